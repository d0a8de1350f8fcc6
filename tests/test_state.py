"""state_dict / load_state_dict, the per-call training override, recompute_running_stats."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnorm
from bnorm.layers._base import IncompatibleKeys, Module, StateDictKeyError

KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def trained(cls=bnorm.BatchNorm1d, c=3, steps=3, seed=0, shape=(8,), **kw):
    rng = np.random.default_rng(seed)
    bn = cls(c, **kw)
    bn.weight[...] = rng.normal(size=c) if bn.weight is not None else 0
    for _ in range(steps):
        bn(rng.normal(2.0, 3.0, size=(shape[0], c, *shape[1:])))
    return bn


# -- state_dict ------------------------------------------------------------------
def test_keys_order_dtypes_like_pytorch():
    sd = trained().state_dict()
    assert list(sd) == KEYS
    assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"].shape == ()
    assert int(sd["num_batches_tracked"]) == 3
    for k in KEYS[:4]:
        assert sd[k].dtype == np.float32 and sd[k].shape == (3,)


@pytest.mark.parametrize(
    "affine, track, keys",
    [
        (True, True, KEYS),
        (False, True, KEYS[2:]),
        (True, False, KEYS[:2]),
        (False, False, []),
    ],
)
def test_absent_entries_are_dropped(affine, track, keys):
    bn = bnorm.BatchNorm2d(4, affine=affine, track_running_stats=track)
    assert list(bn.state_dict()) == keys


def test_state_dict_matches_torch_keys_and_dtypes():
    torch = pytest.importorskip("torch")
    for affine in (True, False):
        for track in (True, False):
            t = torch.nn.BatchNorm2d(4, affine=affine, track_running_stats=track)
            b = bnorm.BatchNorm2d(4, affine=affine, track_running_stats=track)
            tsd, bsd = t.state_dict(), b.state_dict()
            assert list(tsd) == list(bsd)
            for k in tsd:
                assert tsd[k].numpy().dtype == bsd[k].dtype and tuple(tsd[k].shape) == bsd[k].shape
                np.testing.assert_array_equal(tsd[k].numpy(), bsd[k])


def test_state_dict_returns_copies():
    bn = trained()
    sd = bn.state_dict()
    before = {k: v.copy() for k, v in sd.items()}
    for v in sd.values():
        v[...] = 7
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


# -- load_state_dict -------------------------------------------------------------
def test_round_trip_outputs_equal():
    a = trained(bnorm.BatchNorm2d, c=3, shape=(4, 5, 5))
    b = bnorm.BatchNorm2d(3)
    assert b.load_state_dict(a.state_dict()) == IncompatibleKeys([], [])
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v)
    x = np.random.default_rng(9).normal(size=(2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(a.eval()(x), b.eval()(x))


def test_load_copies_into_layer_dtype_in_place():
    bn = bnorm.BatchNorm1d(2)  # float32
    w = bn.weight
    state = {
        "weight": np.array([1.5, 2.5]),  # float64
        "bias": [0.25, -1],  # a list
        "running_mean": [1, 2],  # Python ints: no dtype, taken as numbers
        "running_var": np.array([3.0, 4.0], np.float16),
        "num_batches_tracked": np.int32(5),
    }
    bn.load_state_dict(state)
    assert bn.weight is w  # copied into the existing array
    for k in KEYS[:4]:
        assert getattr(bn, k).dtype == np.float32
    assert bn.num_batches_tracked.dtype == np.int64 and int(bn.num_batches_tracked) == 5
    np.testing.assert_array_equal(bn.bias, [0.25, -1])
    state["weight"][0] = 100  # the layer does not alias its source
    assert bn.weight[0] == 1.5


def test_load_accepts_torch_tensors_without_importing_torch_in_bnorm():
    torch = pytest.importorskip("torch")
    t = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        t.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))  # requires_grad parameter
    t(torch.randn(6, 3))
    t(torch.randn(6, 3))
    b = bnorm.BatchNorm1d(3)
    b.load_state_dict(t.state_dict())
    for k, v in t.state_dict().items():
        np.testing.assert_array_equal(getattr(b, k), v.detach().numpy())
    assert int(b.num_batches_tracked) == 2


def test_strict_names_every_missing_and_unexpected_key():
    bn = bnorm.BatchNorm1d(2)
    state = {"weight": np.ones(2), "running_mean": np.zeros(2), "extra": 1, "other": 2}
    with pytest.raises(
        StateDictKeyError, match=r"missing keys 'bias', 'running_var'; unexpected keys 'extra', 'other'"
    ):
        bn.load_state_dict(state)


@pytest.mark.parametrize("exc", [KeyError, ValueError, RuntimeError])
def test_strict_error_is_caught_as_key_value_or_runtime_error(exc):
    with pytest.raises(exc, match="unexpected keys 'x'"):
        bnorm.BatchNorm1d(2).load_state_dict({**bnorm.BatchNorm1d(2).state_dict(), "x": 1})


def test_non_strict_loads_matching_and_reports():
    bn = bnorm.BatchNorm1d(2, affine=False)
    res = bn.load_state_dict({"weight": np.ones(2), "running_mean": np.array([1.0, 2.0])}, strict=False)
    assert res.missing_keys == ["running_var"] and res.unexpected_keys == ["weight"]
    np.testing.assert_array_equal(bn.running_mean, [1, 2])
    np.testing.assert_array_equal(bn.running_var, [1, 1])


def test_missing_num_batches_tracked_keeps_counter():
    bn = trained(steps=4)
    state = trained(steps=1, seed=3).state_dict()
    del state["num_batches_tracked"]
    bn.load_state_dict(state)  # strict
    assert int(bn.num_batches_tracked) == 4
    np.testing.assert_array_equal(bn.running_mean, state["running_mean"])


def test_shape_mismatch_names_key_and_changes_nothing():
    bn = trained()
    before = bn.state_dict()
    state = {k: v + 1 for k, v in before.items()}
    state["running_var"] = np.ones(4)  # weight, bias, running_mean come first and are fine
    with pytest.raises(
        ValueError, match=r"state\['running_var'\] must have shape \(3,\) to match BatchNorm1d, got \(4,\)"
    ):
        bn.load_state_dict(state)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_bad_counter_changes_nothing():
    bn = trained()
    before = bn.state_dict()
    state = {k: v + 1 for k, v in before.items()}
    state["num_batches_tracked"] = np.array(-1)
    with pytest.raises(ValueError, match=r"state\['num_batches_tracked'\] must be >= 0"):
        bn.load_state_dict(state)
    state["num_batches_tracked"] = np.array(2.5)  # a float counter is refused, not rounded
    with pytest.raises(TypeError, match=r"state\['num_batches_tracked'\] must be an integer array"):
        bn.load_state_dict(state)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_non_numeric_value_is_refused():
    bn = bnorm.BatchNorm1d(2)
    with pytest.raises(
        TypeError, match=r"state\['weight'\] must be a numeric array, got an array of dtype object"
    ):
        bn.load_state_dict({**bn.state_dict(), "weight": np.array([object(), object()])})
    with pytest.raises(TypeError, match=r"state\['weight'\] must be a floating array .*got dtype <U1"):
        bn.load_state_dict({**bn.state_dict(), "weight": np.array(["a", "b"])})


@pytest.mark.parametrize(
    ("key", "value", "error", "message"),
    [
        ("num_batches_tracked", np.array(1e30), TypeError, "must be an integer array .*float64"),
        (
            "num_batches_tracked",
            np.array(2**64 - 1, np.uint64),
            ValueError,
            "must be >= 0 and <= 9223372036854775807",
        ),
        ("num_batches_tracked", np.array(-3), ValueError, "must be >= 0"),
        ("num_batches_tracked", np.array(True), TypeError, "must be an integer array .*bool"),
        ("weight", np.array([1, 2, 3]), TypeError, "must be a floating array .*int64"),
        ("running_mean", np.array([True, False, True]), TypeError, "must be a floating array .*bool"),
        (
            "running_var",
            np.array([1.0, 1e300, 1.0]),
            ValueError,
            "holds 1e\\+300, beyond the largest float32",
        ),
        ("running_var", np.array([1.0, -0.5, 1.0]), ValueError, "must be >= 0 \\(it is a variance\\)"),
    ],
    ids=[
        "huge-float-counter",
        "uint64-counter",
        "negative-counter",
        "bool-counter",
        "int-weight",
        "bool-running-mean",
        "overflowing-var",
        "negative-var",
    ],
)
def test_tampered_state_is_refused_naming_the_key_and_changes_nothing(key, value, error, message):
    bn = trained()
    before = bn.state_dict()
    with pytest.raises(error, match=rf"state\[{key!r}\] {message}"):
        bn.load_state_dict({**before, key: value})
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_a_refused_huge_counter_cannot_reach_the_cumulative_average():
    # on main 1e30 loaded as -2**63 and the next momentum=None step divided by zero
    bn = bnorm.BatchNorm1d(3, momentum=None)
    with pytest.raises(TypeError):
        bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": np.array(1e30)})
    bn(np.random.default_rng(0).normal(size=(4, 3)))
    assert int(bn.num_batches_tracked) == 1 and np.isfinite(bn.running_mean).all()


def test_state_must_be_a_mapping():
    with pytest.raises(TypeError, match="state must be a mapping of names to arrays, got list"):
        bnorm.BatchNorm1d(2).load_state_dict([("weight", np.ones(2))])


class Scale(Module):
    """A minimal stateful layer declared with the tuples only (as other norm layers will be)."""

    _parameters = ("weight",)
    _buffers = ()

    def __init__(self, n: int, learnable: bool = True) -> None:
        super().__init__()
        self.n = n
        self.weight = np.ones(n) if learnable else None

    def forward(self, x, *, training=None):
        return x * (1.0 if self.weight is None else self.weight)


def test_machinery_is_generic_over_declared_tuples():
    a, b = Scale(3), Scale(3)
    a.weight[:] = [1, 2, 3]
    assert list(a.state_dict()) == ["weight"]
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.weight, [1, 2, 3])
    assert Scale(3, learnable=False).state_dict() == {}
    with pytest.raises(KeyError, match="unexpected keys 'weight'"):
        Scale(3, learnable=False).load_state_dict(a.state_dict())
    # `learnable` is not stored under its own name: the recorded argument is used
    assert a._config() == {"n": 3, "learnable": True}
    assert Scale(3, learnable=False)._config() == {"n": 3, "learnable": False}


# -- layer(x, training=...) ------------------------------------------------------
def test_per_call_override_to_eval_leaves_flag_and_stats():
    bn = trained()
    before = bn.state_dict()
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    y = bn(x, training=False)
    assert bn.training is True
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(y, bn.eval()(x))


def test_per_call_override_to_train_updates_stats_keeps_eval():
    bn = trained().eval()
    ref = trained().train()
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    y = bn(x, training=True)
    assert bn.training is False
    np.testing.assert_array_equal(y, ref(x))
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(bn.state_dict()[k], v)
    assert int(bn.num_batches_tracked) == 4


# -- recompute_running_stats -----------------------------------------------------
def batches_of(shape, n, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return [offset + rng.normal(1.0, 2.0, size=(rng.integers(2, 6), *shape)) for _ in range(n)]


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_recompute_equals_population_statistics(convention):
    axis = 1 if convention == "torch" else -1
    shape = (3, 4, 5) if axis == 1 else (4, 5, 3)
    bn = bnorm.BatchNorm2d(3, convention=convention, dtype=np.float64)
    bn(np.random.default_rng(5).normal(size=(2, *shape)))
    weight = bn.weight.copy()
    bs = batches_of(shape, 4)
    assert bn.recompute_running_stats(iter(bs)) is bn
    whole = np.moveaxis(np.concatenate(bs), axis, -1).reshape(-1, 3)
    ddof = 1 if convention == "torch" else 0
    np.testing.assert_allclose(bn.running_mean, whole.mean(0), rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, whole.var(0, ddof=ddof), rtol=1e-13)
    assert int(bn.num_batches_tracked) == 4
    assert bn.training is True
    np.testing.assert_array_equal(bn.weight, weight)


def test_recompute_matches_torch_swa_update_bn_for_equal_batches():
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import update_bn

    bs = [np.random.default_rng(i).normal(3, 2, size=(6, 2, 3, 3)) for i in range(5)]
    t = torch.nn.BatchNorm2d(2).double()
    update_bn([torch.from_numpy(b) for b in bs], torch.nn.Sequential(t))
    b = bnorm.BatchNorm2d(2, dtype=np.float64).recompute_running_stats(bs)
    # equal batch sizes: the cumulative average of batch means is the population mean
    np.testing.assert_allclose(b.running_mean, t.running_mean.numpy(), rtol=1e-12)
    assert int(b.num_batches_tracked) == int(t.num_batches_tracked) == 5
    # update_bn averages per-batch unbiased variances; the population variance is exact
    whole = np.concatenate(bs).transpose(1, 0, 2, 3).reshape(2, -1)
    np.testing.assert_allclose(b.running_var, whole.var(1, ddof=1), rtol=1e-12)
    assert not np.allclose(b.running_var, t.running_var.numpy(), rtol=1e-6)


def test_recompute_is_exact_far_from_zero():
    bs = batches_of((2,), 6, offset=1e8)
    bn = bnorm.BatchNorm1d(2, dtype=np.float64).recompute_running_stats(bs)
    whole = np.concatenate(bs) - 1e8  # exact: the offset is representable
    np.testing.assert_allclose(bn.running_var, whole.var(0, ddof=1), rtol=1e-7)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=6), st.integers(0, 2**31))
def test_recompute_independent_of_split(sizes, seed):
    x = np.random.default_rng(seed).normal(size=(sum(sizes) + 2, 3))
    cuts = np.cumsum(sizes)[:-1]
    parts = np.split(x[:-2], cuts)
    a = bnorm.BatchNorm1d(3, dtype=np.float64).recompute_running_stats([*parts, x[-2:]])
    b = bnorm.BatchNorm1d(3, dtype=np.float64).recompute_running_stats([x])
    np.testing.assert_allclose(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-12)
    assert int(a.num_batches_tracked) == len(parts) + 1


def test_recompute_then_cumulative_average_continues():
    bs = [np.random.default_rng(i).normal(size=(4, 2)) for i in range(3)]
    a = bnorm.BatchNorm1d(2, momentum=None, dtype=np.float64).recompute_running_stats(bs[:2])
    a(bs[2])
    assert int(a.num_batches_tracked) == 3
    np.testing.assert_allclose(a.running_mean, np.concatenate(bs).mean(0), rtol=1e-12)


def test_recompute_empty_iterable_raises():
    bn = trained()
    before = bn.state_dict()
    with pytest.raises(ValueError, match="batches must contain at least one batch, got an empty iterable"):
        bn.recompute_running_stats(iter([]))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_recompute_state_unchanged_when_a_batch_raises():
    bn = trained()
    before = bn.state_dict()

    def gen():
        yield np.ones((4, 3))
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        bn.recompute_running_stats(gen())
    with pytest.raises(
        ValueError, match=r"expected input with 3 channels on axis 1, got input of shape \(4, 2\)"
    ):
        bn.recompute_running_stats([np.ones((4, 3)), np.ones((4, 2))])
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        bn.recompute_running_stats([np.ones((4, 3, 2, 2))])
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_recompute_needs_running_stats():
    with pytest.raises(ValueError, match="recompute_running_stats needs running statistics"):
        bnorm.BatchNorm1d(2, track_running_stats=False).recompute_running_stats([np.ones((3, 2))])


def test_recompute_needs_two_values_for_unbiased():
    with pytest.raises(
        ValueError, match=r"batches must hold more than 1 value\(s\) per channel to compute the unbiased"
    ):
        bnorm.BatchNorm1d(2).recompute_running_stats([np.ones((1, 2)), np.ones((0, 2))])
    bn = bnorm.BatchNorm1d(2, unbiased_running_var=False).recompute_running_stats([np.array([[1.0, 2.0]])])
    np.testing.assert_array_equal(bn.running_var, [0, 0])


def test_recompute_nonfinite_policies():
    good = np.random.default_rng(0).normal(size=(5, 2))
    bad = good.copy()
    bad[0, 0] = np.nan
    bn = bnorm.BatchNorm1d(2, on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="batch 1 has non-finite statistics"):
        bn.recompute_running_stats([good, bad])
    assert int(bn.num_batches_tracked) == 0
    bn = bnorm.BatchNorm1d(2, dtype=np.float64)
    with pytest.warns(RuntimeWarning, match="batch 1 has non-finite statistics .* was skipped"):
        bn.recompute_running_stats([good, bad])
    np.testing.assert_allclose(bn.running_mean, good.mean(0), rtol=1e-12)
    assert int(bn.num_batches_tracked) == 1


def test_read_only_target_is_refused_before_anything_changes():
    bn = trained()
    before = bn.state_dict()
    bn.running_var = np.ones(3, np.float32)
    bn.running_var.flags.writeable = False
    state = {k: v + 1 for k, v in before.items()}
    with pytest.raises(
        ValueError, match=r"BatchNorm1d.running_var is a read-only array; cannot load into it"
    ):
        bn.load_state_dict(state)
    np.testing.assert_array_equal(bn.weight, before["weight"])
    np.testing.assert_array_equal(bn.running_mean, before["running_mean"])
