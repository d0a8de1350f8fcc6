r"""Batch norm on inputs that fit in cache: plain NumPy expressions, no tiles, no threads.

Contract
--------
Every function takes the ``(A, K*B)`` matrix view ``x2`` of a C-contiguous
float32 or float64 input whose channel axis was made the middle axis of
``(A, K, B)`` (:func:`~bnorm.functional._kernels.moments.channel_view`), so
that channel ``k``'s values are ``x2[:, k*B:(k+1)*B]``; per-channel vectors
are float64 of length K.  Outputs go into a given array of ``x2``'s shape and
dtype that does not overlap the inputs (the caller copies an overlapping
input first).  The caller holds ``np.errstate`` for the whole call.

Each op is the textbook formula with the fewest passes over the data:

* training forward (:func:`forward_batch`): ``s = sum(x)``, the shift
  ``c = s / m`` rounded to the compute dtype, ``d = x - c`` (exact for data
  offset from zero: Sterbenz), then ``mean = c + sum(d) / m``,
  ``var = sum(d**2) / m - (sum(d) / m)**2`` -- no cancellation at any offset --
  and ``y = d * alpha + (beta - (mean - c) * alpha)`` with
  ``alpha = gamma * invstd``: five passes, one output, no temporary.
* evaluation forward (:func:`forward_eval`): ``y = x * alpha + (beta - mean *
  alpha)``, or centered first where the mean is large against the spread.
* backward (:func:`backward`): ``d = x - c``
  into the output, ``sum(g)`` and ``sum(g * d)``, then
  ``dx = k * (d * (coef_x / k) + coef_c / k + g)`` -- four in-place operations.

Tiny inputs take the same formulas in float64 instead
(:func:`_tiny_forward_batch`, :func:`_tiny_forward_eval`,
:func:`_tiny_backward`): one cast, a two-pass mean and variance, the output
rounded once.  There every NumPy call costs ~0.5 us whatever its size, and the
float64 form needs no shift, no safety test of the shifted sums and no casts of
the per-channel vectors; its extra casts and memory traffic win only up to a
size that differs per op (:data:`TINY_MAX_ELEMENTS`).  Measured per kernel
call, float32, compute-dtype / float64 form, in us:

===============  ===========  ===========  ===========
shape (values)   training     evaluation   backward
===============  ===========  ===========  ===========
(4, 8) (32)      12.8 / 7.6   7.2 / 4.8    10.9 / 8.7
(32, 32) (1 Ki)  16.6 / 10.2  8.2 / 6.3    13.4 / 12.5
(32, 64) (2 Ki)  17.6 / 12.1  8.7 / 7.6    14.5 / 15.2
(64, 64) (4 Ki)  21.2 / 16.4  9.6 / 10.6   18.0 / 21.5
(32, 256) (8 Ki) 25.0 / 22.8  11.9 / 15.6  22.2 / 31.4
===============  ===========  ===========  ===========

Numerics
--------
In the float64 form the statistics are those of :func:`numpy.mean` and
:func:`numpy.var` on the float64 values (float32 and float16 input: a constant
channel's float64 sum is exact, so its mean is its value and ``x - mean`` is 0;
float64 input: the mean is corrected by the mean of ``x - mean``, as in the
row-wise kernels), and the output is the float64 formula rounded once to the
compute dtype.  In the compute-dtype form, sums run down the A rows in the
compute dtype, in groups of at most :data:`GROUP_ROWS` rows, and in float64
across groups and across a channel's B columns, so no float32 sum accumulates
more than GROUP_ROWS values (relative error ~1e-7 of the variance, as in the
channel kernels).  Where a sum or
coefficient is not finite, or the shift left a channel's mean far from zero
(``mean(d)**2 > 4 var``, the one case where ``sum(d**2)`` could cancel), the
functions return None / False before writing the output and the caller takes
the channel kernels, which own the exact fallbacks.  Per-channel vectors are
broadcast as *planes* (the vector repeated B times) because NumPy's loops
over two contiguous operands run 2-3x faster than a column broadcast over the
inner axis (measured on (16, 32, 256) float32: 12 us vs 42 us for one
subtraction).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["GROUP_ROWS", "TINY_MAX_ELEMENTS", "backward", "center", "forward_batch", "forward_eval"]

#: Rows summed in the compute dtype before the float64 sum: bounds the float32
#: accumulation depth.
GROUP_ROWS = 256

#: ``mean(d)**2 <= SHIFT_FREE_RATIO * var`` on every channel: the shifted sums are safe.
SHIFT_FREE_RATIO = 4.0

#: Inputs of at most this many values are computed in float64, per op (the
#: crossovers of the table in the module's docstring).
TINY_MAX_ELEMENTS = {"train": 1 << 13, "eval": 1 << 11, "backward": 1 << 10}

#: Below this many values a sum of products is a product and a sum (fewer fixed
#: costs than einsum: 1.4 vs 2.0 us on (4, 8)); above, einsum (no temporary).
_EINSUM_MIN = 1 << 13

FloatArray = np.ndarray[Any, np.dtype[np.floating[Any]]]


def _plane(v: np.ndarray, b: int, dtype: np.dtype[Any]) -> np.ndarray:
    """A per-channel vector as a row of the ``(A, K*B)`` matrix, in `dtype`."""
    w = v if v.dtype is dtype or v.dtype == dtype else v.astype(dtype)  # `is`: the cheap common case
    return w if b == 1 else np.repeat(w, b)


def _colsums(z2: np.ndarray, w2: np.ndarray | None, b: int) -> FloatArray:
    """Per-channel float64 ``sum(z)`` (`w2` None) or ``sum(z * w)`` of ``(A, K*B)`` matrices."""
    a, n = z2.shape
    if a <= GROUP_ROWS:
        if w2 is None:
            s = np.add.reduce(z2, axis=0)
        elif z2.size < _EINSUM_MIN:
            s = np.add.reduce(z2 * w2, axis=0)
        else:
            s = np.einsum("ij,ij->j", z2, w2)
    else:
        q = GROUP_ROWS
        whole = a - a % q
        zg = z2[:whole].reshape(-1, q, n)
        if w2 is None:
            s = np.add.reduce(zg, axis=1).sum(axis=0, dtype=np.float64)
            if whole < a:
                s += np.add.reduce(z2[whole:], axis=0)
        else:
            s = np.einsum("gij,gij->gj", zg, w2[:whole].reshape(-1, q, n)).sum(axis=0, dtype=np.float64)
            if whole < a:
                s += np.einsum("ij,ij->j", z2[whole:], w2[whole:])
    total: FloatArray = (
        s.astype(np.float64, copy=False) if b == 1 else s.reshape(-1, b).sum(axis=1, dtype=np.float64)
    )
    return total


def center(x2: np.ndarray, b: int, mean: np.ndarray, d2: np.ndarray) -> FloatArray:
    """``d2 = x2 - c`` with ``c = mean`` in the compute dtype; returns `c` (as float64)."""
    c = mean.astype(x2.dtype)
    np.subtract(x2, _plane(c, b, x2.dtype), out=d2)
    return c.astype(np.float64)


def forward_batch(
    x2: np.ndarray,
    b: int,
    y2: np.ndarray,
    d2: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
) -> tuple[FloatArray, FloatArray, FloatArray] | None:
    """Batch-statistics forward into `y2`; returns ``(mean, var, invstd)`` per channel.

    `d2` (`y2` itself, or a scratch array where `y2` must stay untouched until
    the statistics are known) receives ``d = x - c``.  None, before `y2` is
    written, where a sum is not finite or the shifted sums could cancel.
    """
    if x2.size <= TINY_MAX_ELEMENTS["train"]:
        return _tiny_forward_batch(x2, b, y2, gamma, beta, eps)
    m = x2.shape[0] * b
    ct = x2.dtype
    c = (_colsums(x2, None, b) / m).astype(ct)
    np.subtract(x2, _plane(c, b, ct), out=d2)
    dmean = _colsums(d2, None, b) / m
    var = _colsums(d2, d2, b) / m - dmean * dmean
    t = SHIFT_FREE_RATIO * var - dmean * dmean
    # A sum is finite only if every term is (inf - inf is NaN): NaN and inf fail too.
    if not (np.minimum.reduce(t) >= 0 and math.isfinite(np.add.reduce(t))):
        return None
    invstd = 1.0 / np.sqrt(var + eps)
    alpha = invstd if gamma is None else gamma * invstd
    shift = -dmean * alpha if beta is None else beta - dmean * alpha
    np.multiply(d2, _plane(alpha, b, ct), out=y2)
    np.add(y2, _plane(shift, b, ct), out=y2)
    return c.astype(np.float64) + dmean, var, invstd


def forward_eval(
    x2: np.ndarray,
    b: int,
    y2: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
) -> bool:
    """``y2 = (x - mean) * gamma * invstd + beta`` with given statistics; False if not finite.

    The mean is folded into the shift (``x * alpha + (beta - mean * alpha)``,
    two operations) where ``|mean| <= 2 / invstd`` on every channel, which
    rounds within a few units of the output's own; else `x` is centered first
    (``c`` the mean in the compute dtype, its rounding folded into the shift),
    the channel kernels' rule.  False, with nothing written, where a
    coefficient is not finite: the channel kernels then apply the formula.
    """
    if x2.size <= TINY_MAX_ELEMENTS["eval"]:
        return _tiny_forward_eval(x2, b, y2, mean, invstd, gamma, beta)
    ct = x2.dtype
    alpha = invstd if gamma is None else gamma * invstd
    fold = bool((np.abs(mean) * invstd <= 2.0).all())
    c = np.zeros_like(mean) if fold else mean.astype(ct).astype(np.float64)
    shift = (0.0 if beta is None else beta) - (mean - c) * alpha
    # A dot product is finite only if every term is (0 * inf is NaN): one cheap check.
    if not (np.isfinite(np.dot(alpha, alpha)) and np.isfinite(np.dot(shift, shift))):
        return False
    if fold:
        np.multiply(x2, _plane(alpha, b, ct), out=y2)
    else:
        np.subtract(x2, _plane(c, b, ct), out=y2)
        np.multiply(y2, _plane(alpha, b, ct), out=y2)
    np.add(y2, _plane(shift, b, ct), out=y2)
    return True


def backward(
    g2: np.ndarray,
    x2: np.ndarray,
    b: int,
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray,
    dx2: np.ndarray,
    *,
    batch_stats: bool,
) -> tuple[FloatArray, FloatArray] | None:
    """The input gradient into `dx2`; returns ``(sum(g), sum(g * (x - mean)))`` per channel.

    Both sums come from one pass over ``d = x - c`` (``c`` the mean in the
    compute dtype, written into `dx2` first): ``sum(g * (x - mean)) = sum(g * d)
    - (mean - c) * sum(g)``, no cancellation.  With ``k = gamma * invstd``:

    * running statistics (constants): ``dx = k * g``;
    * batch statistics: ``dx = k * g + (x - mean) * coef_x + coef_c`` with
      ``coef_x = -k * invstd**2 * sum(g * (x - mean)) / m`` and
      ``coef_c = -k * sum(g) / m``, evaluated as ``k * (d * b_k + c_k + g)``
      -- four in-place operations on ``d`` -- where ``b_k``, ``c_k`` are the
      coefficients divided by ``k`` (computed without it, so ``k = 0`` needs no
      special case).  None where a coefficient is not finite (the caller takes
      the channel kernels).
    """
    if x2.size <= TINY_MAX_ELEMENTS["backward"]:
        return _tiny_backward(g2, x2, b, mean, invstd, gamma, dx2, batch_stats)
    m = x2.shape[0] * b
    ct = x2.dtype
    dm = mean - center(x2, b, mean, dx2)
    sum_g = _colsums(g2, None, b)
    sum_gx = _colsums(g2, dx2, b) - dm * sum_g
    k = gamma * invstd
    if not batch_stats:
        np.multiply(g2, _plane(k, b, ct), out=dx2)
        return sum_g, sum_gx
    b_k = (invstd * invstd) * sum_gx / -m  # coef_x / k
    c_k = sum_g / -m - b_k * dm  # coef_c / k, the constant on d rather than on x - mean
    if not math.isfinite(np.add.reduce(b_k + c_k + k)):  # any NaN or inf term
        return None
    np.multiply(dx2, _plane(b_k, b, ct), out=dx2)
    np.add(dx2, _plane(c_k, b, ct), out=dx2)
    np.add(dx2, g2, out=dx2)
    np.multiply(dx2, _plane(k, b, ct), out=dx2)
    return sum_g, sum_gx


# --------------------------------------------------------------------------- tiny inputs, in float64


def _channel_sums(z2: np.ndarray, b: int) -> FloatArray:
    """Per-channel sums of a float64 ``(A, K*B)`` matrix.

    Not :func:`_colsums`: its groups of rows bound the depth of float32
    accumulation, which float64 does not need, and cost the tiny calls 2-8%
    (measured on (60, 100) and (700, 3) training forwards).
    """
    s: FloatArray = np.add.reduce(z2, axis=0)
    return s if b == 1 else np.add.reduce(s.reshape(-1, b), axis=1)


def _tiny_centered(x2: np.ndarray, b: int, mean: np.ndarray | None) -> tuple[FloatArray, FloatArray]:
    """``(x - mean, mean)`` in float64; the two-pass batch mean when `mean` is None."""
    d: FloatArray = x2.astype(np.float64)
    m = x2.shape[0] * b
    if mean is None:
        mean = _channel_sums(d, b) / m
        np.subtract(d, _plane(mean, b, d.dtype), out=d)
        if x2.dtype == np.float64:  # the rounding of the first sum (float32 sums are exact here)
            correction = _channel_sums(d, b) / m
            np.subtract(d, _plane(correction, b, d.dtype), out=d)
            mean += correction
    else:
        np.subtract(d, _plane(mean, b, d.dtype), out=d)
    return d, mean


def _tiny_output(d: FloatArray, b: int, alpha: np.ndarray, beta: np.ndarray | None, y2: np.ndarray) -> None:
    """``y2 = d * alpha + beta`` computed in float64 (`d` is overwritten) and rounded once."""
    if beta is None:
        np.multiply(d, _plane(alpha, b, d.dtype), out=y2, casting="same_kind")
    else:
        np.multiply(d, _plane(alpha, b, d.dtype), out=d)
        np.add(d, _plane(beta, b, d.dtype), out=y2, casting="same_kind")


def _tiny_forward_batch(
    x2: np.ndarray, b: int, y2: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None, eps: float
) -> tuple[FloatArray, FloatArray, FloatArray] | None:
    """:func:`forward_batch` in float64 (`y2` is written last; None if a sum is not finite)."""
    m = x2.shape[0] * b
    d, mean = _tiny_centered(x2, b, None)
    var = _channel_sums(np.square(d), b) / m
    if not math.isfinite(np.add.reduce(var)):  # NaN or inf in the input, or d**2 overflowed
        return None
    invstd = 1.0 / np.sqrt(var + eps)
    _tiny_output(d, b, invstd if gamma is None else gamma * invstd, beta, y2)
    return mean, var, invstd


def _tiny_forward_eval(
    x2: np.ndarray,
    b: int,
    y2: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
) -> bool:
    """:func:`forward_eval` in float64: ``y = (x - mean) * alpha + beta``, rounded once."""
    alpha = invstd if gamma is None else gamma * invstd
    # Any NaN or inf coefficient makes the sum non-finite (inf - inf is NaN).
    if not math.isfinite(
        np.add.reduce(alpha) + np.add.reduce(mean) + (0.0 if beta is None else np.add.reduce(beta))
    ):
        return False
    d, _ = _tiny_centered(x2, b, mean)
    _tiny_output(d, b, alpha, beta, y2)
    return True


def _tiny_backward(
    g2: np.ndarray,
    x2: np.ndarray,
    b: int,
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray,
    dx2: np.ndarray,
    batch_stats: bool,
) -> tuple[FloatArray, FloatArray] | None:
    """:func:`backward` in float64: ``dx = k * (g + (x - mean) * b_k + c_k)``, rounded once."""
    m = x2.shape[0] * b
    d, _ = _tiny_centered(x2, b, mean)
    g = g2.astype(np.float64)
    sum_g = _channel_sums(g, b)
    sum_gx = _channel_sums(g * d, b)
    k = gamma * invstd
    if not batch_stats:
        np.multiply(g, _plane(k, b, g.dtype), out=dx2, casting="same_kind")
        return sum_g, sum_gx
    b_k = (invstd * invstd) * sum_gx / -m  # coef_x / k
    c_k = sum_g / -m
    if not math.isfinite(np.add.reduce(b_k + c_k + k)):  # any NaN or inf term
        return None
    np.multiply(d, _plane(b_k, b, d.dtype), out=d)
    np.add(d, _plane(c_k, b, d.dtype), out=d)
    np.add(d, g, out=d)
    np.multiply(d, _plane(k, b, d.dtype), out=dx2, casting="same_kind")
    return sum_g, sum_gx
