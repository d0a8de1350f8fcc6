"""SyncBatchNorm scenarios run by every rank of a communicator.

Each rank builds the same global batch from a shared seed, runs its shard
through SyncBatchNorm and checks the results against single-process BatchNorm
on the whole (concatenated) batch; the failure scenarios put one rank out of
step (an extra forward, allreduce_grads against backward, evaluation mode,
another layer, a rebuilt layer, a peer that never arrives) and check that
every rank raises, with the message, and that no state changed.  Used by
``tests/test_sync.py`` (ranks as threads over a fake communicator) and
``tests/mpi/run_sync.py`` (ranks as MPI processes under ``mpiexec -n 3``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.testing import assert_allclose, assert_array_equal

import bnorm
from bnorm.distributed import (
    PeerError,
    PeerTimeoutError,
    allgather_rows,
    allreduce_grads,
    allreduce_running_stats,
)
from bnorm.functional._kernels.moments import Moments, channel_moments, channel_view

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


class Counting:
    """Wraps a communicator and counts its collectives (mpi4py's Comm takes no attributes)."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.calls = 0
        if hasattr(comm, "Iallgather"):  # only where the wrapped communicator has it
            self.Iallgather = self._iallgather

    def Get_size(self) -> int:
        return int(self.comm.Get_size())

    def Get_rank(self) -> int:
        return int(self.comm.Get_rank())

    def Allgather(self, send: Any, recv: Any) -> None:
        self.calls += 1
        if hasattr(self.comm, "Allgather"):
            self.comm.Allgather(send, recv)
        else:
            recv[...] = np.stack(self.comm.allgather(np.array(send)))

    def _iallgather(self, send: Any, recv: Any) -> Any:
        self.calls += 1
        return self.comm.Iallgather(send, recv)


def _bounds(shards: list[int], rank: int) -> tuple[int, int]:
    lo = sum(shards[:rank])
    return lo, lo + shards[rank]


def _same_on_all_ranks(comm: Any, *arrays: np.ndarray) -> None:
    row = np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])
    rows = allgather_rows(comm, row)
    for r in rows:
        assert_array_equal(r, rows[0])  # bitwise: same rows, same arithmetic


def check_training(
    comm: Any,
    shards: list[int],
    *,
    convention: str | None = None,
    channels_last: bool = False,
    tail: tuple[int, ...] = (2, 3),
    steps: int = 3,
    momentum_none: bool = False,
    seed: int = 0,
    timeout: float | None = None,
) -> None:
    """Forward, grad_input, summed grads, running stats and eval == BatchNorm on the whole batch."""
    rank = int(comm.Get_rank())
    assert int(comm.Get_size()) == len(shards)
    c = 4
    counting = Counting(comm)
    kw: dict[str, Any] = {"dtype": np.float64}
    if convention is not None:
        kw["convention"] = convention
    elif channels_last:
        kw["axis"] = -1
    if momentum_none:
        kw["momentum"] = None
    ref = bnorm.BatchNorm(c, **kw)
    bn = bnorm.SyncBatchNorm(c, comm=counting, timeout=timeout, **kw)
    lo, hi = _bounds(shards, rank)
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 2.0, c)
    beta = rng.normal(size=c)
    for layer in (ref, bn):
        layer.weight[...] = gamma
        layer.bias[...] = beta
    axis = ref.axis % (len(tail) + 2)
    for step in range(steps):
        n = sum(shards)
        shape = (n, *tail, c) if axis != 1 else (n, c, *tail)
        x = rng.normal(3.0, 2.0, size=shape) + step
        g = rng.normal(size=shape)
        y_ref = ref(x)
        dx_ref = ref.backward(g)
        before = counting.calls
        y = bn(x[lo:hi])
        dx = bn.backward(g[lo:hi])
        # One operation forward, one backward; each is a header and a payload exchange.
        assert counting.calls == before + 4, "two exchanges forward, two backward"
        assert_allclose(y, y_ref[lo:hi], **TIGHT)
        assert_allclose(dx, dx_ref[lo:hi], **TIGHT)
        # This rank's contributions: dbeta = sum(g), dgamma = sum(g * x_hat) over the shard.
        gs = channel_view(g[lo:hi], axis)
        xs = channel_view(x[lo:hi], axis)
        x_hat = (xs - ref._ctx.mean[None, :, None]) * ref._ctx.invstd[None, :, None]
        assert_allclose(bn.grad_bias, gs.sum(axis=(0, 2)), **TIGHT)
        assert_allclose(bn.grad_weight, (gs * x_hat).sum(axis=(0, 2)), **TIGHT)
        allreduce_grads([bn])
        assert_allclose(bn.grad_weight, ref.grad_weight, **TIGHT)
        assert_allclose(bn.grad_bias, ref.grad_bias, **TIGHT)
        assert_allclose(bn.running_mean, ref.running_mean, **TIGHT)
        assert_allclose(bn.running_var, ref.running_var, **TIGHT)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
        _same_on_all_ranks(comm, bn.running_mean, bn.running_var, bn.grad_weight, bn.grad_bias)
    # Evaluation: the running statistics, no communication.
    ref.eval()
    bn.eval()
    x = rng.normal(size=(sum(shards), *tail, c) if axis != 1 else (sum(shards), c, *tail))
    before = counting.calls
    y_ref = ref(x)
    y = bn(x[lo:hi])
    g = rng.normal(size=x.shape)
    dx_ref = ref.backward(g)
    dx = bn.backward(g[lo:hi])
    assert counting.calls == before, "evaluation must not communicate"
    assert_allclose(y, y_ref[lo:hi], **TIGHT)
    assert_allclose(dx, dx_ref[lo:hi], **TIGHT)


def _raises(rank: int, exc: type[BaseException], pattern: str, fn: Callable[[], Any]) -> BaseException:
    """`fn()` must raise exactly `exc` (not a subclass) with a message matching `pattern`."""
    try:
        fn()
    except BaseException as e:
        if type(e) is not exc or not re.search(pattern, str(e)):
            raise AssertionError(
                f"rank {rank}: expected {exc.__name__} matching {pattern!r}, got {e!r}"
            ) from e
        return e
    raise AssertionError(f"rank {rank}: expected {exc.__name__} matching {pattern!r}, nothing raised")


def _expect(rank: int, bad: int, exc: type[BaseException], match: str, fn: Callable[[], Any]) -> None:
    """Rank `bad` must raise `exc` matching `match`; every other rank PeerError."""
    want, pattern = (exc, match) if rank == bad else (PeerError, f"failed on rank {bad} of")
    _raises(rank, want, pattern, fn)


def _state(bn: Any) -> list[np.ndarray]:
    return [np.array(a, copy=True) for a in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


def check_errors(comm: Any) -> None:
    """A rejected input on one rank raises on every rank, changes nothing, and the next step works."""
    rank = int(comm.Get_rank())
    size = int(comm.Get_size())
    c = 3
    bn = bnorm.SyncBatchNorm(c, comm=comm, dtype=np.float64)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, c, 2))
    g = rng.normal(size=x.shape)
    bn(x)
    bn.backward(g)
    saved = _state(bn)
    grads = (bn.grad_weight.copy(), bn.grad_bias.copy())

    # Forward: wrong channels, wrong rank, a complex input on one rank.
    bad_x = {0: x, 1: x[:, :2], 2: x}
    _expect(rank, 1, ValueError, "expected input with 3 channels", lambda: bn(bad_x.get(rank, x)))
    _expect(rank, size - 1, ValueError, "at least 2D", lambda: bn(x[0, 0] if rank == size - 1 else x))
    _expect(
        rank,
        0,
        TypeError,
        "input must have a real floating",
        lambda: bn(x.astype(complex) if rank == 0 else x),
    )
    for a, b in zip(_state(bn), saved, strict=True):
        assert_array_equal(a, b)

    # The collectives are still in step: a normal step works everywhere.
    y = bn(x)
    dx = bn.backward(g)
    saved = _state(bn)
    grads = (bn.grad_weight.copy(), bn.grad_bias.copy())

    # Backward: wrong grad_output shape on one rank; grads unchanged everywhere.
    _expect(
        rank,
        1,
        ValueError,
        "grad_output must have the input's shape",
        lambda: bn.backward(g[:1] if rank == 1 else g),
    )
    assert_array_equal(bn.grad_weight, grads[0])
    assert_array_equal(bn.grad_bias, grads[1])
    assert_array_equal(bn.backward(g), dx)  # and backward can be repeated in step

    # on_nonfinite='raise': a NaN on one rank makes the global statistics NaN on all ranks.
    strict = bnorm.SyncBatchNorm(c, comm=comm, dtype=np.float64, on_nonfinite="raise")
    xn = x.copy()
    if rank == 2 % size:
        xn[0, 0, 0] = np.nan
    before = _state(strict)
    try:
        strict(xn)
    except FloatingPointError as e:
        assert "not finite" in str(e)
    else:
        raise AssertionError(f"rank {rank}: expected FloatingPointError")
    for a, b in zip(_state(strict), before, strict=True):
        assert_array_equal(a, b)

    # A global count of 1 (shards [1, 0, 0]) is refused on every rank, as BatchNorm refuses (1, C).
    one = x[:1, :, :1] if rank == 0 else x[:0, :, :1]
    try:
        bn(one)
    except ValueError as e:
        assert "Expected more than 1 value per channel when training" in str(e), str(e)
    else:
        raise AssertionError(f"rank {rank}: expected ValueError")
    assert_array_equal(bn(x), y)  # still in step: the same batch normalizes the same way

    # allreduce_grads with no gradients on one rank.
    fresh = bnorm.SyncBatchNorm(c, comm=comm, dtype=np.float64)
    fresh(x)
    fresh.backward(g)
    if rank == 1:
        fresh.grad_weight = None
    _expect(rank, 1, RuntimeError, "has no grad_weight: run backward first", lambda: allreduce_grads([fresh]))


def check_moments_and_running_stats(comm: Any, shards: list[int]) -> None:
    """allreduce_moments and allreduce_running_stats equal the moments of the whole data."""
    from bnorm.distributed import allreduce_moments

    rank = int(comm.Get_rank())
    rng = np.random.default_rng(5)
    data = rng.normal(1e4, 1.0, size=(sum(shards), 2, 3))  # offset: Chan merge keeps precision
    lo, hi = _bounds(shards, rank)
    whole = channel_moments(data.reshape(sum(shards), 6, 1))
    part = channel_moments(data[lo:hi].reshape(hi - lo, 6, 1))
    got = allreduce_moments(part, comm)
    assert got.count == whole.count
    assert_allclose(got.mean, whole.mean, rtol=1e-14)
    assert_allclose(got.m2, whole.m2, rtol=1e-9)

    class Stats:  # the RunningStats contract: state in .moments (None before any data)
        def __init__(self, moments: Moments | None) -> None:
            self.moments = moments

    shaped = Moments(part.count, part.mean.reshape(2, 3), part.m2.reshape(2, 3))
    stats = Stats(shaped if hi > lo else None)
    assert allreduce_running_stats(stats, comm) is stats
    assert stats.moments is not None and stats.moments.mean.shape == (2, 3)
    assert stats.moments.count == whole.count
    assert_allclose(stats.moments.mean.ravel(), whole.mean, rtol=1e-14)
    assert_allclose(stats.moments.m2.ravel(), whole.m2, rtol=1e-9)
    _same_on_all_ranks(comm, stats.moments.mean, stats.moments.m2)

    # Different feature shapes: ValueError on every rank.
    odd = Stats(Moments(1, np.zeros(3 + rank), np.zeros(3 + rank)))
    try:
        allreduce_running_stats(odd, comm)
    except ValueError as e:
        assert "different feature shapes" in str(e)
    else:
        raise AssertionError("expected ValueError")


def _snapshot(bn: Any) -> list[Any]:
    """Everything a failed call must leave unchanged: buffers, gradients, the step counter."""
    arrays = (bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.grad_weight, bn.grad_bias)
    return [None if a is None else np.array(a, copy=True) for a in arrays] + [bn._sync_step]


def _unchanged(bn: Any, before: list[Any]) -> None:
    for a, b in zip(_snapshot(bn), before, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b), (a, b)


def _batches(data: np.ndarray, lo: int, hi: int, chunk: int) -> list[np.ndarray]:
    return [data[i : min(i + chunk, hi)] for i in range(lo, hi, chunk)]


def check_recompute(comm: Any, shards: list[int], *, chunk: int = 2) -> None:
    """recompute_running_stats merges every rank's batches (empty ranks too); identical buffers."""
    rank, size = int(comm.Get_rank()), int(comm.Get_size())
    c = 3
    rng = np.random.default_rng(sum(shards))
    data = rng.normal(5.0, 2.0, size=(sum(shards), c, 2)) + 1e3  # offset: the Chan merge keeps precision
    bounds = [_bounds(shards, r) for r in range(size)]
    ref = bnorm.BatchNorm(c, dtype=np.float64)
    ref.recompute_running_stats([b for lo, hi in bounds for b in _batches(data, lo, hi, chunk)])
    bn = bnorm.SyncBatchNorm(c, comm=comm, dtype=np.float64)
    mine = _batches(data, *bounds[rank], chunk)
    assert bn.recompute_running_stats(iter(mine)) is bn  # a generator; [] on an empty shard
    assert_allclose(bn.running_mean, ref.running_mean, rtol=1e-13)
    assert_allclose(bn.running_var, ref.running_var, rtol=1e-9)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)  # all ranks' batches
    _same_on_all_ranks(comm, bn.running_mean, bn.running_var, bn.num_batches_tracked)

    # One rank's bad batch, or its iterator failing, raises on every rank; nothing changes.
    before = _snapshot(bn)
    bad = [*mine, data[:1, :2]] if rank == 1 else mine
    _expect(rank, 1, ValueError, "expected input with 3 channels", lambda: bn.recompute_running_stats(bad))

    def broken() -> Any:
        yield from mine
        raise OSError("shard file vanished")

    _expect(
        rank,
        size - 1,
        OSError,
        "shard file vanished",
        lambda: bn.recompute_running_stats(broken() if rank == size - 1 else mine),
    )
    _unchanged(bn, before)
    # No values anywhere: the same ValueError on every rank, from the same merged count.
    _raises(
        rank,
        ValueError,
        "more than 1 value.s. per channel .* got 0",
        lambda: bn.recompute_running_stats([data[:0]] if rank == 0 else []),
    )
    _unchanged(bn, before)


def _who(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]} is"
    return f"ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]} are"


def _new_layer(comm: Any, c: int = 3, **kw: Any) -> Any:
    bn = bnorm.SyncBatchNorm(c, comm=comm, dtype=np.float64, **kw)
    bn.weight[...] = np.linspace(0.5, 2.0, c)
    return bn


def check_out_of_step(comm: Any) -> None:
    """Out-of-step ranks raise PeerError on every rank, naming both sides; nothing changes."""
    rank, size = int(comm.Get_rank()), int(comm.Get_size())
    others = [r for r in range(size) if r != 0]
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4, 3, 2)) + rank
    g = rng.normal(size=x.shape)
    bn = _new_layer(comm)
    bn(x)
    bn.backward(g)

    # 1. An extra forward on rank 0: its forward of step 3 meets the others' backward of step 2.
    bn(x)
    before = _snapshot(bn)
    if rank == 0:
        pattern = (
            rf"^SyncBatchNorm ranks are out of step: this rank \(0 of {size}\) is in "
            rf"SyncBatchNorm\(3\)\.forward of step 3, but {_who(others)} in "
            r"SyncBatchNorm\(3\)\.backward of step 2\. Every rank must make the same calls"
        )
        _raises(rank, PeerError, pattern, lambda: bn(x))
    else:
        pattern = (
            rf"this rank \({rank} of {size}\) is in SyncBatchNorm\(3\)\.backward of step 2, "
            r"but rank 0 is in SyncBatchNorm\(3\)\.forward of step 3\."
        )
        _raises(rank, PeerError, pattern, lambda: bn.backward(g))
    _unchanged(bn, before)
    # Every rank made the same exchanges, so the layer and communicator still work.
    bn.backward(g)
    bn.allreduce_grads()

    # 2. allreduce_grads on rank 1 while the others run backward (same row length on main:
    #    they paired silently, with wrong gradients everywhere, and then hung).
    bn(x)
    before = _snapshot(bn)
    if rank == 1:
        _raises(
            rank,
            PeerError,
            r"this rank \(1 of \d\) is in allreduce_grads \(6 values\) of step 3, but ranks? [\d, and]+ "
            r"(is|are) in SyncBatchNorm\(3\)\.backward of step 3\.",
            bn.allreduce_grads,
        )
    else:
        _raises(
            rank,
            PeerError,
            r"is in SyncBatchNorm\(3\)\.backward of step 3, but rank 1 is in allreduce_grads \(6 values\) of step 3",
            lambda: bn.backward(g),
        )
    _unchanged(bn, before)
    bn.backward(g)
    bn.allreduce_grads()

    # 3. One rank in evaluation mode: it makes no collective, so the training ranks wait at
    #    their forward; its next collective (allreduce_grads) meets their forward and every
    #    rank raises instead of pairing them.
    eval_rank = size - 1
    before = _snapshot(bn)
    if rank == eval_rank:
        bn.eval()
        bn(x)
        bn.backward(g)  # evaluation backward: this rank's gradients, no collective
        before = _snapshot(bn)
        _raises(
            rank,
            PeerError,
            rf"this rank \({eval_rank} of {size}\) is in allreduce_grads \(6 values\) of step 3, but "
            r"ranks? [\d, and]+ (is|are) in SyncBatchNorm\(3\)\.forward of step 4",
            bn.allreduce_grads,
        )
        bn.train()
    else:
        _raises(
            rank,
            PeerError,
            rf"is in SyncBatchNorm\(3\)\.forward of step 4, but rank {eval_rank} is in allreduce_grads",
            lambda: bn(x),
        )
    _unchanged(bn, before)
    y = bn(x)  # all in training again: step 4 everywhere
    assert bn._sync_step == 4 and y.shape == x.shape
    bn.backward(g)

    # 4. Another layer on one rank (rows of different lengths: on main, MPI's
    #    "Message truncated" on some ranks and garbage on others).
    wide = _new_layer(comm, 5)
    xw = rng.normal(size=(4, 5)) + rank
    if rank == 0:
        _raises(
            rank,
            PeerError,
            r"is in SyncBatchNorm\(5\)\.forward of step 1, but ranks? [\d, and]+ (is|are) in "
            r"SyncBatchNorm\(3\)\.forward of step 5",
            lambda: wide(xw),
        )
    else:
        _raises(rank, PeerError, r"but rank 0 is in SyncBatchNorm\(5\)\.forward of step 1\.", lambda: bn(x))

    # 5. A layer rebuilt on one rank (from a checkpoint, say) restarts its step count.
    fresh = bnorm.SyncBatchNorm.from_batch_norm(bn, comm) if rank == 1 else bn
    _raises(
        rank,
        PeerError,
        r"out of step: .*forward of step 1\b"
        if rank != 1
        else r"is in SyncBatchNorm\(3\)\.forward of step 1, ",
        lambda: fresh(x),
    )

    # Still in step after all this: one more normal step agrees on every rank.
    bn(x)
    bn.backward(g)
    bn.allreduce_grads()
    _same_on_all_ranks(comm, bn.running_mean, bn.running_var, bn.grad_weight, bn.grad_bias)


def check_timeout(comm: Any, seconds: float = 0.3) -> None:
    """A peer that never arrives (evaluation mode) raises PeerTimeoutError on the waiting ranks.

    Runs on a duplicate of `comm`: after a timeout the communicator holds an
    abandoned collective; the late rank then joins it raw so that it completes.
    """
    from bnorm import distributed

    rank, size = int(comm.Get_rank()), int(comm.Get_size())
    sub = comm.Dup()
    try:
        late = 1
        bn = _new_layer(sub, timeout=seconds)
        x = np.random.default_rng(rank).normal(size=(3, 3))
        bn(x)  # step 1, every rank in time
        before = _snapshot(bn)
        if rank == late:
            bn.eval()
            bn(x)  # no collective: the others wait for this rank
            bn.train()
        else:
            t0 = time.monotonic()
            e = _raises(
                rank,
                PeerTimeoutError,
                rf"^SyncBatchNorm\(3\)\.forward of step 2 timed out after {seconds:g} s on rank {rank} of "
                rf"{size}: a peer did not join .* abort the job \(comm\.Abort\(\)\)$",
                lambda: bn(x),
            )
            waited = time.monotonic() - t0
            assert isinstance(e, TimeoutError) and isinstance(e, PeerError)
            assert seconds <= waited < seconds + 5.0, waited
            _unchanged(bn, before)
            # The communicator is unusable from now on: refused at once, nothing changed.
            t0 = time.monotonic()
            _raises(
                rank,
                PeerError,
                r"forward of step 2 cannot run on rank \d: an earlier SyncBatchNorm\(3\)\.forward of step 2 "
                r"timed out on this communicator",
                lambda: bn(x),
            )
            assert time.monotonic() - t0 < 0.5
            _unchanged(bn, before)
        comm.Barrier()
        # Clean up for the next scenarios: the late rank joins the abandoned header exchange.
        # (Non-blocking: MPI never pairs a blocking collective with a non-blocking one.)
        if rank == late:
            sub.Iallgather(np.zeros(8), np.empty((size, 8))).Wait()
        for a in [a for a in distributed._ABANDONED if a.comm is sub]:
            a.request.Wait()
            distributed._ABANDONED.remove(a)
    finally:
        if hasattr(sub, "Free"):
            sub.Free()


def run_all(comm: Any) -> None:
    """Every scenario, for a 3-rank communicator."""
    for shards in ([3, 1, 5], [2, 0, 4]):
        check_training(comm, shards)
        check_training(comm, shards, channels_last=True, tail=(3,))
        check_training(comm, shards, convention="keras", tail=(2, 2))
    check_training(comm, [0, 3, 2], convention="torch", tail=(), momentum_none=True)
    check_training(comm, [2, 0, 4], convention="onnx", tail=(2, 1, 2))
    check_training(comm, [3, 1, 5], timeout=60.0, steps=2)
    check_errors(comm)
    check_moments_and_running_stats(comm, [3, 1, 5])
    check_moments_and_running_stats(comm, [2, 0, 4])
    check_recompute(comm, [3, 1, 5])
    check_recompute(comm, [4, 0, 3])
    check_out_of_step(comm)
    check_timeout(comm)
