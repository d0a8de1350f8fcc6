"""Peak extra memory of the kernels (tracemalloc; deterministic, not timed).

The speed targets: training forward and backward on (32, 64, 56, 56) float32 take at
most 1.1x the input's bytes of extra memory, the returned array included --
no full-size temporaries.  NumPy reports its data allocations to tracemalloc.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from bnorm.functional import batch_norm_backward, batch_norm_forward
from bnorm.functional._kernels import buffers
from bnorm.functional._kernels import channel as C
from bnorm.functional._kernels import moments as Mo
from bnorm.functional._kernels import pool as P

SHAPE = (32, 64, 56, 56)
BOUND = 1.1


def peak_extra(f: Callable[[], Any]) -> int:
    """Peak bytes allocated during ``f()`` above what was allocated before, result included.

    The output cache is emptied first, so the result is a fresh allocation (a
    recycled one would not be counted).
    """
    buffers.clear()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = f()
        peak = tracemalloc.get_traced_memory()[1] - base
        del result
    finally:
        tracemalloc.stop()
    return peak


@pytest.fixture(params=[1, 2, 8], ids=lambda n: f"{n}threads")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    old = P.num_threads()
    P.set_num_threads(request.param)
    yield request.param
    P.set_num_threads(old)


@pytest.fixture(scope="module", params=[0.0, 1e4], ids=["centered", "offset1e4"])
def data(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(SHAPE, dtype=np.float32) + np.float32(request.param)).astype(np.float32)
    g = rng.standard_normal(SHAPE, dtype=np.float32)
    return x, g


def test_training_forward_peak_memory(data, threads):
    x, _ = data
    c = SHAPE[1]
    rm, rv, w, b = (
        np.zeros(c, np.float32),
        np.ones(c, np.float32),
        np.ones(c, np.float32),
        np.zeros(c, np.float32),
    )
    peak = peak_extra(lambda: batch_norm_forward(x, rm, rv, w, b, training=True))
    assert peak <= BOUND * x.nbytes, f"peak {peak / x.nbytes:.3f}x the input"
    assert peak >= x.nbytes  # the returned array is counted


def test_backward_peak_memory(data, threads):
    x, g = data
    c = SHAPE[1]
    _, ctx = batch_norm_forward(x, None, None, np.ones(c, np.float32), np.zeros(c, np.float32), training=True)
    peak = peak_extra(lambda: batch_norm_backward(g, ctx))
    assert peak <= BOUND * x.nbytes, f"peak {peak / x.nbytes:.3f}x the input"
    assert peak >= x.nbytes


def test_eval_forward_peak_memory(data, threads):
    x, _ = data
    c = SHAPE[1]
    peak = peak_extra(lambda: batch_norm_forward(x, np.zeros(c), np.ones(c), training=False))
    assert peak <= BOUND * x.nbytes


@pytest.mark.parametrize("axis", [1, -1])
def test_with_out_no_full_size_allocation(data, axis):
    """With out= the forward and backward allocate only cache-sized tiles."""
    x, g = data
    if axis == -1:
        x, g = np.ascontiguousarray(np.moveaxis(x, 1, -1)), np.ascontiguousarray(np.moveaxis(g, 1, -1))
    y, dx = np.empty_like(x), np.empty_like(x)
    peak = peak_extra(lambda: batch_norm_forward(x, None, None, training=True, axis=axis, out=y))
    assert peak <= 0.1 * x.nbytes
    _, ctx = batch_norm_forward(x, None, None, training=True, axis=axis)
    peak = peak_extra(lambda: batch_norm_backward(g, ctx, out=dx))
    assert peak <= 0.1 * x.nbytes


def test_peak_measurement_sees_numpy_temporaries():
    """The harness must be able to fail: the textbook formula makes full-size temporaries."""
    x = np.ones(SHAPE, np.float32)

    def textbook() -> np.ndarray:
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        var = x.var(axis=(0, 2, 3), keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5)

    assert peak_extra(textbook) > 2 * x.nbytes


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_layer_norm_like_long_rows_stay_tiled(offset, threads):
    """A = 1 with rows far longer than a tile: the shared kernels allocate tiles only."""
    x3 = (np.random.default_rng(1).standard_normal((1, 4, 1 << 21)) + offset).astype(np.float32)
    out3 = np.empty_like(x3)
    ones, zeros = np.ones(4), np.zeros(4)
    assert peak_extra(lambda: Mo.channel_moments(x3)) <= 0.1 * x3.nbytes
    assert peak_extra(lambda: C.affine_pass(x3, ones, zeros, out3, np.full(4, offset))) <= 0.1 * x3.nbytes
    assert peak_extra(lambda: Mo.backward_sums(x3, x3, np.full(4, offset))) <= 0.1 * x3.nbytes
    assert peak_extra(lambda: C.backward_pass(x3, x3, ones, ones, zeros, out3)) <= 0.1 * x3.nbytes


def test_large_outputs_reuse_dropped_memory():
    """A dropped output's memory serves the next output of that size; a live one is never reused."""
    x, g = np.ones(SHAPE, np.float32), np.ones(SHAPE, np.float32)
    buffers.clear()
    y1, ctx = batch_norm_forward(x, None, None, training=True)
    address = y1.__array_interface__["data"][0]
    y2, _ = batch_norm_forward(x, None, None, training=True)
    assert not np.shares_memory(y1, y2)  # y1 is alive: never handed out twice
    del y1
    y3, _ = batch_norm_forward(x, None, None, training=True)
    assert y3.__array_interface__["data"][0] == address
    dx, _, _ = batch_norm_backward(g, ctx)
    assert not np.shares_memory(dx, y2) and not np.shares_memory(dx, y3)
    view = y2[1:]
    del y2
    y4, _ = batch_norm_forward(x, None, None, training=True)
    assert not np.shares_memory(y4, view)  # a view keeps its block in use
    buffers.clear()


def test_unused_blocks_of_other_sizes_are_released_without_comparing_arrays():
    """Several cached sizes, then a new one: the oldest unused blocks go, live ones stay."""
    buffers.clear()
    sizes = [(1 << 20) + k * 4096 for k in range(4)]  # float32: 4 MiB and a little more each
    live = buffers.empty_output((sizes[0],), np.dtype(np.float32))
    for n in sizes[1:]:
        buffers.empty_output((n,), np.dtype(np.float32))  # dropped at once: unused blocks of other sizes
    fresh = buffers.empty_output(((1 << 20) + 99 * 4096,), np.dtype(np.float32))
    assert not np.shares_memory(fresh, live)
    unused = [b for b in buffers._blocks if sys.getrefcount(b) <= buffers._UNUSED_REFS]
    assert len(unused) <= buffers.RECYCLE_FREE_BLOCKS
    assert any(np.shares_memory(b, live) for b in buffers._blocks)  # the live block is still tracked
    buffers.clear()
