"""Layer, group and instance norm: kernels vs float64 references, gradients,
equivalences, properties, layers and error messages (NumPy only)."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
from _norms_reference import (
    ref_group_norm,
    ref_instance_norm,
    ref_layer_norm,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import bnorm
from bnorm.functional import (
    GroupNormContext,
    InstanceNormContext,
    LayerNormContext,
    batch_norm,
    group_norm,
    group_norm_backward,
    group_norm_forward,
    instance_norm,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
)
from bnorm.testing import check_grad

TOL = {
    np.float64: dict(rtol=1e-12, atol=1e-12),
    np.float32: dict(rtol=1e-5, atol=2e-5),
    np.float16: dict(rtol=1e-2, atol=2e-2),
}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240613)


def _data(rng, shape, dtype=np.float64, offset=3.0, scale=2.0):
    return (rng.normal(size=shape) * scale + offset).astype(dtype)


LN_CASES = [
    ((4, 6), (6,)),
    ((3, 4, 5), (5,)),
    ((3, 4, 5), (4, 5)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((7,), (7,)),
    ((2, 3, 2, 2, 3), (2, 3)),
]
GN_CASES = [((4, 6), 3), ((3, 6, 5), 2), ((2, 8, 3, 4), 4), ((2, 6, 2, 2, 3), 1), ((3, 4, 5), 4)]
IN_CASES = [(4, 3, 5), (2, 3, 4, 5), (2, 2, 2, 3, 4), (1, 4, 6)]


# -- forward against the references -----------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("shape,ns", LN_CASES)
def test_layer_norm_matches_reference(rng, shape, ns, dtype):
    x = _data(rng, shape, dtype)
    w, b = rng.normal(size=ns), rng.normal(size=ns)
    for weight, bias in [(w, b), (None, None), (w, None), (None, b)]:
        y = layer_norm(x, ns, weight, bias, eps=1e-5)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y, ref_layer_norm(x, ns, weight, bias), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_group_norm_matches_reference(rng, shape, groups, dtype):
    x = _data(rng, shape, dtype)
    c = shape[1]
    w, b = rng.normal(size=c), rng.normal(size=c)
    for weight, bias in [(w, b), (None, None), (w, None)]:
        y = group_norm(x, groups, weight, bias, eps=1e-3)
        assert y.dtype == dtype
        np.testing.assert_allclose(y, ref_group_norm(x, groups, weight, bias, eps=1e-3), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("shape", IN_CASES)
def test_instance_norm_matches_reference(rng, shape, dtype):
    x = _data(rng, shape, dtype)
    c = shape[1]
    w, b = rng.normal(size=c), rng.normal(size=c)
    np.testing.assert_allclose(instance_norm(x, weight=w, bias=b), ref_instance_norm(x, w, b), **TOL[dtype])
    rm, rv = rng.normal(size=c), rng.random(c) + 0.5
    y = instance_norm(x, rm, rv, w, b, use_input_stats=False)
    np.testing.assert_allclose(y, ref_instance_norm(x, w, b, mean=rm, var=rv), **TOL[dtype])


def test_integer_input_is_promoted_to_float64():
    x = np.arange(24).reshape(2, 3, 4)
    assert layer_norm(x, 4).dtype == np.float64
    assert group_norm(x, 3).dtype == np.float64
    assert instance_norm(x).dtype == np.float64


def test_non_contiguous_input(rng):
    x = _data(rng, (5, 4, 6)).transpose(2, 1, 0)  # (6, 4, 5), Fortran-ordered
    g = rng.normal(size=x.shape)
    xc = np.ascontiguousarray(x)
    for fwd, bwd, args in [
        (layer_norm_forward, layer_norm_backward, ((4, 5),)),
        (group_norm_forward, group_norm_backward, (2,)),
        (instance_norm_forward, instance_norm_backward, ()),
    ]:
        y, ctx = fwd(x, *args)
        yc, ctxc = fwd(xc, *args)
        np.testing.assert_array_equal(y, yc)
        np.testing.assert_array_equal(bwd(g, ctx)[0], bwd(g.T.copy().T, ctxc)[0])


def test_empty_inputs():
    assert layer_norm(np.zeros((0, 4)), 4).shape == (0, 4)
    assert layer_norm(np.zeros((2, 0)), 0).shape == (2, 0)
    assert group_norm(np.zeros((0, 4, 3)), 2).shape == (0, 4, 3)
    _y, ctx = instance_norm_forward(np.zeros((0, 3, 4)), weight=np.ones(3))
    dx, dw, _db = instance_norm_backward(np.zeros((0, 3, 4)), ctx)
    assert dx.shape == (0, 3, 4) and np.array_equal(dw, np.zeros(3))


def test_constant_rows_give_zero_not_nan():
    x = np.full((2, 3, 4), 7.0)
    assert np.array_equal(layer_norm(x, (3, 4)), np.zeros_like(x))
    assert np.array_equal(group_norm(x, 3), np.zeros_like(x))
    assert np.array_equal(instance_norm(x), np.zeros_like(x))


# -- backward: gradient checks in float64 ---------------------------------------------


@pytest.mark.parametrize("shape,ns", LN_CASES)
def test_layer_norm_gradients(rng, shape, ns):
    x = _data(rng, shape)
    w, b = rng.normal(size=ns) + 1.0, rng.normal(size=ns)
    check_grad(lambda x, w, b: layer_norm_forward(x, ns, w, b), layer_norm_backward, x, w, b)
    # Without gamma and beta the gradients are None and the input gradient the gamma = 1 one.
    check_grad(lambda x: layer_norm_forward(x, ns), lambda g, c: layer_norm_backward(g, c)[0], x)
    assert layer_norm_backward(rng.normal(size=shape), layer_norm_forward(x, ns)[1])[1:] == (None, None)


@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_group_norm_gradients(rng, shape, groups):
    x = _data(rng, shape)
    c = shape[1]
    w, b = rng.normal(size=c) + 1.0, rng.normal(size=c)
    check_grad(lambda x, w, b: group_norm_forward(x, groups, w, b), group_norm_backward, x, w, b)


@pytest.mark.parametrize("shape", IN_CASES)
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_gradients(rng, shape, use_input_stats):
    x = _data(rng, shape)
    c = shape[1]
    w, b = rng.normal(size=c) + 1.0, rng.normal(size=c)
    rm, rv = rng.normal(size=c), rng.random(c) + 0.5

    def forward(x, w, b):
        # Running statistics are read (not updated) by the use_input_stats=False path;
        # with input stats pass none so the check does not mutate them.
        if use_input_stats:
            return instance_norm_forward(x, None, None, w, b)
        return instance_norm_forward(x, rm, rv, w, b, use_input_stats=False)

    check_grad(forward, instance_norm_backward, x, w, b)


def test_gradient_dtypes_follow_parameters(rng):
    x = _data(rng, (3, 4, 5), np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    w32, b16 = np.ones(5, np.float32), np.zeros(5, np.float16)
    dx, dw, db = layer_norm_backward(g, layer_norm_forward(x, 5, w32, b16)[1])
    assert (dx.dtype, dw.dtype, db.dtype) == (np.float32, np.float32, np.float16)
    dx, dw, db = group_norm_backward(g, group_norm_forward(x, 2, np.ones(4), np.zeros(4, np.float32))[1])
    assert (dx.dtype, dw.dtype, db.dtype) == (np.float32, np.float64, np.float32)


def test_float16_backward_close_to_float64(rng):
    x = _data(rng, (4, 6, 5))
    g = rng.normal(size=x.shape)
    w = rng.normal(size=6) + 1.0
    for fwd, bwd, args, wt in [
        (layer_norm_forward, layer_norm_backward, ((6, 5),), rng.normal(size=(6, 5)) + 1.0),
        (group_norm_forward, group_norm_backward, (3,), w),
        (instance_norm_forward, instance_norm_backward, (None, None), w),
    ]:
        ref = bwd(g, fwd(x, *args, wt)[1])[0]
        half = bwd(g.astype(np.float16), fwd(x.astype(np.float16), *args, wt)[1])[0]
        assert half.dtype == np.float16
        np.testing.assert_allclose(half, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


# -- equivalences -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 6, 3, 2), (4, 3)])
def test_group_norm_one_group_is_layer_norm(rng, shape):
    """GroupNorm(1, C) == LayerNorm over (C, *S) with gamma/beta broadcast per channel."""
    x = _data(rng, shape)
    c = shape[1]
    w, b = rng.normal(size=c) + 1.0, rng.normal(size=c)
    g = rng.normal(size=shape)
    per_channel = (c,) + (1,) * (len(shape) - 2)
    wl = np.broadcast_to(w.reshape(per_channel), shape[1:]).copy()
    bl = np.broadcast_to(b.reshape(per_channel), shape[1:]).copy()
    yg, cg = group_norm_forward(x, 1, w, b)
    yl, cl = layer_norm_forward(x, shape[1:], wl, bl)
    np.testing.assert_allclose(yg, yl, rtol=1e-12, atol=1e-12)
    dxg, dwg, dbg = group_norm_backward(g, cg)
    dxl, dwl, dbl = layer_norm_backward(g, cl)
    np.testing.assert_allclose(dxg, dxl, rtol=1e-10, atol=1e-12)
    axes = tuple(range(1, len(shape) - 1))
    np.testing.assert_allclose(dwg, dwl.sum(axis=axes) if axes else dwl, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbg, dbl.sum(axis=axes) if axes else dbl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", IN_CASES)
def test_group_norm_c_groups_is_instance_norm(rng, shape):
    x = _data(rng, shape)
    c = shape[1]
    w, b = rng.normal(size=c), rng.normal(size=c)
    g = rng.normal(size=shape)
    yg, cg = group_norm_forward(x, c, w, b)
    yi, ci = instance_norm_forward(x, None, None, w, b)
    np.testing.assert_array_equal(yg, yi)
    for a, e in zip(group_norm_backward(g, cg), instance_norm_backward(g, ci), strict=True):
        np.testing.assert_array_equal(a, e)


def test_instance_norm_is_batch_norm_of_each_sample(rng):
    """Batch norm with batch size 1 is instance norm (the PyTorch tutorial's remark)."""
    x = _data(rng, (3, 4, 5, 2))
    w, b = rng.normal(size=4), rng.normal(size=4)
    y = instance_norm(x, weight=w, bias=b)
    for n in range(3):
        np.testing.assert_allclose(
            y[n : n + 1], batch_norm(x[n : n + 1], None, None, w, b, training=True), rtol=1e-12, atol=1e-12
        )


def test_layer_norm_of_2d_is_batch_norm_of_transpose(rng):
    x = _data(rng, (5, 7))
    np.testing.assert_allclose(
        layer_norm(x, 7), batch_norm(x.T, None, None, training=True).T, rtol=1e-12, atol=1e-12
    )


# -- properties ---------------------------------------------------------------------

shapes3 = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 6))


@settings(max_examples=40, deadline=None)
@given(shape=shapes3, seed=st.integers(0, 2**32 - 1), a=st.floats(0.01, 100), c=st.floats(-1e3, 1e3))
def test_properties_layer_norm(shape, seed, a, c):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    y = layer_norm(x, shape[1:], eps=0.0)
    rows = y.reshape(shape[0], -1)
    np.testing.assert_allclose(rows.mean(axis=1), 0, atol=1e-10)
    np.testing.assert_allclose(rows.var(axis=1), 1, rtol=1e-9)
    np.testing.assert_allclose(layer_norm(a * x + c, shape[1:], eps=0.0), y, rtol=1e-7, atol=1e-7)
    w = rng.normal(size=shape[1:])
    g = rng.normal(size=shape)
    dx = layer_norm_backward(g, layer_norm_forward(x, shape[1:], w, eps=0.0)[1])[0].reshape(shape[0], -1)
    xhat = rows
    np.testing.assert_allclose(dx.sum(axis=1), 0, atol=1e-8 * (1 + np.abs(dx).sum()))
    np.testing.assert_allclose((dx * xhat).sum(axis=1), 0, atol=1e-8 * (1 + np.abs(dx).sum()))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    groups=st.integers(1, 3),
    cg=st.integers(1, 3),
    s=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    a=st.floats(0.01, 100),
    c=st.floats(-1e3, 1e3),
)
def test_properties_group_norm(n, groups, cg, s, seed, a, c):
    rng = np.random.default_rng(seed)
    if cg * s == 1:
        s = 2
    shape = (n, groups * cg, s)
    x = rng.normal(size=shape)
    y = group_norm(x, groups, eps=0.0)
    rows = y.reshape(n * groups, -1)
    np.testing.assert_allclose(rows.mean(axis=1), 0, atol=1e-10)
    np.testing.assert_allclose(rows.var(axis=1), 1, rtol=1e-9)
    np.testing.assert_allclose(group_norm(a * x + c, groups, eps=0.0), y, rtol=1e-7, atol=1e-7)
    w = rng.normal(size=groups * cg)
    dx = group_norm_backward(rng.normal(size=shape), group_norm_forward(x, groups, w, eps=0.0)[1])[0]
    drows = dx.reshape(n * groups, -1)
    np.testing.assert_allclose(drows.sum(axis=1), 0, atol=1e-8 * (1 + np.abs(dx).sum()))
    np.testing.assert_allclose((drows * rows).sum(axis=1), 0, atol=1e-8 * (1 + np.abs(dx).sum()))


@settings(max_examples=30, deadline=None)
@given(shape=shapes3, seed=st.integers(0, 2**32 - 1), momentum=st.floats(0, 1))
def test_properties_instance_norm_running_stats(shape, seed, momentum):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 3 + 1
    c, length = shape[1], shape[2]
    rm0, rv0 = rng.normal(size=c), rng.random(c) + 0.1
    rm, rv = rm0.copy(), rv0.copy()
    instance_norm(x, rm, rv, momentum=momentum)
    np.testing.assert_allclose(
        rm, (1 - momentum) * rm0 + momentum * x.mean(axis=2).mean(axis=0), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        rv, (1 - momentum) * rv0 + momentum * x.var(axis=2, ddof=1).mean(axis=0), rtol=1e-12, atol=1e-12
    )
    assert length >= 2


# -- contexts -------------------------------------------------------------------------


def test_contexts_keep_a_reference_and_small_vectors(rng):
    x = _data(rng, (4, 6, 5))
    for ctx, cls in [
        (layer_norm_forward(x, (6, 5), np.ones((6, 5)))[1], LayerNormContext),
        (group_norm_forward(x, 3, np.ones(6))[1], GroupNormContext),
        (instance_norm_forward(x, weight=np.ones(6))[1], InstanceNormContext),
    ]:
        assert isinstance(ctx, cls)
        assert ctx.input is x
        assert ctx.mean.size <= 24 and ctx.invstd.size <= 24
        with pytest.raises(AttributeError):
            ctx.mean = None  # frozen


# -- layers ---------------------------------------------------------------------------


def test_layer_norm_layer(rng):
    ln = bnorm.LayerNorm((4, 5))
    assert ln.weight.shape == (4, 5) and ln.weight.dtype == np.float32
    assert LayerNormState(ln) == ("weight", "bias", ())
    ln.weight[...] = rng.normal(size=(4, 5))
    ln.bias[...] = rng.normal(size=(4, 5))
    x = _data(rng, (3, 4, 5))
    g = rng.normal(size=x.shape)
    y = ln(x)
    yf, ctx = layer_norm_forward(x, (4, 5), ln.weight, ln.bias)
    np.testing.assert_array_equal(y, yf)
    np.testing.assert_array_equal(ln.eval()(x), y)  # no mode dependence
    dx = ln.backward(g)
    edx, edw, edb = layer_norm_backward(g, ctx)
    np.testing.assert_array_equal(dx, edx)
    np.testing.assert_array_equal(ln.grad_weight, edw)
    np.testing.assert_array_equal(ln.grad_bias, edb)
    assert ln.grad_weight.dtype == np.float32
    ln.reset_parameters()
    assert (ln.weight == 1).all() and (ln.bias == 0).all()
    assert repr(ln) == "LayerNorm((4, 5), eps=1e-05, elementwise_affine=True, bias=True)"
    assert bnorm.LayerNorm(3, bias=False).bias is None
    plain = bnorm.LayerNorm(5, elementwise_affine=False, dtype=np.float64)
    assert plain.weight is None and plain.bias is None
    plain(x)
    plain.backward(g)
    assert plain.grad_weight is None


def LayerNormState(layer):
    return (*layer._parameters, layer._buffers)


def test_group_norm_layer(rng):
    gn = bnorm.GroupNorm(2, 6, dtype=np.float64)
    gn.weight[...] = rng.normal(size=6)
    x = _data(rng, (3, 6, 4))
    g = rng.normal(size=x.shape)
    y = gn(x)
    np.testing.assert_array_equal(y, group_norm(x, 2, gn.weight, gn.bias))
    dx = gn.backward(g)
    edx, edw, _edb = group_norm_backward(g, group_norm_forward(x, 2, gn.weight, gn.bias)[1])
    np.testing.assert_array_equal(dx, edx)
    np.testing.assert_array_equal(gn.grad_weight, edw)
    assert gn._parameters == ("weight", "bias") and gn._buffers == ()
    assert repr(gn) == "GroupNorm(2, 6, eps=1e-05, affine=True, bias=True)"
    assert bnorm.GroupNorm(3, 6, affine=False).weight is None
    assert bnorm.GroupNorm(3, 6, bias=False).bias is None


@pytest.mark.parametrize(
    "cls,spatial",
    [(bnorm.InstanceNorm1d, (5,)), (bnorm.InstanceNorm2d, (3, 4)), (bnorm.InstanceNorm3d, (2, 3, 2))],
)
def test_instance_norm_layers(rng, cls, spatial):
    c = 3
    m = cls(c, affine=True, track_running_stats=True, dtype=np.float64)
    assert m._buffers == ("running_mean", "running_var", "num_batches_tracked")
    m.weight[...] = rng.normal(size=c)
    x = _data(rng, (4, c, *spatial))
    y = m(x)
    rm, rv = np.zeros(c), np.ones(c)
    np.testing.assert_array_equal(y, instance_norm(x, rm, rv, m.weight, m.bias))
    np.testing.assert_array_equal(m.running_mean, rm)
    np.testing.assert_array_equal(m.running_var, rv)
    assert int(m.num_batches_tracked) == 0  # PyTorch's instance norm never counts
    g = rng.normal(size=x.shape)
    dx = m.backward(g)
    np.testing.assert_array_equal(
        dx, instance_norm_backward(g, instance_norm_forward(x, None, None, m.weight, m.bias)[1])[0]
    )
    # evaluation uses the running statistics and leaves them alone
    m.eval()
    ye = m(x)
    np.testing.assert_allclose(ye, ref_instance_norm(x, m.weight, m.bias, mean=rm, var=rv), rtol=1e-12)
    np.testing.assert_array_equal(m.running_mean, rm)
    dxe = m.backward(g)
    np.testing.assert_allclose(
        dxe, g * (m.weight / np.sqrt(rv + 1e-5)).reshape((1, c) + (1,) * len(spatial)), rtol=1e-12
    )
    # ... or the input's own with training=True for one call
    np.testing.assert_array_equal(m(x, training=True), instance_norm(x, None, None, m.weight, m.bias))
    assert not m.training
    # unbatched input
    x1 = x[0]
    y1 = m.train()(x1)
    assert y1.shape == x1.shape
    np.testing.assert_allclose(y1, instance_norm(x[:1], None, None, m.weight, m.bias)[0], rtol=1e-12)
    assert m.backward(g[0]).shape == x1.shape
    m.reset_parameters()
    assert (m.running_mean == 0).all() and (m.running_var == 1).all() and (m.weight == 1).all()


def test_instance_norm_default_layer_uses_input_stats_in_eval(rng):
    m = bnorm.InstanceNorm1d(3).eval()
    x = _data(rng, (2, 3, 6))
    np.testing.assert_array_equal(m(x), instance_norm(x))
    assert m.running_mean is None and m.weight is None
    assert (
        repr(m)
        == "InstanceNorm1d(3, eps=1e-05, momentum=0.1, affine=False, bias=False, track_running_stats=False)"
    )


def test_instance_norm_momentum_none_never_updates(rng):
    """PyTorch passes momentum=None on as 0.0: the running statistics stay put."""
    m = bnorm.InstanceNorm1d(3, momentum=None, track_running_stats=True)
    m(_data(rng, (2, 3, 6)))
    assert (m.running_mean == 0).all() and (m.running_var == 1).all()


def test_instance_norm_empty_batch_leaves_running_stats(rng):
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    y = instance_norm(np.zeros((0, 3, 4)), rm, rv)
    assert y.shape == (0, 3, 4)
    assert (rm == 0.5).all() and (rv == 2.0).all()


def test_instance_norm_channel_mismatch_warns_without_state(rng):
    m = bnorm.InstanceNorm1d(3)
    with pytest.warns(UserWarning, match=r"input's size at dim=1 does not match num_features"):
        y = m(_data(rng, (2, 5, 4)))
    assert y.shape == (2, 5, 4)


def test_layer_backward_before_forward():
    with pytest.raises(RuntimeError, match="backward called before forward"):
        bnorm.GroupNorm(1, 2).backward(np.zeros((1, 2)))


def test_exports():
    for name in ["LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]:
        assert name in bnorm.__all__ and hasattr(bnorm, name)
    for name in ["layer_norm", "group_norm", "instance_norm"]:
        for suffix in ["", "_forward", "_backward"]:
            assert name + suffix in bnorm.functional.__all__


# -- errors: one per message; a raising call changes nothing --------------------------


def test_error_layer_norm_shape_mismatch():
    with pytest.raises(
        ValueError,
        match=r"x must end with normalized_shape=\(3, 4\): expected input of shape \(\*, 3, 4\), got \(2, 4, 3\)",
    ):
        layer_norm(np.zeros((2, 4, 3)), (3, 4))


def test_error_layer_norm_longer_than_input():
    with pytest.raises(ValueError, match=r"x must end with normalized_shape=\(1, 2, 3\)"):
        layer_norm(np.zeros((2, 3)), (1, 2, 3))


def test_error_normalized_shape_empty():
    with pytest.raises(ValueError, match=r"normalized_shape must have at least one dimension, got \(\)"):
        layer_norm(np.zeros((2, 3)), ())


def test_error_normalized_shape_type():
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints, got float"):
        layer_norm(np.zeros((2, 3)), 3.0)


def test_error_normalized_shape_items():
    with pytest.raises(TypeError, match=r"normalized_shape must contain only ints, got \(3.0,\)"):
        bnorm.LayerNorm([3.0])


def test_error_normalized_shape_negative():
    with pytest.raises(
        ValueError, match=r"normalized_shape must contain only non-negative sizes, got \(-1,\)"
    ):
        bnorm.LayerNorm(-1)


def test_error_layer_norm_weight_shape():
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape=\(3,\), got \(4,\)"):
        layer_norm(np.zeros((2, 3)), 3, weight=np.ones(4))


def test_error_layer_norm_bias_dtype():
    with pytest.raises(TypeError, match="bias must be a real floating array, got dtype complex128"):
        layer_norm(np.zeros((2, 3)), 3, bias=np.ones(3, complex))


def test_error_negative_eps():
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        group_norm(np.zeros((2, 4)), 2, eps=-1)


def test_error_group_norm_rank():
    with pytest.raises(
        ValueError, match=r"x must have at least 2 dimensions \(N, C, \.\.\.\), got 1D input of shape \(4,\)"
    ):
        group_norm(np.zeros(4), 2)


def test_error_group_norm_divisibility():
    with pytest.raises(
        ValueError,
        match=r"num_groups=3 must divide the number of channels x.shape\[1\]=4 \(x of shape \(2, 4, 3\)\)",
    ):
        group_norm(np.zeros((2, 4, 3)), 3)


def test_error_group_norm_single_value():
    with pytest.raises(
        ValueError, match=r"Expected more than 1 value per channel when training, got input size \[1, 2\]"
    ):
        group_norm(np.zeros((1, 2)), 2)
    assert group_norm(np.arange(4.0).reshape(2, 2), 2).shape == (
        2,
        2,
    )  # PyTorch only counts N * C / G * prod(S)


def test_error_num_groups_not_positive():
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 0"):
        group_norm(np.zeros((2, 4)), 0)


def test_error_num_groups_type():
    with pytest.raises(TypeError, match="num_groups must be a positive int, got float"):
        bnorm.GroupNorm(2.0, 4)


def test_error_group_norm_weight_shape():
    with pytest.raises(
        ValueError, match=r"weight must have shape \(4,\) to match input.shape\[1\], got \(3,\)"
    ):
        group_norm(np.zeros((2, 4, 3)), 2, weight=np.ones(3))


def test_error_group_norm_layer_divisibility():
    with pytest.raises(ValueError, match=r"num_channels \(4\) must be divisible by num_groups \(3\)"):
        bnorm.GroupNorm(3, 4)


def test_error_group_norm_layer_rank():
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        bnorm.GroupNorm(2, 4)(np.zeros(4))


def test_error_group_norm_layer_channels():
    with pytest.raises(
        ValueError, match=r"expected input with 4 channels on axis 1, got input of shape \(2, 6, 3\)"
    ):
        bnorm.GroupNorm(2, 4)(np.zeros((2, 6, 3)))
    assert bnorm.GroupNorm(2, 4, affine=False)(np.ones((2, 6, 3))).shape == (2, 6, 3)  # as PyTorch


def test_error_num_channels():
    with pytest.raises(ValueError, match="num_channels must be a positive int, got 0"):
        bnorm.GroupNorm(1, 0)


def test_error_instance_norm_one_spatial_element():
    with pytest.raises(
        ValueError, match=r"Expected more than 1 spatial element when training, got input size \(2, 3, 1\)"
    ):
        instance_norm(np.zeros((2, 3, 1)))


def test_error_instance_norm_needs_running_stats():
    with pytest.raises(
        ValueError, match="Expected running_mean and running_var to be defined when use_input_stats is false"
    ):
        instance_norm(np.zeros((2, 3, 4)), use_input_stats=False)


def test_error_instance_norm_one_buffer():
    with pytest.raises(
        ValueError, match="running_mean and running_var must either both be None or neither be None"
    ):
        instance_norm(np.zeros((2, 3, 4)), running_mean=np.zeros(3))


def test_error_instance_norm_buffer_shape_changes_nothing():
    rm, rv = np.zeros(3), np.ones(4)
    with pytest.raises(
        ValueError, match=r"running_var must have shape \(3,\) to match input.shape\[1\], got \(4,\)"
    ):
        instance_norm(np.ones((2, 3, 4)) + np.arange(4), rm, rv)
    assert (rm == 0).all()


def test_error_instance_norm_bad_weight_changes_nothing():
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        instance_norm(np.arange(24.0).reshape(2, 3, 4), rm, rv, weight=np.ones(2))
    assert (rm == 0).all() and (rv == 1).all()


def test_error_instance_norm_buffer_not_array():
    with pytest.raises(
        TypeError,
        match=r"running_mean must be a NumPy array of shape \(3,\) so it can be updated in place, got list",
    ):
        instance_norm(np.zeros((2, 3, 4)), [0.0, 0.0, 0.0], np.ones(3))


def test_error_instance_norm_momentum():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1\.5"):
        instance_norm(np.zeros((2, 3, 4)), momentum=1.5)


def test_error_instance_norm_use_input_stats_type():
    with pytest.raises(TypeError, match="use_input_stats must be a bool, got str"):
        instance_norm(np.zeros((2, 3, 4)), use_input_stats="yes")


def test_error_instance_norm_rank():
    with pytest.raises(ValueError, match=r"x must have at least 2 dimensions \(N, C, \.\.\.\), got 1D input"):
        instance_norm(np.zeros(4))


@pytest.mark.parametrize(
    "cls,ndim,text",
    [
        (bnorm.InstanceNorm1d, 4, r"expected 2D or 3D input \(got 4D input\)"),
        (bnorm.InstanceNorm1d, 1, r"expected 2D or 3D input \(got 1D input\)"),
        (bnorm.InstanceNorm2d, 2, r"expected 3D or 4D input \(got 2D input\)"),
        (bnorm.InstanceNorm2d, 5, r"expected 3D or 4D input \(got 5D input\)"),
        (bnorm.InstanceNorm3d, 3, r"expected 4D or 5D input \(got 3D input\)"),
        (bnorm.InstanceNorm3d, 6, r"expected 4D or 5D input \(got 6D input\)"),
    ],
)
def test_error_instance_norm_layer_rank(cls, ndim, text):
    with pytest.raises(ValueError, match=text):
        cls(3)(np.zeros((3,) * ndim))


def test_error_instance_norm_layer_channels_batched():
    m = bnorm.InstanceNorm2d(3, affine=True)
    with pytest.raises(
        ValueError, match=r"expected input's size at dim=1 to match num_features \(3\), but got: 5\."
    ):
        m(np.zeros((2, 5, 4, 4)))


def test_error_instance_norm_layer_channels_unbatched():
    m = bnorm.InstanceNorm1d(3, track_running_stats=True)
    with pytest.raises(
        ValueError, match=r"expected input's size at dim=0 to match num_features \(3\), but got: 5\."
    ):
        m(np.zeros((5, 4)))
    assert (m.running_mean == 0).all()


def test_error_layer_dtype():
    with pytest.raises(TypeError, match="dtype must be a floating dtype, got int64"):
        bnorm.InstanceNorm1d(3, dtype=np.int64)


def test_error_layer_flag():
    with pytest.raises(TypeError, match="affine must be a bool, got str"):
        bnorm.GroupNorm(1, 3, affine="no")


def test_error_num_features():
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        bnorm.InstanceNorm2d(0)


def test_error_layer_momentum():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got -0\.1"):
        bnorm.InstanceNorm3d(2, momentum=-0.1)


def test_error_wrong_context():
    _, ctx = group_norm_forward(np.zeros((2, 4)), 2)
    with pytest.raises(
        TypeError,
        match="ctx must be the LayerNormContext returned by layer_norm_forward, got GroupNormContext",
    ):
        layer_norm_backward(np.zeros((2, 4)), ctx)
    with pytest.raises(
        TypeError,
        match="ctx must be the GroupNormContext returned by group_norm_forward, got LayerNormContext",
    ):
        group_norm_backward(np.zeros((2, 4)), layer_norm_forward(np.zeros((2, 4)), 4)[1])
    with pytest.raises(
        TypeError,
        match="ctx must be the InstanceNormContext returned by instance_norm_forward, got GroupNormContext",
    ):
        instance_norm_backward(np.zeros((2, 4)), ctx)


def test_error_grad_output_shape():
    _, ctx = layer_norm_forward(np.zeros((2, 4)), 4)
    with pytest.raises(ValueError, match=r"grad_output must have the input's shape \(2, 4\), got \(4, 2\)"):
        layer_norm_backward(np.zeros((4, 2)), ctx)


def test_error_unbatched_grad_output_shape(rng):
    m = bnorm.InstanceNorm1d(3)
    m(_data(rng, (3, 4)))
    with pytest.raises(
        ValueError, match=r"grad_output must have the input's shape \(3, 4\), got \(1, 3, 4\)"
    ):
        m.backward(np.zeros((1, 3, 4)))


def test_error_complex_input():
    with pytest.raises(
        TypeError, match="x must have a real floating, integer or bool dtype, got dtype complex128"
    ):
        layer_norm(np.zeros((2, 3), complex), 3)


def test_no_warnings_on_normal_use(rng):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnorm.InstanceNorm2d(3)(_data(rng, (2, 3, 4, 4)))
        bnorm.GroupNorm(1, 3)(_data(rng, (2, 3, 4)))


@pytest.mark.parametrize(
    "cls",
    [
        bnorm.InstanceNorm1d,
        bnorm.InstanceNorm2d,
        bnorm.InstanceNorm3d,
        bnorm.LayerNorm,
        bnorm.GroupNorm,
        bnorm.BatchNorm,
        bnorm.BatchNorm1d,
        bnorm.BatchNorm2d,
        bnorm.BatchNorm3d,
    ],
)
def test_layer_docstrings_parse_as_numpydoc(cls):
    """The shared Parameters section must start a section (a blank line before it), or
    Sphinx renders it as a block quote; this caught that bug in BatchNorm*d too."""
    docscrape = pytest.importorskip("numpydoc.docscrape")
    doc = docscrape.ClassDoc(cls)
    names = [p.name for p in doc["Parameters"]]
    assert names and names[0] in ("num_features", "normalized_shape", "num_groups")
    assert "\n\nParameters\n----------\n" in inspect.cleandoc(cls.__doc__).replace("\n    \n", "\n\n")


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("shape3", [(1, 7, 300), (5, 3, 1), (2, 40000, 8)])
def test_moments_passes_are_safe_in_place(dtype, shape3):
    """The per-channel passes stay elementwise read-before-write when the output is
    the input (batch norm's ``out=`` may be its input); layer norm no longer
    relies on it (its row-wise kernels keep their scratch per tile)."""
    from bnorm.functional._kernels.channel import affine_pass, backward_pass

    rng = np.random.default_rng(0)
    k = shape3[1]
    x3 = rng.normal(size=shape3).astype(dtype)
    g3 = rng.normal(size=shape3).astype(dtype)
    a, b, c = rng.normal(size=k), rng.normal(size=k), rng.normal(size=k)
    want = np.empty_like(x3)
    affine_pass(x3, a, b, want)
    got = x3.copy()
    affine_pass(got, a, b, got)
    np.testing.assert_array_equal(got, want)
    want = np.empty_like(x3)
    backward_pass(g3, x3, a, b, c, want)
    got = g3.copy()
    backward_pass(got, x3, a, b, c, got)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_float32_backward_of_tiny_groups_close_to_float64(m):
    """Groups of 1-3 values (variance far below eps) make dx a difference of large
    terms; in float32 bnorm stays within a few ulps of those terms of the float64
    result (PyTorch's float32 kernels measured the same or further off)."""
    rng = np.random.default_rng(m)
    x = rng.normal(size=(4, 3, m)) * 3
    w3, g = rng.normal(size=3) * 3, rng.normal(size=(4, 3, m))
    wl = rng.normal(size=m) * 3
    for fwd, bwd, args in [
        (layer_norm_forward, layer_norm_backward, lambda w: (m, wl)),
        (group_norm_forward, group_norm_backward, lambda w: (3, w)),
        (instance_norm_forward, instance_norm_backward, lambda w: (None, None, w)),
    ]:
        if fwd is instance_norm_forward and m == 1:
            continue  # one spatial element is refused
        truth = bwd(g, fwd(x, *args(w3))[1])[0]
        single = bwd(g.astype(np.float32), fwd(x.astype(np.float32), *args(w3.astype(np.float32)))[1])[0]
        # dx = g*a + x*b + c with |g*a| up to |g| |gamma| / sqrt(eps): a few float32 ulps of that.
        terms = np.abs(g).max() * max(np.abs(w3).max(), np.abs(wl).max()) / np.sqrt(1e-5)
        assert (
            np.abs(single - truth).max() <= 8 * np.finfo(np.float32).eps * terms + 1e-5 * np.abs(truth).max()
        )
