"""One non-finite policy for every layer with running statistics, checked after the cast.

The layers are discovered from ``bnorm.__all__`` (every Module subclass with a
``running_var`` buffer), so a layer added later is held to the same policy.
Three kinds of bad batch: NaN in the input, a finite float32 batch whose
variance overflows float16 buffers, and a finite float64 batch around 1e21
whose variance overflows float32 buffers.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

import bnorm
from bnorm.functional import batch_norm, instance_norm

C = 3


def running_stat_classes():
    found = []
    for name in bnorm.__all__:
        obj = getattr(bnorm, name)
        if isinstance(obj, type) and issubclass(obj, bnorm.Module) and "running_var" in obj._buffers:
            found.append(obj)
    return found


def make(cls, **kw):
    params = inspect.signature(cls.__init__).parameters
    if "track_running_stats" in params:
        kw.setdefault("track_running_stats", True)
    assert "on_nonfinite" in params, f"{cls.__name__} has running statistics but no on_nonfinite"
    return cls(C, **kw)


def input_shape(layer):
    """The first rank (2D to 5D) the layer accepts, shaped (N, C, 4, 4, ...)."""
    for ndim in range(2, 6):
        shape = (8, C, *([4] * (ndim - 2)))
        try:
            layer.forward(np.ones(shape), training=False)
        except ValueError:
            continue
        return shape
    raise AssertionError(f"no input rank works for {layer!r}")


def bad_batch(kind, shape):
    rng = np.random.default_rng(0)
    if kind == "nan":
        x = rng.normal(size=shape)
        x.flat[5] = np.nan
        return x, np.float32, "not finite"
    # Large enough that one step's running variance overflows in every layer: batch
    # norm's 0.1 * var, and batch renorm's (0.1 * std)**2 (it averages the deviation).
    if kind == "float16-overflow":
        # finite statistics (variance ~1e8) that a float16 buffer cannot hold
        return rng.normal(1e4, 1e4, size=shape).astype(np.float32), np.float16, "overflow.*float16"
    # float64 data around 1e21: variance ~1e42, beyond float32
    return rng.normal(1e21, 1e21, size=shape), np.float32, "overflow.*float32"


def snapshot(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}


CLASSES = running_stat_classes()
KINDS = ["nan", "float16-overflow", "float32-overflow"]


def test_discovery_sees_batch_instance_and_sync():
    names = {c.__name__ for c in CLASSES}
    assert {"BatchNorm", "BatchNorm2d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm3d"} <= names


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_skip_is_the_default_and_leaves_every_buffer_finite(cls, kind):
    probe = make(cls)
    x, dtype, message = bad_batch(kind, input_shape(probe))
    layer = make(cls, dtype=dtype)
    assert layer.on_nonfinite == "skip"
    before = snapshot(layer)
    with pytest.warns(RuntimeWarning, match=message):
        layer(x)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)  # the counter too: not absorbed


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_raise_changes_no_state(cls, kind):
    x, dtype, message = bad_batch(kind, input_shape(make(cls)))
    layer = make(cls, dtype=dtype, on_nonfinite="raise")
    before = snapshot(layer)
    with pytest.raises(FloatingPointError, match=message):
        layer(x)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_propagate_writes_the_nonfinite_values_as_pytorch(cls, kind):
    x, dtype, _ = bad_batch(kind, input_shape(make(cls)))
    layer = make(cls, dtype=dtype, on_nonfinite="propagate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning under propagate
        with np.errstate(all="ignore"):
            layer(x)
    assert not np.isfinite(layer.running_var).all()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_finite_batches_are_absorbed_without_a_warning(cls):
    layer = make(cls, dtype=np.float16)
    shape = input_shape(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(np.random.default_rng(1).normal(5.0, 2.0, size=shape).astype(np.float32))
    assert np.isfinite(layer.running_var).all() and not np.all(layer.running_var == 1)


def test_functional_batch_norm_checks_after_the_cast():
    x = np.random.default_rng(0).normal(1000.0, 1000.0, size=(16, 2)).astype(np.float32)
    rm, rv = np.zeros(2, np.float16), np.ones(2, np.float16)
    with pytest.raises(FloatingPointError, match=r"running_var would overflow .*float16"):
        batch_norm(x, rm, rv, training=True, on_nonfinite="raise")
    assert np.all(rv == 1) and np.all(rm == 0)


def test_functional_instance_norm_takes_the_same_policy():
    x = np.random.default_rng(0).normal(1e20, 1e20, size=(2, 2, 5))
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    with pytest.raises(FloatingPointError, match=r"overflow .*float32"):
        instance_norm(x, rm, rv, on_nonfinite="raise")
    assert np.all(rv == 1)
    with pytest.warns(RuntimeWarning, match="not finite"):
        instance_norm(np.full((2, 2, 5), np.nan), rm, rv)
    assert np.all(rv == 1) and np.all(rm == 0)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        instance_norm(x, rm, rv, on_nonfinite="ignore")


def test_recompute_running_stats_checks_the_total_after_the_cast():
    bn = bnorm.BatchNorm1d(2, dtype=np.float16, on_nonfinite="raise")
    batches = [np.random.default_rng(s).normal(0.0, 1000.0, size=(8, 2)) for s in range(3)]
    with pytest.raises(FloatingPointError, match=r"running_var would overflow .*float16"):
        bn.recompute_running_stats(batches)
    assert np.all(bn.running_var == 1) and int(bn.num_batches_tracked) == 0
    bn.on_nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match="overflow"):
        bn.recompute_running_stats(batches)
    assert np.all(bn.running_var == 1) and int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finite_values_whose_sum_overflows_are_absorbed(dtype):
    """The quick check sums the converted values; a sum past the dtype's largest
    value must not count as non-finite (the exact check decides)."""
    from bnorm._running import stage_running_update

    big = float(np.finfo(dtype).max) * 0.75
    value = np.array([big, big, 1.0])
    buffer = np.zeros(3, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        staged = stage_running_update([("running_mean", buffer, value)], "raise", stacklevel=1)
    assert staged is not None
    np.testing.assert_array_equal(staged[0][1], value.astype(dtype))
    nan = value.copy()
    nan[2] = np.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        stage_running_update([("running_mean", buffer, nan)], "raise", stacklevel=1)
