"""RMSNorm: functional and layer against float64 references, PyTorch, Keras 3 and ONNX;
gradients, properties, state, save/load, interop and one test per error message."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnorm
from bnorm.functional import (
    RMSNormContext,
    default_rms_eps,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
)
from bnorm.interop import from_keras, from_torch, to_keras_weights
from bnorm.testing import check_grad

SHAPES = [
    ((4, 6), (6,)),
    ((3, 4, 5), (5,)),
    ((3, 4, 5), (4, 5)),
    ((7,), (7,)),
    ((64, 300), (300,)),
    ((8, 50, 512), (512,)),
]


def ref_rms_norm(x, normalized_shape, weight=None, eps=1e-6):
    """RMSNorm from the definition, one row at a time (float64)."""
    x = np.asarray(x, dtype=np.float64)
    rows = x.reshape((-1, *tuple(normalized_shape)))
    out = np.stack([row / np.sqrt((row**2).mean() + eps) for row in rows]).reshape(x.shape)
    return out if weight is None else out * np.asarray(weight, np.float64)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20241119)


@pytest.mark.parametrize("shape,ns", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_forward_matches_reference(rng, shape, ns, dtype):
    x = (rng.normal(size=shape) * 2 + 0.5).astype(dtype)
    w = rng.normal(size=ns)
    tol = {np.float64: 1e-12, np.float32: 1e-5, np.float16: 1e-2}[dtype]
    for weight in (w, None):
        y = rms_norm(x, ns, weight, eps=1e-6)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y, ref_rms_norm(x, ns, weight, 1e-6), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,ns", SHAPES, ids=str)
def test_gradients_directional_float64(rng, shape, ns):
    x = rng.normal(size=shape) + 0.3
    w = rng.normal(size=ns) + 1.0
    check_grad(lambda x, w: rms_norm_forward(x, ns, w, eps=1e-5), rms_norm_backward, x, w)
    # without gamma: no weight gradient, and dx is the gamma = 1 one
    check_grad(lambda x: rms_norm_forward(x, ns, eps=1e-5), lambda g, c: rms_norm_backward(g, c)[0], x)
    assert rms_norm_backward(rng.normal(size=shape), rms_norm_forward(x, ns, eps=1e-5)[1])[1] is None


def test_gradient_dtypes_follow_input_and_weight(rng):
    x = rng.normal(size=(4, 5)).astype(np.float32)
    dx, dw = rms_norm_backward(np.ones_like(x), rms_norm_forward(x, 5, np.ones(5))[1])
    assert dx.dtype == np.float32 and dw.dtype == np.float64


def test_eps_none_is_the_inputs_machine_epsilon():
    x = np.array([[1e-4, 0.0, 0.0, 0.0]])
    for dtype, eps in [(np.float64, 2.220446049250313e-16), (np.float32, 1.1920928955078125e-07)]:
        xd = x.astype(dtype)
        assert default_rms_eps(dtype) == eps
        expected = 1e-4 / np.sqrt(1e-8 / 4 + eps)
        np.testing.assert_allclose(rms_norm(xd, 4)[0, 0], expected, rtol=1e-6)
        assert rms_norm_forward(xd, 4)[1].eps == eps
    # The weight's dtype plays no part (PyTorch: float32 input, float64 weight -> float32's eps).
    assert rms_norm_forward(x.astype(np.float32), 4, np.ones(4))[1].eps == default_rms_eps(np.float32)
    # float16 is computed in float32 and takes float32's epsilon, as PyTorch's opmath does.
    assert default_rms_eps(np.float16) == default_rms_eps(np.float32)
    assert rms_norm_forward(np.ones((2, 3), np.int64), 3)[1].eps == default_rms_eps(np.float64)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    m=st.integers(2, 40),
    seed=st.integers(0, 2**31 - 1),
    a=st.floats(1e-3, 1e3),
)
def test_property_scale_invariance(rows, m, seed, a):
    """RMSNorm(a * x) == RMSNorm(x) for a > 0 (eps = 0 and rows away from zero, so eps plays no part)."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(rows, m)) + np.where(r.random((rows, 1)) < 0.5, 1.0, -1.0)
    w = r.normal(size=m)
    np.testing.assert_allclose(
        rms_norm(a * x, m, w, eps=0.0), rms_norm(x, m, w, eps=0.0), rtol=1e-12, atol=1e-12
    )
    y = rms_norm(x, m, eps=0.0)
    np.testing.assert_allclose((y**2).mean(axis=1), 1.0, rtol=1e-12)  # unit root mean square


def test_context_keeps_a_reference_and_small_vectors(rng):
    x = rng.normal(size=(6, 5))
    _, ctx = rms_norm_forward(x, 5)
    assert isinstance(ctx, RMSNormContext) and ctx.input is x and ctx.invstd.shape == (6,)
    with pytest.raises(AttributeError):
        ctx.invstd = None  # frozen


def test_empty_input():
    assert rms_norm(np.zeros((0, 4)), 4).shape == (0, 4)
    dx, dw = rms_norm_backward(np.zeros((0, 4)), rms_norm_forward(np.zeros((0, 4)), 4, np.ones(4))[1])
    assert dx.shape == (0, 4) and np.array_equal(dw, np.zeros(4))


def test_zero_row_with_zero_eps_is_nan_as_the_formula():
    with np.errstate(all="ignore"):
        assert np.isnan(rms_norm(np.zeros((1, 3)), 3, eps=0.0)).all()
    assert np.array_equal(rms_norm(np.zeros((1, 3)), 3), np.zeros((1, 3)))


def test_rms_norm_is_at_least_as_exact_as_layer_norm_on_centered_rows(rng):
    """On rows of mean 0, RMSNorm is layer norm (same kernels, without the centering)."""
    x = rng.normal(size=(5, 8))
    x -= x.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(
        rms_norm(x, 8, eps=1e-5), bnorm.functional.layer_norm(x, 8, eps=1e-5), atol=1e-12
    )


# -- the layer ---------------------------------------------------------------------------


def test_layer_state_repr_and_roundtrip(tmp_path):
    norm = bnorm.RMSNorm((3, 4), eps=1e-6, dtype=np.float64)
    assert repr(norm) == "RMSNorm((3, 4), eps=1e-06, elementwise_affine=True)"
    assert list(norm.state_dict()) == ["weight"] and norm.bias is None
    norm.weight[...] = np.arange(12.0).reshape(3, 4)
    path = os.path.join(tmp_path, "rms.npz")
    bnorm.save(path, norm)
    back = bnorm.load(path)
    assert isinstance(back, bnorm.RMSNorm) and repr(back) == repr(norm)
    assert back.weight.dtype == np.float64 and np.array_equal(back.weight, norm.weight)
    bare = bnorm.RMSNorm(4, elementwise_affine=False)
    assert repr(bare) == "RMSNorm((4,), eps=None, elementwise_affine=False)" and bare.state_dict() == {}
    bnorm.save(path, bare)
    assert repr(bnorm.load(path)) == repr(bare)


def test_layer_forward_backward(rng):
    norm = bnorm.RMSNorm(5, dtype=np.float64)
    norm.weight[...] = rng.normal(size=5)
    x, g = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    y = norm(x)
    np.testing.assert_allclose(y, ref_rms_norm(x, (5,), norm.weight, np.finfo(np.float64).eps), rtol=1e-12)
    dx = norm.backward(g)
    dx_f, dw_f = rms_norm_backward(g, rms_norm_forward(x, 5, norm.weight)[1])
    assert np.array_equal(dx, dx_f) and np.array_equal(norm.grad_weight, dw_f) and norm.grad_bias is None
    norm.reset_parameters()
    assert np.array_equal(norm.weight, np.ones(5))


# -- PyTorch -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,ns", SHAPES, ids=str)
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_torch_forward_backward_float64(rng, shape, ns, eps):
    torch = pytest.importorskip("torch")
    x, w, g = rng.normal(size=shape), rng.normal(size=ns) + 1.0, rng.normal(size=shape)
    tx = torch.from_numpy(x).requires_grad_(True)
    tw = torch.from_numpy(w).requires_grad_(True)
    ty = torch.nn.functional.rms_norm(tx, ns, tw, eps)
    ty.backward(torch.from_numpy(g))
    y, ctx = rms_norm_forward(x, ns, w, eps)
    dx, dw = rms_norm_backward(g, ctx)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_eps_none_tiny_rows(dtype):
    """Rows so small that eps dominates: the default eps must be PyTorch's exactly."""
    torch = pytest.importorskip("torch")
    x = (np.random.default_rng(0).normal(size=(4, 8)) * 1e-5).astype(dtype)
    ours = rms_norm(x, 8)
    theirs = torch.nn.functional.rms_norm(torch.from_numpy(x), (8,)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-6 if dtype == "float32" else 1e-12)
    # float32 input with a float64 weight: float32's eps and a float32 result, as PyTorch.
    if dtype == "float32":
        w = np.ones(8)
        with pytest.warns(UserWarning, match="Mismatch dtype"):  # PyTorch's unfused path
            t = torch.nn.functional.rms_norm(torch.from_numpy(x), (8,), torch.from_numpy(w)).numpy()
        got = rms_norm(x, 8, w)
        assert got.dtype == t.dtype == np.float32
        np.testing.assert_allclose(got, t, rtol=2e-6)


def test_torch_module_interop(rng):
    torch = pytest.importorskip("torch")
    for kwargs in [
        dict(normalized_shape=(3, 4), eps=1e-6),
        dict(normalized_shape=4),
        dict(normalized_shape=4, elementwise_affine=False),
    ]:
        t = torch.nn.RMSNorm(**kwargs)
        if t.weight is not None:
            with torch.no_grad():
                t.weight.copy_(torch.from_numpy(rng.normal(size=tuple(t.weight.shape)).astype(np.float32)))
        ours = from_torch(t)
        assert isinstance(ours, bnorm.RMSNorm)
        assert repr(ours) == repr(t) and ours.extra_repr() == t.extra_repr()
        assert list(ours.state_dict()) == list(t.state_dict())
        x = rng.normal(size=(2, 3, 4)).astype(np.float32)
        np.testing.assert_allclose(ours(x), t(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
        # and back: PyTorch loads bnorm's state dict
        t2 = torch.nn.RMSNorm(**kwargs)
        t2.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
        np.testing.assert_allclose(t2(torch.from_numpy(x)).detach().numpy(), ours(x), rtol=1e-5, atol=1e-6)


# -- Keras 3 -----------------------------------------------------------------------------


def test_keras_cross_check(rng):
    keras = pytest.importorskip("keras")
    for axis, shape in [(-1, (6, 5)), ([-2, -1], (3, 4, 5))]:
        layer = keras.layers.RMSNormalization(axis=axis)
        layer.build((None, *shape[1:]))
        layer.set_weights([rng.normal(size=tuple(layer.scale.shape)).astype(np.float32)])
        ours = from_keras(layer)
        assert isinstance(ours, bnorm.RMSNorm) and ours.eps == 1e-6
        x = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_allclose(ours(x), keras.ops.convert_to_numpy(layer(x)), rtol=1e-5, atol=1e-6)
        # the functional form a Keras user writes: eps=1e-6, trailing axes
        scale = to_keras_weights(ours)[0]
        ns = x.shape[-len(scale.shape) :]
        np.testing.assert_allclose(rms_norm(x, ns, scale, eps=1e-6), ours(x), rtol=1e-6)
        fresh = keras.layers.RMSNormalization(axis=axis)
        fresh.build((None, *shape[1:]))
        fresh.set_weights(to_keras_weights(ours))
        np.testing.assert_allclose(keras.ops.convert_to_numpy(fresh(x)), ours(x), rtol=1e-5, atol=1e-6)


def test_whole_models_include_rmsnorm(rng):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.RMSNorm(4, eps=1e-6))
    layers = from_torch(model)
    assert list(layers) == ["1"] and repr(layers["1"]) == "RMSNorm((4,), eps=1e-06, elementwise_affine=True)"
    keras = pytest.importorskip("keras")
    kmodel = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(5), keras.layers.RMSNormalization(name="rms")]
    )
    found = from_keras(kmodel)
    assert list(found) == ["rms"] and isinstance(found["rms"], bnorm.RMSNorm)


def test_error_keras_non_trailing_axis():
    keras = pytest.importorskip("keras")
    layer = keras.layers.RMSNormalization(axis=1)
    layer.build((None, 5, 3))
    with pytest.raises(ValueError, match=r"normalizes axis=\[1\]; bnorm's RMSNorm normalizes trailing axes"):
        from_keras(layer)


def test_error_to_keras_weights_without_weight():
    with pytest.raises(ValueError, match="has no Keras scale"):
        to_keras_weights(bnorm.RMSNorm(3, elementwise_affine=False))


# -- ONNX --------------------------------------------------------------------------------


def _onnx_rms(x, scale, axis, epsilon, stash_type):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    elem = TensorProto.DOUBLE if x.dtype == np.float64 else TensorProto.FLOAT
    node = helper.make_node(
        "RMSNormalization", ["X", "S"], ["Y"], axis=axis, epsilon=epsilon, stash_type=stash_type
    )
    graph = helper.make_graph(
        [node],
        "rms",
        [helper.make_tensor_value_info("X", elem, None), helper.make_tensor_value_info("S", elem, None)],
        [helper.make_tensor_value_info("Y", elem, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    assert onnx.__version__
    return ReferenceEvaluator(model).run(None, {"X": x, "S": scale})[0]


@pytest.mark.parametrize("axis", [-1, -2, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_onnx_reference(rng, axis, dtype):
    """ONNX's reference (stash_type 1, its only implemented one) computes in the input's dtype."""
    x = rng.normal(size=(2, 3, 4, 5)).astype(dtype)
    ns = x.shape[axis:]  # ONNX normalizes the axes axis .. rank-1
    scale = rng.normal(size=ns).astype(dtype)
    theirs = _onnx_rms(x, scale, axis, 1e-5, 1)
    # ONNX's default epsilon 1e-5, stored as a float32 attribute.
    ours = rms_norm(x, ns, scale, eps=float(np.float32(1e-5)))
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol)


# -- error messages ----------------------------------------------------------------------


def test_error_trailing_shape():
    with pytest.raises(ValueError, match=r"x must end with normalized_shape=\(4,\)"):
        rms_norm(np.zeros((3, 5)), 4)


def test_error_weight_shape():
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape=\(4,\), got \(3,\)"):
        rms_norm(np.zeros((3, 4)), 4, np.ones(3))


def test_error_negative_eps():
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        rms_norm(np.zeros((3, 4)), 4, eps=-1.0)


def test_error_eps_type():
    with pytest.raises(TypeError, match="eps must be a positive number, got str"):
        rms_norm(np.zeros((3, 4)), 4, eps="small")


def test_error_normalized_shape_type():
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints"):
        rms_norm(np.zeros((3, 4)), 4.0)


def test_error_backward_ctx():
    with pytest.raises(TypeError, match="ctx must be the RMSNormContext returned by rms_norm_forward"):
        rms_norm_backward(np.zeros((3, 4)), object())


def test_error_backward_grad_shape():
    _, ctx = rms_norm_forward(np.ones((3, 4)), 4)
    with pytest.raises(ValueError, match=r"grad_output must have the input's shape \(3, 4\), got \(4, 3\)"):
        rms_norm_backward(np.zeros((4, 3)), ctx)


def test_error_layer_flag_and_dtype():
    with pytest.raises(TypeError, match="elementwise_affine must be a bool"):
        bnorm.RMSNorm(4, elementwise_affine=1)
    with pytest.raises(TypeError, match="dtype must be a floating dtype, got int64"):
        bnorm.RMSNorm(4, dtype=np.int64)


def test_error_layer_backward_before_forward():
    with pytest.raises(RuntimeError, match="backward called before forward"):
        bnorm.RMSNorm(4).backward(np.zeros((2, 4)))


def test_exports():
    assert "RMSNorm" in bnorm.__all__ and bnorm.RMSNorm is bnorm.layers.RMSNorm
    for name in ("rms_norm", "rms_norm_forward", "rms_norm_backward", "RMSNormContext"):
        assert name in bnorm.functional.__all__
