"""Batch renormalization: a step-by-step float64 reference, gradients, properties, state, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnorm
from bnorm.functional import (
    BatchRenormContext,
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
    batch_renorm,
    batch_renorm_backward,
    batch_renorm_forward,
)
from bnorm.interop import from_keras, to_keras_weights
from bnorm.testing import check_grad


def _rows(x, axis):
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


class RefRenorm:
    """The algorithm written out per channel in float64 (Keras 3's form when `separate`)."""

    def __init__(self, c, eps, new_weight, renorm_weight=None):
        self.eps, self.m, self.rm = eps, new_weight, renorm_weight
        self.mu, self.sigma = np.zeros(c), np.ones(c)
        self.var = np.ones(c)
        self.rmu, self.rsigma = np.zeros(c), np.ones(c)

    def step(self, x, axis, gamma, beta, r_max, r_min, d_max):
        rows = _rows(x, axis)
        mu_b, var_b = rows.mean(0), rows.var(0)
        sigma_b = np.sqrt(var_b + self.eps)
        mu, sigma = (self.rmu, self.rsigma) if self.rm is not None else (self.mu, self.sigma)
        s = np.maximum(sigma, np.sqrt(self.eps))
        r, d = sigma_b / s, (mu_b - mu) / s
        r = r if r_min is None else np.maximum(r, r_min)
        r = r if r_max is None else np.minimum(r, r_max)
        d = d if d_max is None else np.clip(d, -d_max, d_max)
        y = gamma * (r * (rows - mu_b) / sigma_b + d) + beta
        if self.rm is not None:
            self.rmu = (1 - self.rm) * self.rmu + self.rm * mu_b
            self.rsigma = (1 - self.rm) * self.rsigma + self.rm * sigma_b
        self.mu = (1 - self.m) * self.mu + self.m * mu_b
        self.sigma = (1 - self.m) * self.sigma + self.m * sigma_b
        self.var = np.maximum(self.sigma**2 - self.eps, 0)
        moved = np.moveaxis(np.empty(x.shape), axis, -1).shape
        return np.moveaxis(y.reshape(moved), -1, axis), r, d


@pytest.mark.parametrize(
    "shape,axis", [((6, 3), 1), ((4, 3, 5), 1), ((2, 3, 4, 3), -1), ((3, 2, 2, 2, 3), 1)]
)
@pytest.mark.parametrize("separate", [False, True])
def test_layer_follows_reference_over_steps_with_a_schedule(rng, shape, axis, separate):
    c = shape[axis]
    kw = dict(renorm_momentum=0.3) if separate else {}
    layer = bnorm.BatchRenorm(c, momentum=0.2, axis=axis, dtype=np.float64, **kw)
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    layer.weight[...], layer.bias[...] = gamma, beta
    ref = RefRenorm(c, 1e-5, 0.2, 0.3 if separate else None)
    # a warm-up schedule, changed between steps as users do
    schedule = [(1.0, 1.0, 0.0), (1.5, 1 / 1.5, 0.5), (3.0, None, 5.0), (None, None, None)]
    for r_max, r_min, d_max in schedule:
        layer.r_max, layer.r_min, layer.d_max = r_max, r_min, d_max
        x = rng.normal(size=shape) * rng.uniform(0.3, 3) + rng.normal()
        y = layer(x)
        y_ref, r, d = ref.step(x, axis % len(shape), gamma, beta, r_max, r_min, d_max)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.r, r, rtol=1e-13)
        np.testing.assert_allclose(layer.d, d, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(layer.running_mean, ref.mu, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(layer.running_std, ref.sigma, rtol=1e-13)
        np.testing.assert_allclose(layer.running_var, ref.var, rtol=1e-12)
        if separate:
            np.testing.assert_allclose(layer.renorm_mean, ref.rmu, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(layer.renorm_std, ref.rsigma, rtol=1e-13)
        else:
            assert layer.renorm_mean is None and layer.renorm_std is None
    assert int(layer.num_batches_tracked) == len(schedule)
    x = rng.normal(size=shape)
    expected = batch_norm(x, layer.running_mean, layer.running_var, gamma, beta, eps=1e-5, axis=axis)
    np.testing.assert_allclose(layer.eval()(x), expected, rtol=1e-13, atol=1e-13)


GRAD_CASES = [((7, 3), 1), ((3, 4, 5), 1), ((2, 3, 2, 4), -1)]


@pytest.mark.parametrize("shape,axis", GRAD_CASES)
@pytest.mark.parametrize("clip", [(None, None, None), (1.2, 0.8, 0.3)])
def test_training_gradients_with_r_and_d_frozen(rng, shape, axis, clip):
    """backward is the derivative of y = gamma * (r * x_hat + d) + beta with r, d held at their values."""
    c = shape[axis]
    x = rng.normal(size=shape) * 2 + 0.5
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    mu, sigma = rng.normal(size=c), rng.uniform(0.5, 2, c)
    r_max, r_min, d_max = clip
    _, ctx0 = batch_renorm_forward(
        x, mu.copy(), sigma.copy(), gamma, beta, True, r_max=r_max, r_min=r_min, d_max=d_max, axis=axis
    )
    assert not np.all(ctx0.d == ctx0.d[0])  # d varies by channel: not a trivial point
    shape_c = [1] * len(shape)
    shape_c[axis] = c
    r0, d0 = ctx0.r.reshape(shape_c), ctx0.d.reshape(shape_c)

    def forward(x, gamma, beta):
        red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
        x_hat = (x - x.mean(red, keepdims=True)) / np.sqrt(x.var(red, keepdims=True) + 1e-5)
        y = gamma.reshape(shape_c) * (r0 * x_hat + d0) + beta.reshape(shape_c)
        _, ctx = batch_renorm_forward(
            x, mu.copy(), sigma.copy(), gamma, beta, True, r_max=r_max, r_min=r_min, d_max=d_max, axis=axis
        )
        return y, ctx

    assert check_grad(forward, batch_renorm_backward, x, gamma, beta, n_directions=3) < 1e-7


@pytest.mark.parametrize("shape,axis", GRAD_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_functional_gradients(rng, shape, axis, training):
    """The kernel itself, where r and d are truly constant: pinned by the clipping, or evaluation."""
    c = shape[axis]
    x = rng.normal(size=shape) * 2 + 0.5
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    mu, sigma = rng.normal(size=c), rng.uniform(0.5, 2, c)

    def forward(x, gamma, beta):
        return batch_renorm_forward(
            x, mu.copy(), sigma.copy(), gamma, beta, training, r_max=1.3, r_min=1.3, d_max=0, axis=axis
        )

    assert check_grad(forward, batch_renorm_backward, x, gamma, beta, n_directions=3) < 1e-7


def test_layer_gradients_without_affine(rng):
    x = rng.normal(size=(6, 4))
    layer = bnorm.BatchRenorm1d(4, affine=False, r_max=0.5, r_min=0.5, d_max=0.0, dtype=np.float64)
    layer(rng.normal(size=(6, 4)) * 3)  # r = 0.5 pinned, d = 0

    def forward(x):
        state = layer.state_dict()
        y = layer(x)
        layer.load_state_dict(state)  # every evaluation starts from the same averages
        return y, layer._renorm_ctx

    check_grad(forward, lambda g, ctx: batch_renorm_backward(g, ctx)[0], x)
    layer(x)
    dx = layer.backward(np.ones_like(x))
    assert layer.grad_weight is None and layer.grad_bias is None
    assert dx.shape == x.shape


def test_r_and_d_are_constants_in_backward(rng):
    # with r = 2 and d = 1 pinned by the clipping, the gradients are batch norm's with gamma * r
    x = rng.normal(size=(8, 3)) * 5
    gamma, beta = rng.uniform(0.5, 2, 3), rng.normal(size=3)
    g = rng.normal(size=x.shape)
    y, ctx = batch_renorm_forward(
        x, np.full(3, -10.0), np.full(3, 0.01), gamma, beta, True, r_min=2, r_max=2, d_max=1
    )
    np.testing.assert_array_equal(ctx.r, 2.0)
    np.testing.assert_array_equal(ctx.d, 1.0)
    dx, dgamma, dbeta = batch_renorm_backward(g, ctx)
    _, bn = batch_norm_forward(x, None, None, 2 * gamma, beta, training=True)
    dx_bn = batch_norm_backward(g, bn)[0]
    np.testing.assert_allclose(dx, dx_bn, rtol=1e-12, atol=1e-12)
    x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(dgamma, (g * (2 * x_hat + 1)).sum(0), rtol=1e-12)
    np.testing.assert_allclose(dbeta, g.sum(0), rtol=1e-13)
    np.testing.assert_allclose(y, gamma * (2 * x_hat + 1) + beta, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 6),
    st.integers(1, 4),
    st.sampled_from([(), (3,), (2, 3)]),
    st.integers(0, 2**31),
    st.booleans(),
)
def test_no_correction_is_batch_norm(n, c, spatial, seed, keras_form):
    """r_max = r_min = 1 and d_max = 0: batch renorm is batch norm (forward, backward, running mean)."""
    rng = np.random.default_rng(seed)
    shape = (n, c, *spatial)
    x = rng.normal(size=shape) * rng.uniform(0.1, 10) + rng.normal() * 3
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    g = rng.normal(size=shape)
    conv = dict(convention="keras", axis=1, eps=1e-5) if keras_form else {}
    layer = bnorm.BatchRenorm(c, r_max=1, r_min=1, d_max=0, dtype=np.float64, **conv)
    ref = bnorm.BatchNorm(c, unbiased_running_var=False, dtype=np.float64, **conv)
    for lay in (layer, ref):
        lay.weight[...], lay.bias[...] = gamma, beta
    for _ in range(2):
        y, y_ref = layer(x), ref(x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.backward(g), ref.backward(g), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(layer.grad_weight, ref.grad_weight, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(layer.grad_bias, ref.grad_bias, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
        x = rng.normal(size=shape) + 1
    y = batch_renorm(x, np.zeros(c), np.ones(c), gamma, beta, True, r_max=1, r_min=1, d_max=0)
    np.testing.assert_allclose(
        y, batch_norm(x, None, None, gamma, beta, training=True), rtol=1e-12, atol=1e-12
    )


def test_functional_updates_in_place_and_eval_uses_sigma(rng):
    x = rng.normal(size=(5, 3)) + 2
    mu, sigma = np.zeros(3), np.ones(3)
    batch_renorm(x, mu, sigma, training=True, decay=0.9)
    np.testing.assert_allclose(mu, 0.1 * x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, 0.9 + 0.1 * np.sqrt(x.var(0) + 1e-5), rtol=1e-14)
    before = (mu.copy(), sigma.copy())
    y = batch_renorm(x, mu, sigma, np.full(3, 2.0), np.ones(3))
    np.testing.assert_allclose(y, 2 * (x - mu) / sigma + 1, rtol=1e-12)
    assert np.array_equal(mu, before[0]) and np.array_equal(sigma, before[1])
    y, ctx = batch_renorm_forward(x, mu, sigma)
    assert isinstance(ctx, BatchRenormContext) and ctx.batch_mean is None
    np.testing.assert_array_equal(ctx.r, 1.0)


def test_float32_layer_keeps_dtypes(rng):
    x = rng.normal(size=(8, 4)).astype(np.float32)
    layer = bnorm.BatchRenorm1d(4, r_max=3, d_max=5)
    y = layer(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == np.float32
    for name in ("running_mean", "running_var", "running_std", "grad_weight", "grad_bias"):
        assert getattr(layer, name).dtype == np.float32, name
    y16 = layer(x.astype(np.float16))
    assert y16.dtype == np.float16


def test_counter_and_nonfinite_skip(rng):
    layer = bnorm.BatchRenorm1d(3)
    x = rng.normal(size=(4, 3))
    x[0, 1] = np.nan
    state = layer.state_dict()
    with pytest.warns(
        RuntimeWarning, match="the batch was skipped and the running statistics were not updated"
    ):
        layer(x)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    layer(np.zeros((0, 3)))
    assert int(layer.num_batches_tracked) == 1  # the empty batch is counted, the NaN one is not


def test_cumulative_momentum(rng):
    layer = bnorm.BatchRenorm1d(2, momentum=None, dtype=np.float64)
    a, b = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    layer(a)
    layer(b)
    np.testing.assert_allclose(layer.running_mean, (a.mean(0) + b.mean(0)) / 2, rtol=1e-14)
    sig = (np.sqrt(a.var(0) + 1e-5) + np.sqrt(b.var(0) + 1e-5)) / 2
    np.testing.assert_allclose(layer.running_std, sig, rtol=1e-14)


def test_reset_and_recompute(rng):
    layer = bnorm.BatchRenorm1d(3, renorm_momentum=0.5, dtype=np.float64)
    data = [rng.normal(size=(6, 3)) + 1 for _ in range(3)]
    for x in data:
        layer(x)
    layer.recompute_running_stats(data)
    allx = np.concatenate(data)
    np.testing.assert_allclose(layer.running_mean, allx.mean(0), rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, allx.var(0), rtol=1e-13)
    np.testing.assert_allclose(layer.running_std, np.sqrt(allx.var(0) + 1e-5), rtol=1e-13)
    layer.reset_parameters()
    for name, value in [("running_mean", 0), ("running_var", 1), ("running_std", 1), ("renorm_mean", 0)]:
        np.testing.assert_array_equal(getattr(layer, name), value)
    np.testing.assert_array_equal(layer.renorm_std, 1)
    assert int(layer.num_batches_tracked) == 0


# -- conventions, repr, state ----------------------------------------------------------
def test_keras_preset_and_overrides():
    k = bnorm.BatchRenorm(4, convention="keras")
    assert (k.eps, k.axis, k.decay, k.renorm_decay, k.renorm_momentum) == (
        1e-3,
        -1,
        0.99,
        0.99,
        pytest.approx(0.01),
    )
    assert k.renorm_mean is not None
    k2 = bnorm.BatchRenorm(4, convention="keras", renorm_momentum=0.1)
    assert k2.renorm_decay is None and k2.renorm_momentum == 0.1
    p = bnorm.BatchRenorm(4)
    assert (p.eps, p.axis, p.momentum, p.renorm_momentum, p.renorm_decay) == (1e-5, 1, 0.1, None, None)
    assert p.renorm_mean is None
    assert repr(p) == "BatchRenorm(4, eps=1e-05, momentum=0.1)"
    assert repr(bnorm.BatchRenorm2d(2, affine=False, r_max=2, r_min=0.5, dtype=np.float64)) == (
        "BatchRenorm2d(2, eps=1e-05, momentum=0.1, affine=False, r_max=2.0, r_min=0.5, dtype=float64)"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(convention="keras", r_max=3, d_max=5),
        dict(renorm_momentum=0.2, r_min=0.5, momentum=None),
        dict(affine=False, decay=0.9, axis=-1, dtype=np.float64),
    ],
)
def test_state_dict_and_save_load_round_trip(rng, tmp_path, kwargs):
    layer = bnorm.BatchRenorm2d(3, **kwargs)
    ax = layer.axis
    shape = (4, 3, 2, 2) if ax == 1 else (4, 2, 2, 3)
    for _ in range(2):
        layer(rng.normal(size=shape))
    layer.r_max = 4.0  # changed after construction: the saved file keeps the current value
    path = tmp_path / "renorm.npz"
    bnorm.save(path, {"brn": layer})
    back = bnorm.load(path)["brn"]
    assert type(back) is bnorm.BatchRenorm2d and repr(back) == repr(layer)
    assert back.r_max == 4.0 and back.training
    sd, sd2 = layer.state_dict(), back.state_dict()
    assert list(sd) == list(sd2)
    for k in sd:
        np.testing.assert_array_equal(sd[k], sd2[k])
        assert sd[k].dtype == sd2[k].dtype
    x = rng.normal(size=shape)
    np.testing.assert_array_equal(layer(x), back(x))
    np.testing.assert_array_equal(layer.running_std, back.running_std)
    fresh = bnorm.BatchRenorm2d(3, **kwargs)
    fresh.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(fresh.running_std, layer.running_std)


def test_state_dict_keys():
    assert list(bnorm.BatchRenorm1d(2, convention="keras").state_dict()) == [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "running_std",
        "renorm_mean",
        "renorm_std",
        "num_batches_tracked",
    ]
    assert list(bnorm.BatchRenorm1d(2, affine=False).state_dict()) == [
        "running_mean",
        "running_var",
        "running_std",
        "num_batches_tracked",
    ]


def test_keras_weight_lists_round_trip(rng):
    layer = bnorm.BatchRenorm(3, convention="keras", r_max=2, d_max=1)
    for _ in range(2):
        layer(rng.normal(size=(5, 3)))
    weights = to_keras_weights(layer)
    assert len(weights) == 7
    back = from_keras(weights, renorm=True, renorm_clipping={"rmax": 2, "dmax": 1}, renorm_momentum=0.99)
    assert isinstance(back, bnorm.BatchRenorm) and not back.training
    assert (back.r_max, back.r_min, back.d_max, back.renorm_decay, back.decay) == (2.0, None, 1.0, 0.99, 0.99)
    for a, b in zip(to_keras_weights(back), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(back(x, training=True), layer(x, training=True))
    # the paper's form exports its running averages as the renorm ones
    paper = bnorm.BatchRenorm(3, axis=-1)
    w = to_keras_weights(paper)
    assert len(w) == 7
    np.testing.assert_array_equal(w[5], paper.running_mean)


def test_sync_batch_norm_refuses_renorm():
    with pytest.raises(ValueError, match="SyncBatchNorm does not support batch renormalization"):
        bnorm.SyncBatchNorm.from_batch_norm(bnorm.BatchRenorm1d(2))


# -- one test per error message ----------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(r_max=0), ValueError, r"r_max must be > 0 \(or None for no clipping\), got 0"),
        (dict(r_min=-1), ValueError, r"r_min must be >= 0 \(or None for no clipping\), got -1"),
        (dict(d_max=-0.5), ValueError, r"d_max must be >= 0 \(or None for no clipping\), got -0.5"),
        (dict(d_max=float("nan")), ValueError, r"d_max must be >= 0"),
        (dict(r_max="3"), TypeError, r"r_max must be a number or None \(unclipped\), got str"),
        (dict(r_max=2, r_min=3), ValueError, r"r_min must be <= r_max, got r_min=3 and r_max=2"),
        (
            dict(renorm_momentum=0.1, renorm_decay=0.9),
            ValueError,
            r"give either renorm_momentum \(weight on the new batch\) or renorm_decay",
        ),
        (dict(renorm_decay=1.5), ValueError, r"renorm_decay must be in \[0, 1\], got 1.5"),
        (dict(renorm_momentum=-0.1), ValueError, r"renorm_momentum must be in \[0, 1\], got -0.1"),
        (dict(renorm_momentum="0.1"), TypeError, r"renorm_momentum must be a number in \[0, 1\], got str"),
        (dict(momentum=0.1, decay=0.9), ValueError, "give either momentum"),
        (dict(convention="pytorch"), ValueError, "convention must be one of"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bnorm.BatchRenorm(3, **kwargs)


def test_attribute_errors_change_nothing(rng):
    layer = bnorm.BatchRenorm1d(3, r_max=2.0, r_min=0.5)
    with pytest.raises(ValueError, match="r_max must be > 0"):
        layer.r_max = -1
    assert layer.r_max == 2.0
    layer.r_min = 3.0  # each limit alone is valid; the pair is checked when it is used
    state = layer.state_dict()
    with pytest.raises(ValueError, match=r"r_min must be <= r_max, got r_min=3\.0 and r_max=2\.0"):
        layer(rng.normal(size=(4, 3)))
    assert int(layer.num_batches_tracked) == 0
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_forward_errors(rng):
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        bnorm.BatchRenorm1d(3)(np.zeros((2, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bnorm.BatchRenorm2d(3)(np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
        bnorm.BatchRenorm3d(3)(np.zeros((2, 3, 2, 2)))
    with pytest.raises(ValueError, match="expected input with 3 channels on axis 1"):
        bnorm.BatchRenorm(3)(np.zeros((2, 4)))
    layer = bnorm.BatchRenorm(3)
    with pytest.raises(
        ValueError, match=r"Expected more than 1 value per channel when training, got input size \(1, 3\)"
    ):
        layer(np.zeros((1, 3)))
    assert int(layer.num_batches_tracked) == 0
    with pytest.raises(RuntimeError, match="backward called before forward"):
        bnorm.BatchRenorm(3).backward(np.zeros((2, 3)))
    with pytest.raises(
        TypeError, match="input must have a real floating, integer or bool dtype, got dtype complex128"
    ):
        bnorm.BatchRenorm(3)(np.zeros((2, 3), complex))
    y = bnorm.BatchRenorm(3)(np.arange(6).reshape(2, 3))  # integers are promoted, as batch norm does
    assert y.dtype == np.float64


def test_functional_errors(rng):
    x = rng.normal(size=(4, 3))
    with pytest.raises(ValueError, match="running_std must be given: batch renormalization corrects"):
        batch_renorm(x, np.zeros(3), None, training=True)
    with pytest.raises(TypeError, match="running_mean must be a NumPy array of shape"):
        batch_renorm(x, [0.0, 0.0, 0.0], np.ones(3), training=True)
    with pytest.raises(
        ValueError, match=r"running_std must have shape \(3,\) to match input.shape\[1\], got \(2,\)"
    ):
        batch_renorm(x, np.zeros(3), np.ones(2), training=True)
    with pytest.raises(ValueError, match="give either momentum"):
        batch_renorm(x, np.zeros(3), np.ones(3), training=True, momentum=0.2, decay=0.9)
    with pytest.raises(ValueError, match="input must have at least 2 dimensions"):
        batch_renorm(np.zeros(3), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="eps must be > 0 when batch statistics are used"):
        batch_renorm(x, np.zeros(3), np.ones(3), training=True, eps=0)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        batch_renorm(x, np.zeros(3), np.ones(3), on_nonfinite="ignore")
    with pytest.raises(
        TypeError, match="ctx must be the BatchRenormContext returned by batch_renorm_forward"
    ):
        batch_renorm_backward(x, object())
    bad = x.copy()
    bad[0, 0] = np.inf
    mu, sigma = np.zeros(3), np.ones(3)
    with pytest.raises(FloatingPointError, match="running statistics left unchanged"):
        batch_renorm(bad, mu, sigma, training=True, on_nonfinite="raise")
    assert not mu.any() and (sigma == 1).all()


def test_from_keras_weight_list_errors():
    w = [np.ones(3, np.float32)] * 7
    with pytest.raises(ValueError, match=r"expected 7 Keras weights \(gamma, beta, moving_mean"):
        from_keras(w[:4], renorm=True)
    with pytest.raises(
        ValueError, match=r"renorm_clipping keys must be among 'rmax', 'rmin', 'dmax', got \['r_max'\]"
    ):
        from_keras(w, renorm=True, renorm_clipping={"r_max": 3})


def test_peak_memory_is_batch_norms(rng):
    """Renorm adds only per-channel vectors to batch norm: no full-size temporaries."""
    from test_memory import BOUND, SHAPE, peak_extra

    x = rng.standard_normal(SHAPE, dtype=np.float32)
    g = rng.standard_normal(x.shape, dtype=np.float32)
    layer = bnorm.BatchRenorm2d(SHAPE[1], r_max=3, d_max=5)
    assert peak_extra(lambda: layer(x)) <= BOUND * x.nbytes
    assert peak_extra(lambda: layer.backward(g)) <= BOUND * x.nbytes


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 2**31))
def test_unclipped_training_output_is_the_inference_output(n, c, seed):
    """r * x_hat + d = (x - mu) / sigma: unclipped renorm trains on what inference computes."""
    rng = np.random.default_rng(seed)
    layer = bnorm.BatchRenorm1d(c, dtype=np.float64)
    layer.weight[...], layer.bias[...] = rng.uniform(0.5, 2, c), rng.normal(size=c)
    for _ in range(3):
        layer(rng.normal(size=(n, c)) * 2 + 1)
    x = rng.normal(size=(n, c)) * 3 - 1
    expected = layer(x, training=False)  # the moving statistics before the step
    np.testing.assert_allclose(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_keras_renorm_momentum_written_as_renorm_momentum_warns():
    with pytest.warns(
        bnorm.MomentumConventionWarning, match=r"write renorm_decay=0\.99 \(or renorm_momentum=0\.01\)"
    ):
        layer = bnorm.BatchRenorm(3, renorm_momentum=0.99)
    assert layer.renorm_momentum == 0.99
    with pytest.warns(bnorm.MomentumConventionWarning, match=r"write decay=0\.9 \(or momentum=0\.1\)"):
        bnorm.BatchRenorm(3, momentum=0.9)


def test_load_checks_every_renorm_buffer_shape_before_building(tmp_path):
    import zipfile

    path = tmp_path / "brn.npz"
    bnorm.save(path, bnorm.BatchRenorm1d(3, convention="keras"))
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["renorm_std"] = np.ones(4, np.float32)  # a tampered file
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w") as zf:
        for key, arr in arrays.items():
            with zf.open(key + ".npy", "w") as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    with pytest.raises(
        ValueError, match=r"its arguments give 'renorm_std' the shape \(3,\), the file holds \(4,\)"
    ):
        bnorm.load(bad)
    shapes = bnorm.BatchRenorm._state_shapes({"num_features": 3})
    assert set(shapes) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "running_std",
        "num_batches_tracked",
    }
