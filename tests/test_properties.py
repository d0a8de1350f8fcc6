"""Hypothesis properties over shape (2-D to 5-D), dtype, axis and affine."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import ref_train

from bnorm.functional import batch_norm, batch_norm_backward, batch_norm_forward
from bnorm.testing import check_grad

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw, dtypes=(np.float64, np.float32)):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.sampled_from([1, -1]))
    # at least 2 values per channel
    if int(np.prod(shape)) // shape[axis] < 2:
        shape = (shape[0] + 1, *shape[1:]) if axis != 0 % ndim else shape
    dtype = draw(st.sampled_from(dtypes))
    affine = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.floats(0.1, 100.0))
    offset = draw(st.floats(-1000.0, 1000.0))
    return shape, axis, np.dtype(dtype), affine, np.random.default_rng(seed), scale, offset


def _params(rng, c, affine):
    if not affine:
        return None, None
    return rng.standard_normal(c) * 2, rng.standard_normal(c)


@SETTINGS
@given(configs())
def test_training_output_standardized_per_channel(cfg):
    shape, axis, dtype, _, rng, scale, offset = cfg
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    if np.ptp(np.moveaxis(x, axis, -1).reshape(-1, shape[axis]), axis=0).min() == 0:
        return  # a constant channel normalizes to 0, not to variance 1
    y = batch_norm(x, None, None, training=True, axis=axis, eps=1e-12 if dtype == np.float64 else 1e-5)
    rows = np.moveaxis(y.astype(np.float64), axis, -1).reshape(-1, shape[axis])
    tol = 1e-9 if dtype == np.float64 else 2e-3
    np.testing.assert_allclose(rows.mean(0), 0, atol=tol)
    var = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, shape[axis]).var(0)
    expected_var = var / (var + (1e-12 if dtype == np.float64 else 1e-5))
    np.testing.assert_allclose(rows.var(0), expected_var, rtol=tol, atol=tol)


@SETTINGS
@given(configs(dtypes=(np.float64,)), st.floats(0.01, 100.0), st.floats(-100.0, 100.0))
def test_invariant_to_positive_affine_input_transform(cfg, a, b):
    shape, axis, _, affine, rng, scale, offset = cfg
    x = rng.standard_normal(shape) * scale + offset
    w, bias = _params(rng, shape[axis], affine)
    y1 = batch_norm(x, None, None, w, bias, training=True, axis=axis, eps=1e-300)
    y2 = batch_norm(a * x + b, None, None, w, bias, training=True, axis=axis, eps=1e-300)
    np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(configs(dtypes=(np.float64,)))
def test_matches_reference(cfg):
    shape, axis, _, affine, rng, scale, offset = cfg
    x = rng.standard_normal(shape) * scale + offset
    w, b = _params(rng, shape[axis], affine)
    y = batch_norm(x, None, None, w, b, training=True, axis=axis)
    np.testing.assert_allclose(y, ref_train(x, w, b, axis=axis), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(configs(dtypes=(np.float64,)))
def test_grad_input_sums_to_zero_per_channel(cfg):
    shape, axis, _, affine, rng, scale, offset = cfg
    x = rng.standard_normal(shape) * scale + offset
    w, b = _params(rng, shape[axis], affine)
    _, ctx = batch_norm_forward(x, None, None, w, b, training=True, axis=axis)
    g = rng.standard_normal(shape)
    dx, _, _ = batch_norm_backward(g, ctx)
    rows = lambda a: np.moveaxis(a, axis, -1).reshape(-1, shape[axis])  # noqa: E731
    xr, gr = rows(x), rows(g)
    sums = np.abs(rows(dx).sum(0))
    # The rounding bound of sum(dx) in float64, derived from dx = k * g + coef_x * (x - mean) + c:
    # x - mean carries eps * |x| (the input's own quantum), amplified by coef_x, which grows as
    # invstd**3 for a channel whose variance is near eps; every term rounds at eps.  A fixed
    # bound ignores that conditioning: PyTorch itself exceeds one (|sum dx| ~ 6e-10 on two
    # values at offset 68 with scale 0.125).  Measured over 3000 random configurations, bnorm
    # stays within 0.94x this bound and PyTorch within 2.35x.
    m = xr.shape[0]
    invstd = 1 / np.sqrt(xr.var(0) + 1e-5)
    k = (1.0 if w is None else np.abs(w)) * invstd
    coef_x = k * invstd**2 * np.abs((gr * (xr - xr.mean(0))).sum(0)) / m
    spread = np.abs(xr - xr.mean(0)).max(0)
    bound = (
        m * np.finfo(np.float64).eps * (np.abs(xr).max(0) * coef_x + k * np.abs(gr).max(0) + coef_x * spread)
    )
    assert np.all(sums <= 4 * bound + 1e-300), (sums, bound)


@SETTINGS
@given(configs(dtypes=(np.float64,)), st.booleans())
def test_vjp_gradient_check(cfg, training):
    shape, axis, _, _, rng, _, offset = cfg
    c = shape[axis]
    x = rng.standard_normal(shape) + offset / 100
    w, b = rng.standard_normal(c) * 2, rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5

    def forward(x, w, b):
        return batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training=training, axis=axis, eps=1e-3)

    check_grad(forward, batch_norm_backward, x, w, b, rtol=1e-5, atol=1e-7, seed=int(rng.integers(2**32)))
