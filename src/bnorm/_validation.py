"""The few checks that every public entry point shares.

Every message names the argument, what was expected and what came, so a user
can fix the call without reading the source.  Checks never mutate anything: an
entry point runs all of them before it touches a buffer or a counter.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import sys
import warnings
from typing import Any

import numpy as np

__all__ = [
    "as_array",
    "as_float_input",
    "check_float_dtype",
    "check_bool",
    "check_call",
    "channels_last_hint",
    "warn_caller",
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


def check_bool(value: Any, name: str) -> bool:
    """A flag (`training`, `affine`, ...): a real bool or ``np.bool_``, never a truthy stand-in.

    ``training="False"`` is a non-empty string, so ``bool()`` of it is True: a
    flag that accepted it would train when the caller asked not to.
    """
    if not isinstance(value, (bool, np.bool_)):
        hint = ""
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            hint = f" (write {value.strip().capitalize()} without quotes)"
        elif isinstance(value, (int, np.integer)) and value in (0, 1):
            hint = f" (write {bool(value)})"
        shown = f" {value!r}" if isinstance(value, (str, int, float, np.generic, type(None))) else ""
        raise TypeError(f"{name} must be a bool, got {describe(value)}{shown}{hint}")
    return bool(value)


def channels_last_hint(shape: tuple[int, ...], num_channels: int, axis: int) -> str:
    """A suggestion to append to a channel-count error, or "".

    When the channels are not on `axis` but the input's last axis has exactly
    `num_channels` entries, the input is most likely channels-last (NHWC, as
    Keras and TensorFlow lay images out): say so and how to pass it.
    """
    ndim = len(shape)
    if ndim < 2 or axis in (-1, ndim - 1) or shape[-1] != num_channels:
        return ""
    order = (0, ndim - 1, *range(1, ndim - 1))
    return (
        f"; its last axis has {num_channels} entries, so it looks channels-last: pass axis=-1 "
        f"(channels-last) or transpose it to channels-first with x.transpose{order}"
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_caller(message: str, category: type[Warning]) -> None:
    """Warn with the location of the first frame outside bnorm (the user's line).

    A fixed ``stacklevel`` would point into bnorm whenever a subclass or a
    wrapper adds a frame; the warnings module's per-location "once" then keys on
    the user's line, so one mistaken line warns once however often it runs.
    """
    level = 2  # 1 is this function; 2 its caller, the frame below
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _keyword_names(sig: inspect.Signature) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in sig.parameters.items() if p.kind in kinds and n != "self"]


def check_call(name: str, sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise Python's own TypeError for a bad call of `name`, with the closest keyword.

    `sig` is the signature without ``self``.  ``BatchNorm2d(3, momentun=0.1)``
    raises ``BatchNorm2d() got an unexpected keyword argument 'momentun'; did
    you mean 'momentum'?`` -- naming the class the user typed (not a base
    class's ``__init__``), from the user's call rather than from inside
    :mod:`inspect`.
    """
    params = sig.parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keywords = _keyword_names(sig)
    if not accepts_any:
        for key in kwargs:
            if key not in keywords:
                close = difflib.get_close_matches(key, keywords, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f" (valid: {', '.join(keywords)})"
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}{hint}")
    positional = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(positional) and not any(p.kind is p.VAR_POSITIONAL for p in params.values()):
        raise TypeError(
            f"{name}() takes {len(positional)} positional arguments ({', '.join(positional)}) but "
            f"{len(args)} were given; pass the others by keyword"
        )
    for n in positional[: len(args)]:
        if n in kwargs:
            raise TypeError(f"{name}() got multiple values for argument {n!r}")
    given = set(positional[: len(args)]) | set(kwargs)
    for n, p in params.items():
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in given:
            raise TypeError(f"{name}() missing required argument {n!r}")


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


def as_array(x: Any, name: str = "input") -> np.ndarray:
    """`x` as an ndarray, refusing what :func:`numpy.asarray` would get silently wrong.

    A masked array is refused (TypeError): ``np.asarray`` drops its mask, so the
    masked values would be normalized and would enter the statistics.  bnorm
    does not honour masks -- statistics over a ragged set of positions are a
    different operation -- so the message says how to pass the data.  A ragged
    nested sequence is a ValueError naming `name`.
    """
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array; bnorm does not honour masks (the masked values would be "
            f"normalized and enter the statistics): pass {name}.filled(value) to choose the masked "
            f"entries' value, or drop them first ({name}.compressed() for 1-D data, or select the "
            "unmasked rows)"
        )
    try:
        return np.asarray(x)
    except ValueError as err:
        if "inhomogeneous" not in str(err) and "sequence" not in str(err):
            raise
        raise ValueError(
            f"{name} must be a rectangular array, got a ragged nested sequence (rows of different "
            "lengths); pad the rows to one length or pass a NumPy array"
        ) from err


def check_float_dtype(dtype: Any, name: str = "dtype") -> np.dtype[Any]:
    """A parameter/buffer dtype: a NumPy floating dtype (float16, float32, float64, ...)."""
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(
            f"{name} must be a floating dtype such as np.float32 or 'float64', got {dtype!r} ({err})"
        ) from err
    if dt.kind != "f":
        raise TypeError(f"{name} must be a floating dtype, got {dt}")
    return dt


def as_float_input(x: Any, name: str = "input") -> np.ndarray:
    """Return `x` as a floating ndarray, promoting integers and bools to float64.

    Floating arrays come back as they are (no copy).  Integer and boolean input is
    promoted to float64, as NumPy's reductions promote it; complex, object,
    string and other dtypes raise TypeError, because batch statistics of them are
    not defined.
    """
    arr = as_array(x, name)
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


def check_channel_vector(
    value: Any, name: str, num_channels: int, axis: int, input_shape: tuple[int, ...] = ()
) -> np.ndarray | None:
    """A per-channel parameter (weight, bias, or a running buffer read in eval).

    With `input_shape`, a length that fits the input's last axis suggests ``axis=-1``.
    """
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real floating array, got dtype {arr.dtype}")
    if arr.shape != (num_channels,):
        raise ValueError(
            f"{name} must have shape ({num_channels},) to match input.shape[{axis}], got {arr.shape}"
            + _length_hint(arr.shape, input_shape, axis)
        )
    return arr


def _length_hint(vector_shape: tuple[int, ...], input_shape: tuple[int, ...], axis: int) -> str:
    return channels_last_hint(input_shape, vector_shape[0], axis) if len(vector_shape) == 1 else ""


def check_buffer(
    value: Any, name: str, num_channels: int, axis: int, input_shape: tuple[int, ...] = ()
) -> np.ndarray:
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
            + _length_hint(value.shape, input_shape, axis)
        )
    if not value.flags.writeable:
        raise ValueError(f"{name} must be writeable to be updated in place")
    return value
