r"""Fused row-wise kernels: layer, group, instance and RMS norm, one cached tile at a time.

Contract
--------
The input is a C-contiguous ``(R, M)`` matrix ``x2``: ``R`` independent rows
(normalization groups) of ``M = Cg * S`` values, each row made of ``Cg``
channels of ``S`` consecutive values.  Row ``r`` takes its affine parameters
from group ``r % G``: ``gamma`` and ``beta`` have shape ``(G, Cg)`` and are
broadcast over ``S``.

==============  ====================  ============  ======  ==========  ====
op              input                 R             Cg      S           G
==============  ====================  ============  ======  ==========  ====
layer / RMS     ``(*B, *F)``          prod(B)       prod(F)  1           1
group norm      ``(N, C, *S)``, G     N * G         C / G   prod(S)     G
instance norm   ``(N, C, *S)``        N * C         1       prod(S)     C
==============  ====================  ============  ======  ==========  ====

:func:`row_forward` writes ``y = (x - mean) * invstd * gamma + beta`` per row
(``center=False``, RMSNorm: ``y = x * invstd * gamma`` with ``invstd =
1 / sqrt(mean(x**2) + eps)``) and returns the float64 ``mean`` and
``invstd`` of every row; :func:`row_apply` does the same with given
statistics (instance norm's running statistics); :func:`row_backward` writes
the input gradient and returns float64 ``dgamma``, ``dbeta`` of shape
``(G * Cg,)``.  Backward, with :math:`\hat g = g\gamma`, :math:`x_c = x -
\mu` (``x`` itself without centering) and bars the mean over a row's M values:

.. math::
    dx = \mathrm{invstd}\,\bigl(\hat g - \overline{\hat g}\bigr)
         - x_c\,\mathrm{invstd}^3\,\overline{\hat g\,x_c}

(without the :math:`\overline{\hat g}` term for RMSNorm, and just
:math:`\hat g\,\mathrm{invstd}` when the statistics are constants).  Nothing
full-size is allocated besides the output; the kernels keep no state.

How it is fast
--------------
Every row is independent, so statistics and normalization happen on the same
tile of whole rows (:data:`TILE_ELEMENTS`, about 128 KiB of float32, in the
core's L2 cache with the scratch it needs): the input is read from memory
once and the output written once.  Per tile, forward: the row sums with a BLAS
matrix-vector product, ``xc = x - mean``, ``sum(xc)`` and ``sum(xc**2)`` by
BLAS (``@`` and ``np.vecdot``), then the affine in place.  Backward: ``xc``,
the row and column sums of ``g`` and ``g * xc`` by BLAS against gamma,
invstd and ones, then ``dx`` in four in-place passes.

The affine has two forms, chosen by ``S``:

* *channel* (``S >= CHANNEL_FORM_MIN``, group and instance norm on images):
  invstd and gamma fold into one coefficient per (row, channel), broadcast
  over the S values: ``y = xc * (invstd * gamma) + beta``.
* *element* (short S; layer norm, where S = 1): the per-row invstd and the
  per-position gamma, beta are applied one after the other, each over whole
  contiguous rows, because NumPy's loops over a stride-0 operand run slowly
  on short inner loops.  Group norm in this form uses a tile-sized gamma
  pattern built once per call (tiles are whole multiples of G rows).

Tiles are cut from the shape alone and handed to :func:`~.pool.parallel_map`;
each tile's partial sums are combined in tile order, so results are
bit-identical for any thread count.  Rows longer than :data:`LONG_ROW` are cut
into chunks: statistics chunk by chunk (merged in chunk order), then the
elementwise passes chunk by chunk.

Numerics
--------
* The row statistics are float64.  Sums run in the compute dtype (float16 is
  computed in float32) on *centered* data: a first BLAS sum gives a shift
  ``m1``; ``sum(x - m1)`` and ``sum((x - m1)**2)`` then give ``mean = m1 +
  sum(x - m1) / M`` and ``M var = sum((x - m1)**2) - sum(x - m1)**2 / M``
  without cancellation, so data offset by 1e4 keeps its variance (float32 BLAS
  sums are as accurate as PyTorch's float32 row moments: ~1e-7 relative).
* The output is computed in the compute dtype as ``(x - mean) * invstd``
  with the mean rounded to it (not ``x * invstd - mean * invstd``): a constant
  row gives exactly 0 (exactly beta), as in PyTorch.
* Rows whose sums are not finite although the row is (float32 overflow of
  squares of values above ~1e19) are recomputed in float64; NaN and inf
  propagate as the formula says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..._validation import compute_dtype
from .pool import parallel_map

__all__ = [
    "CHANNEL_FORM_MIN",
    "LONG_ROW",
    "TILE_ELEMENTS",
    "RowPlan",
    "as_rows",
    "make_plan",
    "row_problem",
    "row_apply",
    "row_backward",
    "row_forward",
]

#: Values per tile (128 KiB of float32).  A backward tile works on five arrays
#: of this size (x, g, dx and two scratch tiles): 640 KiB, inside a 2 MiB L2.
TILE_ELEMENTS = 1 << 15

#: Shortest S for the channel form.  Below it NumPy's loops with a stride-0
#: operand run on inner loops too short to pay for their setup.
CHANNEL_FORM_MIN = 64

#: Rows longer than this are cut into chunks of TILE_ELEMENTS values.
LONG_ROW = 1 << 18

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
    tile_rows : int
        Rows per tile: ``TILE_ELEMENTS // M`` at least 1, and in the element
        form with ``G > 1`` a multiple of G (so every tile starts at group 0).
    channel_form : bool
        Whether the affine is applied per (row, channel) (else per element).
    """

    rows: int
    channels: int
    spatial: int
    groups: int
    dtype: np.dtype[Any]
    tile_rows: int
    channel_form: bool

    @property
    def row_length(self) -> int:
        """M = Cg * S."""
        return self.channels * self.spatial

    @property
    def long_rows(self) -> bool:
        """Whether rows are cut into chunks."""
        return self.row_length > LONG_ROW

    def tiles(self) -> list[tuple[int, int]]:
        """The ``(first_row, end_row)`` of every tile, from the shape alone."""
        t = self.tile_rows
        return [(r, min(r + t, self.rows)) for r in range(0, self.rows, t)]


def make_plan(rows: int, channels: int, spatial: int, groups: int, dtype: np.dtype[Any]) -> RowPlan:
    """The :class:`RowPlan` of an ``(R, Cg * S)`` problem in compute dtype `dtype`."""
    m = channels * spatial
    channel_form = spatial >= CHANNEL_FORM_MIN or m > LONG_ROW
    t = max(1, TILE_ELEMENTS // max(m, 1))
    if not channel_form and groups > 1:
        # A multiple of G (G rows at least): every tile starts at group 0, so one
        # tile-sized gamma pattern serves them all.
        t = max(1, t // groups) * groups
    return RowPlan(rows, channels, spatial, groups, np.dtype(dtype), min(t, max(rows, 1)), channel_form)


def as_rows(a: Array, rows: int) -> Array:
    """The C-contiguous ``(rows, size // rows)`` view of `a` (a copy only for non-contiguous input)."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.reshape(rows, a.size // rows if rows else 0)


def row_problem(x: Array, rows: int, channels: int, spatial: int, groups: int) -> tuple[Array, RowPlan]:
    """`x` as its ``(R, Cg * S)`` matrix and the plan to normalize it in its compute dtype."""
    return as_rows(x, rows), make_plan(rows, channels, spatial, groups, compute_dtype(x.dtype))


# --------------------------------------------------------------------------- affine parameters


class _Affine:
    """gamma and beta in the compute dtype, in the layout each form reads.

    Channel form: ``gamma``, ``beta`` of shape (G, Cg); a tile takes the rows
    ``group_of(r0, r1)``.  Element form: ``gamma_rows``, ``beta_rows`` of shape
    (1, M) for G = 1, or (tile_rows, M) -- the pattern of groups in a tile --
    for G > 1.
    """

    def __init__(self, plan: RowPlan, gamma: Array | None, beta: Array | None) -> None:
        ct = plan.dtype
        g, cg, s = plan.groups, plan.channels, plan.spatial
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
        return np.ascontiguousarray(np.tile(rep, (plan.tile_rows // plan.groups, 1)))

    def per_channel(self, p: Array | None, r0: int, r1: int) -> Array | None:
        """Rows r0..r1 of a (G, Cg) parameter: shape (T, Cg)."""
        if p is None:
            return None
        g = self.plan.groups
        if g == 1:
            return p
        return p[np.arange(r0, r1) % g]

    def per_element(self, p: Array | None, t: int) -> Array | None:
        """A tile's (t, M) or (1, M) element-form parameter."""
        if p is None or p.shape[0] == 1:
            return p
        return p[:t]


# --------------------------------------------------------------------------- statistics


def _centered_sums(xt: Array, xc: Array, ones: Array, center: bool) -> tuple[Array, Array, Array]:
    """Shift, ``sum(x - shift)``, ``sum((x - shift)**2)`` per row of a tile, the last two float64.

    Writes ``x - shift`` into `xc` (`xt` itself when not centering).
    """
    m = xt.shape[1]
    if not center:
        shift = np.zeros(xt.shape[0], xt.dtype)
        return shift, np.zeros(xt.shape[0]), np.vecdot(xt, xt).astype(np.float64)
    shift = xt @ ones
    shift /= m
    np.subtract(xt, shift[:, None], out=xc)
    return shift, (xc @ ones).astype(np.float64), np.vecdot(xc, xc).astype(np.float64)


def _stats_from_sums(
    shift: Array, d: Array, ss: Array, m: int, eps: float, center: bool
) -> tuple[Array, Array, Array]:
    """float64 mean, variance (mean square without centering) and invstd from shifted sums."""
    mean = shift.astype(np.float64)
    if center:
        mean = mean + d / m
        var = np.maximum(ss - d * d / m, 0.0) / m
    else:
        var = ss / m
    return mean, var, 1.0 / np.sqrt(var + eps)


def _float64_stats(xt: Array, eps: float, center: bool) -> tuple[Array, Array, Array]:
    """Exact two-pass float64 statistics of the rows of a tile."""
    x64 = xt.astype(np.float64)
    mean = x64.mean(axis=1) if center else np.zeros(xt.shape[0])
    if center:
        x64 -= mean[:, None]
    var = np.vecdot(x64, x64) / xt.shape[1]
    return mean, var, 1.0 / np.sqrt(var + eps)


def _fix_nonfinite(
    xt: Array, stats: tuple[Array, Array, Array], eps: float, center: bool, rows_sums: Array
) -> None:
    """Recompute in float64 the rows whose float32 sums overflowed (in place)."""
    bad = ~np.isfinite(rows_sums)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    for dst, src in zip(stats, _float64_stats(xt[rows], eps, center), strict=True):
        dst[rows] = src


# --------------------------------------------------------------------------- forward


def _normalize_tile(
    xt: Array,
    yt: Array,
    mean_c: Array,
    invstd: Array,
    aff: _Affine,
    r0: int,
    center: bool,
    recenter: bool,
) -> None:
    """``yt = (xt - mean) * invstd * gamma + beta``, in the compute dtype, in place in `yt`.

    `recenter`: `yt` does not yet hold ``xt - mean_c`` and must be rewritten.
    """
    plan = aff.plan
    t = xt.shape[0]
    ct = plan.dtype
    if recenter:
        if center:
            np.subtract(xt, mean_c[:, None], out=yt)
        elif yt is not xt:
            np.copyto(yt, xt)
    inv_c = invstd.astype(ct)
    if plan.channel_form:
        gamma = aff.per_channel(aff.gamma, r0, r0 + t)
        beta = aff.per_channel(aff.beta, r0, r0 + t)
        y3 = yt.reshape(t, plan.channels, plan.spatial)
        coef = inv_c[:, None] if gamma is None else inv_c[:, None] * gamma  # (T, 1) or (T, Cg)
        np.multiply(y3, coef[:, :, None], out=y3)
        if beta is not None:
            np.add(y3, np.broadcast_to(beta, (t, plan.channels))[:, :, None], out=y3)
    else:
        np.multiply(yt, inv_c[:, None], out=yt)
        gamma = aff.per_element(aff.gamma_rows, t)
        beta = aff.per_element(aff.beta_rows, t)
        if gamma is not None:
            np.multiply(yt, gamma, out=yt)
        if beta is not None:
            np.add(yt, beta, out=yt)


def _forward_tile(
    xt: Array, yt: Array, aff: _Affine, ones: Array, eps: float, center: bool, r0: int
) -> tuple[Array, Array, Array]:
    """Statistics and normalized output of one tile of whole rows; returns (mean, var, invstd)."""
    ct = aff.plan.dtype
    m = xt.shape[1]
    work = yt if yt.dtype == ct else np.empty(xt.shape, ct)
    if xt.dtype != ct:
        xt = xt.astype(ct)
    shift, d, ss = _centered_sums(xt, work, ones, center)
    stats = _stats_from_sums(shift, d, ss, m, eps, center)
    _fix_nonfinite(xt, stats, eps, center, d + ss)
    mean, _var, invstd = stats
    mean_c = mean.astype(ct)
    # x - shift is already in `work`; rewrite it only where the rounded mean differs.
    recenter = not center or bool(np.any(mean_c != shift))
    _normalize_tile(xt, work, mean_c, invstd, aff, r0, center, recenter)
    if work is not yt:
        np.copyto(yt, work)
    return stats


def row_forward(
    x2: Array,
    plan: RowPlan,
    gamma: Array | None,
    beta: Array | None,
    eps: float,
    y2: Array,
    *,
    center: bool = True,
) -> tuple[Array, Array, Array]:
    """Normalize the rows of `x2` into `y2`; return float64 ``(mean, var, invstd)`` of shape (R,).

    ``var`` is the biased variance (the mean square without centering).

    Parameters
    ----------
    x2, y2 : ndarray of shape (R, M), C-contiguous
        Input and output (any float dtype; computed in ``plan.dtype``).
    plan : RowPlan
        From :func:`make_plan`.
    gamma, beta : ndarray of G * Cg values or None
        The affine (None: 1 and 0).
    eps : float
        Added to the variance (to the mean square without centering).
    center : bool, keyword-only
        Subtract the mean (False: RMSNorm; the returned mean is 0).
    """
    r, m = plan.rows, plan.row_length
    if r == 0 or m == 0:
        with np.errstate(divide="ignore"):
            return np.zeros(r), np.zeros(r), np.full(r, 1.0 / np.sqrt(eps))
    aff = _Affine(plan, gamma, beta)
    if plan.long_rows:
        return _long_forward(x2, plan, aff, eps, y2, center)
    ones = np.ones(m, plan.dtype)

    def tile(bounds: tuple[int, int]) -> tuple[Array, Array, Array]:
        r0, r1 = bounds
        with np.errstate(all="ignore"):
            return _forward_tile(x2[r0:r1], y2[r0:r1], aff, ones, eps, center, r0)

    return _concat(_run(tile, plan.tiles(), r * m))


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
    ct = plan.dtype

    def tile(bounds: tuple[int, int]) -> None:
        r0, r1 = bounds
        xt, yt = x2[r0:r1], y2[r0:r1]
        with np.errstate(all="ignore"):
            work = yt if yt.dtype == ct else np.empty(xt.shape, ct)
            _normalize_tile(
                xt if xt.dtype == ct else xt.astype(ct),
                work,
                mean[r0:r1].astype(ct),
                invstd[r0:r1],
                aff,
                r0,
                True,
                True,
            )
            if work is not yt:
                np.copyto(yt, work)

    if plan.long_rows:
        tiles = [(r, r + 1) for r in range(plan.rows)]
    else:
        tiles = plan.tiles()
    _run(tile, tiles, plan.rows * plan.row_length)


# --------------------------------------------------------------------------- backward


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
    center: bool,
    want_params: bool,
) -> tuple[Array | None, Array | None]:
    """Input gradient of one tile into `dxt`; per-tile parameter-gradient partials.

    Returns ``(dgamma_part, dbeta_part)``: in the channel form float64 arrays of
    shape (T, Cg) (one per row, summed over the rows of each group by the
    caller); in the element form of shape (G, M) (this tile's rows already
    summed per group).  None when not `want_params`.
    """
    plan = aff.plan
    ct = plan.dtype
    t, m = xt.shape
    if xt.dtype != ct:
        xt = xt.astype(ct)
    if gt.dtype != ct:
        gt = gt.astype(ct)
    work = dxt if dxt.dtype == ct else np.empty(xt.shape, ct)
    inv = invstd
    if center:
        xc = np.empty(xt.shape, ct)
        np.subtract(xt, mean.astype(ct)[:, None], out=xc)
    else:
        xc = xt if not stats_depend else xt.copy()
    need_xc_sums = stats_depend or want_params
    dgamma_part = dbeta_part = None
    if plan.channel_form:
        cg, s = plan.channels, plan.spatial
        g3 = gt.reshape(t * cg, s)
        x3 = xc.reshape(t * cg, s)
        sg = (g3 @ ones[:s]).astype(np.float64).reshape(t, cg)  # sum_s g
        sgx = np.vecdot(g3, x3).astype(np.float64).reshape(t, cg) if need_xc_sums else None
        gamma = aff.per_channel(aff.gamma, r0, r0 + t)
        gamma64 = None if gamma is None else gamma.astype(np.float64)
        if want_params:
            assert sgx is not None
            dgamma_part, dbeta_part = sgx * inv[:, None], sg
        coef = inv[:, None] if gamma64 is None else inv[:, None] * gamma64  # (T, 1) or (T, Cg)
        d3 = work.reshape(t, cg, s)
        np.multiply(gt.reshape(t, cg, s), coef.astype(ct)[:, :, None], out=d3)
        if stats_depend:
            assert sgx is not None
            a = (sg if gamma64 is None else sg * gamma64).sum(axis=1)  # sum g_hat
            b = (sgx if gamma64 is None else sgx * gamma64).sum(axis=1)  # sum g_hat * xc
            _add_stat_terms(work, xc, a, b, inv, m, center)
    else:
        gamma_rows = aff.per_element(aff.gamma_rows, t)
        gx = None
        if want_params or gamma_rows is not None:
            gx = np.multiply(gt, xc)  # g * xc
        if want_params:
            assert gx is not None
            if plan.groups == 1:
                dgamma_part = (inv.astype(ct) @ gx).astype(np.float64)[None, :]
                dbeta_part = (ones[:t] @ gt).astype(np.float64)[None, :]
            else:
                k = t // plan.groups
                np.multiply(gx, inv.astype(ct)[:, None], out=gx)
                dgamma_part = (ones[:k] @ gx.reshape(k, plan.groups * m)).astype(np.float64)
                dbeta_part = (ones[:k] @ gt.reshape(k, plan.groups * m)).astype(np.float64)
                dgamma_part = dgamma_part.reshape(plan.groups, m)
                dbeta_part = dbeta_part.reshape(plan.groups, m)
                if stats_depend:
                    np.multiply(gt, xc, out=gx)  # back to g * xc for the row sums
        if gamma_rows is None:
            np.multiply(gt, inv.astype(ct)[:, None], out=work)
            if stats_depend:
                a = (gt @ ones[:m]).astype(np.float64) if center else None
                b = np.vecdot(gt, xc).astype(np.float64)
        else:
            assert gx is not None
            np.multiply(gt, gamma_rows, out=work)
            if stats_depend:
                a = _row_dot(gt, gamma_rows) if center else None
                b = _row_dot(gx, gamma_rows)
            np.multiply(work, inv.astype(ct)[:, None], out=work)
        if stats_depend:
            _add_stat_terms(work, xc, a, b, inv, m, center)
    if work is not dxt:
        np.copyto(dxt, work)
    return dgamma_part, dbeta_part


def _row_dot(a: Array, gamma_rows: Array) -> Array:
    """float64 ``sum_j a_ij * gamma_ij`` per row (gamma one row or one per row)."""
    if gamma_rows.shape[0] == 1:
        return (a @ gamma_rows[0]).astype(np.float64)
    return np.vecdot(a, gamma_rows).astype(np.float64)


def _add_stat_terms(
    work: Array, xc: Array, a: Array | None, b: Array, inv: Array, m: int, center: bool
) -> None:
    """``work += xc * k1 + k2``: the terms of dx that come through the statistics.

    ``k1 = -invstd**3 * b / m`` (b = sum g_hat * xc) and ``k2 = -invstd * a / m``
    (a = sum g_hat; absent without centering).  `xc` is scratch and is overwritten.
    """
    ct = work.dtype
    t = work.shape[0]
    k1 = (-(inv**3) * b / m).astype(ct)
    x2 = xc.reshape(t, -1)
    np.multiply(x2, k1[:, None], out=x2)
    w2 = work.reshape(t, -1)
    np.add(w2, x2, out=w2)
    if center:
        assert a is not None
        k2 = (-inv * a / m).astype(ct)
        np.add(w2, k2[:, None], out=w2)


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
    center: bool = True,
    want_params: bool = True,
) -> tuple[Array, Array]:
    """Write the input gradient into `dx2`; return float64 ``(dgamma, dbeta)`` of shape (G * Cg,).

    Parameters
    ----------
    g2, x2, dx2 : ndarray of shape (R, M), C-contiguous
        Upstream gradient, forward input, and the input gradient (output).
    plan : RowPlan
        The forward's plan.
    mean, invstd : float64 ndarray of shape (R,)
        The statistics the forward normalized with.
    gamma : ndarray of G * Cg values or None
        The forward's gamma (None: 1).
    stats_depend : bool, keyword-only
        Whether the statistics were computed from `x2` (else they are constants
        and ``dx = g * gamma * invstd``).
    center : bool, keyword-only
        Whether the forward subtracted the mean (False: RMSNorm).
    want_params : bool, keyword-only
        Compute dgamma and dbeta (else zeros are returned).
    """
    r, m = plan.rows, plan.row_length
    size = plan.groups * plan.channels
    if r == 0 or m == 0:
        return np.zeros(size), np.zeros(size)
    aff = _Affine(plan, gamma, None)
    if plan.long_rows:
        return _long_backward(g2, x2, plan, aff, mean, invstd, dx2, stats_depend, center, want_params)
    ones = np.ones(max(m, plan.tile_rows), plan.dtype)

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
                center,
                want_params,
            )

    parts = _run(tile, plan.tiles(), r * m)
    if not want_params:
        return np.zeros(size), np.zeros(size)
    return _param_sums(parts, plan)


def _param_sums(parts: list[tuple[Array | None, Array | None]], plan: RowPlan) -> tuple[Array, Array]:
    """dgamma, dbeta of shape (G * Cg,) from the tiles' partials, in tile order."""
    g, cg = plan.groups, plan.channels
    dg = [p[0] for p in parts]
    db = [p[1] for p in parts]
    if plan.channel_form:
        # One (T, Cg) block per tile: rows r in order; group r % G.
        rows_g = np.concatenate(dg)  # type: ignore[arg-type]
        rows_b = np.concatenate(db)  # type: ignore[arg-type]
        return _sum_over_groups(rows_g, g), _sum_over_groups(rows_b, g)
    # Element form: (G, M) per tile; summed over tiles, then over S within each channel.
    tot_g = _ordered_sum(dg).reshape(g, cg, plan.spatial).sum(axis=2).ravel()
    tot_b = _ordered_sum(db).reshape(g, cg, plan.spatial).sum(axis=2).ravel()
    return tot_g, tot_b


def _sum_over_groups(per_row: Array, g: int) -> Array:
    """Sum the (R, Cg) per-row values over the rows of each group: shape (G * Cg,)."""
    r, cg = per_row.shape
    full = (r // g) * g
    out = per_row[:full].reshape(r // g, g, cg).sum(axis=0)
    if full < r:  # only when R is not a multiple of G (never for group/instance norm)
        out[: r - full] += per_row[full:]
    return out.ravel()


def _ordered_sum(parts: list[Any]) -> Array:
    total = np.array(parts[0], dtype=np.float64, copy=True)
    for p in parts[1:]:
        total += p
    return total


# --------------------------------------------------------------------------- long rows


def _chunks(m: int) -> list[tuple[int, int]]:
    return [(c, min(c + TILE_ELEMENTS, m)) for c in range(0, m, TILE_ELEMENTS)]


def _long_forward(
    x2: Array, plan: RowPlan, aff: _Affine, eps: float, y2: Array, center: bool
) -> tuple[Array, Array, Array]:
    """Forward of rows longer than LONG_ROW: statistics chunk by chunk, then the passes."""
    ct = plan.dtype
    r, m = plan.rows, plan.row_length
    chunks = _chunks(m)
    ones = np.ones(TILE_ELEMENTS, ct)
    items = [(row, c0, c1) for row in range(r) for (c0, c1) in chunks]
    shift = np.zeros(r, ct)
    if center:

        def row_sum(item: tuple[int, int, int]) -> Any:
            row, c0, c1 = item
            xt = x2[row, c0:c1]
            return (xt.astype(ct) if xt.dtype != ct else xt) @ ones[: c1 - c0]

        sums = np.array(_run(row_sum, items, r * m), dtype=np.float64).reshape(r, len(chunks))
        shift = (sums.sum(axis=1) / m).astype(ct)

    def shifted(item: tuple[int, int, int]) -> tuple[float, float]:
        row, c0, c1 = item
        with np.errstate(all="ignore"):
            xt = x2[row, c0:c1]
            xt = xt.astype(ct) if xt.dtype != ct else xt
            xc = xt - shift[row] if center else xt
            return float(xc @ ones[: c1 - c0]), float(np.vecdot(xc, xc))

    sums2 = np.array(_run(shifted, items, r * m), dtype=np.float64).reshape(r, len(chunks), 2)
    d, ss = sums2[:, :, 0].sum(axis=1), sums2[:, :, 1].sum(axis=1)
    with np.errstate(all="ignore"):
        stats = _stats_from_sums(shift, d, ss, m, eps, center)
        for row in np.flatnonzero(~np.isfinite(d + ss)):
            for dst, src in zip(stats, _float64_stats(x2[row : row + 1], eps, center), strict=True):
                dst[row] = src[0]
    _long_apply(x2, plan, aff, stats[0], stats[2], y2, center)
    return stats


def _long_apply(
    x2: Array, plan: RowPlan, aff: _Affine, mean: Array, invstd: Array, y2: Array, center: bool
) -> None:
    """The elementwise passes of long rows, one chunk of whole channels at a time."""
    ct = plan.dtype
    cg, s = plan.channels, plan.spatial
    mean_c = mean.astype(ct)
    per_chunk = max(1, TILE_ELEMENTS // s)  # channels per chunk
    items = [(row, c0, min(c0 + per_chunk, cg)) for row in range(plan.rows) for c0 in range(0, cg, per_chunk)]

    def chunk(item: tuple[int, int, int]) -> None:
        row, c0, c1 = item
        with np.errstate(all="ignore"):
            xt = x2[row, c0 * s : c1 * s].reshape(c1 - c0, s)
            yt = y2[row, c0 * s : c1 * s].reshape(c1 - c0, s)
            xt = xt.astype(ct) if xt.dtype != ct else xt
            work = yt if yt.dtype == ct else np.empty(xt.shape, ct)
            if center:
                np.subtract(xt, mean_c[row], out=work)
            else:
                np.copyto(work, xt)
            gamma = aff.per_channel(aff.gamma, row, row + 1)
            beta = aff.per_channel(aff.beta, row, row + 1)
            coef = invstd[row] if gamma is None else invstd[row] * gamma[0, c0:c1].astype(np.float64)
            np.multiply(work, np.asarray(coef, ct).reshape(-1, 1), out=work)
            if beta is not None:
                np.add(work, beta[0, c0:c1, None], out=work)
            if work is not yt:
                np.copyto(yt, work)

    _run(chunk, items, plan.rows * plan.row_length)


def _long_backward(
    g2: Array,
    x2: Array,
    plan: RowPlan,
    aff: _Affine,
    mean: Array,
    invstd: Array,
    dx2: Array,
    stats_depend: bool,
    center: bool,
    want_params: bool,
) -> tuple[Array, Array]:
    """Backward of rows longer than LONG_ROW, chunk by chunk (whole channels per chunk)."""
    ct = plan.dtype
    cg, s, g = plan.channels, plan.spatial, plan.groups
    m = plan.row_length
    mean_c = mean.astype(ct)
    per_chunk = max(1, TILE_ELEMENTS // s)
    ones = np.ones(s, ct)
    items = [(row, c0, min(c0 + per_chunk, cg)) for row in range(plan.rows) for c0 in range(0, cg, per_chunk)]

    def load(row: int, c0: int, c1: int) -> tuple[Array, Array]:
        xt = x2[row, c0 * s : c1 * s].reshape(c1 - c0, s)
        gt = g2[row, c0 * s : c1 * s].reshape(c1 - c0, s)
        xt = xt.astype(ct) if xt.dtype != ct else xt
        gt = gt.astype(ct) if gt.dtype != ct else gt
        xc = xt - mean_c[row] if center else xt
        return gt, xc

    def sums(item: tuple[int, int, int]) -> tuple[Array, Array]:
        row, c0, c1 = item
        with np.errstate(all="ignore"):
            gt, xc = load(row, c0, c1)
            return (gt @ ones).astype(np.float64), np.vecdot(gt, xc).astype(np.float64)

    parts = _run(sums, items, plan.rows * m)
    sg = np.concatenate([p[0] for p in parts]).reshape(plan.rows, cg)  # per (row, channel)
    sgx = np.concatenate([p[1] for p in parts]).reshape(plan.rows, cg)
    gamma64 = None if aff.gamma is None else aff.gamma.astype(np.float64)
    gam_rows = None if gamma64 is None else gamma64[np.arange(plan.rows) % g]  # (R, Cg)
    a = (sg if gam_rows is None else sg * gam_rows).sum(axis=1)
    b = (sgx if gam_rows is None else sgx * gam_rows).sum(axis=1)
    with np.errstate(all="ignore"):
        k1 = -(invstd**3) * b / m
        k2 = -invstd * a / m if center else np.zeros(plan.rows)

    def chunk(item: tuple[int, int, int]) -> None:
        row, c0, c1 = item
        with np.errstate(all="ignore"):
            gt, xc = load(row, c0, c1)
            dt = dx2[row, c0 * s : c1 * s].reshape(c1 - c0, s)
            work = dt if dt.dtype == ct else np.empty(gt.shape, ct)
            coef = invstd[row] if gam_rows is None else invstd[row] * gam_rows[row, c0:c1]
            np.multiply(gt, np.asarray(coef, ct).reshape(-1, 1), out=work)
            if stats_depend:
                xk = np.multiply(xc, ct.type(k1[row]))
                work += xk
                if center:
                    work += ct.type(k2[row])
            if work is not dt:
                np.copyto(dt, work)

    _run(chunk, items, plan.rows * m)
    size = g * cg
    if not want_params:
        return np.zeros(size), np.zeros(size)
    return _sum_over_groups(sgx * invstd[:, None], g), _sum_over_groups(sg, g)


# --------------------------------------------------------------------------- helpers


def _run(fn: Callable[[Any], Any], items: list[Any], work_elements: int) -> list[Any]:
    """One item on the caller (the small-input path: no pool), else the pool."""
    if len(items) == 1:
        return [fn(items[0])]
    return parallel_map(fn, items, work_elements)


def _concat(parts: list[tuple[Array, Array, Array]]) -> tuple[Array, Array, Array]:
    if len(parts) == 1:
        return parts[0]
    mean, var, invstd = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return mean, var, invstd
