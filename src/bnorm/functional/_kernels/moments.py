r"""Per-channel moments: :class:`Moments`, their Chan merge, and the shifted sums.

Contract
--------
Every normalization reduces a 3-D view ``x3`` of shape ``(A, K, B)`` over axes
0 and 2, once per index ``k`` of axis 1 (:func:`channel_view` makes the view,
without a copy for C-contiguous input):

=================  ===========================  =====================
op                 input                        view (A, K, B)
=================  ===========================  =====================
batch norm         (N, C, *S), channel axis 1    (N, C, prod(S))
batch norm         (N, *S, C), channel axis -1   (N * prod(S), C, 1)
layer norm         (*B, *F)                      (1, prod(B), prod(F))
group norm         (N, C, *S), G groups          (1, N * G, C / G * prod(S))
instance norm      (N, C, *S)                    (1, N * C, prod(S))
=================  ===========================  =====================

Statistics are :class:`Moments` ``(count, mean, m2)`` -- count, mean and sum of
squared deviations, float64 vectors of length K -- because that triple merges
exactly (Chan, Golub & LeVeque 1979) across batches, blocks, processes and
streams (:func:`merge_moments`).

:func:`channel_moments` and :func:`backward_sums` decide *which* sums to take;
the tiled sums themselves (:func:`~bnorm.functional._kernels.channel.tiled_sums`)
live with the other per-channel passes.

Numerics
--------
* Shifted sums.  The one-pass sums ``sum(x)``, ``sum(x**2)`` are used only
  where they cannot cancel: when every channel's ``mean**2 <= 4 * var``.
  Otherwise (data offset from zero, e.g. by 1e4) a second pass sums
  ``d = x - c`` and ``d**2`` with the shift ``c`` the first pass's mean in the
  accumulation dtype: ``x - c`` is exact (Sterbenz), the sums no longer
  cancel, and ``mean = c + sum(d) / n``, ``m2 = sum(d**2) - sum(d)**2 / n``,
  clipped at 0.  The backward sum ``sum(g * (x - mean))`` is shifted by the
  forward's mean directly: one pass (the mean is known).
* Within a row or a group of rows the sums accumulate in float64
  (``accumulate="float64"``, the default: float32 tiles are converted first)
  or in the compute dtype (``accumulate="compute"``, batch norm's choice: two
  to three times faster, relative errors of the variance around 1e-7, under
  the float32 rounding of anything normalized with it); across rows, tiles and
  threads always in float64, in an order fixed by the shape.
* Non-finite sums (NaN or inf input, or float32 overflow of finite input) fall
  back to the exact float64 two-pass evaluation (:func:`_exact_moments`), so
  such input behaves exactly as it always did.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..._validation import compute_dtype
from .channel import col, tiled_sums

__all__ = [
    "BLOCK_ELEMENTS",
    "Accumulate",
    "Moments",
    "backward_sums",
    "channel_moments",
    "channel_view",
    "iter_blocks",
    "merge_moments",
]

#: Target number of elements of one block's temporary (about 1 MiB in float64).
BLOCK_ELEMENTS = 1 << 17

#: ``mean**2 <= SHIFT_FREE_RATIO * var`` on every channel: one-pass sums are safe.
SHIFT_FREE_RATIO = 4.0

FloatArray = np.ndarray[Any, np.dtype[np.floating[Any]]]


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations per channel (float64 vectors).

    ``var(ddof) = m2 / (count - ddof)``.  Two partial moments merge exactly with
    :func:`merge_moments`, in any order and any split.
    """

    count: int
    mean: FloatArray
    m2: FloatArray

    def var(self, ddof: int = 0) -> FloatArray:
        """The variance per channel; NaN where ``count <= ddof``."""
        denom = self.count - ddof
        if denom <= 0:
            return np.full_like(self.m2, np.nan)
        return self.m2 / denom

    @classmethod
    def empty(cls, num_channels: int) -> Moments:
        z = np.zeros(num_channels, dtype=np.float64)
        return cls(0, z, z.copy())


def merge_moments(a: Moments, b: Moments) -> Moments:
    r"""Merge two partial moments (Chan, Golub & LeVeque).

    .. math::
        n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad
        \bar x = \bar x_a + \delta \frac{n_b}{n},\quad
        M_2 = M_{2,a} + M_{2,b} + \delta^2 \frac{n_a n_b}{n}

    Empty partials are skipped, so a rank or batch with no samples changes nothing.
    """
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n)
    return Moments(n, mean, m2)


def channel_view(x: np.ndarray, axis: int) -> np.ndarray:
    """The ``(A, K, B)`` view of `x` with the channel axis `axis` in the middle.

    A view for C-contiguous input; other layouts are copied once by ``reshape``.
    """
    shape = x.shape
    a = math.prod(shape[:axis])
    b = math.prod(shape[axis + 1 :])
    return x.reshape(a, shape[axis], b)


def iter_blocks(
    shape3: tuple[int, int, int], elements: int = BLOCK_ELEMENTS
) -> Iterator[tuple[slice, slice]]:
    """Slices ``(rows of A, channels of K)`` covering the view in blocks of about `elements`.

    Blocks run over whole rows of A where a row is small enough, else over
    channels within one row, so each block's temporary stays cache-sized.
    """
    a, k, b = shape3
    row = k * b
    if row == 0 or a == 0:
        return
    if row <= elements:
        step = max(1, elements // row)
        for start in range(0, a, step):
            yield slice(start, min(a, start + step)), slice(0, k)
    else:
        kstep = max(1, elements // max(b, 1))
        for i in range(a):
            for start in range(0, k, kstep):
                yield slice(i, i + 1), slice(start, min(k, start + kstep))


def _needs_shift(mean: np.ndarray, var: np.ndarray) -> bool:
    """Whether one-pass sums around 0 could cancel on some channel."""
    with np.errstate(invalid="ignore", over="ignore"):
        return not bool(np.all(mean * mean <= SHIFT_FREE_RATIO * var))


def _exact_moments(x3: np.ndarray) -> Moments:
    """Two-pass moments accumulated in float64 (the reference evaluation)."""
    a, k, b = x3.shape
    count = a * b
    total = np.zeros(k, dtype=np.float64)
    for rows, chans in iter_blocks(x3.shape):
        total[chans] += np.add.reduce(x3[rows, chans], axis=(0, 2), dtype=np.float64)
    mean = total / count
    m2 = np.zeros(k, dtype=np.float64)
    # inf - inf is NaN: non-finite statistics are reported by the caller's policy.
    with np.errstate(invalid="ignore", over="ignore"):
        for rows, chans in iter_blocks(x3.shape):
            d = x3[rows, chans].astype(np.float64)
            d -= col(mean[chans])
            m2[chans] += np.einsum("akb,akb->k", d, d)
    return Moments(count, mean, m2)


Accumulate = Literal["float64", "compute"]


def _accumulation_dtype(dtype: np.dtype[Any], accumulate: Accumulate) -> np.dtype[Any]:
    if accumulate == "float64":
        return np.dtype(np.float64)
    if accumulate == "compute":
        return compute_dtype(np.dtype(dtype))
    raise ValueError(f"accumulate must be 'float64' or 'compute', got {accumulate!r}")


def channel_moments(x3: np.ndarray, *, accumulate: Accumulate = "float64") -> Moments:
    """Count, mean and M2 per channel of an ``(A, K, B)`` view (float64 results).

    One pass of BLAS sums where that is exact enough (``mean**2 <= 4 var`` on
    every channel), else a second pass shifted by the first pass's mean; the
    exact float64 two-pass evaluation where the sums are not finite.

    `accumulate` says what the BLAS sums within a row (at most 8192 values, or
    32 rows) accumulate in: 'float64' (default; float32 and float16 tiles are
    converted first) gives the moments to float64 rounding; 'compute' sums
    float32 data in float32 -- two to three times faster, with relative errors
    of the variance around 1e-7, under the float32 rounding of anything
    normalized with it (batch norm's choice; the sums across rows and tiles
    are float64 either way).
    """
    a, k, b = x3.shape
    count = a * b
    ct = _accumulation_dtype(x3.dtype, accumulate)
    if count == 0:
        return Moments.empty(k)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        s1, s2 = tiled_sums(x3, None, None, ct)
        mean = s1 / count
        m2 = s2 - s1 * mean
        if np.isfinite(m2).all() and not _needs_shift(mean, m2 / count):
            return Moments(count, mean, np.maximum(m2, 0.0))
        if np.isfinite(mean).all():
            c = mean.astype(ct)
            s1, s2 = tiled_sums(x3, None, c, ct)
            dmean = s1 / count
            m2 = s2 - s1 * dmean
            if np.isfinite(m2).all():
                return Moments(count, c.astype(np.float64) + dmean, np.maximum(m2, 0.0))
    return _exact_moments(x3)


def backward_sums(
    g3: np.ndarray,
    x3: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray | None = None,
    *,
    accumulate: Accumulate = "float64",
) -> tuple[FloatArray, FloatArray]:
    """``(sum(g), sum(g * (x - mean)))`` per channel, float64 results.

    With `invstd` (``1 / sqrt(var + eps)`` of the forward) and
    ``|mean| * invstd <= 2`` on every channel, ``sum(g * x) - mean * sum(g)``
    in one pass of BLAS dot products; otherwise ``x`` is shifted by `mean`
    inside each tile first.  Non-finite sums fall back to the exact float64
    evaluation.  `accumulate` as in :func:`channel_moments`.
    """
    k = x3.shape[1]
    ct = _accumulation_dtype(np.result_type(x3.dtype, g3.dtype), accumulate)
    if x3.size == 0:
        return np.zeros(k), np.zeros(k)
    mean = np.asarray(mean, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if invstd is not None and np.isfinite(mean).all() and not _needs_shift(mean * invstd, np.ones(k)):
            sum_g, sum_gx = tiled_sums(x3, g3, None, ct)
            sum_gx = sum_gx - mean * sum_g
        elif np.isfinite(mean).all():
            c = mean.astype(ct)
            sum_g, sum_gd = tiled_sums(x3, g3, c, ct)
            sum_gx = sum_gd + (c.astype(np.float64) - mean) * sum_g
        else:
            sum_g = sum_gx = np.full(k, np.nan)
    if np.isfinite(sum_g).all() and np.isfinite(sum_gx).all():
        return sum_g, sum_gx
    return _exact_backward_sums(g3, x3, mean)


def _exact_backward_sums(g3: np.ndarray, x3: np.ndarray, mean: np.ndarray) -> tuple[FloatArray, FloatArray]:
    k = x3.shape[1]
    sum_g = np.zeros(k, dtype=np.float64)
    sum_gx = np.zeros(k, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for rows, chans in iter_blocks(x3.shape):
            g = g3[rows, chans].astype(np.float64)
            d = x3[rows, chans].astype(np.float64)
            d -= col(mean[chans])
            sum_g[chans] += g.sum(axis=(0, 2))
            sum_gx[chans] += np.einsum("akb,akb->k", g, d)
    return sum_g, sum_gx
