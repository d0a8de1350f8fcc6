"""The few checks that every public entry point shares.

Every message names the argument, what was expected and what came, so a user
can fix the call without reading the source.  Checks never mutate anything: an
entry point runs all of them before it touches a buffer or a counter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "as_float_input",
    "check_positive_int",
    "shape_text",
    "check_fraction",
    "check_eps",
    "normalize_axis",
    "check_channel_vector",
    "check_buffer",
    "compute_dtype",
    "describe",
]


def describe(value: Any) -> str:
    """A short description of `value` for error messages."""
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    return type(value).__name__


def check_positive_int(value: Any, name: str) -> int:
    """A count such as num_features or num_groups: an int (not a bool) > 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {describe(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def shape_text(shape: tuple[int, ...]) -> str:
    """A shape as PyTorch's messages print it without ``torch.Size``: ``(1, 3)``."""
    return "(" + ", ".join(str(s) for s in shape) + ")"


def as_float_input(x: Any, name: str = "input") -> np.ndarray:
    """Return `x` as a floating ndarray, promoting integers and bools to float64.

    Floating arrays come back as they are (no copy).  Integer and boolean input is
    promoted to float64, as NumPy's reductions promote it; complex, object,
    string and other dtypes raise TypeError, because batch statistics of them are
    not defined.
    """
    arr = np.asarray(x)
    kind = arr.dtype.kind
    if kind == "f":
        return arr
    if kind in "iub":
        return arr.astype(np.float64)
    raise TypeError(f"{name} must have a real floating, integer or bool dtype, got dtype {arr.dtype}")


def compute_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype elementwise passes run in: float16 is computed in float32 (as PyTorch)."""
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype


def check_fraction(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    """A momentum or decay: a real number in [0, 1] (None only where allowed)."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number in [0, 1], got None")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1], got {describe(value)}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def check_eps(eps: Any, *, training: bool) -> float:
    """Eps must be a finite number >= 0, and > 0 wherever batch statistics are used."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"eps must be a positive number, got {describe(eps)}")
    v = float(eps)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if training and v == 0:
        raise ValueError(
            "eps must be > 0 when batch statistics are used (training), got 0: "
            "a channel with zero variance would divide by zero"
        )
    return v


def normalize_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """The channel axis as a non-negative index into an `ndim`-dimensional input."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {describe(axis)}")
    a = int(axis)
    if not -ndim <= a < ndim:
        raise ValueError(f"{name}={a} is out of range for {ndim}D input (valid: {-ndim} to {ndim - 1})")
    return a % ndim


def check_channel_vector(value: Any, name: str, num_channels: int, axis: int) -> np.ndarray | None:
    """A per-channel parameter (weight, bias, or a running buffer read in eval)."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real floating array, got dtype {arr.dtype}")
    if arr.shape != (num_channels,):
        raise ValueError(
            f"{name} must have shape ({num_channels},) to match input.shape[{axis}], got {arr.shape}"
        )
    return arr


def check_buffer(value: Any, name: str, num_channels: int, axis: int) -> np.ndarray:
    """A running buffer that training updates in place: a writable floating ndarray."""
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{name} must be a NumPy array of shape ({num_channels},) so it can be "
            f"updated in place, got {describe(value)}"
        )
    if value.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype to be updated in place, got {value.dtype}")
    if value.shape != (num_channels,):
        raise ValueError(
            f"{name} must have shape ({num_channels},) to match input.shape[{axis}], got {value.shape}"
        )
    if not value.flags.writeable:
        raise ValueError(f"{name} must be writeable to be updated in place")
    return value
