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

Shapes: input ``(N, *rest)`` with the channel axis in `rest`; the work runs
on the grouped view ``(G, v, *rest)`` (contiguous) or ``(v, G, *rest)``
(strided) of the input, with per-(virtual batch, channel) float64 vectors in
keepdims form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._conventions import RunningAverage
from .._running import check_policy, stage_running_update
from .._validation import check_buffer, check_channel_vector, check_eps, shape_text
from ._common import check_grad_output

__all__ = ["GhostContext", "SPLITS", "ghost_forward", "ghost_backward", "check_split"]

SPLITS = ("contiguous", "strided")


@dataclass(frozen=True)
class GhostContext:
    """What :func:`ghost_backward` needs: the input (a reference) and per-(virtual batch, channel) vectors.

    `mean` and `invstd` are float64 with keepdims shape in the grouped view
    ``xg`` of the input (``(G, v, *rest)`` contiguous, ``(v, G, *rest)``
    strided), broadcasting against it; `axes` are the reduced axes of that view.
    """

    input: np.ndarray
    grouped_shape: tuple[int, ...]
    axes: tuple[int, ...]
    channel_axis: int
    mean: np.ndarray
    invstd: np.ndarray
    weight: np.ndarray | None
    weight_dtype: np.dtype[Any] | None
    bias_dtype: np.dtype[Any] | None
    count: int
    stats_updated: bool


def check_split(split: Any) -> str:
    if split not in SPLITS:
        raise ValueError(f"virtual_batch_split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    return str(split)


def _grouped(x: np.ndarray, v: int, split: str) -> np.ndarray:
    """The view of `x` with the virtual batches on their own axis (0 contiguous, 1 strided)."""
    groups = x.shape[0] // v
    lead = (groups, v) if split == "contiguous" else (v, groups)
    return x.reshape(*lead, *x.shape[1:])


def _accumulation(ct: Any, m: int) -> Any:
    """The dtype the per-virtual-batch sums accumulate in.

    float32 sums of at most 8192 values (batch norm's "compute" accumulation:
    relative errors around 1e-7, under the float32 rounding of the output) and
    float64 beyond.  float64 accumulation of float32 input cost 20-30% of the
    whole step at (16384, 64) with virtual batches of 128, where the textbook
    NumPy this replaces sums in float32.
    """
    return ct if m <= 8192 else np.float64


def _sums(a: np.ndarray, b: np.ndarray | None, keep: tuple[int, ...], acc: Any) -> np.ndarray:
    """``sum(a)`` or ``sum(a * b)`` over every axis but `keep`, in keepdims form, as float64.

    With compute-dtype accumulation this is one ``np.einsum`` (no temporary for
    the product; 3-5x faster than ``np.sum(a * b, axis=...)`` on (128, 128,
    64) float32); float64 accumulation of float32 goes through ``np.sum``.
    """
    if acc == a.dtype:
        letters = "abcdefghijklmnopqrstuvwxyz"[: a.ndim]
        out = "".join(letters[i] for i in keep)
        spec = f"{letters},{letters}->{out}" if b is not None else f"{letters}->{out}"
        r = np.einsum(spec, a, b) if b is not None else np.einsum(spec, a)
    else:
        prod = a if b is None else a * b
        r = np.sum(prod, axis=tuple(i for i in range(a.ndim) if i not in keep), dtype=acc)
    shape = [a.shape[i] if i in keep else 1 for i in range(a.ndim)]
    return np.asarray(r, dtype=np.float64).reshape(shape)


def _vector(a: np.ndarray, ax: int) -> np.ndarray:
    """A keepdims per-(group, channel) array as (G, C)."""
    return np.moveaxis(a, ax, -1).reshape(-1, a.shape[ax])


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

    The whole batch is one vectorized NumPy pass over the grouped view (not a
    loop of batch-norm calls: with 128 virtual batches of 128 x 64 values the
    loop cost 3.5x the textbook NumPy, its per-call overhead dominating).
    Sums accumulate as :func:`_accumulation` says; the variance is the mean of
    the centred squares (two passes, no cancellation); float16 is computed in
    float32.
    """
    n, c = x.shape[0], x.shape[ax]
    v = virtual_batch_size
    if n % v:
        raise ValueError(
            f"virtual_batch_size={v} must divide the batch size, got input of shape {shape_text(x.shape)} "
            f"(batch size {n}); use batches whose size is a multiple of {v}, "
            "or drop the incomplete last batch"
        )
    m = v * (x.size // (n * c)) if n and c else 0
    if n and m == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got virtual batches of "
            f"{v} sample(s) of input size {shape_text(x.shape)}: use a larger virtual_batch_size"
        )
    eps_f = check_eps(eps, training=True)
    w = check_channel_vector(weight, "weight", c, ax)
    b = check_channel_vector(bias, "bias", c, ax)
    rm = None if running_mean is None else check_buffer(running_mean, "running_mean", c, ax)
    rv = None if running_var is None else check_buffer(running_var, "running_var", c, ax)
    ct = np.float32 if x.dtype == np.float16 else x.dtype
    xg = _grouped(x, v, split).astype(ct, copy=False)
    group_axis, cax = (0 if split == "contiguous" else 1), ax + 1
    axes = tuple(i for i in range(xg.ndim) if i not in (group_axis, cax))
    pshape = [1] * xg.ndim
    pshape[cax] = c
    gamma = None if w is None else w.astype(np.float64)
    if n == 0:
        mean = invstd = np.zeros([xg.shape[i] if i in (group_axis, cax) else 1 for i in range(xg.ndim)])
        y = np.empty(x.shape, dtype=x.dtype)
        ctx = GhostContext(
            x,
            xg.shape,
            axes,
            cax,
            mean,
            invstd,
            gamma,
            None if w is None else w.dtype,
            None if b is None else b.dtype,
            0,
            False,
        )
        return y, ctx
    acc = _accumulation(ct, m)
    keep = (group_axis, cax)
    mean = _sums(xg, None, keep, acc) / m  # (G, C) in keepdims form
    d = xg - mean.astype(ct)  # centred, in the compute dtype (exact where it matters: Sterbenz)
    # the centre in the compute dtype differs from the float64 mean by < 1 ulp; fold it back
    shift = mean - mean.astype(ct).astype(np.float64)
    var = np.maximum(_sums(d, d, keep, acc) / m - shift**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        invstd = 1.0 / np.sqrt(var + eps_f)
    alpha = invstd if gamma is None else invstd * gamma.reshape(pshape)
    beta = 0.0 if b is None else b.astype(np.float64).reshape(pshape)
    # y = (x - mean) * alpha + beta = d * alpha + (beta - shift * alpha), written into d
    with np.errstate(invalid="ignore", over="ignore"):
        np.multiply(d, alpha.astype(ct), out=d)
        d += (beta - shift * alpha).astype(ct)
    y = d.reshape(x.shape).astype(x.dtype, copy=False)
    updated = False
    if training and (rm is not None or rv is not None):
        mean_bar = _vector(mean, cax).mean(axis=0)
        var_bar = _vector(var, cax).mean(axis=0)
        batch_var = var_bar * (m / (m - 1)) if unbiased_running_var else var_bar
        updates = []
        if rm is not None:
            updates.append(("running_mean", rm, running.blend(rm, mean_bar, num_batches_tracked)))
        if rv is not None:
            updates.append(("running_var", rv, running.blend(rv, batch_var, num_batches_tracked)))
        # the shared non-finite policy, checked after the cast to the buffers' dtype
        staged = stage_running_update(updates, check_policy(on_nonfinite), stacklevel=5)
        for buffer, value in staged or ():
            buffer[...] = value
        updated = staged is not None
    ctx = GhostContext(
        input=x,
        grouped_shape=xg.shape,
        axes=axes,
        channel_axis=cax,
        mean=mean,
        invstd=invstd,
        weight=gamma,
        weight_dtype=None if w is None else w.dtype,
        bias_dtype=None if b is None else b.dtype,
        count=n,
        stats_updated=updated,
    )
    return y, ctx


def ghost_backward(
    grad_output: Any, ctx: GhostContext
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Batch norm's training backward per virtual batch; parameter gradients summed over them.

    With ``m`` values per (virtual batch, channel) and ``x_hat = (x - mean) * invstd``::

        dbeta  = sum over everything but the channel of g
        dgamma = sum over everything but the channel of g * x_hat
        dx     = gamma * invstd / m * (m * g - sum_vb(g) - x_hat * sum_vb(g * x_hat))

    where ``sum_vb`` sums within each virtual batch.
    """
    x = ctx.input
    g = check_grad_output(grad_output, x)
    ct = np.float32 if x.dtype == np.float16 else x.dtype
    xg = x.reshape(ctx.grouped_shape).astype(ct, copy=False)
    gg = g.reshape(ctx.grouped_shape).astype(ct, copy=False)
    m = int(np.prod([xg.shape[i] for i in ctx.axes]))
    pshape = [1] * xg.ndim
    pshape[ctx.channel_axis] = -1
    k = ctx.invstd if ctx.weight is None else ctx.invstd * ctx.weight.reshape(pshape)  # gamma * invstd
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        x_hat = (xg - ctx.mean.astype(ct)) * ctx.invstd.astype(ct)
        acc = _accumulation(ct, m)
        keep = tuple(i for i in range(xg.ndim) if i not in ctx.axes)
        sum_g = _sums(gg, None, keep, acc)
        sum_gx = _sums(gg, x_hat, keep, acc)
        # dx = k * g - k * sum_g / m - x_hat * (k * sum_gx / m): two temporaries, as the textbook
        dxg = gg * k.astype(ct)
        dxg -= (k * sum_g / m).astype(ct)
        x_hat *= (k * sum_gx / m).astype(ct)
        dxg -= x_hat
    dx = dxg.reshape(x.shape).astype(x.dtype, copy=False)
    others = tuple(i for i in range(xg.ndim) if i != ctx.channel_axis)
    gw = None if ctx.weight_dtype is None else np.sum(sum_gx, axis=others).astype(ctx.weight_dtype)
    gb = None if ctx.bias_dtype is None else np.sum(sum_g, axis=others).astype(ctx.bias_dtype)
    return dx, gw, gb
