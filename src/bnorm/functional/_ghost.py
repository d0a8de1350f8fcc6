r"""Ghost (virtual) batch norm: each sub-batch of a batch normalized with its own statistics.

Hoffer et al. (2017): a batch of N samples (axis 0) is split into
``G = N / v`` virtual batches of ``v = virtual_batch_size`` samples; each is
batch-normalized with its own mean and biased variance, and all share gamma
and beta.  Two splits are in use:

* ``"contiguous"``: virtual batch j is samples ``j*v ... (j+1)*v - 1``
  (TabNet's GBN and PyTorch ports: ``x.chunk(G)``);
* ``"strided"``: virtual batch j is samples ``j, j + G, j + 2G, ...``
  (tf.keras: it reshapes the batch to ``(v, G, ...)`` and reduces over the
  first axis).

The running statistics absorb, once per step, the average over the virtual
batches of their means and of their variances (tf.keras's update):

.. math::
    \bar\mu = \frac1G \sum_j \mu_j, \qquad
    \bar\sigma^2 = \frac1G \sum_j \sigma_j^2

with :math:`\sigma_j^2` biased, or unbiased over the ``m = v * prod(S)``
values of a virtual batch (``m / (m - 1)``) when `unbiased_running_var`.
:math:`\bar\mu` is the whole batch's mean; :math:`\bar\sigma^2` is the
within-batch part of its variance.  Backward is batch norm's backward per
virtual batch; gamma's and beta's gradients are the sums over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._conventions import RunningAverage
from .._validation import check_buffer, check_channel_vector, check_eps, shape_text
from ._batch_pass import absorbs, batch_moments, normalize_with
from ._common import check_grad_output
from .batch_norm import BatchNormContext, batch_norm_backward

__all__ = ["GhostContext", "SPLITS", "ghost_forward", "ghost_backward", "check_split"]

SPLITS = ("contiguous", "strided")


@dataclass(frozen=True)
class GhostContext:
    """Per-virtual-batch batch-norm contexts and where each virtual batch sits in the batch."""

    parts: tuple[BatchNormContext, ...]
    index: tuple[slice, ...]
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    weight_dtype: np.dtype[Any] | None
    bias_dtype: np.dtype[Any] | None
    stats_updated: bool
    count: int


def check_split(split: Any) -> str:
    if split not in SPLITS:
        raise ValueError(f"virtual_batch_split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    return str(split)


def _index(n: int, v: int, split: str) -> tuple[slice, ...]:
    groups = n // v
    if split == "contiguous":
        return tuple(slice(j * v, (j + 1) * v) for j in range(groups))
    return tuple(slice(j, n, groups) for j in range(groups))


def ghost_forward(
    x: np.ndarray,
    ax: int,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: Any,
    bias: Any,
    training: bool,
    running: RunningAverage,
    eps: float,
    unbiased_running_var: bool,
    on_nonfinite: str,
    virtual_batch_size: int,
    split: str,
    num_batches_tracked: int,
) -> tuple[np.ndarray, GhostContext]:
    """Normalize float array `x` (channel axis `ax` > 0) by virtual batches of axis 0.

    Updates `running_mean` / `running_var` in place when `training` (and they
    are given), after every check has passed.
    """
    n, c = x.shape[0], x.shape[ax]
    v = virtual_batch_size
    if n % v:
        raise ValueError(
            f"virtual_batch_size={v} must divide the batch size, got input of shape {shape_text(x.shape)} "
            f"(batch size {n}); use batches whose size is a multiple of {v}, or drop the incomplete last batch"
        )
    per_channel = v * (x.size // max(n * c, 1)) if n else 0
    if n and per_channel == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got virtual batches of "
            f"{v} sample(s) of input size {shape_text(x.shape)}: use a larger virtual_batch_size"
        )
    eps_f = check_eps(eps, training=True)
    w = check_channel_vector(weight, "weight", c, ax)
    b = check_channel_vector(bias, "bias", c, ax)
    rm = None if running_mean is None else check_buffer(running_mean, "running_mean", c, ax)
    rv = None if running_var is None else check_buffer(running_var, "running_var", c, ax)
    index = _index(n, v, split)
    stats = [batch_moments(x[ix], ax, "virtual batch of size") for ix in index]
    # float64 parameters in the parts, so their gradients add up in float64
    w64 = None if w is None else w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    y = np.empty(x.shape, dtype=x.dtype)
    parts = []
    for ix, (mean, var, m) in zip(index, stats, strict=True):
        if split == "contiguous":  # a C-contiguous slab of y: written in place
            _, ctx = normalize_with(x[ix], ax, mean, var, m, w64, b64, eps_f, out=y[ix])
        else:
            y[ix], ctx = normalize_with(x[ix], ax, mean, var, m, w64, b64, eps_f)
        parts.append(ctx)
    updated = False
    if training and stats and (rm is not None or rv is not None):
        m = stats[0][2]
        mean_bar = np.mean([s[0] for s in stats], axis=0)
        var_bar = np.mean([s[1] for s in stats], axis=0)
        if absorbs(mean_bar, var_bar, on_nonfinite, 4):
            new_rm = None if rm is None else running.update(rm, mean_bar, num_batches_tracked)
            batch_var = var_bar * (m / (m - 1)) if unbiased_running_var else var_bar
            new_rv = None if rv is None else running.update(rv, batch_var, num_batches_tracked)
            if rm is not None and new_rm is not None:
                rm[...] = new_rm
            if rv is not None and new_rv is not None:
                rv[...] = new_rv
            updated = True
    ctx = GhostContext(
        parts=tuple(parts),
        index=index,
        shape=x.shape,
        dtype=x.dtype,
        weight_dtype=None if w is None else w.dtype,
        bias_dtype=None if b is None else b.dtype,
        stats_updated=updated,
        count=n,
    )
    return y, ctx


def ghost_backward(grad_output: Any, ctx: GhostContext) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Batch norm's training backward per virtual batch; parameter gradients summed over them."""
    g = check_grad_output(grad_output, np.empty(ctx.shape, dtype=ctx.dtype))
    dx = np.empty(ctx.shape, dtype=ctx.dtype)
    c = ctx.parts[0].mean.shape[0] if ctx.parts else 0
    dgamma, dbeta = np.zeros(c), np.zeros(c)
    for ix, part in zip(ctx.index, ctx.parts, strict=True):
        dx_j, dw_j, db_j = batch_norm_backward(g[ix], part)
        dx[ix] = dx_j
        if dw_j is not None:
            dgamma += dw_j
        if db_j is not None:
            dbeta += db_j
    gw = None if ctx.weight_dtype is None else dgamma.astype(ctx.weight_dtype)
    gb = None if ctx.bias_dtype is None else dbeta.astype(ctx.bias_dtype)
    return dx, gw, gb
