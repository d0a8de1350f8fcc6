"""The direct kernels (batch norm on small input) against the float64 reference.

Small inputs take ``bnorm.functional._kernels.direct`` (see ``kernel_for``); these
tests pin what that path must deliver: float64-accurate statistics at any
offset, the constant channel exact, gamma = 0, both layouts, out= with the same
bits, and the hand-over to the channel kernels for non-finite input and for
the cases the shifted sums cannot take.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import ref_batch_stats, ref_forward

from bnorm.functional import batch_norm_backward, batch_norm_forward
from bnorm.functional._kernels import DIRECT_MAX_ELEMENTS, kernel_for
from bnorm.functional._kernels.direct import TINY_MAX_ELEMENTS
from bnorm.functional._kernels.moments import channel_view

SMALL = [
    ((4, 8), 1),
    ((60, 100), 1),
    ((128, 10), 1),
    ((16, 32, 16, 16), 1),
    ((8, 6, 5, 3), -1),
    ((700, 3), 1),
]
# Output tolerance relative to |y| + 1 in the compute dtype (a few units of rounding).
TOL = {np.float32: 3e-6, np.float64: 1e-13}


def _ref_backward(x, g, gamma, eps, axis):
    """dx, dgamma, dbeta in float64 (the closed form on the reference statistics)."""
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    mean, var, m = ref_batch_stats(x64, axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    mean_b, invstd = mean.reshape(shape), (1 / np.sqrt(var + eps)).reshape(shape)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x_hat = (x64 - mean_b) * invstd
    dbeta = g64.sum(axis=axes)
    dgamma = (g64 * x_hat).sum(axis=axes)
    dx = gamma.reshape(shape) * invstd / m * (m * g64 - dbeta.reshape(shape) - x_hat * dgamma.reshape(shape))
    return dx, dgamma, dbeta


@pytest.mark.parametrize("shape, axis", SMALL, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centered", "offset1e4"])
def test_direct_matches_float64_reference(shape, axis, dtype, offset):
    rng = np.random.default_rng(3)
    c = shape[axis]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2.0) + offset).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    assert kernel_for("batch_norm", channel_view(x, axis % x.ndim)) == "direct"
    rm, rv = np.zeros(c, np.float64), np.ones(c, np.float64)
    y, ctx = batch_norm_forward(x, rm, rv, w, b, training=True, axis=axis, momentum=1.0)
    mean, var, m = ref_batch_stats(x, axis)
    rows = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, c)
    mean = mean + (rows - mean).mean(axis=0)  # corrected: the float64 truth to ~1 ulp
    # Statistics to float64 accuracy relative to the spread (float32 data: sums of
    # at most 256 float32 values, then float64).
    std = np.sqrt(var)
    stat_tol = 1e-6 if dtype == np.float32 else 1e-12
    atol = stat_tol * std.max() + 4 * np.finfo(np.float64).eps * np.abs(mean).max()
    np.testing.assert_allclose(ctx.mean, mean, rtol=0, atol=atol)
    np.testing.assert_allclose(rm, mean, rtol=0, atol=atol)
    np.testing.assert_allclose(rv, var * m / (m - 1), rtol=stat_tol * 4)
    y_ref = ref_forward(x, mean, var, w, b, axis=axis)
    # The float64 truth itself is only known to float64 rounding of the offset mean.
    tol = TOL[dtype] + 16 * np.finfo(np.float64).eps * (np.abs(mean) / std).max()
    assert y.dtype == dtype
    assert np.max(np.abs(y - y_ref) / (np.abs(y_ref) + 1)) <= tol
    dx, dw, db = batch_norm_backward(g, ctx)
    dx_ref, dw_ref, db_ref = _ref_backward(x, g, w.astype(np.float64), 1e-5, axis)
    scale = np.abs(dx_ref).max()
    assert np.max(np.abs(dx - dx_ref)) <= 20 * tol * scale
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)
    np.testing.assert_allclose(db, db_ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_constant_channel_at_offset_is_exact(dtype):
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(dtype)
    x[:, 2] = 1e4
    y, ctx = batch_norm_forward(x, None, None, training=True)
    assert np.all(y[:, 2] == 0)
    assert ctx.mean[2] == 1e4
    dx, _, _ = batch_norm_backward(np.ones_like(x), ctx)
    assert np.all(dx[:, 2] == 0)


def test_direct_zero_gamma_gives_zero_gradient():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 5)).astype(np.float32)
    w = np.array([1.0, 0.0, 2.0, 0.0, 0.5], np.float32)
    _, ctx = batch_norm_forward(x, None, None, w, None, training=True)
    dx, dw, _ = batch_norm_backward(rng.standard_normal(x.shape).astype(np.float32), ctx)
    assert np.all(dx[:, [1, 3]] == 0) and np.all(np.isfinite(dx))
    assert np.all(np.isfinite(dw))


@pytest.mark.parametrize("training", [True, False])
def test_direct_out_gives_the_same_bits(training):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 12)) + 50).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    rm, rv = np.full(12, 50.0), np.full(12, 2.0)
    y_new, ctx = batch_norm_forward(x, rm.copy(), rv.copy(), training=training)
    out = np.full_like(x, np.nan)
    y_out, _ = batch_norm_forward(x, rm.copy(), rv.copy(), training=training, out=out)
    assert y_out is out and np.array_equal(y_out, y_new)
    dx_new, _, _ = batch_norm_backward(g, ctx)
    g_copy = g.copy()
    dx_in_g, _, _ = batch_norm_backward(g_copy, ctx, out=g_copy)
    assert np.array_equal(dx_in_g, dx_new)


def test_direct_nonfinite_input_takes_the_channel_kernels_policy():
    x = np.random.default_rng(4).standard_normal((16, 3)).astype(np.float32)
    x[3, 1] = np.nan
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.warns(RuntimeWarning, match="not finite"):
        y, _ = batch_norm_forward(x, rm, rv, training=True)
    assert np.all(rm == 0) and np.all(rv == 1)  # skipped, as on large input
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))
    with pytest.raises(FloatingPointError):
        batch_norm_forward(x, rm, rv, training=True, on_nonfinite="raise")


def test_direct_and_channel_kernels_agree_at_the_boundary():
    """Just below and just above DIRECT_MAX_ELEMENTS the results agree to rounding."""
    rng = np.random.default_rng(5)
    c = 64
    n_small = DIRECT_MAX_ELEMENTS // c
    for n in (n_small, n_small + 1):
        x = (rng.standard_normal((n, c)) * 3 + 1e4).astype(np.float32)
        y, ctx = batch_norm_forward(x, None, None, training=True)
        mean, var, _ = ref_batch_stats(x)
        y_ref = ref_forward(x, mean, var)
        assert np.max(np.abs(y - y_ref)) <= 1e-5 * (1 + np.abs(y_ref).max())
        np.testing.assert_allclose(ctx.mean, mean, rtol=0, atol=1e-6 * np.sqrt(var).max())
    assert kernel_for("batch_norm", channel_view(np.empty((n_small, c), np.float32), 1)) == "direct"
    assert kernel_for("batch_norm", channel_view(np.empty((n_small + 1, c), np.float32), 1)) == "channel"


# Shapes on both sides of each op's float64 threshold (direct.TINY_MAX_ELEMENTS).
FORMS = [(4, 8), (8, 4, 4, 2), (32, 64), (60, 100), (16, 8, 8, 16)]


def test_forms_cover_both_sides_of_every_threshold():
    sizes = [int(np.prod(s)) for s in FORMS]
    for limit in TINY_MAX_ELEMENTS.values():
        assert min(sizes) <= limit < max(sizes)


@pytest.mark.parametrize("shape", FORMS, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_eval_and_frozen_backward_match_float64_reference(shape, dtype):
    """Evaluation forward and its backward (constant statistics) in both forms."""
    rng = np.random.default_rng(6)
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c) + 3, rng.uniform(2.0, 6.0, c)
    y, ctx = batch_norm_forward(x, rm, rv, w, b, training=False)
    y_ref = ref_forward(x, rm, rv, w, b)
    assert y.dtype == dtype
    assert np.max(np.abs(y - y_ref) / (np.abs(y_ref) + 1)) <= TOL[dtype]
    dx, dw, db = batch_norm_backward(g, ctx)
    shape_c = [1] * x.ndim
    shape_c[1] = -1
    invstd = 1 / np.sqrt(rv + 1e-5)
    g64 = g.astype(np.float64)
    dx_ref = g64 * (w * invstd).reshape(shape_c)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    dw_ref = (g64 * (x.astype(np.float64) - rm.reshape(shape_c))).sum(axis=axes) * invstd
    assert np.max(np.abs(dx - dx_ref) / (np.abs(dx_ref) + 1)) <= TOL[dtype]
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)
    np.testing.assert_allclose(db, g64.sum(axis=axes), rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("shape", FORMS, ids=str)
@pytest.mark.parametrize("value", [0.1, 1e4 + 0.3, -7.7e7])
def test_direct_constant_float64_channel_is_exact_in_both_forms(shape, value):
    """A float64 sum of copies of 0.1 is not exact; the corrected mean still is 0.1."""
    x = np.random.default_rng(7).standard_normal(shape)
    x[:, 1] = value
    y, ctx = batch_norm_forward(x, None, None, training=True)
    assert np.all(y[:, 1] == 0)
    assert ctx.mean[1] == value
    dx, _, _ = batch_norm_backward(np.random.default_rng(8).standard_normal(shape), ctx)
    assert np.all(np.isfinite(dx))
