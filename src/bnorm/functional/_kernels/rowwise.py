r"""Fused row-wise kernels: layer, group, instance and RMS norm, one cached tile at a time.

Contract
--------
The input is a C-contiguous ``(R, M)`` matrix ``x2``: ``R`` independent rows
(normalization groups) of ``M = Cg * S`` values, each row made of ``Cg``
channels of ``S`` consecutive values.  Row ``r`` takes its affine parameters
from group ``r % G``: ``gamma`` and ``beta`` hold ``G * Cg`` values, one per
(group, channel), broadcast over ``S``.

==============  ====================  ============  =======  =======  ====
op              input                 R             Cg       S        G
==============  ====================  ============  =======  =======  ====
layer / RMS     ``(*B, *F)``          prod(B)       prod(F)  1        1
group norm      ``(N, C, *S)``, G     N * G         C / G    prod(S)  G
instance norm   ``(N, C, *S)``        N * C         1        prod(S)  C
==============  ====================  ============  =======  =======  ====

* :func:`row_forward` writes ``y = (x - mean) * invstd * gamma + beta`` per
  row and returns the float64 ``(mean, var, invstd)`` of every row (biased
  variance, ``invstd = 1 / sqrt(var + eps)``).  Without centering (RMSNorm,
  ``center=False`` in the plan) ``y = x * invstd * gamma`` with ``var`` the
  mean square and ``mean = 0``.
* :func:`row_apply` does the same with given statistics (instance norm's
  running statistics).
* :func:`row_backward` writes the input gradient and returns float64
  ``dgamma``, ``dbeta`` of ``G * Cg`` values.  With :math:`\hat g = g\gamma`,
  :math:`x_c = x - \mu` (``x`` itself without centering) and bars the mean
  over a row's M values,

  .. math::
      dx = \mathrm{invstd}\,\bigl(\hat g - \overline{\hat g}\bigr)
           - x_c\,\mathrm{invstd}^3\,\overline{\hat g\,x_c}

  (without the :math:`\overline{\hat g}` term without centering, and just
  :math:`\hat g\,\mathrm{invstd}` when the statistics are constants);
  ``dgamma = sum g * x_c * invstd`` and ``dbeta = sum g`` over the values of
  each (group, channel).

Nothing full-size is allocated besides the output; the kernels keep no state.

How it is fast
--------------
Every row is independent, so the statistics and the normalization of a row
happen on the same tile of whole rows (:data:`TILE_ELEMENTS` values, 512 KiB
of float32 forward, :data:`BACKWARD_TILE_ELEMENTS` backward, in the core's L2
cache with the scratch they need): x is read from memory once and y written
once.  Per tile, forward: the row sums by BLAS (``x @ ones``), ``xc = x -
shift``, ``sum(xc)`` and ``sum(xc**2)`` by BLAS (``@``, ``np.vecdot``), then
the affine in place (three or four passes in cache).  Backward: ``xc``, the
sums of ``g`` and ``g * xc`` by BLAS against ones, gamma and invstd, then
``dx`` in four or five in-place passes.  Inputs of at most
:data:`DIRECT_MAX_ELEMENTS` values take the direct path: the same formulas as
whole-array NumPy calls on the calling thread (no tiles, no pool, one
``errstate``), because there calls, not bandwidth, set the time.

The affine has two forms, chosen by ``S``:

* *channel* (``S >= CHANNEL_FORM_MIN``: group and instance norm of images):
  invstd and gamma fold into one coefficient per (row, channel), broadcast
  over the S values: ``y = xc * (invstd * gamma) + beta`` (two passes).
* *element* (short S, and layer norm, where S = 1): the per-row invstd, then
  the per-position gamma and beta, each over whole contiguous rows, because
  NumPy's broadcasting loops run slowly on short inner loops.  Group norm in
  this form uses a tile-sized gamma pattern built once per call (its tiles
  are whole multiples of G rows, so every tile starts at group 0).

Tiles are cut from the shape alone and, for work of at least
:data:`PARALLEL_MIN_ELEMENTS` values, handed to
:func:`~bnorm.functional._kernels.pool.parallel_map`; each tile's partial sums
are combined in tile order, so results are bit-identical for any thread
count.  Rows longer than :data:`LONG_ROW_TILES` tiles are cut into chunks of whole
channels (or of one channel): statistics chunk by chunk, merged in chunk
order, then the elementwise passes chunk by chunk.

Numerics
--------
* Row statistics are float64.  The sums run in the compute dtype (float16 is
  computed in float32) on *centered* data: a BLAS row sum gives a shift
  ``c``; ``sum(x - c)`` and ``sum((x - c)**2)`` then give ``mean = c +
  sum(x - c) / M`` and ``M var = sum((x - c)**2) - sum(x - c)**2 / M``
  without cancellation, so data offset by 1e4 keeps its variance.  (float32
  BLAS sums of centered data are as accurate as PyTorch's float32 row
  moments: ~1e-7 relative.)
* The output is ``(x - mean) * invstd`` in the compute dtype with the mean
  rounded to it, never ``x * invstd - mean * invstd`` in mixed precision: a
  constant row gives exactly 0 (beta), as in PyTorch.  The shift ``c`` is
  used instead of the rounded mean only where that moves no output by more
  than half the dtype's epsilon (:data:`RECENTER_TOL`), which saves a pass on
  ordinary data; constant rows and offset data always get the rounded mean.
* Rows whose sums are not finite (NaN or inf in the row, or float32 overflow
  of squares above ~1e19) get float64 two-pass statistics, so finite input
  never overflows and non-finite input gives what the formula gives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..._validation import compute_dtype
from .buffers import empty_output
from .pool import parallel_map

__all__ = [
    "BACKWARD_TILE_ELEMENTS",
    "CHANNEL_FORM_MIN",
    "DIRECT_MAX_ELEMENTS",
    "LONG_ROW_TILES",
    "PARALLEL_MIN_ELEMENTS",
    "RECENTER_TOL",
    "TILE_ELEMENTS",
    "RowPlan",
    "as_rows",
    "make_plan",
    "row_apply",
    "row_backward",
    "row_forward",
    "normalize",
    "normalize_backward",
    "plan_for",
]

#: Values per forward tile (512 KiB of float32; x and y tiles: 1 MiB, inside
#: a core's 2 MiB L2).  Measured per call, float32, one thread, 64 Ki / 128 Ki /
#: 256 Ki values: layer norm (8, 128, 768) 1.32 / 1.18 / 1.15 ms, (2048, 128)
#: 0.46 / 0.41 / 0.38 ms; group norm (8, 64, 32, 32) / 32 0.88 / 0.78 / 0.77 ms
#: (fewer tiles, fewer per-tile NumPy calls; 32 Ki: 1.55 ms for the first).
TILE_ELEMENTS = 1 << 17

#: Values per backward tile (256 KiB of float32).  A backward tile works on
#: five arrays of this size (x, g, dx and two scratch tiles): 1.25 MiB.
#: Measured as above: (8, 128, 768) 1.80 / 1.81 / 2.13 ms for 64 / 128 / 256
#: Ki values, group norm 1.06 / 1.03 / 1.11 ms.
BACKWARD_TILE_ELEMENTS = 1 << 16

#: Inputs of at most this many values (64 KiB of float32) take the direct
#: path: the textbook formulas in float64 on the calling thread, the fewest
#: NumPy calls, because calls, not bandwidth, set the time there.
DIRECT_MAX_ELEMENTS = 1 << 14

#: Shortest S for the channel form.  Below it NumPy's loops with a stride-0
#: operand run on inner loops too short to pay for their setup.
CHANNEL_FORM_MIN = 64

#: Rows longer than this many tiles are cut into chunks of at most one tile
#: (forward: TILE_ELEMENTS, backward: BACKWARD_TILE_ELEMENTS values), so that
#: what a pass works on stays in cache and the scratch stays tile-sized.
LONG_ROW_TILES = 2

#: Work (values) from which the tiles are spread over the thread pool; below it
#: the calling thread runs them all.  Measured on this project's 2-core machine
#: (shared with other jobs), float32, median wall time of 1 / 2 threads: layer
#: norm (8, 128, 768) forward 1.04 / 1.34 ms, forward+backward 2.75 / 3.17 ms;
#: (4, 512, 1024) 3.70 / 5.35 ms and 8.5 / 12.9 ms; (64, 512, 1024) 98 / 171 ms;
#: instance norm (16, 64, 64, 64) 10.3 / 12.8 ms -- a second thread never paid
#: (plain NumPy passes did not scale there either), so by default only inputs
#: beyond these (2**26 values, 256 MiB of float32) use the pool.  Results do not
#: depend on it: the tiles are the same either way.
PARALLEL_MIN_ELEMENTS = 1 << 26

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class RowPlan:
    """The shape of a row-wise problem and how it is cut into tiles.

    Attributes
    ----------
    rows, channels, spatial, groups : int
        R, Cg, S and G of the module docstring.
    dtype : numpy dtype
        The compute dtype (float32 for float16 input).
    center : bool
        Subtract the mean (False: RMSNorm).
    tile_rows, backward_tile_rows : int
        Rows per forward and backward tile: ``TILE_ELEMENTS // M`` and
        ``BACKWARD_TILE_ELEMENTS // M``, at least 1, and in the element form
        with ``G > 1`` multiples of G.
    channel_form : bool
        Whether the affine is applied per (row, channel) rather than per value.
    """

    rows: int
    channels: int
    spatial: int
    groups: int
    dtype: np.dtype[Any]
    center: bool
    tile_rows: int
    backward_tile_rows: int
    channel_form: bool

    @property
    def row_length(self) -> int:
        """M = Cg * S."""
        return self.channels * self.spatial

    def long_rows(self, *, backward: bool = False) -> bool:
        """Whether rows are cut into chunks (rows longer than LONG_ROW_TILES tiles)."""
        return self.row_length > LONG_ROW_TILES * _tile_elements(backward)

    def tiles(self, *, backward: bool = False) -> list[tuple[int, int]]:
        """The ``(first_row, end_row)`` of every tile, from the shape alone."""
        t = self.backward_tile_rows if backward else self.tile_rows
        return [(r, min(r + t, self.rows)) for r in range(0, self.rows, t)]


def _tile_elements(backward: bool) -> int:
    return BACKWARD_TILE_ELEMENTS if backward else TILE_ELEMENTS


@functools.lru_cache(maxsize=256)
def make_plan(
    rows: int, channels: int, spatial: int, groups: int, dtype: Any, *, center: bool = True
) -> RowPlan:
    """The :class:`RowPlan` of an ``(R, Cg * S)`` problem in compute dtype `dtype` (cached)."""
    m = channels * spatial
    # Small group norm takes the channel form too: the element form's gamma
    # pattern costs more calls than its faster loops save there.
    channel_form = spatial >= CHANNEL_FORM_MIN or (groups > 1 and rows * m <= DIRECT_MAX_ELEMENTS)

    def rows_per_tile(elements: int) -> int:
        t = max(1, elements // max(m, 1))
        if not channel_form and groups > 1:
            t = max(1, t // groups) * groups  # every tile starts at group 0
        return t

    t, tb = rows_per_tile(TILE_ELEMENTS), rows_per_tile(BACKWARD_TILE_ELEMENTS)
    return RowPlan(rows, channels, spatial, groups, np.dtype(dtype), center, t, tb, channel_form)


def as_rows(a: Array, rows: int) -> Array:
    """The C-contiguous ``(rows, size // rows)`` view of `a` (a copy only for non-contiguous input)."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.reshape(rows, a.size // rows if rows else 0)


def plan_for(
    x: Array, rows: int, channels: int, spatial: int, groups: int, *, center: bool = True
) -> RowPlan:
    """The plan to normalize `x`, viewed as ``(rows, channels * spatial)``, in its compute dtype."""
    return make_plan(rows, channels, spatial, groups, compute_dtype(x.dtype), center=center)


def normalize(
    x: Array, plan: RowPlan, gamma: Array | None, beta: Array | None, eps: float
) -> tuple[Array, Array, Array, Array]:
    """:func:`row_forward` of any-shape `x`: a new output like `x`, and float64 ``(mean, var, invstd)``."""
    y = empty_output(x.shape, x.dtype)
    mean, var, invstd = row_forward(as_rows(x, plan.rows), plan, gamma, beta, eps, as_rows(y, plan.rows))
    return y, mean, var, invstd


def normalize_backward(
    g: Array,
    x: Array,
    dx: Array,
    plan: RowPlan,
    mean: Array,
    invstd: Array,
    gamma: Array | None,
    *,
    stats_depend: bool = True,
    want_params: bool = True,
) -> tuple[Array, Array]:
    """:func:`row_backward` of any-shape arrays (`dx`: a C-contiguous output like `x`)."""
    rows = plan.rows
    return row_backward(
        as_rows(g, rows),
        as_rows(x, rows),
        plan,
        mean,
        invstd,
        gamma,
        as_rows(dx, rows),
        stats_depend=stats_depend,
        want_params=want_params,
    )


# --------------------------------------------------------------------------- affine parameters


class _Affine:
    """gamma and beta in the compute dtype, in the layout each form reads.

    Channel form: ``gamma``, ``beta`` of shape (G, Cg); a tile takes the rows of
    its groups (:meth:`per_channel`).  Element form: ``gamma_rows``,
    ``beta_rows`` of shape (1, M) for G = 1, else (tile_rows, M): the groups of
    a tile's rows, repeated over S (forward tiles are the larger).
    """

    def __init__(self, plan: RowPlan, gamma: Array | None, beta: Array | None) -> None:
        ct = plan.dtype
        g, cg = plan.groups, plan.channels
        self.plan = plan
        self.gamma = None if gamma is None else np.asarray(gamma, dtype=ct).reshape(g, cg)
        self.beta = None if beta is None else np.asarray(beta, dtype=ct).reshape(g, cg)
        self.gamma_rows = self._element(self.gamma)
        self.beta_rows = self._element(self.beta)

    def _element(self, p: Array | None) -> Array | None:
        plan = self.plan
        if p is None or plan.channel_form:
            return None
        rep = np.repeat(p, plan.spatial, axis=1) if plan.spatial > 1 else p  # (G, M)
        if plan.groups == 1:
            return rep
        return np.tile(rep, (max(plan.tile_rows, plan.backward_tile_rows) // plan.groups, 1))

    def per_channel(self, p: Array | None, r0: int, r1: int) -> Array | None:
        """Rows r0..r1 of a (G, Cg) parameter: shape (r1 - r0, Cg), or (1, Cg) for G = 1."""
        if p is None or self.plan.groups == 1:
            return p
        return p[np.arange(r0, r1) % self.plan.groups]

    @staticmethod
    def per_element(p: Array | None, t: int) -> Array | None:
        """A tile's (t, M) or (1, M) element-form parameter."""
        if p is None or p.shape[0] == 1:
            return p
        return p[:t]


# --------------------------------------------------------------------------- statistics


def _tile_stats(
    xt: Array, work: Array, ones: Array, eps: float, center: bool
) -> tuple[Array, Array, Array, Array | None]:
    """float64 ``(mean, var, invstd)`` of the rows of a tile, and the compute-dtype shift.

    Centering writes ``xt - shift`` into `work`, with the shift the BLAS row
    mean; the shifted sums then give the mean and variance without
    cancellation.  Without centering the shift is None and var the mean square.
    """
    m = xt.shape[1]
    shift = None
    if center:
        shift = xt @ ones[:m]
        shift *= shift.dtype.type(1.0 / m)
        np.subtract(xt, shift[:, None], out=work)
        d = (work @ ones[:m]).astype(np.float64)  # sum(x - shift)
        ss = np.vecdot(work, work).astype(np.float64)  # sum((x - shift)**2)
        mean = d / m
        var = ss - d * mean
        np.maximum(var, 0.0, out=var)
        var /= m
        mean += shift
        check = d + ss
    else:
        ss = np.vecdot(xt, xt).astype(np.float64)
        mean = np.zeros(xt.shape[0])
        var = ss / m
        check = ss
    invstd = 1.0 / np.sqrt(var + eps)
    if not np.isfinite(check).all():
        bad = np.flatnonzero(~np.isfinite(check))
        mean[bad], var[bad], invstd[bad] = _float64_stats(xt[bad], eps, center)
    return mean, var, invstd, shift


def _float64_stats(xt: Array, eps: float, center: bool) -> tuple[Array, Array, Array]:
    """Two-pass float64 statistics of the rows of `xt` (the fallback for non-finite sums)."""
    mean, var, invstd, _ = _float64_centered(xt, eps, center)
    return mean, var, invstd


def _float64_centered(xt: Array, eps: float, center: bool) -> tuple[Array, Array, Array, Array]:
    """Two-pass float64 ``(mean, var, invstd)`` of the rows of `xt`, and ``xt - mean`` in float64.

    The mean is corrected by the mean of ``x - mean`` (the rounding of the first
    sum), so a constant row of any float64 value gets exactly its value as mean
    and exactly 0 as ``x - mean``.
    """
    x64 = xt.astype(np.float64)
    m = xt.shape[1]
    if center:
        mean = np.add.reduce(x64, axis=1)
        mean /= m
        x64 -= mean[:, None]
        correction = np.add.reduce(x64, axis=1)
        correction /= m
        mean += correction
        x64 -= correction[:, None]
    else:
        mean = np.zeros(xt.shape[0])
    var = np.vecdot(x64, x64)
    var /= m
    invstd = var + eps
    np.sqrt(invstd, out=invstd)
    np.divide(1.0, invstd, out=invstd)
    return mean, var, invstd, x64


#: How far (in output units, i.e. multiplied by invstd) the BLAS shift may lie
#: from the rounded mean before the tile is centered again with the rounded
#: mean: half the dtype's epsilon, half an ulp at 1.  PyTorch's own
#: ``x * alpha + beta'`` rounds at ``ulp(|x| * alpha)``, which is more; a
#: constant row (invstd = 1/sqrt(eps)) or data far from 0 always exceeds it.
#: On N(0, 1) rows of 768 float32 values the shift is within 5e-8 of the
#: rounded mean: recentering everywhere (a fifth pass) cost 10-15% of layer
#: norm's forward.
RECENTER_TOL = {np.dtype(t): float(np.finfo(t).eps) / 2 for t in (np.float32, np.float64, np.longdouble)}


# --------------------------------------------------------------------------- forward


def _normalize_tile(
    xt: Array, work: Array, mean: Array, invstd: Array, shift: Array | None, aff: _Affine, r0: int
) -> None:
    """``work = (xt - mean) * invstd * gamma + beta`` for one tile, in the compute dtype.

    `work` already holds ``xt - shift`` when `shift` is given (the forward's
    centering).  The mean is rounded to the compute dtype and subtracted before
    the scaling (the centered form), so a constant row gives exactly beta.
    """
    plan = aff.plan
    t = xt.shape[0]
    ct = plan.dtype
    inv_c = invstd.astype(ct)
    src = work  # what the scaling reads: x - mean, or x itself without centering
    if plan.center:
        mean_c = mean.astype(ct)
        if shift is None or (np.abs(mean_c - shift) * inv_c > RECENTER_TOL[ct]).any():
            np.subtract(xt, mean_c[:, None], out=work)
    else:
        src = xt  # RMSNorm: the scaling reads x directly, no copy
    if plan.channel_form:
        gamma = aff.per_channel(aff.gamma, r0, r0 + t)
        beta = aff.per_channel(aff.beta, r0, r0 + t)
        w3 = work.reshape(t, plan.channels, plan.spatial)
        coef = inv_c[:, None] if gamma is None else inv_c[:, None] * gamma  # (T, 1) or (T, Cg)
        np.multiply(src.reshape(w3.shape), coef[:, :, None], out=w3)
        if beta is not None:
            np.add(w3, beta[:, :, None], out=w3)
    else:
        np.multiply(src, inv_c[:, None], out=work)
        gamma = aff.per_element(aff.gamma_rows, t)
        beta = aff.per_element(aff.beta_rows, t)
        if gamma is not None:
            np.multiply(work, gamma, out=work)
        if beta is not None:
            np.add(work, beta, out=work)


def _forward_tile(
    xt: Array, yt: Array, aff: _Affine, ones: Array, eps: float, r0: int
) -> tuple[Array, Array, Array]:
    """Statistics and output of one tile of whole rows; returns ``(mean, var, invstd)``."""
    ct = aff.plan.dtype
    work = yt if yt.dtype == ct else np.empty(xt.shape, ct)
    if xt.dtype != ct:
        xt = xt.astype(ct)
    mean, var, invstd, shift = _tile_stats(xt, work, ones, eps, aff.plan.center)
    _normalize_tile(xt, work, mean, invstd, shift, aff, r0)
    if work is not yt:
        np.copyto(yt, work)
    return mean, var, invstd


def row_forward(
    x2: Array, plan: RowPlan, gamma: Array | None, beta: Array | None, eps: float, y2: Array
) -> tuple[Array, Array, Array]:
    """Normalize the rows of `x2` into `y2`; return float64 ``(mean, var, invstd)`` of shape (R,).

    Parameters
    ----------
    x2, y2 : ndarray of shape (R, M), C-contiguous
        Input and output (any float dtypes; computed in ``plan.dtype``).
    plan : RowPlan
        From :func:`make_plan`.
    gamma, beta : array of G * Cg values, or None
        The affine (None: 1 and 0).
    eps : float
        Added to the variance (to the mean square without centering).
    """
    r, m = plan.rows, plan.row_length
    if r == 0 or m == 0:
        with np.errstate(divide="ignore"):
            return np.zeros(r), np.zeros(r), np.full(r, 1.0 / np.sqrt(eps))
    if r * m <= DIRECT_MAX_ELEMENTS:
        with np.errstate(all="ignore"):
            return _direct_forward(x2, y2, plan, gamma, beta, eps)
    aff = _Affine(plan, gamma, beta)
    if plan.long_rows():
        return _long_forward(x2, aff, eps, y2)
    ones = np.ones(m, plan.dtype)

    def tile(bounds: tuple[int, int]) -> tuple[Array, Array, Array]:
        r0, r1 = bounds
        with np.errstate(all="ignore"):
            return _forward_tile(x2[r0:r1], y2[r0:r1], aff, ones, eps, r0)

    parts = _run(tile, plan.tiles(), r * m)
    if len(parts) == 1:
        first: tuple[Array, Array, Array] = parts[0]
        return first
    mean, var, invstd = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return mean, var, invstd


def row_apply(
    x2: Array,
    plan: RowPlan,
    mean: Array,
    invstd: Array,
    gamma: Array | None,
    beta: Array | None,
    y2: Array,
) -> None:
    """``y2 = (x2 - mean) * invstd * gamma + beta`` with given float64 row statistics."""
    if plan.rows == 0 or plan.row_length == 0:
        return
    aff = _Affine(plan, gamma, beta)
    if plan.long_rows():
        _long_apply(x2, aff, mean, invstd, y2)
        return
    ct = plan.dtype

    def tile(bounds: tuple[int, int]) -> None:
        r0, r1 = bounds
        xt, yt = x2[r0:r1], y2[r0:r1]
        with np.errstate(all="ignore"):
            work = yt if yt.dtype == ct else np.empty(xt.shape, ct)
            xt = xt if xt.dtype == ct else xt.astype(ct)
            _normalize_tile(xt, work, mean[r0:r1], invstd[r0:r1], None, aff, r0)
            if work is not yt:
                np.copyto(yt, work)

    _run(tile, plan.tiles(), plan.rows * plan.row_length)


# --------------------------------------------------------------------------- direct (small inputs)


def _rows_of_channels(p: Array | None, plan: RowPlan, t: int, dtype: Any) -> Array | None:
    """G * Cg parameter values in `dtype`, shape (t or 1, Cg, 1): each row's group's values."""
    if p is None:
        return None
    pc = np.asarray(p, dtype=dtype).reshape(plan.groups, plan.channels)
    if plan.groups > 1:
        pc = pc[np.arange(t) % plan.groups]
    return pc[:, :, None]


def _direct_stats(x2: Array, eps: float, plan: RowPlan, xc: Array) -> tuple[Array, Array, Array]:
    """float64 ``(mean, var, invstd)`` of a small input; ``x - mean`` (rounded mean) into `xc`.

    Without centering `xc` is left untouched (the caller scales `x2` itself).

    The row sums accumulate in float64 (``dtype=`` of the reduction), so a
    float32 constant row's mean is exactly its value; float64 input gets the
    mean of ``x - mean`` added back (its first sum rounds), so it is exact there
    too.  The variance is the compute-dtype square sum of the centered values.
    """
    ct = plan.dtype
    m = x2.shape[1]
    if plan.center:
        mean = np.add.reduce(x2, axis=1, dtype=np.float64)
        mean /= m
        np.subtract(x2, mean.astype(ct)[:, None], out=xc)
        if ct == np.float64 or ct == np.longdouble:
            correction = np.add.reduce(xc, axis=1)
            correction /= m
            mean += correction
            xc -= correction[:, None]
    else:
        mean = np.zeros(x2.shape[0])
    var = (
        np.vecdot(xc, xc).astype(np.float64)
        if plan.center
        else np.vecdot(x2, x2, dtype=ct).astype(np.float64)
    )
    var /= m
    invstd = var + eps
    np.sqrt(invstd, out=invstd)
    np.divide(1.0, invstd, out=invstd)
    return mean, var, invstd


def _direct_forward(
    x2: Array, y2: Array, plan: RowPlan, gamma: Array | None, beta: Array | None, eps: float
) -> tuple[Array, Array, Array]:
    """A small input as whole-array NumPy calls in the compute dtype, on the calling thread."""
    t = x2.shape[0]
    ct = plan.dtype
    work = y2 if y2.dtype == ct else np.empty(x2.shape, ct)
    mean, var, invstd = _direct_stats(x2, eps, plan, work)
    np.multiply(work if plan.center else x2, invstd.astype(ct)[:, None], out=work)
    w3 = work.reshape(t, plan.channels, plan.spatial)
    if gamma is not None:
        w3 *= _rows_of_channels(gamma, plan, t, ct)
    if beta is not None:
        w3 += _rows_of_channels(beta, plan, t, ct)
    if work is not y2:
        np.copyto(y2, work, casting="same_kind")
    return mean, var, invstd


def _direct_backward(
    g2: Array,
    x2: Array,
    dx2: Array,
    plan: RowPlan,
    mean: Array,
    invstd: Array,
    gamma: Array | None,
    stats_depend: bool,
    want_params: bool,
) -> tuple[Array, Array]:
    """Backward of a small input in the compute dtype (the module docstring's formula, written out)."""
    t, m = x2.shape
    ct = plan.dtype
    cg, s, groups = plan.channels, plan.spatial, plan.groups
    inv_c = invstd.astype(ct)[:, None]
    x_hat = np.subtract(x2, mean.astype(ct)[:, None], dtype=ct) if plan.center else x2.astype(ct)
    x_hat *= inv_c
    g = g2 if g2.dtype == ct else g2.astype(ct)
    if want_params:
        # Down the rows of each group first (a BLAS product with ones), then over S.
        k = t // groups
        ones = np.ones(k, ct)
        dgamma = (ones @ (g * x_hat).reshape(k, groups * m)).astype(np.float64)
        dbeta = (ones @ g.reshape(k, groups * m)).astype(np.float64)
        if s > 1:
            dgamma = dgamma.reshape(groups * cg, s).sum(axis=1)
            dbeta = dbeta.reshape(groups * cg, s).sum(axis=1)
    else:
        dgamma = dbeta = np.zeros(groups * cg)
    out = dx2 if dx2.dtype == ct else np.empty(x2.shape, ct)
    gamma3 = _rows_of_channels(gamma, plan, t, ct)
    if gamma3 is not None:
        np.multiply(g.reshape(t, cg, s), gamma3, out=out.reshape(t, cg, s))
    else:
        np.copyto(out, g)
    if stats_depend:
        # The row means of g_hat * x_hat and g_hat, in the compute dtype (small rows:
        # pairwise / BLAS sums, as accurate as the tile path's).
        inv_m = ct.type(1.0 / m)
        b = np.vecdot(out, x_hat)
        b *= inv_m
        if plan.center:
            a = np.add.reduce(out, axis=1)
            a *= inv_m
            out -= a[:, None]
        x_hat *= b[:, None]
        out -= x_hat
    out *= inv_c
    if out is not dx2:
        np.copyto(dx2, out, casting="same_kind")
    return dgamma, dbeta


# --------------------------------------------------------------------------- backward


def _dx_stat_terms(work: Array, xc: Array, a: Array | None, b: Array, invstd: Array, m: int) -> None:
    """``work += xc * k1 + k2``: the part of dx that flows through the statistics.

    ``k1 = -invstd**3 * b / m`` with ``b = sum(g_hat * xc)``, and ``k2 = -invstd
    * a / m`` with ``a = sum(g_hat)`` (None without centering).  `xc` is
    overwritten.
    """
    ct = work.dtype
    t = work.shape[0]
    k1 = (-(invstd**3) * b / m).astype(ct)
    x2 = xc.reshape(t, -1)
    w2 = work.reshape(t, -1)
    np.multiply(x2, k1[:, None], out=x2)
    np.add(w2, x2, out=w2)
    if a is not None:
        np.add(w2, (-invstd * a / m).astype(ct)[:, None], out=w2)


def _backward_tile(
    gt: Array,
    xt: Array,
    dxt: Array,
    mean: Array,
    invstd: Array,
    aff: _Affine,
    ones: Array,
    r0: int,
    stats_depend: bool,
    want_params: bool,
) -> tuple[Array | None, Array | None]:
    """Input gradient of one tile into `dxt`; the tile's parameter-gradient partials.

    Returns ``(dgamma_part, dbeta_part)``, float64: in the channel form of shape
    (T, Cg), one row per row (summed per group by the caller); in the element
    form of shape (G, M), this tile's rows already summed per group.  None
    without `want_params`.
    """
    plan = aff.plan
    ct = plan.dtype
    center = plan.center
    t, m = xt.shape
    xt = xt if xt.dtype == ct else xt.astype(ct)
    gt = gt if gt.dtype == ct else gt.astype(ct)
    work = dxt if dxt.dtype == ct else np.empty(xt.shape, ct)
    inv_c = invstd.astype(ct)
    if center:
        xc = np.subtract(xt, mean.astype(ct)[:, None])
    else:
        xc = xt.copy() if stats_depend else xt  # _dx_stat_terms overwrites it
    a: Array | None = None
    dgamma_part = dbeta_part = None
    if plan.channel_form:
        cg, s = plan.channels, plan.spatial
        g3 = gt.reshape(t * cg, s)
        sg = (g3 @ ones[:s]).astype(np.float64).reshape(t, cg)  # sum_s g
        sgx = np.vecdot(g3, xc.reshape(t * cg, s)).astype(np.float64).reshape(t, cg)  # sum_s g * xc
        gamma = aff.per_channel(aff.gamma, r0, r0 + t)
        gamma64 = None if gamma is None else gamma.astype(np.float64)
        if want_params:
            dgamma_part, dbeta_part = sgx * invstd[:, None], sg
        coef = invstd[:, None] if gamma64 is None else invstd[:, None] * gamma64  # (T, 1) or (T, Cg)
        np.multiply(gt.reshape(t, cg, s), coef.astype(ct)[:, :, None], out=work.reshape(t, cg, s))
        if stats_depend:
            if center:
                a = (sg if gamma64 is None else sg * gamma64).sum(axis=1)  # sum g_hat
            b = (sgx if gamma64 is None else sgx * gamma64).sum(axis=1)  # sum g_hat * xc
            _dx_stat_terms(work, xc, a, b, invstd, m)
    else:
        gamma_rows = aff.per_element(aff.gamma_rows, t)
        gx = np.multiply(gt, xc) if (want_params or gamma_rows is not None) else None  # g * xc
        if want_params:
            assert gx is not None
            dgamma_part, dbeta_part = _element_param_parts(gt, gx, inv_c, ones, plan.groups)
        if gamma_rows is None:
            np.multiply(gt, inv_c[:, None], out=work)
            if stats_depend:
                if center:
                    a = (gt @ ones[:m]).astype(np.float64)
                b = np.vecdot(gt, xc).astype(np.float64)
        else:
            assert gx is not None
            if stats_depend:
                if center:
                    a = _row_dot(gt, gamma_rows)
                b = _row_dot(gx, gamma_rows)
            np.multiply(gt, gamma_rows, out=work)
            np.multiply(work, inv_c[:, None], out=work)
        if stats_depend:
            _dx_stat_terms(work, xc, a, b, invstd, m)
    if work is not dxt:
        np.copyto(dxt, work)
    return dgamma_part, dbeta_part


def _element_param_parts(gt: Array, gx: Array, inv_c: Array, ones: Array, groups: int) -> tuple[Array, Array]:
    """A tile's float64 (G, M) sums of ``g * x_hat`` and ``g`` over its rows of each group."""
    t, m = gt.shape
    if groups == 1:
        return (inv_c @ gx).astype(np.float64)[None, :], (ones[:t] @ gt).astype(np.float64)[None, :]
    k = t // groups  # the tile is k blocks of G rows, each block groups 0..G-1
    gxhat = gx * inv_c[:, None]
    dgamma = (ones[:k] @ gxhat.reshape(k, groups * m)).astype(np.float64).reshape(groups, m)
    dbeta = (ones[:k] @ gt.reshape(k, groups * m)).astype(np.float64).reshape(groups, m)
    return dgamma, dbeta


def _row_dot(a: Array, gamma_rows: Array) -> Array:
    """float64 ``sum_j a_ij * gamma_ij`` per row (gamma one row for all, or one per row)."""
    out: Array = (a @ gamma_rows[0]) if gamma_rows.shape[0] == 1 else np.vecdot(a, gamma_rows)
    return out.astype(np.float64)


def row_backward(
    g2: Array,
    x2: Array,
    plan: RowPlan,
    mean: Array,
    invstd: Array,
    gamma: Array | None,
    dx2: Array,
    *,
    stats_depend: bool = True,
    want_params: bool = True,
) -> tuple[Array, Array]:
    """Write the input gradient into `dx2`; return float64 ``(dgamma, dbeta)`` of G * Cg values.

    Parameters
    ----------
    g2, x2, dx2 : ndarray of shape (R, M), C-contiguous
        Upstream gradient, forward input, and the input gradient (output).
    plan : RowPlan
        The forward's plan.
    mean, invstd : float64 ndarray of shape (R,)
        The statistics the forward normalized with.
    gamma : array of G * Cg values, or None
        The forward's gamma (None: 1).
    stats_depend : bool, keyword-only
        Whether the statistics were computed from `x2` (else they are constants
        and ``dx = g * gamma * invstd``).
    want_params : bool, keyword-only
        Compute dgamma and dbeta (else zeros are returned).
    """
    r, m = plan.rows, plan.row_length
    size = plan.groups * plan.channels
    if r == 0 or m == 0:
        return np.zeros(size), np.zeros(size)
    if r * m <= DIRECT_MAX_ELEMENTS:
        with np.errstate(all="ignore"):
            return _direct_backward(g2, x2, dx2, plan, mean, invstd, gamma, stats_depend, want_params)
    aff = _Affine(plan, gamma, None)
    if plan.long_rows(backward=True):
        return _long_backward(g2, x2, aff, mean, invstd, dx2, stats_depend, want_params)
    ones = np.ones(max(m, plan.backward_tile_rows), plan.dtype)

    def tile(bounds: tuple[int, int]) -> tuple[Array | None, Array | None]:
        r0, r1 = bounds
        with np.errstate(all="ignore"):
            return _backward_tile(
                g2[r0:r1],
                x2[r0:r1],
                dx2[r0:r1],
                mean[r0:r1],
                invstd[r0:r1],
                aff,
                ones,
                r0,
                stats_depend,
                want_params,
            )

    parts = _run(tile, plan.tiles(backward=True), r * m)
    if not want_params:
        return np.zeros(size), np.zeros(size)
    dg = [p[0] for p in parts]
    db = [p[1] for p in parts]
    if plan.channel_form:  # (T, Cg) per tile: per-row values, group r % G
        return _sum_over_groups(np.concatenate(dg), plan.groups), _sum_over_groups(
            np.concatenate(db), plan.groups
        )
    # Element form: (G, M) per tile, summed in tile order, then over S within each channel.
    shape3 = (plan.groups, plan.channels, plan.spatial)
    return _ordered_sum(dg).reshape(shape3).sum(axis=2).ravel(), _ordered_sum(db).reshape(shape3).sum(
        axis=2
    ).ravel()


def _sum_over_groups(per_row: Array, groups: int) -> Array:
    """Sum (R, Cg) per-row values over the rows of each group (R is a multiple of G)."""
    r, cg = per_row.shape
    out: Array = per_row.reshape(r // groups, groups, cg).sum(axis=0)
    return out.ravel()


def _ordered_sum(parts: list[Any]) -> Array:
    """The sum of the arrays in `parts`, added in list order."""
    total = np.array(parts[0], dtype=np.float64, copy=True)
    for p in parts[1:]:
        total += p
    return total


# --------------------------------------------------------------------------- long rows


def _row_chunks(plan: RowPlan, backward: bool) -> list[tuple[int, int, int, int]]:
    """Chunks of one row: ``(c0, c1, s0, s1)``, whole channels c0..c1, or part s0..s1 of one.

    At most one tile of values each, cut from the shape alone.
    """
    cg, s = plan.channels, plan.spatial
    size = _tile_elements(backward)
    if s <= size:
        k = size // s
        return [(c, min(c + k, cg), 0, s) for c in range(0, cg, k)]
    return [(c, c + 1, v, min(v + size, s)) for c in range(cg) for v in range(0, s, size)]


def _chunk(a: Array, row: int, chunk: tuple[int, int, int, int], s: int, ct: np.dtype[Any]) -> Array:
    """The ``(channels, values)`` view of a chunk of a row, in the compute dtype."""
    c0, c1, s0, s1 = chunk
    part = a[row, c0 * s + s0 : (c1 - 1) * s + s1].reshape(c1 - c0, s1 - s0)
    return part if part.dtype == ct else part.astype(ct)


def _long_items(plan: RowPlan, backward: bool = False) -> list[tuple[int, tuple[int, int, int, int]]]:
    return [(row, ch) for row in range(plan.rows) for ch in _row_chunks(plan, backward)]


def _per_row_channel(parts: list[Array], items: list[Any], plan: RowPlan) -> Array:
    """(R, Cg) float64 sums from per-chunk ``(channels,)`` partial sums, added in chunk order."""
    out = np.zeros((plan.rows, plan.channels))
    for (row, (c0, c1, _s0, _s1)), p in zip(items, parts, strict=True):
        out[row, c0:c1] += p
    return out


def _long_forward(x2: Array, aff: _Affine, eps: float, y2: Array) -> tuple[Array, Array, Array]:
    """Forward of long rows: a shift, then shifted sums, chunk by chunk; then the passes."""
    plan = aff.plan
    ct, s, m = plan.dtype, plan.spatial, plan.row_length
    items = _long_items(plan)
    ones = np.ones(min(TILE_ELEMENTS, s), ct)
    work = plan.rows * m
    shift = np.zeros(plan.rows, ct)
    if plan.center:

        def chunk_sum(item: tuple[int, Any]) -> Array:
            with np.errstate(all="ignore"):
                xt = _chunk(x2, item[0], item[1], s, ct)
                return (xt @ ones[: xt.shape[1]]).astype(np.float64)

        sums = _per_row_channel(_run(chunk_sum, items, work), items, plan).sum(axis=1)
        shift = (sums / m).astype(ct)

    def chunk_sums(item: tuple[int, Any]) -> tuple[Array, Array]:
        with np.errstate(all="ignore"):
            xt = _chunk(x2, item[0], item[1], s, ct)
            xc = xt - shift[item[0]] if plan.center else xt
            return (xc @ ones[: xt.shape[1]]).astype(np.float64), np.vecdot(xc, xc).astype(np.float64)

    parts = _run(chunk_sums, items, work)
    d = _per_row_channel([p[0] for p in parts], items, plan).sum(axis=1)
    ss = _per_row_channel([p[1] for p in parts], items, plan).sum(axis=1)
    with np.errstate(all="ignore"):
        if plan.center:
            mean = d / m
            var = np.maximum(ss - d * mean, 0.0) / m
            mean += shift
        else:
            mean, var = np.zeros(plan.rows), ss / m
        invstd = 1.0 / np.sqrt(var + eps)
        for row in np.flatnonzero(~np.isfinite(d + ss)):
            mean[row], var[row], invstd[row] = (
                v[0] for v in _float64_stats(x2[row : row + 1], eps, plan.center)
            )
    _long_apply(x2, aff, mean, invstd, y2)
    return mean, var, invstd


def _long_apply(x2: Array, aff: _Affine, mean: Array, invstd: Array, y2: Array) -> None:
    """``y = (x - mean) * invstd * gamma + beta`` on long rows, chunk by chunk."""
    plan = aff.plan
    ct, s, g = plan.dtype, plan.spatial, plan.groups
    mean_c = mean.astype(ct)
    items = _long_items(plan)

    def chunk(item: tuple[int, tuple[int, int, int, int]]) -> None:
        row, (c0, c1, s0, s1) = item
        with np.errstate(all="ignore"):
            xt = _chunk(x2, row, item[1], s, ct)
            yt = y2[row, c0 * s + s0 : (c1 - 1) * s + s1].reshape(xt.shape)
            work = yt if yt.dtype == ct else np.empty(xt.shape, ct)
            if plan.center:
                np.subtract(xt, mean_c[row], out=work)
            elif work is not xt:
                np.copyto(work, xt)
            coef = np.full((c1 - c0, 1), invstd[row])
            if aff.gamma is not None:
                coef *= aff.gamma[row % g, c0:c1, None]
            np.multiply(work, coef.astype(ct), out=work)
            if aff.beta is not None:
                np.add(work, aff.beta[row % g, c0:c1, None], out=work)
            if work is not yt:
                np.copyto(yt, work)

    _run(chunk, items, plan.rows * plan.row_length)


def _long_backward(
    g2: Array,
    x2: Array,
    aff: _Affine,
    mean: Array,
    invstd: Array,
    dx2: Array,
    stats_depend: bool,
    want_params: bool,
) -> tuple[Array, Array]:
    """Backward of long rows: per-channel sums chunk by chunk, then dx chunk by chunk."""
    plan = aff.plan
    ct, s, g, m = plan.dtype, plan.spatial, plan.groups, plan.row_length
    mean_c = mean.astype(ct)
    items = _long_items(plan, backward=True)
    ones = np.ones(min(BACKWARD_TILE_ELEMENTS, s), ct)
    work = plan.rows * m

    def centered(item: tuple[int, Any]) -> tuple[Array, Array]:
        xt = _chunk(x2, item[0], item[1], s, ct)
        return _chunk(g2, item[0], item[1], s, ct), (xt - mean_c[item[0]] if plan.center else xt)

    def chunk_sums(item: tuple[int, Any]) -> tuple[Array, Array]:
        with np.errstate(all="ignore"):
            gt, xc = centered(item)
            return (gt @ ones[: gt.shape[1]]).astype(np.float64), np.vecdot(gt, xc).astype(np.float64)

    parts = _run(chunk_sums, items, work)
    sg = _per_row_channel([p[0] for p in parts], items, plan)  # (R, Cg): sum g
    sgx = _per_row_channel([p[1] for p in parts], items, plan)  # (R, Cg): sum g * xc
    gam = (
        np.ones((plan.rows, plan.channels))
        if aff.gamma is None
        else aff.gamma.astype(np.float64)[np.arange(plan.rows) % g]
    )
    with np.errstate(all="ignore"):
        k1 = -(invstd**3) * (sgx * gam).sum(axis=1) / m
        k2 = -invstd * (sg * gam).sum(axis=1) / m if plan.center else np.zeros(plan.rows)
        coef_all = invstd[:, None] * gam  # (R, Cg)

    def chunk(item: tuple[int, tuple[int, int, int, int]]) -> None:
        row, (c0, c1, s0, s1) = item
        with np.errstate(all="ignore"):
            gt, xc = centered(item)
            dt = dx2[row, c0 * s + s0 : (c1 - 1) * s + s1].reshape(gt.shape)
            out = dt if dt.dtype == ct else np.empty(gt.shape, ct)
            np.multiply(gt, coef_all[row, c0:c1, None].astype(ct), out=out)
            if stats_depend:
                out += xc * ct.type(k1[row])
                out += ct.type(k2[row])
            if out is not dt:
                np.copyto(dt, out)

    _run(chunk, items, work)
    if not want_params:
        size = g * plan.channels
        return np.zeros(size), np.zeros(size)
    return _sum_over_groups(sgx * invstd[:, None], g), _sum_over_groups(sg, g)


# --------------------------------------------------------------------------- scheduling


def _run(fn: Callable[[Any], Any], items: list[Any], work_elements: int) -> list[Any]:
    """``[fn(item) for item in items]``: on the caller below PARALLEL_MIN_ELEMENTS, else over the pool."""
    if len(items) == 1 or work_elements < PARALLEL_MIN_ELEMENTS:
        return [fn(item) for item in items]
    return parallel_map(fn, items, work_elements)
