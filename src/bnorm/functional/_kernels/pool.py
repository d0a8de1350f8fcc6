"""The thread pool every kernel shares: :func:`parallel_map` and the thread count.

Contract
--------
``parallel_map(fn, items, work_elements)`` returns ``[fn(item) for item in items]``,
in the order of `items`.  The items are cut by the caller from the data's shape
alone, never from the thread count, and each item's result is computed by one
call ``fn(item)`` that does not depend on which thread runs it; whatever
combines the results does so in the order of `items`.  Results are therefore
bit-identical for any :func:`set_num_threads` value and on any machine.

Scheduling
----------
The calling thread and up to ``num_threads() - 1`` helper threads take the next
run of items from one shared counter until none is left (NumPy releases the
GIL in its loops, so the threads overlap).  The runs shrink as the work runs
out (guided scheduling: each is the remaining items over
``CHUNKS_PER_THREAD * threads``), so neighbouring tiles stay together early on
and a thread that is descheduled holds only a little of the work at the end.
Small work (`work_elements` below :data:`PARALLEL_MIN_ELEMENTS`) and
one-thread settings run on the caller alone, without touching the pool.

A loaded machine
----------------
When other processes keep the cores busy, a kernel's threads are descheduled in
turn and the call waits for whichever holds the last run: measured on the
2-core machine with one competing CPU-bound process, batch norm on
(32, 64, 56, 56) float32 took 5.4 ms (training) and 8.6-9.5 ms (backward) on
two threads against 4.8 and 7.9 ms on one.  So every threaded call measures
how long the calling thread actually ran (``time.thread_time``) against the
wall time: on a quiet machine it is idle for 3-20% of a call (waiting for the
helper's last item), under that load for ~70%.  A call idle for more than
:data:`CONTENDED_IDLE` of its time makes the following calls run on the caller
alone for :data:`BACKOFF_MIN` seconds, growing up to :data:`BACKOFF_MAX` while
the threaded calls that probe again stay contended; :data:`CALM_CALLS`
uncontended calls in a row reset it.  Results are the same bits either way.

Threads
-------
The helpers are daemon threads started on first use and kept; they block on a
queue when idle.  :func:`set_num_threads` only changes how many helpers the
next call asks for (and retires surplus helpers through the same queue once
they are idle), under a lock: it never stops a thread that runs a kernel, so
it is safe to call while kernels run in other threads.  A forked child starts
with no helpers and builds its own on first use.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "PARALLEL_MIN_ELEMENTS",
    "active_threads",
    "num_threads",
    "parallel_map",
    "reset_contention",
    "set_num_threads",
]

#: Work smaller than this many elements runs on the calling thread alone: below
#: it, waking a helper (63 us median, 84 us at the 90th percentile, on the 2-core
#: benchmark VM) costs more than it saves.
PARALLEL_MIN_ELEMENTS = 1 << 18

#: Each run of items is the remaining items over this many times the thread count.
CHUNKS_PER_THREAD = 2

#: A threaded call whose calling thread ran for less than ``1 - CONTENDED_IDLE``
#: of its wall time counts as contended (quiet: idle 3-20%; one competing
#: process on two cores: ~70%).
CONTENDED_IDLE = 0.4

#: Seconds of one-thread calls after a contended call, times BACKOFF_GROWTH for
#: each further contended probe up to BACKOFF_MAX: while the machine stays busy,
#: at most one slow call per BACKOFF_MAX after three probes (a probe costs up to
#: 1-3 ms on a 5 ms call); a false alarm on a quiet machine costs BACKOFF_MIN of
#: one-thread calls.
BACKOFF_MIN = 0.2
BACKOFF_GROWTH = 4.0
BACKOFF_MAX = 5.0

#: Uncontended threaded calls in a row after which the backoff starts again from
#: BACKOFF_MIN.  Not a few: under load, calls often run undisturbed for a while
#: (a probe's short first job, batch norm's sums, most of all), and resetting
#: after 4 of them kept the probes 0.2 s apart instead of growing (measured: 4
#: to 6 uncontended jobs before each contended one).
CALM_CALLS = 16

# Whether time.thread_time can measure a call of a few ms (Linux, macOS: ns;
# Windows: 15.6 ms ticks -- no contention detection there).
_CPU_CLOCK_OK = time.get_clock_info("thread_time").resolution <= 1e-6

_T = TypeVar("_T")


def _default_threads() -> int:
    env = os.environ.get("BNORM_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(os.cpu_count() or 1, 8))


class _Job:
    """One :func:`parallel_map` call: items taken from a shared counter by any thread.

    No lock: ``next()`` of an ``itertools.count`` and ``list.append`` are atomic
    under the GIL, so a helper descheduled at any point never blocks the others
    (a lock held by a descheduled thread would).
    """

    __slots__ = ("_done", "_errors", "_finished", "_next", "bounds", "fn", "items", "results")

    def __init__(self, fn: Callable[[Any], Any], items: Sequence[Any], threads: int) -> None:
        self.fn = fn
        self.items = items
        # Guided runs of consecutive items: long ones first (a thread works through
        # neighbouring tiles -- measured: item by item, two threads made the
        # elementwise passes of (32, 64, 56, 56) float32 1.2x slower than runs),
        # short ones last, so a descheduled thread holds little of the work.
        n = len(items)
        bounds = [0]
        while bounds[-1] < n:
            rest = n - bounds[-1]
            bounds.append(bounds[-1] + max(1, -(-rest // (CHUNKS_PER_THREAD * threads))))
        self.bounds = bounds
        self.results: list[Any] = [None] * n
        self._next = itertools.count()
        self._done = itertools.count(1)
        self._finished = threading.Event()
        self._errors: list[tuple[int, BaseException]] = []

    def work(self) -> None:
        """Run runs of items until none is left (called by the caller and by helpers)."""
        bounds = self.bounds
        chunks = len(bounds) - 1
        while True:
            j = next(self._next)
            if j >= chunks:
                return
            for i in range(bounds[j], bounds[j + 1]):
                if not self._errors:  # after a failure the rest are only counted
                    try:
                        self.results[i] = self.fn(self.items[i])
                    except BaseException as e:  # re-raised by the caller, in item order
                        self._errors.append((i, e))
            if next(self._done) == chunks:
                self._finished.set()

    def wait(self) -> list[Any]:
        self._finished.wait()
        if self._errors:
            raise min(self._errors, key=lambda ie: ie[0])[1]
        return self.results


class _Pool:
    """Helper threads fed through one queue; the thread count behind a lock."""

    def __init__(self, threads: int) -> None:
        self.lock = threading.Lock()
        self.threads = threads
        self.helpers = 0  # helper threads alive (or about to start)
        self.queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.serial_until = 0.0  # time.monotonic() before which calls run on the caller alone
        self.backoff = BACKOFF_MIN
        self.calm = 0  # uncontended threaded calls since the last contended one

    def _serve(self) -> None:
        q = self.queue
        while True:
            job = q.get()
            if job is None:  # retired by set_num_threads
                return
            job.work()

    def set_threads(self, n: int) -> None:
        with self.lock:
            self.threads = n
            # Retire helpers beyond the new count: each takes one None when idle,
            # after any job already queued.  Running kernels are never interrupted.
            while self.helpers > n - 1:
                self.queue.put(None)
                self.helpers -= 1

    def run(self, job: _Job, helpers: int) -> list[Any]:
        with self.lock:
            while self.helpers < helpers:
                t = threading.Thread(target=self._serve, name=f"bnorm-{self.helpers}", daemon=True)
                t.start()
                self.helpers += 1
            for _ in range(helpers):
                self.queue.put(job)
        start, cpu = time.perf_counter(), time.thread_time()
        job.work()
        try:
            return job.wait()
        finally:
            self._observe(time.perf_counter() - start, time.thread_time() - cpu)

    def _observe(self, wall: float, cpu: float) -> None:
        """Back off to one thread after a contended call (see "A loaded machine")."""
        if not _CPU_CLOCK_OK:
            return
        if cpu < (1.0 - CONTENDED_IDLE) * wall:
            self.serial_until = time.monotonic() + self.backoff
            self.backoff = min(BACKOFF_GROWTH * self.backoff, BACKOFF_MAX)
            self.calm = 0
        else:
            self.calm += 1
            if self.calm >= CALM_CALLS:
                self.backoff = BACKOFF_MIN

    def serial(self) -> bool:
        """Whether calls run on the caller alone for now (backing off after contention)."""
        return self.serial_until > 0.0 and time.monotonic() < self.serial_until


_pool = _Pool(_default_threads())


def _after_fork_in_child() -> None:
    # A forked child has none of the parent's threads (and maybe a held lock).
    global _pool
    _pool = _Pool(_pool.threads)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def num_threads() -> int:
    """The number of threads bnorm's kernels use.

    The default is the CPU count, at most 8, or the environment variable
    ``BNORM_NUM_THREADS`` when set at import.  Small arrays always run on the
    calling thread.

    Returns
    -------
    int
        At least 1.

    Examples
    --------
    >>> import bnorm
    >>> bnorm.num_threads() >= 1
    True
    """
    return _pool.threads


def set_num_threads(n: int) -> None:
    """Use `n` threads in bnorm's kernels from now on (1: no threading).

    The kernels cut arrays into cache-sized tiles fixed by the array's shape and
    let up to `n` threads take them (NumPy and BLAS release the GIL).  Results
    are bit-identical for every `n`: the tiles and the order in which their
    partial results are combined do not depend on it.  Safe to call while
    kernels run in other threads (they finish with the threads they have).

    Parameters
    ----------
    n : int
        The number of threads, >= 1.

    Raises
    ------
    ValueError
        If `n` is not an int >= 1.

    Examples
    --------
    >>> import bnorm
    >>> old = bnorm.num_threads()
    >>> bnorm.set_num_threads(1)
    >>> bnorm.num_threads()
    1
    >>> bnorm.set_num_threads(old)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _pool.set_threads(int(n))


def parallel_map(fn: Callable[[Any], _T], items: Sequence[Any], work_elements: int) -> list[_T]:
    """``[fn(item) for item in items]``, spread over the pool's threads; results in order.

    Parameters
    ----------
    fn : callable
        Called once per item; its result must not depend on the thread that runs it.
    items : sequence
        The work, cut from the data's shape (never from the thread count).
    work_elements : int
        The size of the whole work in array elements; below
        :data:`PARALLEL_MIN_ELEMENTS` everything runs on the calling thread.

    Returns
    -------
    list
        ``fn(item)`` for every item, in the order of `items`.  If calls raise,
        the exception of the first such item (in item order) is re-raised
        after every started call has finished.
    """
    pool = _pool
    helpers = min(pool.threads, len(items)) - 1
    if helpers <= 0 or work_elements < PARALLEL_MIN_ELEMENTS or pool.serial():
        return [fn(item) for item in items]
    return pool.run(_Job(fn, items, helpers + 1), helpers)


def active_threads() -> int:
    """The threads the next call may use: :func:`num_threads`, or 1 while backing off.

    What the kernels size per-thread scratch by (a call on a loaded machine
    runs on the caller alone, with one thread's tiles).
    """
    return 1 if _pool.serial() else _pool.threads


def reset_contention() -> None:
    """Forget any contention measured so far: the next call may use threads again.

    Kernels back off to one thread for a while after a call that the machine's
    load slowed (see the module docstring); benchmarks and tests that switch
    between loaded and quiet conditions call this in between.
    """
    _pool.serial_until = 0.0
    _pool.backoff = BACKOFF_MIN
    _pool.calm = 0
