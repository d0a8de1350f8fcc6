"""Layers: running-statistics formulas per convention, modes, counters, state safety."""

from __future__ import annotations

import numpy as np
import pytest
from reference import ref_batch_stats, ref_forward, ref_train

import bnorm
from bnorm.functional import batch_norm

X = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])


def test_defaults_as_pytorch():
    bn = bnorm.BatchNorm2d(4)
    assert bn.eps == 1e-5 and bn.momentum == 0.1 and bn.decay is None
    assert bn.affine and bn.track_running_stats and bn.training
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked.dtype == np.int64 and bn.num_batches_tracked.shape == ()
    assert bn.weight.dtype == np.float32 and bn.running_var.dtype == np.float32
    assert bn.gamma is bn.weight and bn.beta is bn.bias
    assert (
        repr(bn)
        == "BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)"
    )


def test_vector1_and_2_layer():
    bn = bnorm.BatchNorm1d(2, dtype=np.float64)
    y = bn(X)
    np.testing.assert_allclose(y[0], [-1.224742575001414, -1.2247442972928346], rtol=1e-14)
    np.testing.assert_allclose(bn.running_mean, [0.3, 0.6], rtol=1e-15)
    np.testing.assert_allclose(bn.running_var, [1.3, 2.5], rtol=1e-15)
    assert bn.num_batches_tracked == 1
    assert bn.eval() is bn
    np.testing.assert_allclose(bn(X)[2], [4.122156836324156, 5.945070110988221], rtol=1e-14)
    assert bn.num_batches_tracked == 1


def test_vector3_cumulative_average():
    bn = bnorm.BatchNorm1d(2, momentum=None, dtype=np.float64)
    bn(X)
    np.testing.assert_allclose(bn.running_mean, [3, 6], rtol=1e-15)
    np.testing.assert_allclose(bn.running_var, [4, 16], rtol=1e-15)
    bn(np.array([[0.0, 0.0], [2.0, 4.0]]))
    np.testing.assert_allclose(bn.running_mean, [2, 4], rtol=1e-15)
    np.testing.assert_allclose(bn.running_var, [3, 12], rtol=1e-15)
    assert bn.num_batches_tracked == 2


def test_vector5_keras_defaults():
    bn = bnorm.BatchNorm(2, convention="keras")
    assert bn.decay == 0.99 and bn.eps == 1e-3 and bn.axis == -1 and not bn.unbiased_running_var
    bn(X.astype(np.float32))
    np.testing.assert_allclose(bn.running_mean, [0.03, 0.06], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, [1.0166667, 1.0966667], rtol=1e-6)


def test_vector6_onnx_preset():
    bn = bnorm.BatchNorm(2, convention="onnx")
    assert (bn.decay, bn.eps, bn.axis, bn.unbiased_running_var) == (0.9, 1e-5, 1, False)
    bn(X.astype(np.float32))
    np.testing.assert_allclose(bn.running_mean, [0.3, 0.6], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, [1.1666667, 1.9666667], rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "decay", "eps", "axis"),
    [("flax", 0.99, 1e-5, -1), ("d2l", 0.9, 1e-5, 1), ("torch", None, 1e-5, 1)],
)
def test_presets(name, decay, eps, axis):
    bn = bnorm.BatchNorm(3, convention=name)
    assert bn.decay == decay and bn.eps == eps and bn.axis == axis
    assert bn.unbiased_running_var is (name == "torch")


def test_explicit_arguments_override_preset(rng):
    bn = bnorm.BatchNorm(3, convention="keras", unbiased_running_var=True, eps=1e-5, axis=1)
    assert bn.decay == 0.99 and bn.unbiased_running_var and bn.eps == 1e-5 and bn.axis == 1
    bn2 = bnorm.BatchNorm(3, convention="keras", momentum=0.2)
    assert bn2.decay is None and bn2.momentum == 0.2 and bn2.eps == 1e-3
    bn3 = bnorm.BatchNorm(3, convention="onnx", decay=0.5)
    assert bn3.decay == 0.5
    # tf.keras fused path: Keras preset with the unbiased running variance.
    x = rng.standard_normal((6, 5, 3)).astype(np.float32)
    bn.axis = -1
    bn(x)
    _mean, var, n = ref_batch_stats(x, axis=-1)
    np.testing.assert_allclose(bn.running_var, 0.99 + 0.01 * var * n / (n - 1), rtol=1e-6)


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.5])
def test_decay_form_several_steps(rng, decay):
    """The TF 1 and from-scratch tutorials and d2l: moving = decay * moving + (1 - decay) * batch, biased."""
    bn = bnorm.BatchNorm(3, decay=decay, unbiased_running_var=False, dtype=np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    for _ in range(4):
        x = rng.standard_normal((10, 3, 2)) * 3 + 1
        bn(x)
        mean, var, _ = ref_batch_stats(x)
        rm = decay * rm + (1 - decay) * mean
        rv = decay * rv + (1 - decay) * var
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-13)
    assert bn.num_batches_tracked == 4


def test_momentum_and_decay_setters():
    bn = bnorm.BatchNorm1d(3)
    bn.decay = 0.9
    assert bn.decay == 0.9 and bn.momentum == pytest.approx(0.1)
    bn.momentum = 0.3
    assert bn.decay is None and bn.momentum == 0.3
    bn.momentum = None
    assert bn.momentum is None and bn.decay is None


def test_track_running_stats_false_uses_batch_stats_in_eval(rng):
    bn = bnorm.BatchNorm2d(3, track_running_stats=False, dtype=np.float64).eval()
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    x = rng.standard_normal((2, 3, 4, 4))
    np.testing.assert_allclose(bn(x), ref_train(x), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(x.shape)
    dx = bn.backward(g)
    np.testing.assert_allclose(dx.sum(axis=(0, 2, 3)), 0, atol=1e-12)


def test_affine_false(rng):
    bn = bnorm.BatchNorm1d(3, affine=False, dtype=np.float64)
    assert bn.weight is None and bn.bias is None
    x = rng.standard_normal((5, 3))
    bn(x)
    bn.backward(rng.standard_normal(x.shape))
    assert bn.grad_weight is None and bn.grad_bias is None


def test_forward_backward_layer_matches_functional(rng):
    bn = bnorm.BatchNorm2d(3, dtype=np.float64)
    bn.weight[:] = rng.standard_normal(3)
    bn.bias[:] = rng.standard_normal(3)
    x = rng.standard_normal((4, 3, 5, 5))
    y = bn(x)
    np.testing.assert_allclose(y, ref_train(x, bn.weight, bn.bias), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(x.shape)
    dx = bn.backward(g)
    xhat = ref_train(x)
    np.testing.assert_allclose(bn.grad_bias, g.sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, (g * xhat).sum(axis=(0, 2, 3)), rtol=1e-10)
    assert dx.shape == x.shape
    bn.eval()
    y_eval = bn(x)
    expected = ref_forward(x, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-12)
    dx_eval = bn.backward(g)
    k = bn.weight / np.sqrt(bn.running_var + bn.eps)
    np.testing.assert_allclose(dx_eval, g * k[None, :, None, None], rtol=1e-12)


def test_per_call_training_override(rng):
    bn = bnorm.BatchNorm1d(3)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    bn(x, training=False)
    assert bn.training and bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0)
    bn.eval()
    bn(x, training=True)
    assert not bn.training and bn.num_batches_tracked == 1
    assert not np.all(bn.running_mean == 0)


def test_train_eval_return_self_and_validate():
    bn = bnorm.BatchNorm1d(3)
    assert bn.train() is bn and bn.training
    assert bn.train(False) is bn and not bn.training
    with pytest.raises(TypeError, match="mode must be a bool"):
        bn.train("yes")


def test_reset_running_stats_and_parameters(rng):
    bn = bnorm.BatchNorm1d(3)
    bn(rng.standard_normal((8, 3)))
    bn.weight[:] = 3
    bn.bias[:] = -2
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.weight, 3)
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)


def test_empty_batch_counts_but_keeps_stats():
    bn = bnorm.BatchNorm2d(3)
    y = bn(np.empty((0, 3, 2, 2), np.float32))
    assert y.shape == (0, 3, 2, 2)
    assert bn.num_batches_tracked == 1
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)


def test_nonfinite_skip_not_counted_layer():
    bn = bnorm.BatchNorm1d(2)
    x = np.array([[1.0, np.inf], [2.0, 3.0]])
    with pytest.warns(RuntimeWarning):
        bn(x)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0)
    bn.on_nonfinite = "propagate"
    bn(x)
    assert bn.num_batches_tracked == 1 and not np.isfinite(bn.running_mean[1])


def _snapshot(bn):
    return [
        None if a is None else np.array(a, copy=True)
        for a in (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
    ]


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((1, 3)),  # one value per channel
        np.ones((4, 5)),  # wrong channel count
        np.ones((2, 3, 4, 5)),  # wrong rank for 1d
        np.ones((4, 3), dtype=complex),  # complex
        np.array([[1, 2, 3], [4, 5, 6]], dtype=object),
    ],
)
def test_raising_call_changes_no_state(rng, bad):
    bn = bnorm.BatchNorm1d(3)
    bn(rng.standard_normal((6, 3)))
    before = _snapshot(bn)
    with pytest.raises((ValueError, TypeError)):
        bn(bad)
    for a, b in zip(before, _snapshot(bn), strict=True):
        np.testing.assert_array_equal(a, b)


def test_raise_on_nonfinite_changes_no_state(rng):
    bn = bnorm.BatchNorm1d(3, on_nonfinite="raise")
    bn(rng.standard_normal((6, 3)))
    before = _snapshot(bn)
    x = rng.standard_normal((6, 3))
    x[0, 0] = np.nan
    with pytest.raises(FloatingPointError):
        bn(x)
    for a, b in zip(before, _snapshot(bn), strict=True):
        np.testing.assert_array_equal(a, b)


def test_generic_batchnorm_any_rank_and_channels_last(rng):
    bn = bnorm.BatchNorm(4, axis=-1, dtype=np.float64)
    for shape in [(5, 4), (3, 2, 4), (2, 3, 2, 4), (2, 2, 2, 2, 4), (1, 2, 2, 2, 2, 4)]:
        x = rng.standard_normal(shape)
        np.testing.assert_allclose(bn(x), ref_train(x, axis=-1), rtol=1e-12, atol=1e-12)


def test_layer_keeps_param_dtype_with_float64_input(rng):
    bn = bnorm.BatchNorm1d(3)  # float32 parameters
    x = rng.standard_normal((8, 3))
    y = bn(x)
    assert y.dtype == np.float64 and bn.running_mean.dtype == np.float32
    np.testing.assert_allclose(bn.running_mean, 0.1 * x.mean(0), rtol=1e-6)


def test_functional_and_layer_agree_over_steps(rng):
    bn = bnorm.BatchNorm2d(3, momentum=0.2, dtype=np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = rng.standard_normal((4, 3, 3, 3))
        np.testing.assert_array_equal(bn(x), batch_norm(x, rm, rv, bn.weight, bn.bias, True, 0.2))
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
