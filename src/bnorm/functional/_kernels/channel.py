r"""Per-channel tiled passes: the sums and elementwise passes of batch norm on large input.

Contract
--------
Every function works on ``(A, K, B)`` views (see
:mod:`~bnorm.functional._kernels.moments`) and per-channel float64 vectors of
length K; outputs go into a given array.  :func:`tiled_sums` returns float64
per-channel sums; :func:`affine_pass` and :func:`backward_pass` write
``(x - center) * scale + shift`` and ``g * a + x * b + c``.  (Layer, group,
instance and RMS norm have their own fused kernels in :mod:`.rowwise`.)

How the kernels are fast
------------------------
* Sums and sums of squares (or of ``g`` and ``g * x``) are two large calls
  per work item when the input is C-contiguous in the compute dtype: for long
  rows (``B >= 128``) ``np.vecdot`` of every row with a ones vector and with
  ``x`` (BLAS dot products, single-threaded); for short rows ``np.add.reduce``
  and an einsum down groups of 256 rows of the ``(A, K * B)`` matrix.  Other
  inputs (other dtypes, shifted sums) go tile by tile.
* The elementwise passes are short programs -- ``tile = x * scale; tile +=
  shift`` -- run tile by tile (512 KiB of float32, so the chained operations
  work on data in the core's L2 cache).  The first operation reads the input
  and writes the output tile; the rest work in place.  The coefficients are
  NumPy scalars where rows are long (one channel per tile: NumPy's fastest
  loops), else *planes* -- the per-channel coefficients broadcast over a whole
  row of the view, or over a run of channels -- because NumPy's loops over
  contiguous operands run two to three times faster than its broadcasting
  ones; views with few rows of A (a batch of one or two) broadcast
  columns, since a plane would serve too few tiles.  See :func:`_elementwise`.
* Work items (tiles, runs of rows) are cut from the shape alone and handed to
  :func:`~bnorm.functional._kernels.pool.parallel_map`; partial sums are
  combined in item order, so results are bit-identical for any thread count.
  Scratch memory is sized for :data:`SCRATCH_THREADS` threads holding tiles
  at once, never from the actual count (which would change the tiling).

Numerical choices
-----------------
Per-channel vectors and every sum across rows, chunks and tiles are float64.
Within a row (at most 8192 values, 4096 in the whole-array sums) or a group of
rows (32 rows tile by tile, 256 in the whole-array sums of short rows) the
sums accumulate in the accumulation dtype the caller passes.  float16 is
computed in float32, tile by tile.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..._validation import compute_dtype as _compute_dtype
from .pool import active_threads, parallel_map

__all__ = ["SCRATCH_THREADS", "affine_pass", "backward_pass", "col", "tiled_sums"]

#: Elements per tile of the tile-by-tile sums and of the 'columns' form of the
#: elementwise passes (256 KiB of float32): a tile and what is chained on it
#: stay in a core's L2 cache together.
TILE_ELEMENTS = 1 << 16

#: Reduced axes at least this long are summed with row dot products (BLAS);
#: shorter ones column-wise over the rows of a tile.
ROW_DOT_MIN = 128

#: The sums' tiling bounds scratch memory for this many threads holding tiles at
#: once (the default thread count's cap).  It is a constant, not
#: :func:`num_threads`: the sums' tiling decides their rounding, and must not
#: depend on the thread count.  (The elementwise passes compute every output
#: element with the same operations however they are tiled, so their scratch
#: bound follows the actual thread count: see :func:`_scratch_threads`.)
SCRATCH_THREADS = 8

#: Values per work item of the whole-array sums (1 MiB of float32): enough
#: items for the pool's threads to share the work evenly -- and for the calling
#: thread to take over a descheduled helper's share -- few enough that the
#: per-call overhead stays below 1%.
SUM_ITEM_ELEMENTS = 1 << 18

#: Rows per np.vecdot call of the whole-array sums at least: NumPy runs a
#: gufunc's loop without the GIL only over more than 500 outer iterations.
GIL_FREE_ROWS = 512

#: The whole-array sums cut a large array into this many parts per thread (see :func:`_sum_item`).
PARTS_PER_THREAD = 2

FloatArray = np.ndarray[Any, np.dtype[np.floating[Any]]]


def col(v: np.ndarray) -> np.ndarray:
    """A per-channel vector shaped to broadcast against an ``(A, K, B)`` block."""
    return v[None, :, None]


Tile = tuple[slice, slice, slice]


def _tiles(shape3: tuple[int, int, int], elements: int = TILE_ELEMENTS) -> list[Tile]:
    """Tiles ``(rows of A, channels of K, columns of B)`` of about `elements` values.

    Whole rows of A with all channels where they fit; else one row of A and a
    run of channels; else (``B > elements``) one channel's row in pieces.  The
    order is channel-run major (all rows of one run, then the next).
    """
    a, k, b = shape3
    if a == 0 or k == 0 or b == 0:
        return []
    row = k * b
    whole = slice(0, b)
    if row <= elements:
        step = max(1, elements // row)
        return [(slice(s, min(a, s + step)), slice(0, k), whole) for s in range(0, a, step)]
    if b <= elements:
        kstep = max(1, elements // b)
        return [
            (slice(i, i + 1), slice(s, min(k, s + kstep)), whole)
            for s in range(0, k, kstep)
            for i in range(a)
        ]
    return [
        (slice(i, i + 1), slice(j, j + 1), slice(s, min(b, s + elements)))
        for s in range(0, b, elements)
        for j in range(k)
        for i in range(a)
    ]


def _tile(x3: np.ndarray, t: Tile, ct: np.dtype[Any]) -> np.ndarray:
    blk = x3[t]
    return blk if blk.dtype == ct else blk.astype(ct)


#: Row dot products longer than this are split (when the row length allows):
#: it bounds the depth of float32 accumulation and keeps BLAS single-threaded.
ROW_DOT_MAX = 8192

#: The same bound for the whole-array sums, where rows of 4096 float32 values
#: measured twice as fast as rows of 8192 (in the tile-by-tile sums of float32
#: data accumulated in float64, half as fast: those keep ROW_DOT_MAX).
WHOLE_ROW_DOT_MAX = 4096

#: The bound for the whole-array sums of shifted data (``x - shift`` first goes
#: into a scratch part bounded by 1/16 of the input): rows this short let a part
#: hold the GIL_FREE_ROWS rows NumPy needs to release the GIL.  Measured on 4 Mi
#: float32 values, parts of 128 Ki values, 1 / 2 threads: rows of 4096 (32 per
#: call) 1.75 / 2.37 ms, rows of 256 (512 per call) 1.68 / 1.38 ms.
SHIFTED_ROW_DOT_MAX = 256


def _row_length(b: int, cap: int | None = None) -> int:
    """The length rows of `b` elements are cut into for the row dot products."""
    cap = ROW_DOT_MAX if cap is None else cap
    if b <= cap:
        return b
    for length in range(cap, ROW_DOT_MIN - 1, -1):
        if b % length == 0:
            return length
    return b


def _reduce_tiles(shape3: tuple[int, int, int], elements: int = TILE_ELEMENTS) -> list[Tile]:
    """Tiles for the reductions.

    Long rows (``B >= ROW_DOT_MIN``): the contiguous tiles of :func:`_tiles`.
    Short rows: tall tiles -- many rows of A by a run of at least ~512 values
    of one row -- so that the column reductions run down many rows at once.
    """
    a, k, b = shape3
    if b >= ROW_DOT_MIN or a == 0 or k == 0 or b == 0:
        return _tiles(shape3, elements)
    if 32 * k * b <= elements:  # whole rows: 32 or more of them per tile
        kc = k
    else:
        kc = min(k, max(1, -(-512 // b)))
    r = min(a, max(1, elements // (kc * b)))
    if r == a:
        kc = min(k, max(kc, elements // (a * b)))
    nr = -(-a // r)
    rb = np.linspace(0, a, nr + 1).astype(int)
    return [
        (slice(int(rb[i]), int(rb[i + 1])), slice(s, min(k, s + kc)), slice(0, b))
        for s in range(0, k, kc)
        for i in range(nr)
    ]


_ONES: dict[tuple[int, str], np.ndarray] = {}


def _ones(n: int, dtype: np.dtype[Any]) -> np.ndarray:
    """A cached read-only ones vector (the BLAS summation vector)."""
    key = (n, np.dtype(dtype).str)
    v = _ONES.get(key)
    if v is None:
        if len(_ONES) > 64:
            _ONES.clear()
        v = np.ones(n, dtype=dtype)
        v.flags.writeable = False
        _ONES[key] = v
    return v


def _tile_sums(blk: np.ndarray, other: np.ndarray | None) -> tuple[FloatArray, FloatArray]:
    """Per-channel ``(sum(blk), sum(blk * other))`` of an ``(r, kc, B)`` tile.

    Each value is one row's BLAS sum (compute dtype) or a float64 sum of such;
    the caller accumulates them in float64.

    `other` None means ``blk`` itself (a sum of squares).
    """
    r, kc, b = blk.shape
    if b >= ROW_DOT_MIN:
        length = _row_length(b)
        b2 = blk.reshape(-1, length)
        o2 = b2 if other is None else other.reshape(-1, length)
        s1 = np.vecdot(b2, _ones(length, b2.dtype))
        s2 = np.vecdot(o2, b2)
        if r == 1 and length == b:
            return s1, s2  # one value per channel already; the caller adds in float64
        return (
            s1.reshape(r, kc, -1).sum(axis=(0, 2), dtype=np.float64),
            s2.reshape(r, kc, -1).sum(axis=(0, 2), dtype=np.float64),
        )
    b2 = blk.reshape(r, kc * b)
    o2 = b2 if other is None else other.reshape(r, kc * b)
    s1, s2 = _column_sums(b2, o2)
    if b == 1:
        return s1, s2
    return s1.reshape(kc, b).sum(axis=1), s2.reshape(kc, b).sum(axis=1)


#: Column sums run down at most this many rows in the compute dtype, then in float64.
COLUMN_GROUP = 32


def _column_sums(b2: np.ndarray, o2: np.ndarray) -> tuple[FloatArray, FloatArray]:
    """``(b2.sum(axis=0), (o2 * b2).sum(axis=0))`` in float64, summing groups of rows first.

    Narrow contiguous rows (few channels, channels-last) are first joined
    ``m`` at a time into rows of at least 512 values, so that NumPy's inner
    loops run long; the ``m`` partial sums per column are added at the end.
    """
    r, n = b2.shape
    m = -(-512 // n) if n else 1
    if m > 1 and r >= 2 * m and b2.flags.c_contiguous and o2.flags.c_contiguous:
        rm = r - r % m
        s1, s2 = _column_sums(b2[:rm].reshape(rm // m, m * n), o2[:rm].reshape(rm // m, m * n))
        s1, s2 = s1.reshape(m, n).sum(axis=0), s2.reshape(m, n).sum(axis=0)
        if rm < r:
            t1, t2 = _column_sums(b2[rm:], o2[rm:])
            s1 += t1
            s2 += t2
        return s1, s2
    q = COLUMN_GROUP
    r0 = r - r % q
    if r0 == 0:
        return np.add.reduce(b2, axis=0, dtype=np.float64), np.einsum("ij,ij->j", o2, b2).astype(np.float64)
    bg = b2[:r0].reshape(r0 // q, q, n)
    og = o2[:r0].reshape(r0 // q, q, n)
    s1 = np.add.reduce(bg, axis=1).sum(axis=0, dtype=np.float64)
    s2 = np.einsum("gqj,gqj->gj", og, bg).sum(axis=0, dtype=np.float64)
    if r0 < r:
        s1 += np.add.reduce(b2[r0:], axis=0)
        s2 += np.einsum("ij,ij->j", o2[r0:], b2[r0:])
    return s1, s2


def tiled_sums(
    x3: np.ndarray, y3: np.ndarray | None, shift: np.ndarray | None, ct: np.dtype[Any]
) -> tuple[FloatArray, FloatArray]:
    """Per-channel sums over the tiles of ``d = x3 - shift`` (shift None: ``d = x3``), float64.

    Without `y3`: ``(sum(d), sum(d**2))``.  With `y3` (the upstream gradient
    ``g``): ``(sum(g), sum(g * d))``.  `shift` is a length-K vector already in
    the compute dtype `ct`.
    """
    k = x3.shape[1]
    whole = _whole_sums(x3, y3, ct, shift)
    if whole is not None:
        return whole
    # Each thread holds up to two tile temporaries in `ct`: keep them all
    # within 1/16 of the input's size.
    elements = max(4096, min(TILE_ELEMENTS, x3.size // (64 * SCRATCH_THREADS)))
    tiles = _reduce_tiles(x3.shape, elements)

    def work(t: Tile) -> tuple[FloatArray, FloatArray]:
        chans = t[1]
        blk = x3[t]
        if shift is not None:
            blk = np.subtract(blk, col(shift[chans]), dtype=ct)
        elif blk.dtype != ct:
            blk = blk.astype(ct)
        other = None if y3 is None else _tile(y3, t, ct)
        if other is not None:
            # sum(other) is what the backward pass needs; swap so s1 sums `other`.
            s_other, s_prod = _tile_sums(other, blk)
            return s_other, s_prod
        return _tile_sums(blk, None)

    s1 = np.zeros(k, dtype=np.float64)
    s2 = np.zeros(k, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for (_, chans, _), (p1, p2) in zip(tiles, parallel_map(work, tiles, x3.size), strict=True):
            s1[chans] += p1
            s2[chans] += p2
    return s1, s2


#: Rows of A summed in the compute dtype before the float64 sum (short rows).
SUM_GROUP = 256

#: Rows of A narrower than this (``K * B`` values) take the column sums of
#: :func:`_column_sums` (rows joined first), wider ones the grouped sums.
NARROW_ROW = 64


def _sum_item(size: int) -> int:
    """Values per work item of the whole-array sums: PARTS_PER_THREAD parts per thread.

    The split cannot change a bit: every row's (or group's) partial sums land in
    their own slot of one array, which is summed in float64 in an order fixed by
    the shape.  So the parts are sized for the threads there are: two streaming
    calls over a large part beat many calls over cached 1 MiB parts on two
    threads (measured on (32, 64, 56, 56) float32: 1.07 ms in halves against
    1.59 ms in 25 parts; one thread 1.5 ms), and two parts per thread leave the
    calling thread a part to take over from a descheduled helper.
    """
    return max(SUM_ITEM_ELEMENTS, -(-size // (PARTS_PER_THREAD * _scratch_threads())))


def _whole_sums(
    x3: np.ndarray, y3: np.ndarray | None, ct: np.dtype[Any], shift: np.ndarray | None = None
) -> tuple[FloatArray, FloatArray] | None:
    """The sums of :func:`tiled_sums` over the whole contiguous array at once.

    For C-contiguous input already in the compute dtype a few large calls beat
    any loop over small tiles: the array is cut into contiguous parts of about
    SUM_ITEM_ELEMENTS values (a split fixed by the shape), and each part takes
    two calls -- three with a `shift`, whose ``d = x - shift`` goes into a
    per-thread scratch part (at most 1 MiB of float32, in the core's L2 cache;
    all threads' parts within 1/16 of the input) first.

    * long rows (``B >= ROW_DOT_MIN``): ``np.vecdot`` of each row (at most
      WHOLE_ROW_DOT_MAX values) with a ones vector and with ``x``;
    * short rows, ``K * B >= NARROW_ROW``: the ``(A, K * B)`` matrix in groups of
      SUM_GROUP rows, summed down each group's columns (``np.add.reduce`` and
      an einsum);
    * narrow rows (unshifted only): the column sums of :func:`_column_sums`.

    Partial sums (per row, per group) are in the compute dtype; everything
    across them is summed in float64, in an order fixed by the shape.  No BLAS
    matrix product is used: OpenBLAS's worker threads spin for ~0.1 s after
    each threaded call and would take a core from the elementwise pass that
    follows.  None where the input does not qualify.

    Measured on (32, 64, 56, 56) float32 offset by 10, 2 threads: the shifted
    backward sums took 16 ms tile by tile (392 tiles of 64 Ki values, ~15 NumPy
    calls each) against 4 ms unshifted; in parts of 256 Ki values they cost
    about one extra in-cache subtraction over the unshifted sums.
    """
    arrays = [x3] if y3 is None else [x3, y3]
    if any(not a.flags.c_contiguous or a.dtype != ct for a in arrays):
        return None
    a, k, b = x3.shape
    # Values per work item; with a shift each thread's scratch part is one item:
    # all of them together within 1/16 of the input.
    item = _sum_item(x3.size)
    if shift is not None:
        item = min(item, max(SMALL_BUDGET, x3.size // (16 * _scratch_threads())))
    local = threading.local()

    def scratch(shape: tuple[int, int]) -> np.ndarray:
        n = shape[0] * shape[1]
        buf: np.ndarray | None = getattr(local, "d", None)
        if buf is None or buf.size < n:
            buf = np.empty(max(n, item), dtype=ct)
            local.d = buf
        return buf[:n].reshape(shape)

    if b >= ROW_DOT_MIN:
        length = _row_length(b, WHOLE_ROW_DOT_MAX if shift is None else SHIFTED_ROW_DOT_MAX)
        x2 = x3.reshape(-1, length)
        g2 = None if y3 is None else y3.reshape(-1, length)
        rows = x2.shape[0]
        r1 = np.empty(rows, dtype=ct)
        r2 = np.empty(rows, dtype=ct)
        ones = _ones(length, ct)
        # Row i of x2 belongs to channel (i // (b // length)) % k: its shift, as a column.
        c_rows = None if shift is None else np.tile(np.repeat(shift.astype(ct), b // length), a)[:, None]
        # Runs of rows of about SUM_ITEM_ELEMENTS values, two calls each: few calls
        # (each costs a GIL hand-over), yet enough runs to share among threads.
        # Unshifted, at least GIL_FREE_ROWS rows per call: NumPy releases the GIL in
        # np.vecdot only for more than 500 rows (its threading threshold), and a
        # part of 256 rows of 4096 kept the other thread waiting (measured on
        # (8, 32, 16, 32, 32) float32: the sums took 1.3 ms on 2 threads, as on 1;
        # 0.75 ms in parts of 512 rows).  Shifted, the part is the scratch for
        # d = x - shift, whose memory bound comes first; its short rows
        # (SHIFTED_ROW_DOT_MAX) put 512 or more of them in a part of large input.
        step = max(1, item // length, GIL_FREE_ROWS if shift is None else 1)
        parts = [slice(r, min(rows, r + step)) for r in range(0, rows, step)]

        def rows_work(sl: slice) -> None:
            xs = x2[sl]
            if c_rows is not None:
                xs = np.subtract(xs, c_rows[sl], out=scratch(xs.shape))
            gs = xs if g2 is None else g2[sl]
            np.vecdot(gs, ones, out=r1[sl])
            np.vecdot(gs, xs, out=r2[sl])

        parallel_map(rows_work, parts, x3.size)
        return (
            r1.reshape(a, k, -1).sum(axis=(0, 2), dtype=np.float64),
            r2.reshape(a, k, -1).sum(axis=(0, 2), dtype=np.float64),
        )
    n = k * b
    if n < NARROW_ROW:
        if shift is not None:
            return None
        # The whole array as one tile: sum(g) (or sum(x)) and sum(g * x) (or sum(x**2)).
        return _tile_sums(x3, None) if y3 is None else _tile_sums(y3, x3)
    x2 = x3.reshape(a, n)
    g2 = None if y3 is None else y3.reshape(a, n)
    plane = None if shift is None else np.repeat(shift.astype(ct), b)
    q = min(a, SUM_GROUP)
    ng = -(-a // q)
    # One row of partial sums per group (1/256 of the array), summed in float64 at the end.
    part1 = np.empty((ng, n), dtype=ct)
    part2 = np.empty((ng, n), dtype=ct)
    full = a // q
    # Work items of about SUM_ITEM_ELEMENTS values: runs of groups, or (a few large
    # groups) runs of columns across all groups -- fixed by the shape.
    per_item = item // (q * n)
    if per_item >= 1:
        blocks = [(i, min(ng, i + per_item), 0, n) for i in range(0, ng, per_item)]
    else:
        cols = max(16, item // a // 16 * 16)
        blocks = [(0, ng, c0, min(n, c0 + cols)) for c0 in range(0, n, cols)]

    def group_work(part: tuple[int, int, int, int]) -> None:
        i0, i1, c0, c1 = part
        r0, r1_ = i0 * q, min(a, i1 * q)
        xs = x2[r0:r1_, c0:c1]
        if plane is not None:
            xs = np.subtract(xs, plane[c0:c1], out=scratch(xs.shape))
        gs = xs if g2 is None else g2[r0:r1_, c0:c1]
        w1 = min(i1, full)
        nf = (w1 - i0) * q  # rows in whole groups
        if nf > 0:
            gg = gs[:nf].reshape(-1, q, c1 - c0)
            np.add.reduce(gg, axis=1, out=part1[i0:w1, c0:c1])
            np.einsum("gij,gij->gj", gg, xs[:nf].reshape(-1, q, c1 - c0), out=part2[i0:w1, c0:c1])
        if w1 < i1:  # the last, shorter group
            np.add.reduce(gs[nf:], axis=0, out=part1[w1, c0:c1])
            np.einsum("ij,ij->j", gs[nf:], xs[nf:], out=part2[w1, c0:c1])

    parallel_map(group_work, blocks, x3.size)
    s1 = part1.sum(axis=0, dtype=np.float64)
    s2 = part2.sum(axis=0, dtype=np.float64)
    if b > 1:
        return s1.reshape(k, b).sum(axis=1), s2.reshape(k, b).sum(axis=1)
    return s1, s2


# --------------------------------------------------------------------------- elementwise passes


#: Rows (the reduced axis B) at least this long take the *scalar* form of the
#: elementwise passes: one channel at a time, its coefficients as NumPy scalars
#: (NumPy's fastest loops).  Shorter rows take the *plane* form.
SCALAR_ROW_MIN = 2048

#: The scalar form needs this many values per channel (fewer: too many small calls).
SCALAR_CHANNEL_MIN = 1 << 15

#: The plane forms need at least this many rows of A: each plane serves that many tiles.
PLANE_REUSE = 8

#: Values per tile of the elementwise passes (512 KiB of float32): a tile, the
#: input tiles it reads and its planes stay in a core's L2 cache together.
PASS_TILE = 1 << 17

#: Values per coefficient plane in the whole-rows plane form (the plane is
#: broadcast over the outer axis of the tile).
PLANE_ELEMENTS = 1 << 14

#: Planes and tile temporaries may always take this many values, whatever the
#: array's size (their bounds as fractions of the array matter for large arrays only).
SMALL_BUDGET = 1 << 14


def _independent(x3: np.ndarray, out3: np.ndarray) -> np.ndarray:
    """`x3`, or a copy of it when `out3` overlaps it other than element for element."""
    if x3 is out3 or not np.may_share_memory(x3, out3):
        return x3
    same = (
        x3.__array_interface__["data"][0] == out3.__array_interface__["data"][0]
        and x3.strides == out3.strides
        and x3.dtype == out3.dtype
    )
    return x3 if same else x3.copy()


@dataclass(frozen=True)
class _Step:
    """One operation of an elementwise program: ``tile = ufunc(tile, operand)``.

    The first step of a program reads the source input's tile instead of the
    tile.  `operand` names a per-channel coefficient or an input array; with
    `scaled_by` (a coefficient) the operand is ``input * coefficient`` (one
    tile-sized temporary).
    """

    ufunc: np.ufunc
    operand: str
    scaled_by: str | None = None


def _scratch_threads() -> int:
    """Threads whose planes and tile temporaries the elementwise passes budget for.

    The threads that can hold tiles at once (one while the pool backs off on a
    loaded machine: the call then runs alone).  Budgeting for SCRATCH_THREADS on a
    2-thread pool cut the planes, runs and tiles four times smaller than memory
    allows: 4x the NumPy calls per pass, each on a quarter of the data, which
    made 2-thread backward passes slower than 1-thread ones (measured on
    (128, 512, 7, 7) float32: 6.6 ms on 2 threads, 4.7 ms on 1).  Tiling does not
    change an elementwise result, so this cannot change any bit.
    """
    return max(1, min(SCRATCH_THREADS, active_threads()))


def _pass_layout(
    shape3: tuple[int, int, int], contiguous: bool, n_coefs: int, tile_max: int
) -> tuple[str, int, int]:
    """How :func:`_elementwise` tiles an ``(A, K, B)`` array: ``(form, tile, extent)``.

    `form` is 'scalar', 'rows', 'runs' or 'columns'; `tile` the values per
    tile; `extent` the plane rows ('rows') or channels per run ('runs').
    """
    a, k, b = shape3
    size = a * k * b
    if size <= SMALL_BUDGET:
        return "columns", tile_max, 0  # small: no planes to build
    if b >= SCALAR_ROW_MIN and a * b >= SCALAR_CHANNEL_MIN:
        return "scalar", tile_max, 0
    if a < PLANE_REUSE:
        return "columns", tile_max, 0  # a plane would serve too few tiles to pay for itself
    # Every thread's planes together within 1/8 of the array (or a few small ones).
    budget = max(SMALL_BUDGET, size // (8 * _scratch_threads() * max(1, n_coefs)))
    row = k * b
    if contiguous and row <= min(tile_max, budget):
        p = max(1, min(a, PLANE_ELEMENTS // row, budget // row))
        return "rows", max(p, (tile_max // row) // p * p) * row, p
    kc = min(k, max(1, tile_max // b), max(1, budget // b))
    if contiguous and kc * b <= budget:
        kc = -(-k // -(-k // kc))  # runs of equal length
        return "runs", kc * b, kc
    return "columns", tile_max, 0


def _elementwise(
    out3: np.ndarray,
    source: str,
    steps: Sequence[_Step],
    arrays: dict[str, np.ndarray],
    coefs: dict[str, np.ndarray],
) -> None:
    """Run ``tile = arrays[source]; for step: tile = step.ufunc(tile, operand)`` into `out3`.

    All arrays are ``(A, K, B)`` views of one shape; `coefs` are float64 vectors
    of length K (converted to the compute dtype here).  The first step reads the
    source tile and writes the output tile; the later ones work in place, on
    data in cache (with planes the tile is copied in first, and every operation
    works in place).  The tiling (:func:`_pass_layout`) depends on the shape:

    * 'scalar' (``B >= SCALAR_ROW_MIN`` and at least SCALAR_CHANNEL_MIN values
      per channel): tiles of a few rows of one channel,
      ``x3[r0:r1, k, b0:b1]``; coefficients are NumPy scalars, for which NumPy
      runs its fastest loops.
    * 'rows' (``K * B`` within a tile, C-contiguous arrays): tiles of whole
      rows of A, flattened to ``(m, p * K * B)``; each coefficient is a *plane*
      of ``p`` rows (the coefficient broadcast over a row) broadcast over the
      first axis, so NumPy runs long contiguous loops.
    * 'runs' (longer rows, C-contiguous arrays): tiles ``x3[i, k0:k1, :]`` and
      planes of the run's shape, kept per thread and reused down the rows of A
      (tiles are ordered run by run).
    * 'columns' (small or non-contiguous arrays, or fewer than PLANE_REUSE
      rows of A -- a batch of one or two): tiles of :func:`_tiles`,
      the coefficients broadcast as columns.

    Extra memory: per thread, the planes (at most 1/8 of the array over all
    threads) and, where the output cannot be worked in directly (another
    dtype, or an input read after the first write shares its memory), one or
    two tiles (at most 1/16 of the array over all threads).
    """
    ct = _compute_dtype(out3.dtype)
    a, k, b = out3.shape
    size = a * k * b
    if size == 0:
        return
    arrays = {name: _independent(arr, out3) for name, arr in arrays.items()}
    later = {s.operand for s in steps} & arrays.keys()
    direct = out3.dtype == ct and not any(np.may_share_memory(arrays[n], out3) for n in later)
    temps = (0 if direct else 1) + sum(1 for s in steps if s.scaled_by is not None)
    tile_max = PASS_TILE
    if temps:
        tile_max = max(SMALL_BUDGET, min(PASS_TILE, size // (16 * _scratch_threads() * temps)))
    contiguous = out3.flags.c_contiguous and all(arr.flags.c_contiguous for arr in arrays.values())
    form, tile, extent = _pass_layout(out3.shape, contiguous, len(coefs), tile_max)
    # The first operation streams the input from memory.  With scalar operands an
    # out-of-place operation does that best; with planes, a copy (memcpy) followed
    # by in-place work on the cached tile is faster (measured: see docs/performance.md).
    copy_first = form != "scalar"
    local = threading.local()

    def scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        buf = getattr(local, name, None)
        if buf is None or buf.size < n:
            buf = np.empty(max(n, tile), dtype=ct)
            setattr(local, name, buf)
        return buf[:n].reshape(shape)

    def run(dst: np.ndarray, view: Callable[[np.ndarray], np.ndarray], coef: Callable[[str], Any]) -> None:
        work = dst if direct else scratch("work", dst.shape)
        left = view(arrays[source])
        if copy_first:
            np.copyto(work, left, casting="unsafe")
            left = work
        for s in steps:
            rhs = view(arrays[s.operand]) if s.operand in arrays else coef(s.operand)
            if s.scaled_by is not None:
                rhs = np.multiply(rhs, coef(s.scaled_by), out=scratch("scaled", dst.shape))
            s.ufunc(left, rhs, out=work)
            left = work
        if work is not dst:
            np.copyto(dst, work, casting="unsafe")

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        vecs = {name: np.asarray(v, dtype=np.float64).astype(ct) for name, v in coefs.items()}
    fn: Callable[[Any], None]
    items: list[Any]
    if form == "scalar":
        scalars = {name: [ct.type(x) for x in v] for name, v in vecs.items()}
        rows = max(1, min(a, tile // b))
        cols = min(b, tile)
        items = [(kk, r, c) for kk in range(k) for r in range(0, a, rows) for c in range(0, b, cols)]

        def fn(item: tuple[int, int, int]) -> None:
            kk, r, c = item
            idx = (slice(r, r + rows), kk, slice(c, c + cols))
            run(out3[idx], lambda arr: arr[idx], lambda name: scalars[name][kk])

    elif form == "rows":
        row, p = k * b, extent
        planes = {
            name: np.ascontiguousarray(np.broadcast_to(v[None, :, None], (p, k, b))).reshape(p * row)
            for name, v in vecs.items()
        }
        whole = a - a % p
        items = [(r, min(r + tile // row, whole), p) for r in range(0, whole, tile // row)]
        if whole < a:
            items.append((whole, a, a - whole))

        def fn(item: tuple[int, int, int]) -> None:
            r0, r1, q = item
            shape = ((r1 - r0) // q, q * row)
            run(
                out3[r0:r1].reshape(shape),
                lambda arr: arr[r0:r1].reshape(shape),
                lambda name: planes[name][: q * row],
            )

    elif form == "runs":
        kc = extent
        items = [(k0, i) for k0 in range(0, k, kc) for i in range(a)]

        def run_planes(k0: int) -> dict[str, np.ndarray]:
            cache = local.__dict__
            if cache.get("run") != k0:
                cache["run"] = cache["planes"] = None  # drop the old planes first
                k1 = min(k, k0 + kc)
                cache["planes"] = {
                    name: np.ascontiguousarray(np.broadcast_to(v[k0:k1, None], (k1 - k0, b)))
                    for name, v in vecs.items()
                }
                cache["run"] = k0
            planes_k: dict[str, np.ndarray] = cache["planes"]
            return planes_k

        def fn(item: tuple[int, int]) -> None:
            k0, i = item
            idx = (i, slice(k0, k0 + kc))
            pl = run_planes(k0)
            run(out3[idx], lambda arr: arr[idx], lambda name: pl[name])

    else:
        cols_v = {name: col(v) for name, v in vecs.items()}
        items = _tiles(out3.shape, min(tile, TILE_ELEMENTS))

        def fn(t: Tile) -> None:
            run(out3[t], lambda arr: arr[t], lambda name: cols_v[name][:, t[1]])

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        parallel_map(fn, items, size)


def affine_pass(
    x3: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    out3: np.ndarray,
    center: np.ndarray | None = None,
    *,
    spread: np.ndarray | None = None,
) -> None:
    """``out3 = (x3 - center) * scale + shift`` per channel (no `center`: ``x3 * scale + shift``).

    In ``out3``'s compute dtype (float32 for float16), tile by tile.  `scale`,
    `shift` and `center` are float64 vectors of length K.  Centering first keeps
    the rounding relative to the output: ``x * scale + shift`` with a large
    ``scale * x`` (a channel of almost constant, offset data) would round at
    ``eps * |x * scale|`` instead.  The center is subtracted in the compute
    dtype, and its rounding folded into the shift in float64.

    `spread` (optional, length K, e.g. ``sqrt(var + eps)``) is the typical
    ``|x - center|``: where ``|center| <= 2 * spread`` on every channel the
    center is folded into the shift instead (one elementwise operation fewer,
    rounding within a few units of the output's own).
    """
    ct = _compute_dtype(out3.dtype)
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    coefs = {"scale": scale, "shift": shift}
    steps = [_Step(np.multiply, "scale"), _Step(np.add, "shift")]
    if center is not None:
        center = np.asarray(center, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            fold = (
                spread is not None
                and bool(np.all(np.abs(center) <= 2.0 * np.asarray(spread)))
                and bool(np.isfinite(center * scale).all())
            )
            if fold or not np.isfinite(center).all():
                coefs["shift"] = shift - center * scale
            else:
                c_ct = center.astype(ct)
                # (x - c) * s + t' with t' = t + (c - center) * s: exact up to rounding of t'.
                delta = c_ct.astype(np.float64) - center
                coefs["shift"] = shift + np.where(delta != 0, delta * scale, 0.0)
                coefs["center"] = c_ct.astype(np.float64)
                steps.insert(0, _Step(np.subtract, "center"))
    _elementwise(out3, "x", steps, {"x": x3}, coefs)


def backward_pass(
    g3: np.ndarray,
    x3: np.ndarray,
    a: np.ndarray,
    b: np.ndarray | None,
    c: np.ndarray | None,
    out3: np.ndarray,
    *,
    center: np.ndarray | None = None,
) -> None:
    """``out3 = g * a + x * b + c`` per channel (``b``, ``c`` None: ``g * a``), tile by tile.

    Every batch-norm input gradient has this form once the per-channel
    reductions are known; the coefficients are float64 vectors.  Where `a` has
    no zero it is evaluated as ``a * (x * (b / a) + c / a + g)`` -- four
    elementwise operations, two of them by scalars, and no temporary.  With
    `center` (length K, e.g. the mean), ``x`` is shifted by `center` in the
    compute dtype first: ``(x - center) * b`` does not round at
    ``eps * |x * b|`` for offset data.
    """
    ct = _compute_dtype(out3.dtype)
    a = np.asarray(a, dtype=np.float64)
    if b is None or c is None:
        _elementwise(out3, "g", [_Step(np.multiply, "a")], {"g": g3}, {"a": a})
        return
    b = np.asarray(b, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    steps = [_Step(np.multiply, "b"), _Step(np.add, "c")]
    coefs = {"a": a}
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if center is not None and np.isfinite(center).all():
            c_ct = np.asarray(center, dtype=np.float64).astype(ct)
            c = c + b * c_ct.astype(np.float64)  # x * b + c == (x - c_ct) * b + (c + b * c_ct)
            coefs["center"] = c_ct.astype(np.float64)
            steps.insert(0, _Step(np.subtract, "center"))
        b_a, c_a = b / a, c / a
        factored = bool(np.isfinite(a).all() and np.isfinite(b_a).all() and np.isfinite(c_a).all())
        factored = factored and bool(np.all(a != 0))
    if factored:
        coefs.update(b=b_a, c=c_a)
        steps += [_Step(np.add, "g"), _Step(np.multiply, "a")]
    else:
        coefs.update(b=b, c=c)
        steps.append(_Step(np.add, "g", scaled_by="a"))
    _elementwise(out3, "x", steps, {"x": x3, "g": g3}, coefs)
