"""Batch norm's training pass in two steps: the batch statistics, then the normalization with them.

Batch renormalization needs the batch statistics *before* normalizing (r and d
depend on them), then normalizes exactly as batch norm's training pass does.
:func:`batch_moments` returns the per-channel mean and biased variance
(float64, shapes (C,)) of a ``(N, C, *S)`` input with channel axis `ax`;
:func:`normalize_with` runs batch norm's single affine pass with them and
returns a :class:`BatchNormContext` marked as batch statistics, so
:func:`batch_norm_backward` differentiates through the mean and variance.
Nothing here touches running buffers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from .._validation import shape_text
from ._kernels.moments import channel_moments, channel_view
from .batch_norm import BatchNormContext, batch_norm_forward

__all__ = ["batch_moments", "normalize_with"]


def batch_moments(x: np.ndarray, ax: int, what: str = "input size") -> tuple[np.ndarray, np.ndarray, int]:
    """``(mean, var_biased, n)`` per channel of float array `x`; one value per channel is an error."""
    x3 = channel_view(x, ax)
    # batch norm's accumulation (float32 sums within rows, float64 across): same numbers, same speed
    moments = channel_moments(x3, accumulate="compute")
    n = moments.count
    if n == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {what} {shape_text(x.shape)}"
        )
    var = moments.var(ddof=0) if n > 0 else np.zeros(x3.shape[1])
    return moments.mean, var, n


def normalize_with(
    x: np.ndarray,
    ax: int,
    mean: np.ndarray,
    var: np.ndarray,
    n: int,
    weight: Any,
    bias: Any,
    eps: float,
    out: Any = None,
) -> tuple[np.ndarray, BatchNormContext]:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` and a batch-statistics context for backward.

    Batch norm's evaluation pass with the batch statistics in place of the
    running ones is exactly its training pass without a second moments pass.
    """
    y, ctx = batch_norm_forward(x, mean, var, weight, bias, False, eps=eps, axis=ax, out=out)
    return y, replace(ctx, batch_stats=True, count=n)
