"""SyncBatchNorm scenarios run by every rank of a communicator.

Each rank builds the same global batch from a shared seed, runs its shard
through SyncBatchNorm and checks the results against single-process BatchNorm
on the whole (concatenated) batch.  Used by ``tests/test_sync.py`` (ranks as
threads over a fake communicator) and ``tests/mpi/run_sync.py`` (ranks as MPI
processes under ``mpiexec -n 3``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.testing import assert_allclose, assert_array_equal

import bnorm
from bnorm.distributed import (
    PeerError,
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
    bn = bnorm.SyncBatchNorm(c, comm=counting, **kw)
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
        assert counting.calls == before + 2, "one collective forward, one backward"
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


def _expect(rank: int, bad: int, exc: type[BaseException], match: str, fn: Callable[[], Any]) -> None:
    """Rank `bad` must raise `exc` matching `match`; every other rank PeerError."""
    import re

    want, pattern = (exc, match) if rank == bad else (PeerError, f"failed on rank {bad} of")
    try:
        fn()
    except want as e:
        assert re.search(pattern, str(e)), f"rank {rank}: {e!r} does not match {pattern!r}"
    else:
        raise AssertionError(f"rank {rank}: expected {want.__name__}")


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


def run_all(comm: Any) -> None:
    """Every scenario, for a 3-rank communicator."""
    for shards in ([3, 1, 5], [2, 0, 4]):
        check_training(comm, shards)
        check_training(comm, shards, channels_last=True, tail=(3,))
        check_training(comm, shards, convention="keras", tail=(2, 2))
    check_training(comm, [0, 3, 2], convention="torch", tail=(), momentum_none=True)
    check_training(comm, [2, 0, 4], convention="onnx", tail=(2, 1, 2))
    check_errors(comm)
    check_moments_and_running_stats(comm, [3, 1, 5])
    check_moments_and_running_stats(comm, [2, 0, 4])
