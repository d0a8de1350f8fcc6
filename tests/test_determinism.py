"""Results do not depend on the thread count, and the thread count can change under load.

Every kernel cuts its work from the data's shape alone and combines partial
results in a fixed order, so outputs, gradients and running statistics are
bit-identical for any ``set_num_threads`` value (and so on any machine, whose
default thread count is its CPU count).  Shapes cover the direct kernels
(small input) and the tiled, threaded ones; data centered and offset by 1e4
(the shifted sums), both channel layouts, float32 and float64.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import bnorm
from bnorm.functional import (
    batch_norm_backward,
    batch_norm_forward,
    group_norm_backward,
    group_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
)
from bnorm.functional._kernels import pool

THREADS = [1, 2, 3, 8]

# (shape, axis): small (direct kernels), (8192, 64) -- which differed between 1 and
# 2 threads before the split was fixed by the shape --, tiled channels-first with long
# and short rows, channels-last.
BATCH_CASES = [
    ((60, 100), 1),
    ((8192, 64), 1),
    ((16, 32, 64, 64), 1),
    ((64, 64, 7, 7), 1),
    ((32, 16, 16, 24), -1),
]


@pytest.fixture
def restore_threads() -> Iterator[None]:
    old = bnorm.num_threads()
    yield
    bnorm.set_num_threads(old)


def _data(shape, dtype, offset, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 1.5 + offset).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    return x, g


def _batch_norm_run(x, g, axis):
    c = x.shape[axis]
    rng = np.random.default_rng(1)
    w = rng.uniform(0.5, 1.5, c).astype(x.dtype)
    b = rng.standard_normal(c).astype(x.dtype)
    rm, rv = np.zeros(c, x.dtype), np.ones(c, x.dtype)
    y, ctx = batch_norm_forward(x, rm, rv, w, b, training=True, axis=axis)
    dx, dw, db = batch_norm_backward(g, ctx)
    y_eval, ctx_eval = batch_norm_forward(x, rm, rv, w, b, training=False, axis=axis)
    dx_eval, dw_eval, _ = batch_norm_backward(g, ctx_eval)
    return [y, dx, dw, db, rm, rv, y_eval, dx_eval, dw_eval]


@pytest.mark.parametrize("shape, axis", BATCH_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centered", "offset1e4"])
def test_batch_norm_bit_identical_for_any_thread_count(shape, axis, dtype, offset, restore_threads):
    x, g = _data(shape, dtype, offset)
    runs = []
    for n in THREADS:
        bnorm.set_num_threads(n)
        runs.append(_batch_norm_run(x, g, axis))
    for n, run in zip(THREADS[1:], runs[1:], strict=True):
        for i, (a, b) in enumerate(zip(runs[0], run, strict=True)):
            assert np.array_equal(a, b), f"result {i} differs between 1 and {n} threads"


def test_layer_and_group_norm_bit_identical_for_any_thread_count(restore_threads):
    x, g = _data((16, 64, 32, 32), np.float32, 1e4)
    rng = np.random.default_rng(2)
    w_ln, b_ln = (
        rng.uniform(0.5, 1.5, (32, 32)).astype(np.float32),
        rng.standard_normal((32, 32)).astype(np.float32),
    )
    w_gn, b_gn = rng.uniform(0.5, 1.5, 64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    runs = []
    for n in THREADS:
        bnorm.set_num_threads(n)
        y_ln, ctx_ln = layer_norm_forward(x, (32, 32), w_ln, b_ln)
        y_gn, ctx_gn = group_norm_forward(x, 8, w_gn, b_gn)
        runs.append([y_ln, *layer_norm_backward(g, ctx_ln), y_gn, *group_norm_backward(g, ctx_gn)])
    for n, run in zip(THREADS[1:], runs[1:], strict=True):
        for i, (a, b) in enumerate(zip(runs[0], run, strict=True)):
            assert np.array_equal(a, b), f"result {i} differs between 1 and {n} threads"


def test_threaded_work_is_really_split():
    """The pool runs items on more than one thread when asked to (else the tests above prove nothing)."""
    old = bnorm.num_threads()
    names: set[str] = set()
    lock = threading.Lock()
    barrier = threading.Barrier(2, timeout=10)

    n = 8
    chunk = pool._Job(abs, list(range(n)), 2).bounds[1]  # the first run's length: the second starts there

    def fn(i: int) -> int:
        with lock:
            names.add(threading.current_thread().name)
        if i in (0, chunk):
            barrier.wait()  # the first items of the first two runs must run at once, on two threads
        return i * i

    try:
        bnorm.set_num_threads(2)
        pool.reset_contention()  # an earlier test's load must not make this call serial
        assert pool.parallel_map(fn, list(range(n)), pool.PARALLEL_MIN_ELEMENTS) == [i * i for i in range(n)]
    finally:
        bnorm.set_num_threads(old)
    assert len(names) == 2


def test_runs_shrink_towards_the_end():
    """Guided runs: the first is the work over 2 * threads, the last ones single items."""
    bounds = pool._Job(abs, list(range(64)), 2).bounds
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == 64
    assert sizes[0] == 16 and sizes[-1] == 1
    assert np.all(np.diff(sizes) <= 0)


def _threads_used(n_items: int) -> set[str]:
    names: set[str] = set()
    lock = threading.Lock()

    def fn(i: int) -> int:
        with lock:
            names.add(threading.current_thread().name)
        time.sleep(0.002)  # long enough for the helper to take items too
        return i

    assert pool.parallel_map(fn, list(range(n_items)), pool.PARALLEL_MIN_ELEMENTS) == list(range(n_items))
    return names


def test_a_contended_call_backs_off_to_one_thread(restore_threads, monkeypatch):
    """A call whose calling thread mostly did not run makes the next calls serial, for a while."""
    bnorm.set_num_threads(2)
    pool.reset_contention()
    if not pool._CPU_CLOCK_OK:
        pytest.skip("time.thread_time is too coarse here: no contention detection")
    assert len(_threads_used(16)) == 2
    monkeypatch.setattr(pool, "BACKOFF_MIN", 0.2)
    pool.reset_contention()
    # Sleeping in every item keeps the caller off the CPU, as a descheduled thread would be.
    _threads_used(8)
    assert pool._pool.serial()
    assert _threads_used(16) == {threading.current_thread().name}  # backing off: the caller alone
    assert pool._pool.backoff == pytest.approx(0.2 * pool.BACKOFF_GROWTH)  # a further probe waits longer
    time.sleep(0.25)
    assert not pool._pool.serial()
    for _ in range(pool.CALM_CALLS - 1):
        pool._pool._observe(1.0, 0.9)  # uncontended calls ...
    assert pool._pool.backoff == pytest.approx(0.2 * pool.BACKOFF_GROWTH)
    pool._pool._observe(1.0, 0.9)  # ... CALM_CALLS in a row reset the backoff
    assert pool._pool.backoff == pool.BACKOFF_MIN
    pool.reset_contention()


def test_parallel_map_raises_the_first_failing_item():
    old = bnorm.num_threads()

    def fn(i: int) -> int:
        if i in (3, 5):
            raise ValueError(f"item {i}")
        return i

    try:
        bnorm.set_num_threads(3)
        with pytest.raises(ValueError, match="item 3"):
            pool.parallel_map(fn, list(range(8)), pool.PARALLEL_MIN_ELEMENTS)
        # The pool still works afterwards.
        assert pool.parallel_map(abs, [-1, -2, -3], pool.PARALLEL_MIN_ELEMENTS) == [1, 2, 3]
    finally:
        bnorm.set_num_threads(old)


def test_set_num_threads_while_kernels_run(restore_threads):
    """Changing the thread count in a loop never breaks a running kernel or changes its result."""
    x, g = _data((32, 64, 16, 16), np.float32, 1e4)  # 512 Ki values: tiled and threaded
    bnorm.set_num_threads(1)
    expected = _batch_norm_run(x, g, 1)
    errors: list[BaseException] = []
    mismatches: list[int] = []
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                got = _batch_norm_run(x, g, 1)
                mismatches.extend(
                    i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if not np.array_equal(a, b)
                )
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for t in workers:
        t.start()
    try:
        for i in range(300):
            bnorm.set_num_threads(1 + i % 4)
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in workers)
    assert not errors, errors[0]
    assert not mismatches


def test_backing_off_changes_no_bit(restore_threads):
    """A call run on the caller alone while the pool backs off gives the threaded bits."""
    x, g = _data((32, 64, 16, 16), np.float32, 1e4)
    runs = []
    for serial in (False, True):
        bnorm.set_num_threads(2)
        pool.reset_contention()
        if serial:
            pool._pool.serial_until = time.monotonic() + 60.0
            assert pool.active_threads() == 1
        y, ctx = batch_norm_forward(x, None, None, training=True)
        runs.append([y, ctx.mean, ctx.invstd, *batch_norm_backward(g, ctx)])
    pool.reset_contention()
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        assert np.array_equal(a, b), f"result {i} differs when backing off"
