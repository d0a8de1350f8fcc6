"""bnorm's kernel layer: which kernel serves which op, size and layout, and why.

Files
-----
* :mod:`.pool` -- the thread pool (:func:`parallel_map`, :func:`set_num_threads`):
  a work split fixed by the data, so results never depend on the thread count.
* :mod:`.direct` -- batch norm on input that fits in cache: the textbook
  formulas as a handful of whole-array NumPy calls, no tiles, no threads.
* :mod:`.moments` -- :class:`Moments` (count, mean, M2) and their Chan merge;
  the shifted sums behind every statistic.
* :mod:`.channel` -- the per-channel tiled passes (batch norm on large input,
  float16, other layouts, and SyncBatchNorm).
* :mod:`.rowwise` -- layer, group, instance and RMS norm: statistics and
  normalization fused on one cache-resident tile of whole rows (with its own
  direct path for small input).
* :mod:`.buffers` -- large outputs that reuse the memory of outputs the caller
  dropped (no page faults on every fresh output).

The rule
--------
:func:`kernel_for` is the only place that knows sizes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .pool import num_threads, parallel_map, set_num_threads

__all__ = ["DIRECT_MAX_ELEMENTS", "kernel_for", "num_threads", "parallel_map", "set_num_threads"]

#: Batch norm on at most this many values takes the direct kernels.
DIRECT_MAX_ELEMENTS = 1 << 17

_DIRECT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

Kernel = Literal["direct", "channel"]


def kernel_for(op: Literal["batch_norm"], x3: np.ndarray, g3: np.ndarray | None = None) -> Kernel:
    """The kernels that serve `op` on the ``(A, K, B)`` view `x3` (and upstream gradient `g3`).

    batch_norm:
        'direct' (:mod:`.direct`) for C-contiguous float32/float64 input of at
        most DIRECT_MAX_ELEMENTS values (512 KiB of float32, a core's L2
        cache): there a call is dominated by fixed costs -- Python calls,
        reductions' setup, waking threads -- and the fewest whole-array NumPy
        calls win.  'channel' (:mod:`.channel`) otherwise: tiles in L2 spread
        over the pool, or any other dtype (float16 is computed in float32 tile
        by tile), layout or empty input.  A backward whose `g3` differs from `x3` in dtype
        or layout takes 'channel' too (its sums run in the wider dtype).

        Measured (float32, best of interleaved runs, this 2-core machine
        under load; forward / backward in us, direct vs channel): (64, 512)
        55 / 53 vs 95 / 121; (256, 512) 147 / 301 vs 158 / 225; (512, 512)
        615 / 703 vs 631 / 822; (32, 64, 16, 16) 1063 / 1294 vs 938 / 1192.
        Below 128 Ki values the direct kernels win by the fixed costs they
        skip (at (60, 100): 36 vs 150 us forward); around 256 Ki to 512 Ki
        the two meet, and above, the channel kernels' threads and in-cache
        tiles pay.  The bound stays at the L2-sized 128 Ki values.
    """
    if op != "batch_norm":
        raise ValueError(f"unknown op {op!r}")
    if not 0 < x3.size <= DIRECT_MAX_ELEMENTS or x3.dtype not in _DIRECT_DTYPES or not x3.flags.c_contiguous:
        return "channel"
    if g3 is not None and (g3.dtype != x3.dtype or not g3.flags.c_contiguous):
        return "channel"
    return "direct"
