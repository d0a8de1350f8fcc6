"""Functional kernels: worked examples, the specification's vectors, reference, gradients."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import SHAPES, TOL
from reference import ref_batch_stats, ref_forward, ref_train, vjp_check

from bnorm.functional import batch_norm, batch_norm_backward, batch_norm_forward

X = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])


# --- the tutorials' worked examples -----------------------------------
def test_from_scratch_tutorial_arange15_integer_input():
    y = batch_norm(np.arange(15).reshape(5, 3), None, None, training=True)
    assert y.dtype == np.float64
    col = np.array([-1.4142, -0.7071, 0.0, 0.7071, 1.4142])
    for j in range(3):
        np.testing.assert_allclose(y[:, j], col, atol=1e-4)


def test_pytorch_tutorial_uniform_running_mean(rng):
    x = rng.random((100, 16, 784))
    rm, rv = np.zeros(16), np.ones(16)
    batch_norm(x, rm, rv, training=True)
    np.testing.assert_allclose(rm, 0.1 * x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(rm, 0.05, atol=1e-3)


def test_pytorch_tutorial_bn2d_first_element(rng):
    x = rng.standard_normal((1, 2, 3, 4))
    w, b = np.array([1.5, -0.5]), np.array([0.25, 2.0])
    y = batch_norm(x, None, None, w, b, training=True)
    c0 = x[:, 0]
    expected = (x[0, 0, 0, 0] - c0.mean()) / np.sqrt(c0.var() + 1e-5) * w[0] + b[0]
    assert y[0, 0, 0, 0] == pytest.approx(expected, rel=1e-12)


# --- semantics.md test vectors ------------------------------------------------------
def test_vector1_train_step():
    rm, rv = np.zeros(2), np.ones(2)
    y = batch_norm(X, rm, rv, training=True)
    np.testing.assert_allclose(y[0], [-1.224742575001414, -1.2247442972928346], rtol=1e-14)
    np.testing.assert_allclose(y[1], 0, atol=1e-15)
    np.testing.assert_allclose(y[2], -y[0], rtol=1e-15)
    np.testing.assert_allclose(rm, [0.3, 0.6], rtol=1e-15)
    np.testing.assert_allclose(rv, [1.3, 2.5], rtol=1e-15)


def test_vector2_eval_after_step():
    rm, rv = np.zeros(2), np.ones(2)
    batch_norm(X, rm, rv, training=True)
    y = batch_norm(X, rm, rv, training=False)
    expected = [
        [0.6139382522184913, 0.885435973976969],
        [2.3680475442713234, 3.415253042482595],
        [4.122156836324156, 5.945070110988221],
    ]
    np.testing.assert_allclose(y, expected, rtol=1e-14)


def test_vector4_training_backward():
    gamma, beta = np.array([2.0, 3.0]), np.array([0.5, -1.0])
    g = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]])
    _, ctx = batch_norm_forward(X, None, None, gamma, beta, training=True)
    dx, dgamma, dbeta = batch_norm_backward(g, ctx)
    np.testing.assert_allclose(
        dx,
        [
            [0.6123689911169903, -0.4592786809110497],
            [-1.2247425750014138, 0.9185582229696259],
            [0.6123735838844234, -0.45927954205857624],
        ],
        rtol=1e-12,
    )
    np.testing.assert_allclose(dgamma, [1.2247425750014138, -1.2247442972928344], rtol=1e-13)
    np.testing.assert_allclose(dbeta, [3.0, 0.0], atol=1e-15)


def test_vector6_onnx_decay_biased():
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    batch_norm(X.astype(np.float32), rm, rv, training=True, decay=0.9, unbiased_running_var=False)
    np.testing.assert_allclose(rm, [0.3, 0.6], rtol=1e-6)
    np.testing.assert_allclose(rv, [1.1666667, 1.9666667], rtol=1e-6)
    assert rm.dtype == rv.dtype == np.float32


# --- against the float64 reference over shapes, axes, affine ------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_training_forward_matches_reference(rng, shape, axis, dtype):
    if int(np.prod(shape)) // shape[axis] < 2:
        pytest.skip("one value per channel")
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    c = shape[axis]
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    y = batch_norm(x, None, None, w, b, training=True, axis=axis)
    assert y.dtype == dtype and y.shape == x.shape
    rtol, atol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(y, ref_train(x, w, b, axis=axis), rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_eval_forward_matches_reference(rng, shape, axis):
    x = rng.standard_normal(shape)
    c = shape[axis]
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    y = batch_norm(x, rm, rv, w, b, training=False, axis=axis, eps=1e-3)
    np.testing.assert_allclose(y, ref_forward(x, rm, rv, w, b, 1e-3, axis), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_any_axis(rng, axis):
    x = rng.standard_normal((3, 4, 5))
    y = batch_norm(x, None, None, training=True, axis=axis)
    np.testing.assert_allclose(y, ref_train(x, axis=axis), rtol=1e-12, atol=1e-12)


def test_non_contiguous_input(rng):
    base = rng.standard_normal((6, 4, 10))
    x = base[::2, :, ::3]  # strided view
    xt = rng.standard_normal((5, 6, 4)).transpose(0, 2, 1)  # channels moved: not C-contiguous
    for arr in (x, xt):
        y = batch_norm(arr, None, None, training=True)
        np.testing.assert_allclose(y, ref_train(arr), rtol=1e-12, atol=1e-12)
        _, ctx = batch_norm_forward(arr, None, None, training=True)
        g = rng.standard_normal(arr.shape)
        dx, _, _ = batch_norm_backward(np.asfortranarray(g), ctx)
        dx_c, _, _ = batch_norm_backward(np.ascontiguousarray(g), ctx)
        np.testing.assert_allclose(dx, dx_c, rtol=1e-12, atol=1e-13)


# --- running-statistics updates ----------------------------------------------------
@pytest.mark.parametrize("unbiased", [True, False])
def test_running_update_momentum_form(rng, unbiased):
    x = rng.standard_normal((7, 3, 4)) * 2 + 5
    rm0, rv0 = rng.standard_normal(3), rng.random(3) + 1
    rm, rv = rm0.copy(), rv0.copy()
    batch_norm(x, rm, rv, training=True, momentum=0.3, unbiased_running_var=unbiased)
    mean, var, n = ref_batch_stats(x)
    bvar = var * n / (n - 1) if unbiased else var
    np.testing.assert_allclose(rm, 0.7 * rm0 + 0.3 * mean, rtol=1e-14)
    np.testing.assert_allclose(rv, 0.7 * rv0 + 0.3 * bvar, rtol=1e-14)


def test_decay_equals_one_minus_momentum(rng):
    x = rng.standard_normal((9, 4))
    a = [np.zeros(4), np.ones(4)]
    b = [np.zeros(4), np.ones(4)]
    batch_norm(x, *a, training=True, decay=0.75)
    batch_norm(x, *b, training=True, momentum=0.25)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-14)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-14)


def test_running_buffers_keep_their_dtype(rng):
    x = rng.standard_normal((8, 3))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = batch_norm(x, rm, rv, training=True)
    assert y.dtype == np.float64 and rm.dtype == np.float32 and rv.dtype == np.float32


def test_only_one_buffer_given(rng):
    x = rng.standard_normal((8, 3))
    rm = np.zeros(3)
    batch_norm(x, rm, None, training=True)
    np.testing.assert_allclose(rm, 0.1 * x.mean(0), rtol=1e-13)


def test_eval_leaves_buffers(rng):
    x = rng.standard_normal((8, 3))
    rm, rv = rng.standard_normal(3), rng.random(3) + 1
    rm0, rv0 = rm.copy(), rv.copy()
    batch_norm(x, rm, rv, training=False)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


# --- dtypes and numerics ------------------------------------------------------------
def test_float16_is_computed_in_float32(rng):
    x16 = (rng.standard_normal((16, 4, 5)) * 4 + 2).astype(np.float16)
    w, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y = batch_norm(x16, rm, rv, w, b, training=True)
    assert y.dtype == np.float16
    rm32, rv32 = np.zeros(4, np.float32), np.ones(4, np.float32)
    y32 = batch_norm(x16.astype(np.float32), rm32, rv32, w, b, training=True)
    np.testing.assert_array_equal(y, y32.astype(np.float16))
    np.testing.assert_allclose(rm, rm32, rtol=1e-6)
    assert rm.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_and_bool_promote_to_float64(rng, dtype):
    x = rng.integers(0, 2 if dtype is np.bool_ else 50, size=(10, 3)).astype(dtype)
    y = batch_norm(x, None, None, training=True)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref_train(x.astype(np.float64)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_float32_offset_no_cancellation(rng, offset):
    x64 = rng.standard_normal((32, 8, 200)) + offset
    x32 = x64.astype(np.float32)
    y = batch_norm(x32, None, None, training=True)
    ref = ref_train(x32.astype(np.float64))  # the truth for the float32 values given
    # The output is evaluated as x * alpha + beta' in float32 (PyTorch's CPU form), whose
    # rounding is about eps32 * |x * alpha| per operation: the statistics add nothing to it.
    alpha = 1 / np.sqrt(ref_batch_stats(x32)[1] + 1e-5)
    rounding = 4 * np.finfo(np.float32).eps * offset * alpha.max()
    err = np.max(np.abs(y - ref))
    assert err < rounding
    if offset <= 1e4:
        assert err < 1e-2  # the bound
    mean, var, _ = ref_batch_stats(x32.astype(np.float64))
    rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
    batch_norm(x32, rm, rv, training=True, momentum=1.0, unbiased_running_var=False)
    np.testing.assert_allclose(rv, var, rtol=1e-5)
    np.testing.assert_allclose(rm, mean, rtol=1e-7)


def test_variance_never_negative_constant_channel():
    x = np.full((50, 3), 1e4 + 0.1, dtype=np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert np.all(rv >= 0)
    np.testing.assert_array_equal(rv, 0)
    np.testing.assert_array_equal(y, 0)


def test_out_parameter(rng):
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    out = np.empty_like(x)
    y = batch_norm(x, None, None, training=True, out=out)
    assert y is out
    np.testing.assert_array_equal(out, batch_norm(x, None, None, training=True))
    y, ctx = batch_norm_forward(x, None, None, training=True)
    g = rng.standard_normal(x.shape).astype(np.float32)
    dx_out = np.empty_like(x)
    dx, _, _ = batch_norm_backward(g, ctx, out=dx_out)
    assert dx is dx_out
    np.testing.assert_array_equal(dx, batch_norm_backward(g, ctx)[0])


def test_out_aliasing_input_blocks_backward(rng):
    x = rng.standard_normal((6, 3))
    x_copy = x.copy()
    y, ctx = batch_norm_forward(x, None, None, training=True, out=x)
    np.testing.assert_allclose(y, ref_train(x_copy), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="wrote its output over its input"):
        batch_norm_backward(np.ones_like(y), ctx)


def test_empty_batch_training(rng):
    x = np.empty((0, 3, 4))
    rm, rv = np.zeros(3), np.ones(3)
    y, ctx = batch_norm_forward(x, rm, rv, np.ones(3), np.zeros(3), training=True)
    assert y.shape == (0, 3, 4)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    dx, dw, db = batch_norm_backward(np.empty((0, 3, 4)), ctx)
    assert dx.shape == (0, 3, 4)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


# --- non-finite batches --------------------------------------------------------------
def _nan_batch():
    x = np.arange(12.0).reshape(4, 3)
    x[1, 2] = np.nan
    return x


def test_nonfinite_skip_default_warns_and_keeps_buffers():
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = batch_norm(_nan_batch(), rm, rv, training=True)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    assert np.isnan(y[:, 2]).all() and np.isfinite(y[:, :2]).all()


def test_nonfinite_raise_changes_nothing():
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(FloatingPointError, match="not finite"):
        batch_norm(_nan_batch(), rm, rv, training=True, on_nonfinite="raise")
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_nonfinite_propagate_as_pytorch():
    rm, rv = np.zeros(3), np.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_norm(_nan_batch(), rm, rv, training=True, on_nonfinite="propagate")
    assert np.isnan(rm[2]) and np.isnan(rv[2])
    assert np.isfinite(rm[:2]).all()


def test_finite_batch_emits_no_warning(rng):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_norm(rng.standard_normal((4, 3)) * 1e30, np.zeros(3), np.ones(3), training=True)


# --- gradients: VJP checks in float64 with random gamma and upstream -------------------
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
def test_vjp_gradients(rng, shape, axis, training):
    c = shape[axis]
    x = rng.standard_normal(shape) * 2 + 0.5
    gamma, beta = rng.standard_normal(c) * 1.5, rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5
    g = rng.standard_normal(shape)

    def f(x_, w_, b_):
        return batch_norm(x_, rm.copy(), rv.copy(), w_, b_, training=training, axis=axis)

    _, ctx = batch_norm_forward(x, rm.copy(), rv.copy(), gamma, beta, training=training, axis=axis)
    dx, dw, db = batch_norm_backward(g, ctx)
    numeric, analytic = vjp_check(f, [x, gamma, beta], [dx, dw, db], g, rng)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    # Each gradient on its own, too: a wrong dgamma cannot hide behind a right dx.
    for i, grad in enumerate([dx, dw, db]):
        args = [x, gamma, beta]

        def fi(a, i=i, args=args):
            return f(*[a if j == i else args[j] for j in range(3)])

        num_i, an_i = vjp_check(fi, [args[i]], [grad], g, rng)
        assert an_i == pytest.approx(num_i, rel=1e-6, abs=1e-8)


def test_grad_input_sums_to_zero_per_channel_training(rng):
    x = rng.standard_normal((6, 4, 5))
    _, ctx = batch_norm_forward(x, None, None, rng.standard_normal(4), None, training=True)
    dx, dw, db = batch_norm_backward(rng.standard_normal(x.shape), ctx)
    np.testing.assert_allclose(dx.sum(axis=(0, 2)), 0, atol=1e-12)
    assert dw is not None and db is None


def test_backward_without_weight_and_bias(rng):
    x = rng.standard_normal((6, 4))
    g = rng.standard_normal(x.shape)
    _, ctx = batch_norm_forward(x, None, None, training=True)
    dx, dw, db = batch_norm_backward(g, ctx)
    assert dw is None and db is None
    _, ctx1 = batch_norm_forward(x, None, None, np.ones(4), np.zeros(4), training=True)
    np.testing.assert_allclose(dx, batch_norm_backward(g, ctx1)[0], rtol=1e-14)


def test_gradient_dtypes_follow_parameters(rng):
    x = rng.standard_normal((6, 4)).astype(np.float16)
    w, b = np.ones(4, np.float32), np.zeros(4, np.float64)
    _, ctx = batch_norm_forward(x, None, None, w, b, training=True)
    dx, dw, db = batch_norm_backward(rng.standard_normal(x.shape).astype(np.float16), ctx)
    assert dx.dtype == np.float16 and dw.dtype == np.float32 and db.dtype == np.float64


def test_ctx_keeps_reference_not_copy(rng):
    x = rng.standard_normal((6, 4, 3))
    _, ctx = batch_norm_forward(x, None, None, training=True)
    assert ctx.input is x
    big = [v for v in vars(ctx).values() if isinstance(v, np.ndarray) and v.size >= x.size]
    assert len(big) == 1
