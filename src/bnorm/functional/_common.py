"""Plumbing every functional kernel shares: output buffers and the start and end of backward."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validation import as_float_input, describe
from ._kernels.buffers import empty_output

__all__ = ["check_out", "overlaps", "check_grad_output", "start_backward", "param_grads"]

# Bound on np.shares_memory's exact search; beyond it an overlap is assumed (refusing
# is the safe answer).  A C-contiguous `out` against any view is decided in a few steps.
_OVERLAP_MAX_WORK = 100_000


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `a` and `b` share any element of memory (exactly, or conservatively if too hard)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=_OVERLAP_MAX_WORK))  # type: ignore[arg-type]
    except np.exceptions.TooHardError:
        return True


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype[Any], name: str = "out") -> np.ndarray:
    """`out` if it is a writeable C-contiguous array of `shape` and `dtype`, else raise."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {describe(out)}")
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(
            f"{name} must have shape {shape} and dtype {dtype}, got shape {out.shape} and dtype {out.dtype}"
        )
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{name} must be a writeable C-contiguous array")
    return out


def check_grad_output(grad_output: object, x: np.ndarray) -> np.ndarray:
    """`grad_output` as a float array of the forward input's shape."""
    g = as_float_input(grad_output, "grad_output")
    if g.shape != x.shape:
        raise ValueError(f"grad_output must have the input's shape {x.shape}, got {g.shape}")
    return g


def start_backward(
    grad_output: object, ctx: Any, cls: type[Any], forward: str, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check `ctx` (an instance of `cls` from `forward`) and `grad_output`; return ``(x, g, dx)``.

    `dx` is `out` (checked) or a new, uninitialized array of the input's shape and dtype
    (:func:`~bnorm.functional._kernels.buffers.empty_output`).
    """
    if not isinstance(ctx, cls):
        raise TypeError(f"ctx must be the {cls.__name__} returned by {forward}, got {describe(ctx)}")
    x: np.ndarray = ctx.input
    g = check_grad_output(grad_output, x)
    if out is None:
        return x, g, empty_output(x.shape, x.dtype)  # a dropped output's memory, if any
    dx = check_out(out, x.shape, x.dtype)
    # The forward's input is read by this backward and by any later one on the same
    # ctx: writing grad_input over it would make a second backward silently wrong.
    if overlaps(dx, x):
        raise ValueError(
            "out overlaps the forward input saved in ctx (e.g. out=x): backward would overwrite "
            "the input that this and any later backward read; pass a separate array, or "
            "out=grad_output to reuse the gradient's memory"
        )
    # out=grad_output itself is fine (each element is read before it is written);
    # a shifted view of it is not.
    if overlaps(dx, g) and not (dx.ctypes.data == g.ctypes.data and dx.strides == g.strides):
        raise ValueError(
            "out partially overlaps grad_output: pass out=grad_output itself or a separate array"
        )
    return x, g, dx


def param_grads(
    dgamma: np.ndarray,
    dbeta: np.ndarray,
    weight_dtype: Any,
    bias_dtype: Any,
    shape: tuple[int, ...] | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """grad_weight and grad_bias in the parameters' dtypes (None where there was no parameter)."""
    gw = None if weight_dtype is None else dgamma.reshape(shape or dgamma.shape).astype(weight_dtype)
    gb = None if bias_dtype is None else dbeta.reshape(shape or dbeta.shape).astype(bias_dtype)
    return gw, gb
