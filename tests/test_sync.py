"""SyncBatchNorm in one process: ranks as threads over a fake communicator, and comm=None."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

import bnorm
from bnorm.distributed import (
    PeerError,
    allgather_rows,
    allreduce_grads,
    allreduce_moments,
    allreduce_running_stats,
    allreduce_sum,
    check_comm,
)
from bnorm.functional._kernels.moments import channel_moments

sys.path.insert(0, str(Path(__file__).parent / "mpi"))
import sync_scenarios


class _Group:
    """Shared slots and a barrier: an allgather among threads; posted rows for Iallgather."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=20)
        self.lock = threading.Lock()
        self.posted: dict[int, dict[int, np.ndarray]] = {}  # k-th Iallgather -> rank -> row

    def exchange(self, rank: int, obj: Any) -> list[Any]:
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class ObjectComm:
    """A duck-typed communicator with only the object method ``allgather``."""

    def __init__(self, group: _Group, rank: int) -> None:
        self.group = group
        self.rank = rank

    def Get_size(self) -> int:
        return self.group.size

    def Get_rank(self) -> int:
        return self.rank

    def allgather(self, obj: Any) -> list[Any]:
        return self.group.exchange(self.rank, np.array(obj, copy=True))


class _Request:
    """The request of a fake Iallgather: complete once every rank has posted its k-th row."""

    def __init__(self, group: _Group, k: int, recv: np.ndarray) -> None:
        self.group, self.k, self.recv = group, k, recv

    def Test(self) -> bool:
        with self.group.lock:
            rows = dict(self.group.posted.get(self.k, {}))
        if len(rows) < self.group.size:
            return False
        self.recv[...] = np.stack([rows[r] for r in range(self.group.size)])
        return True

    def Wait(self) -> None:
        while not self.Test():
            time.sleep(1e-4)


class BufferComm(ObjectComm):
    """Also the buffer methods ``Allgather`` (what mpi4py offers and bnorm prefers),
    ``Iallgather`` (for timeouts), ``Barrier`` and ``Dup``."""

    def __init__(self, group: _Group, rank: int) -> None:
        super().__init__(group, rank)
        self.posted = 0

    def Allgather(self, send: np.ndarray, recv: np.ndarray) -> None:
        recv[...] = np.stack(self.allgather(send))

    def Iallgather(self, send: np.ndarray, recv: np.ndarray) -> _Request:
        k, self.posted = self.posted, self.posted + 1
        with self.group.lock:
            self.group.posted.setdefault(k, {})[self.rank] = np.array(send, copy=True)
        return _Request(self.group, k, recv)

    def Barrier(self) -> None:
        self.group.barrier.wait()

    def Dup(self) -> BufferComm:
        group = self.group.exchange(self.rank, _Group(self.group.size))[0]  # rank 0's, for all
        return type(self)(group, self.rank)


def run_ranks(size: int, fn: Callable[[Any], Any], comm_type: type = BufferComm) -> list[Any]:
    """Run ``fn(comm)`` on `size` threads; re-raise the first failure (a broken barrier = a hang)."""
    group = _Group(size)
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def target(rank: int) -> None:
        try:
            results[rank] = fn(comm_type(group, rank))
        except BaseException as exc:
            errors[rank] = exc
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real or any(errors):
        raise (real or [e for e in errors if e is not None])[0]
    return results


# -- exactness against BatchNorm on the concatenated batch --------------------------------


@pytest.mark.parametrize("comm_type", [BufferComm, ObjectComm])
@pytest.mark.parametrize("shards", [[3, 1, 5], [2, 0, 4]])
def test_matches_batchnorm_on_whole_batch(shards: list[int], comm_type: type) -> None:
    run_ranks(3, lambda comm: sync_scenarios.check_training(comm, shards), comm_type)


@pytest.mark.parametrize("shards", [[3, 1, 5], [2, 0, 4]])
def test_channels_last(shards: list[int]) -> None:
    run_ranks(3, lambda comm: sync_scenarios.check_training(comm, shards, channels_last=True, tail=(3,)))


@pytest.mark.parametrize("convention", ["torch", "keras", "onnx", "flax"])
def test_conventions(convention: str) -> None:
    run_ranks(3, lambda comm: sync_scenarios.check_training(comm, [3, 1, 5], convention=convention))


def test_cumulative_average_and_2d_input() -> None:
    run_ranks(3, lambda comm: sync_scenarios.check_training(comm, [0, 3, 2], tail=(), momentum_none=True))


def test_two_and_four_ranks() -> None:
    run_ranks(2, lambda comm: sync_scenarios.check_training(comm, [1, 1], tail=(), steps=2))
    run_ranks(4, lambda comm: sync_scenarios.check_training(comm, [2, 0, 0, 3], steps=2))


def test_errors_raise_on_every_rank() -> None:
    run_ranks(3, sync_scenarios.check_errors)


@pytest.mark.parametrize("shards", [[3, 1, 5], [2, 0, 4]])
def test_moments_and_running_stats(shards: list[int]) -> None:
    run_ranks(3, lambda comm: sync_scenarios.check_moments_and_running_stats(comm, shards))


def test_float32_layer_close_to_float64_reference() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(9, 5, 4)).astype(np.float32)
    shards = [3, 1, 5]
    ref = bnorm.BatchNorm(5, dtype=np.float64)
    y_ref = ref(x.astype(np.float64))

    def rank_fn(comm: Any) -> None:
        lo = sum(shards[: comm.Get_rank()])
        bn = bnorm.SyncBatchNorm(5, comm=comm)
        y = bn(x[lo : lo + shards[comm.Get_rank()]])
        assert y.dtype == np.float32 and bn.running_var.dtype == np.float32
        assert_allclose(y, y_ref[lo : lo + len(y)], rtol=1e-5, atol=1e-5)
        assert_allclose(bn.running_var, ref.running_var, rtol=1e-6)

    run_ranks(3, rank_fn)


def test_empty_global_batch_counts_the_step_like_batchnorm() -> None:
    ref = bnorm.BatchNorm(2)
    ref(np.zeros((0, 2)))

    def rank_fn(comm: Any) -> None:
        bn = bnorm.SyncBatchNorm(2, comm=comm)
        y = bn(np.zeros((0, 2)))
        assert y.shape == (0, 2)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1
        assert_array_equal(bn.running_mean, ref.running_mean)
        assert_array_equal(bn.backward(np.zeros((0, 2))), np.zeros((0, 2)))

    run_ranks(3, rank_fn)


def test_grad_input_is_the_gradient_of_the_global_loss() -> None:
    """Finite differences of L = sum(w * y) over the whole batch, w.r.t. one rank's input."""
    rng = np.random.default_rng(11)
    shards = [2, 1, 3]
    x = rng.normal(size=(6, 3, 2))
    w = rng.normal(size=x.shape)
    gamma = np.array([0.7, 1.5, -2.0])

    def loss(xx: np.ndarray) -> float:
        bn = bnorm.BatchNorm(3, dtype=np.float64)
        bn.weight[...] = gamma
        return float((bn(xx) * w).sum())

    def rank_fn(comm: Any) -> np.ndarray:
        r = comm.Get_rank()
        lo = sum(shards[:r])
        bn = bnorm.SyncBatchNorm(3, comm=comm, dtype=np.float64)
        bn.weight[...] = gamma
        bn(x[lo : lo + shards[r]])
        return bn.backward(w[lo : lo + shards[r]])

    dx = np.concatenate(run_ranks(3, rank_fn))
    d = rng.normal(size=x.shape)
    h = 1e-6
    numeric = (loss(x + h * d) - loss(x - h * d)) / (2 * h)
    assert_allclose(np.sum(dx * d), numeric, rtol=1e-6)


# -- one process ------------------------------------------------------------------------


def _solo() -> BufferComm:
    return BufferComm(_Group(1), 0)


@pytest.mark.parametrize("make_comm", [lambda: None, _solo], ids=["none", "one-rank"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"convention": "keras"}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
)
def test_single_process_is_exactly_batchnorm(make_comm: Callable[[], Any], kwargs: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    ref = bnorm.BatchNorm(3, **kwargs)
    bn = bnorm.SyncBatchNorm(3, comm=make_comm(), **kwargs)
    assert bn.axis == ref.axis and bn.eps == ref.eps and bn.momentum == ref.momentum
    shape = (5, 4, 3) if ref.axis == -1 else (5, 3, 4)
    for mode in (True, True, False):
        ref.train(mode)
        bn.train(mode)
        x = rng.normal(size=shape).astype(np.float32)
        g = rng.normal(size=shape).astype(np.float32)
        assert_array_equal(bn(x), ref(x))
        assert_array_equal(bn.backward(g), ref.backward(g))
        for name in ("grad_weight", "grad_bias", "running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(bn, name), getattr(ref, name)
            assert (a is None and b is None) or np.array_equal(a, b), name


def test_convention_preset_is_not_overridden_by_defaults() -> None:
    bn = bnorm.SyncBatchNorm(3, convention="keras")
    assert (bn.axis, bn.eps, bn.decay, bn.unbiased_running_var) == (-1, 1e-3, 0.99, False)
    bn = bnorm.SyncBatchNorm(3, convention="keras", eps=1e-5, axis=1)
    assert (bn.axis, bn.eps, bn.decay) == (1, 1e-5, 0.99)


def test_from_and_to_batch_norm_keep_state_and_copy() -> None:
    src = bnorm.BatchNorm2d(3, convention="onnx", eps=1e-4, dtype=np.float64)
    rng = np.random.default_rng(2)
    src.weight[...] = rng.normal(size=3)
    src.bias[...] = rng.normal(size=3)
    for _ in range(2):
        src(rng.normal(size=(4, 3, 2, 2)))
    src.eval()
    comm = _solo()
    sbn = bnorm.SyncBatchNorm.from_batch_norm(src, comm)
    assert sbn.comm is comm
    for layer in (sbn, sbn.to_batch_norm()):
        assert (
            layer.eps,
            layer.decay,
            layer.axis,
            layer.unbiased_running_var,
            layer.dtype,
            layer.convention,
        ) == (1e-4, 0.9, 1, False, np.float64, "onnx")
        assert layer.training is False and layer.on_nonfinite == src.on_nonfinite
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(layer, name), getattr(src, name)
            assert_array_equal(a, b)
            assert a.dtype == b.dtype and not np.shares_memory(a, b), name
    back = sbn.to_batch_norm()
    assert type(back) is bnorm.BatchNorm
    x = rng.normal(size=(2, 3, 2, 2))
    assert_array_equal(back(x), src(x))
    cumulative = bnorm.SyncBatchNorm.from_batch_norm(bnorm.BatchNorm(2, momentum=None, affine=False))
    assert cumulative.momentum is None and cumulative.weight is None


def test_from_batch_norm_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="layer must be a bnorm batch-norm layer, got list"):
        bnorm.SyncBatchNorm.from_batch_norm([1, 2])


def test_bad_comm_is_refused() -> None:
    with pytest.raises(TypeError, match=r"comm must be an MPI communicator .* got int"):
        bnorm.SyncBatchNorm(3, comm=3)
    with pytest.raises(TypeError, match=r"comm must be an MPI communicator"):
        check_comm(object())


def test_allreduce_grads_sums_and_averages() -> None:
    def rank_fn(comm: Any) -> tuple[np.ndarray, np.ndarray]:
        r = comm.Get_rank()
        a = bnorm.SyncBatchNorm(2, comm=comm, dtype=np.float64)
        b = bnorm.BatchNorm(3, affine=False)
        c = bnorm.SyncBatchNorm(1, comm=comm)
        a.grad_weight, a.grad_bias = np.array([1.0, 2.0]) * (r + 1), np.array([0.5, 0.25]) * (r + 1)
        c.grad_weight, c.grad_bias = np.array([r], np.float32), np.array([1], np.float32)
        allreduce_grads([a, b, c])
        assert c.grad_weight.dtype == np.float32
        a.allreduce_grads(average=True)
        return a.grad_weight, c.grad_bias

    for gw, cb in run_ranks(3, rank_fn):
        assert_array_equal(gw, np.array([6.0, 12.0]))  # sum 1+2+3 = 6, then the mean of equal values
        assert_array_equal(cb, np.array([3.0], np.float32))


def test_allreduce_grads_single_process() -> None:
    bn = bnorm.BatchNorm(2)
    with pytest.raises(RuntimeError, match="has no grad_weight: run backward first"):
        allreduce_grads(bn)
    bn(np.arange(6.0).reshape(3, 2))
    bn.backward(np.ones((3, 2)))
    db = bn.grad_bias.copy()
    allreduce_grads(bn)
    assert_array_equal(bn.grad_bias, db)


def test_allreduce_grads_refuses_mixed_communicators() -> None:
    a = bnorm.SyncBatchNorm(2, comm=_solo())
    b = bnorm.SyncBatchNorm(2, comm=_solo())
    with pytest.raises(ValueError, match="the layers use different communicators"):
        allreduce_grads([a, b])


def test_sums_are_bitwise_identical_and_flag_failures() -> None:
    def rank_fn(comm: Any) -> np.ndarray:
        r = comm.Get_rank()
        return allreduce_sum(comm, np.array([0.1, 1e16, -1e16]) * (r + 1))

    rows = run_ranks(3, rank_fn)
    assert all(np.array_equal(rows[0], r) for r in rows)

    def failing(comm: Any) -> str:
        try:
            allreduce_sum(comm, [1.0], ok=comm.Get_rank() != 2, what="the test step")
        except PeerError as e:
            return str(e)
        return "no error"

    msgs = run_ranks(3, failing)
    assert msgs[2] == "no error"
    assert all(m.startswith("the test step failed on rank 2 of 3") for m in msgs[:2])


def test_allgather_rows_rejects_ragged_object_rows() -> None:
    class Ragged:
        def Get_size(self) -> int:
            return 2

        def Get_rank(self) -> int:
            return 0

        def allgather(self, obj: Any) -> list[Any]:
            return [obj, np.zeros(5)]

    with pytest.raises(RuntimeError, match="allgather returned rows of shapes"):
        allgather_rows(Ragged(), np.zeros(2))


def test_allreduce_moments_checks_its_argument() -> None:
    with pytest.raises(TypeError, match="local must be a bnorm Moments"):
        allreduce_moments((1, 2, 3), None)
    m = channel_moments(np.ones((2, 3, 1)))
    assert allreduce_moments(m, None) is m


def test_running_stats_bad_state_raises_everywhere() -> None:
    class Stats:
        def __init__(self, moments: Any) -> None:
            self.moments = moments

    def rank_fn(comm: Any) -> str:
        stats = Stats("garbage" if comm.Get_rank() == 0 else channel_moments(np.ones((2, 3, 1))))
        try:
            allreduce_running_stats(stats, comm)
        except (TypeError, PeerError) as e:
            return type(e).__name__ + ": " + str(e)
        return "no error"

    msgs = run_ranks(3, rank_fn)
    assert msgs[0].startswith("TypeError: stats.moments must be a bnorm Moments or None, got str")
    assert all(m.startswith("PeerError: allreduce_running_stats failed on rank 0") for m in msgs[1:])
    assert allreduce_running_stats(Stats(None), None).moments is None


def test_importing_bnorm_does_not_import_mpi4py() -> None:
    code = "import sys, bnorm, bnorm.distributed; assert 'mpi4py' not in sys.modules"
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={"PYTHONPATH": src, "PATH": ""})


def test_eval_without_running_stats_is_per_rank_and_silent() -> None:
    """track_running_stats=False in evaluation: per-shard batch statistics, as PyTorch, no collective."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 3))
    shards = [3, 2, 4]

    def rank_fn(comm: Any) -> None:
        r = comm.Get_rank()
        lo = sum(shards[:r])
        counting = sync_scenarios.Counting(comm)
        bn = bnorm.SyncBatchNorm(3, comm=counting, track_running_stats=False, dtype=np.float64).eval()
        ref = bnorm.BatchNorm(3, track_running_stats=False, dtype=np.float64).eval()
        shard = x[lo : lo + shards[r]]
        assert_array_equal(bn(shard), ref(shard))
        assert counting.calls == 0

    run_ranks(3, rank_fn)


def test_matches_torch_on_the_whole_batch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    shards = [3, 0, 4]
    x = rng.normal(size=(7, 3, 5))
    g = rng.normal(size=x.shape)
    gamma = rng.uniform(0.5, 2.0, 3)
    tbn = torch.nn.BatchNorm1d(3).double()
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(gamma))
    xt = torch.from_numpy(x).requires_grad_()
    tbn(xt).backward(torch.from_numpy(g))

    def rank_fn(comm: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = comm.Get_rank()
        lo = sum(shards[:r])
        bn = bnorm.SyncBatchNorm(3, comm=comm, dtype=np.float64)
        bn.weight[...] = gamma
        bn(x[lo : lo + shards[r]])
        dx = bn.backward(g[lo : lo + shards[r]])
        bn.allreduce_grads()
        return dx, bn.grad_weight, bn.running_var

    out = run_ranks(3, rank_fn)
    assert_allclose(np.concatenate([o[0] for o in out]), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for _, gw, rv in out:
        assert_allclose(gw, tbn.weight.grad.numpy(), rtol=1e-10)
        assert_allclose(rv, tbn.running_var.numpy(), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    shards=st.lists(st.integers(0, 4), min_size=1, max_size=4).filter(lambda s: sum(s) >= 2),
    channels=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_any_split_equals_the_whole_batch(shards: list[int], channels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(5.0, 3.0, size=(sum(shards), channels, 2))
    g = rng.normal(size=x.shape)
    ref = bnorm.BatchNorm(channels, dtype=np.float64)
    y_ref = ref(x)
    dx_ref = ref.backward(g)

    def rank_fn(comm: Any) -> tuple[np.ndarray, np.ndarray]:
        r = comm.Get_rank()
        lo = sum(shards[:r])
        bn = bnorm.SyncBatchNorm(channels, comm=comm, dtype=np.float64)
        y = bn(x[lo : lo + shards[r]])
        dx = bn.backward(g[lo : lo + shards[r]])
        assert_allclose(bn.running_var, ref.running_var, rtol=1e-12)
        return y, dx

    out = run_ranks(len(shards), rank_fn)
    assert_allclose(np.concatenate([o[0] for o in out]), y_ref, rtol=1e-12, atol=1e-12)
    assert_allclose(np.concatenate([o[1] for o in out]), dx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shards", [[3, 1, 5], [2, 0, 4], [0, 0, 6]])
@pytest.mark.parametrize("axis", [1, (1, 2)])
def test_running_stats_allreduce_equals_whole_data(shards: list[int], axis: Any) -> None:
    """RunningStats.allreduce: every rank, with or without data, ends with the whole-data statistics."""
    from bnorm.preprocessing import RunningStats

    rng = np.random.default_rng(sum(shards))
    data = rng.normal(size=(sum(shards), 3, 4, 2)) * 2 + 1e8
    parts = np.split(data, np.cumsum(shards)[:-1])

    def rank_fn(comm: Any) -> tuple[Any, Any, Any, Any]:
        stats = RunningStats(axis=axis)
        if len(parts[comm.Get_rank()]):
            stats.update(parts[comm.Get_rank()])
        assert stats.allreduce(comm) is stats
        return stats.count, stats.mean, stats.var(ddof=1), stats.feature_shape

    whole = RunningStats(axis=axis).update(data)
    for count, mean, var, feature_shape in run_ranks(3, rank_fn):
        assert count == whole.count and feature_shape == whole.feature_shape
        np.testing.assert_allclose(mean, whole.mean, rtol=1e-15)
        np.testing.assert_allclose(var, whole.var(ddof=1), rtol=1e-6)
        ref_axes = tuple(a for a in range(4) if a not in ((axis,) if isinstance(axis, int) else axis))
        np.testing.assert_allclose(var, data.astype(np.float64).var(axis=ref_axes, ddof=1), rtol=1e-6)


# -- recompute_running_stats, out-of-step ranks, timeouts (ranks as threads) ---------------


@pytest.mark.parametrize("shards", [[3, 1, 5], [4, 0, 3], [0, 0, 5]])
def test_recompute_running_stats_merges_every_rank(shards: list[int]) -> None:
    run_ranks(3, lambda comm: sync_scenarios.check_recompute(comm, shards))


def test_recompute_running_stats_two_ranks() -> None:
    """The reported case: rank 0 holds rows 0-4, rank 1 rows 5-9; both must get the whole mean."""
    data = np.arange(20.0).reshape(10, 2)

    def rank_fn(comm: Any) -> tuple[np.ndarray, int]:
        bn = bnorm.SyncBatchNorm(2, comm=comm, dtype=np.float64)
        r = comm.Get_rank()
        bn.recompute_running_stats([data[5 * r : 5 * r + 5]])
        return bn.running_mean, int(bn.num_batches_tracked)

    for mean, count in run_ranks(2, rank_fn):
        assert_array_equal(mean, [9.0, 10.0])
        assert count == 2


@pytest.mark.parametrize("size", [2, 3, 4])
def test_out_of_step_ranks_raise_everywhere(size: int) -> None:
    run_ranks(size, sync_scenarios.check_out_of_step)


def test_timeout_raises_on_the_waiting_ranks() -> None:
    run_ranks(3, sync_scenarios.check_timeout)


def test_training_with_a_timeout_matches_batchnorm() -> None:
    run_ranks(3, lambda comm: sync_scenarios.check_training(comm, [3, 1, 5], timeout=30.0, steps=2))


def test_failing_rank_does_not_wait_for_its_own_error() -> None:
    """A rank whose input is rejected while its peers never come raises its own error after the timeout."""

    def rank_fn(comm: Any) -> str:
        bn = bnorm.SyncBatchNorm(3, comm=comm, timeout=0.2)
        if comm.Get_rank() == 1:
            return "absent"
        with pytest.raises(ValueError, match="expected input with 3 channels"):
            bn(np.zeros((2, 4)))
        with pytest.raises(PeerError, match="timed out on this communicator"):
            bn(np.zeros((2, 3)))
        return "raised"

    assert run_ranks(2, rank_fn) == ["raised", "absent"]


def _header(code: int, step: int, width: int, length: int = 7) -> np.ndarray:
    from bnorm import distributed as d

    return np.array([d._MAGIC, 0.0, code, step, width, length, 0.0, 0.0])


def _heads(*ops: tuple[int, int, int], length: int = 7, flags: tuple[float, ...] = ()) -> np.ndarray:
    from bnorm import distributed as d

    heads = np.zeros((len(ops), 8))
    for r, (code, step, width) in enumerate(ops):
        heads[r, :6] = (d._MAGIC, flags[r] if flags else 0.0, code, step, width, length)
    return heads


def test_header_checks_name_both_sides_and_the_steps() -> None:
    from bnorm import distributed as d

    comm = BufferComm(_Group(3), 1)
    fwd, bwd = (d._FORWARD, 3, 4), (d._BACKWARD, 2, 4)
    me = d._Op(*bwd)
    mine = _header(*bwd)
    d._check_heads(_heads(bwd, bwd, bwd), mine, comm, me)  # in step: no error
    with pytest.raises(PeerError) as info:
        d._check_heads(_heads(fwd, bwd, fwd), mine, comm, me)
    assert str(info.value).startswith(
        "SyncBatchNorm ranks are out of step: this rank (1 of 3) is in SyncBatchNorm(4).backward of step 2, "
        "but ranks 0 and 2 are in SyncBatchNorm(4).forward of step 3. Every rank must make the same calls"
    )
    # Two different peers, a step mismatch alone, a layer (width) mismatch alone.
    with pytest.raises(
        PeerError, match=r"but rank 0 is in allreduce_grads \(8 values\) of step 2; rank 2 is in "
    ):
        d._check_heads(_heads((d._GRADS, 2, 8), bwd, fwd), mine, comm, me)
    with pytest.raises(PeerError, match=r"rank 2 is in SyncBatchNorm\(4\)\.backward of step 5\."):
        d._check_heads(_heads(bwd, bwd, (d._BACKWARD, 5, 4)), mine, comm, me)
    with pytest.raises(PeerError, match=r"rank 0 is in SyncBatchNorm\(6\)\.backward of step 2\."):
        d._check_heads(_heads((d._BACKWARD, 2, 6), bwd, bwd), mine, comm, me)
    # A failed peer; a stranger's row; lengths that disagree.
    with pytest.raises(
        PeerError, match=r"^SyncBatchNorm\(4\)\.backward of step 2 failed on rank 2 of 3 \(see"
    ):
        d._check_heads(_heads(bwd, bwd, bwd, flags=(0.0, 0.0, 1.0)), mine, comm, me)
    stranger = _heads(bwd, bwd, bwd)
    stranger[0, 0] = 3.0
    with pytest.raises(PeerError, match="rank 0 sent a row that is not a bnorm header"):
        d._check_heads(stranger, mine, comm, me)
    with pytest.raises(PeerError, match="the ranks send 7 and 9 values"):
        d._check_heads(_heads(bwd, bwd, bwd), _header(*bwd, length=9), comm, me)
    # Helpers carry no step; a label replaces this rank's name.
    assert d._Op(d._SUM, 0, 3).describe() == "allreduce_sum (3 values)"
    assert d._Op(d._SUM, 0, 3, "the test step").describe() == "the test step"
    assert d._Op(99, 1, 2).describe() == "operation 99"


def test_step_counter_counts_completed_training_forwards() -> None:
    def rank_fn(comm: Any) -> list[int]:
        bn = bnorm.SyncBatchNorm(2, comm=comm)
        x = np.arange(8.0).reshape(4, 2)
        seen = []
        bn(x)
        seen.append(bn._sync_step)
        bn.eval()
        bn(x)  # evaluation: no collective, not a step
        seen.append(bn._sync_step)
        bn.train()
        with pytest.raises((ValueError, PeerError)):
            bn(x[:, :1] if comm.Get_rank() == 0 else x)  # rejected on rank 0: not a step anywhere
        seen.append(bn._sync_step)
        bn(x)
        bn.backward(x)
        bn.recompute_running_stats([x])  # carries the step, does not advance it
        seen.append(bn._sync_step)
        return seen

    assert run_ranks(3, rank_fn) == [[1, 1, 1, 2]] * 3


def test_timeout_argument_is_checked() -> None:
    for bad, exc, msg in [
        ("1", TypeError, "timeout must be a number of seconds or None .no timeout., got str"),
        (True, TypeError, "timeout must be a number of seconds"),
        (0, ValueError, "timeout must be a positive, finite number of seconds or None .no timeout., got 0.0"),
        (-1.5, ValueError, "got -1.5"),
        (float("nan"), ValueError, "got nan"),
        (float("inf"), ValueError, "got inf"),
    ]:
        with pytest.raises(exc, match=msg):
            bnorm.SyncBatchNorm(2, timeout=bad)
    bn = bnorm.SyncBatchNorm(2, timeout=np.float32(2.5))
    assert bn.timeout == 2.5 and type(bn.timeout) is float
    with pytest.raises(ValueError, match="timeout must be a positive"):
        bn.timeout = 0
    assert bn.timeout == 2.5
    # Object-form communicators cannot be polled: refused when there is a peer to wait for.
    object_comm = ObjectComm(_Group(2), 0)
    with pytest.raises(TypeError, match=r"timeout= needs a communicator with the non-blocking Iallgather"):
        bnorm.SyncBatchNorm(2, comm=object_comm, timeout=1.0)
    layer = bnorm.SyncBatchNorm(2, comm=object_comm)
    with pytest.raises(TypeError, match="Iallgather"):
        layer.timeout = 1.0
    assert layer.timeout is None
    bnorm.SyncBatchNorm(2, comm=ObjectComm(_Group(1), 0), timeout=1.0)  # one rank: nothing to wait for
    with pytest.raises(ValueError, match="timeout must be a positive"):
        allreduce_sum(BufferComm(_Group(2), 0), [1.0], timeout=-1)


def test_timeout_is_saved_and_restored(tmp_path: Path) -> None:
    bn = bnorm.SyncBatchNorm(3, timeout=12.5)
    bnorm.save(tmp_path / "sbn.npz", bn)
    back = bnorm.load(tmp_path / "sbn.npz")
    assert type(back) is bnorm.SyncBatchNorm and back.timeout == 12.5 and back.comm is None
    assert bnorm.SyncBatchNorm.from_batch_norm(bnorm.BatchNorm(3), timeout=4).timeout == 4.0


def test_helpers_out_of_step_say_so_without_naming_layers() -> None:
    def rank_fn(comm: Any) -> str:
        with pytest.raises(PeerError) as info:
            if comm.Get_rank() == 0:
                allreduce_sum(comm, [1.0, 2.0, 3.0])
            else:
                allreduce_moments(channel_moments(np.ones((2, 2, 1))), comm)
        return str(info.value)

    msgs = run_ranks(2, rank_fn)
    assert msgs[0] == (
        "The ranks are out of step: this rank (0 of 2) is in allreduce_sum (3 values), but rank 1 is in "
        "allreduce_moments (2 channels). Every rank must make the same calls in the same order, with the "
        "same sizes. This call changed no state on any rank"
    )
    assert msgs[1].startswith(
        "The ranks are out of step: this rank (1 of 2) is in allreduce_moments (2 channels)"
    )


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6]), st.integers(0, 3), st.integers(1, 3), st.booleans()),
        min_size=2,
        max_size=5,
    ),
    rank=st.integers(0, 4),
)
def test_any_disagreement_raises_naming_both_sides(rows: list[tuple[int, int, int, bool]], rank: int) -> None:
    """Whatever the ranks announce, a rank passes only if all agree, else PeerError names the peers."""
    from bnorm import distributed as d

    rank %= len(rows)
    heads = np.zeros((len(rows), 8))
    for r, (code, step, width, failed) in enumerate(rows):
        heads[r, :6] = (d._MAGIC, 1.0 if failed and r != rank else 0.0, code, step, width, 2 * width)
    op = d._Op(rows[rank][0], rows[rank][1], rows[rank][2])
    header = heads[rank].copy()
    others = [r for r in range(len(rows)) if r != rank]
    differ = [r for r in others if rows[r][:3] != rows[rank][:3]]
    failed = [r for r in others if rows[r][3]]
    comm = BufferComm(_Group(len(rows)), rank)
    if not differ and not failed:
        d._check_heads(heads, header, comm, op)
        return
    with pytest.raises(PeerError) as info:
        d._check_heads(heads, header, comm, op)
    msg = str(info.value)
    if differ:  # out of step takes precedence over a peer's failure
        assert f"this rank ({rank} of {len(rows)}) is in {op.describe()}, but " in msg
        for r in differ:
            theirs = re.escape(d._op_of(heads[r]).describe())
            assert re.search(rf"\branks? [^;]*\b{r}\b[^;]* (is|are) in {theirs}(;|\.)", msg), (r, msg)
    else:
        named = re.search(r"failed on ranks? ([\d, and]+) of \d", msg)
        assert named is not None and sorted(map(int, re.findall(r"\d+", named.group(1)))) == failed, msg


def test_timeouts_reach_allreduce_grads_and_running_stats() -> None:
    """allreduce_grads takes the layers' timeout; RunningStats.allreduce takes its own."""
    from bnorm.distributed import PeerTimeoutError
    from bnorm.preprocessing import RunningStats

    def rank0(comm: Any) -> list[str]:
        bn = bnorm.SyncBatchNorm(2, comm=comm, timeout=0.2)
        bn.grad_weight, bn.grad_bias = np.ones(2, np.float32), np.ones(2, np.float32)
        msgs = []
        with pytest.raises(PeerTimeoutError) as info:
            bnorm.distributed.allreduce_grads([bn])
        msgs.append(str(info.value))
        assert_array_equal(bn.grad_weight, np.ones(2))  # unchanged
        with pytest.raises(PeerTimeoutError) as info:
            RunningStats().update(np.ones((3, 2))).allreduce(comm.Dup(), timeout=0.2)
        msgs.append(str(info.value))
        return msgs

    # Rank 1 never calls anything, so rank 0 runs alone (its Dup cannot be collective either).
    comm = BufferComm(_Group(2), 0)
    comm.Dup = lambda: BufferComm(_Group(2), 0)  # type: ignore[method-assign]
    msgs = rank0(comm)
    assert msgs[0].startswith("allreduce_grads (4 values) of step 0 timed out after 0.2 s on rank 0 of 2")
    assert msgs[1].startswith("allreduce_running_stats timed out after 0.2 s on rank 0 of 2")
