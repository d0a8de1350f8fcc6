"""Ghost (virtual) batch norm: against plain BatchNorm looped over the virtual batches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnorm
from bnorm.testing import check_grad


def _groups(n, v, split):
    g = n // v
    if split == "contiguous":
        return [np.arange(j * v, (j + 1) * v) for j in range(g)]
    return [np.arange(j, n, g) for j in range(g)]


def _reference(x, g, v, split, layer_kwargs, gamma, beta):
    """Plain BatchNorm per virtual batch: outputs, gradients and the running update by hand."""
    y, dx = np.empty_like(x), np.empty_like(x)
    dgamma, dbeta = np.zeros_like(gamma), np.zeros_like(beta)
    means, vars_ = [], []
    for idx in _groups(x.shape[0], v, split):
        bn = bnorm.BatchNorm(len(gamma), dtype=np.float64, **layer_kwargs)
        bn.weight[...], bn.bias[...] = gamma, beta
        y[idx] = bn(x[idx])
        dx[idx] = bn.backward(g[idx])
        dgamma += bn.grad_weight
        dbeta += bn.grad_bias
        ax = bn.axis % x.ndim
        rows = np.moveaxis(x[idx], ax, -1).reshape(-1, x.shape[ax])
        means.append(rows.mean(0))
        vars_.append(rows.var(0, ddof=1 if bn.unbiased_running_var else 0))
    return y, dx, dgamma, dbeta, np.mean(means, 0), np.mean(vars_, 0)


CASES = [((12, 3), 1, 4), ((8, 3, 5), 1, 2), ((6, 4, 2, 3), -1, 3), ((4, 2, 2, 2, 3), 1, 2), ((10, 5), -1, 5)]


@pytest.mark.parametrize("shape,axis,v", CASES)
@pytest.mark.parametrize("split", ["contiguous", "strided"])
@pytest.mark.parametrize("conv", [{}, {"convention": "keras"}, {"momentum": None}])
def test_matches_batch_norm_looped_over_virtual_batches(rng, shape, axis, v, split, conv):
    c = shape[axis]
    kwargs = dict(conv, axis=axis)
    layer = bnorm.BatchNorm(c, virtual_batch_size=v, virtual_batch_split=split, dtype=np.float64, **kwargs)
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    layer.weight[...], layer.bias[...] = gamma, beta
    running = bnorm.BatchNorm(c, dtype=np.float64, **kwargs)  # the expected running statistics
    for step in range(3):
        x = rng.normal(size=shape) * (step + 1) + rng.normal(
            size=c if axis == -1 else (c,) + (1,) * (len(shape) - 2)
        )
        g = rng.normal(size=shape)
        y, dx = layer(x), layer.backward(g)
        y_ref, dx_ref, dgamma, dbeta, mean_bar, var_bar = _reference(x, g, v, split, kwargs, gamma, beta)
        np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.grad_weight, dgamma, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.grad_bias, dbeta, rtol=1e-12, atol=1e-12)
        count = step + 1
        r = running._running
        running.running_mean[...] = r.update(running.running_mean, mean_bar, count)
        running.running_var[...] = r.update(running.running_var, var_bar, count)
        np.testing.assert_allclose(layer.running_mean, running.running_mean, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(layer.running_var, running.running_var, rtol=1e-13)
    assert int(layer.num_batches_tracked) == 3
    # evaluation: plain batch norm with the running statistics, any batch size
    x = rng.normal(size=(1, *shape[1:]))
    ref = bnorm.BatchNorm(c, dtype=np.float64, **kwargs).eval()
    ref.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(layer.eval()(x), ref(x))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 6),
    st.integers(1, 4),
    st.sampled_from([(), (3,), (2, 2)]),
    st.sampled_from(["contiguous", "strided"]),
    st.integers(0, 2**31),
)
def test_one_virtual_batch_is_batch_norm(n, c, spatial, split, seed):
    rng = np.random.default_rng(seed)
    shape = (n, c, *spatial)
    ghost = bnorm.BatchNorm(c, virtual_batch_size=n, virtual_batch_split=split, dtype=np.float64)
    plain = bnorm.BatchNorm(c, dtype=np.float64)
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    for layer in (ghost, plain):
        layer.weight[...], layer.bias[...] = gamma, beta
    for _ in range(2):
        x = rng.normal(size=shape) * rng.uniform(0.1, 10) + rng.normal()
        g = rng.normal(size=shape)
        np.testing.assert_allclose(ghost(x), plain(x), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(ghost.backward(g), plain.backward(g), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(ghost.grad_weight, plain.grad_weight, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(ghost.grad_bias, plain.grad_bias, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(ghost.running_mean, plain.running_mean, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(ghost.running_var, plain.running_var, rtol=1e-14)


@pytest.mark.parametrize("split", ["contiguous", "strided"])
def test_gradient_check(rng, split):
    x = rng.normal(size=(8, 3, 4))
    gamma, beta = rng.uniform(0.5, 2, 3), rng.normal(size=3)
    layer = bnorm.BatchNorm1d(3, virtual_batch_size=2, virtual_batch_split=split, dtype=np.float64)

    def forward(x, gamma, beta):
        layer.weight, layer.bias = gamma, beta
        y = layer(x)
        return y, layer

    def backward(g, lay):
        dx = lay.backward(g)
        return dx, lay.grad_weight, lay.grad_bias

    assert check_grad(forward, backward, x, gamma, beta, n_directions=3) < 1e-7


def test_without_running_stats_evaluation_is_ghost_too(rng):
    x = rng.normal(size=(6, 2))
    layer = bnorm.BatchNorm1d(2, track_running_stats=False, virtual_batch_size=3, dtype=np.float64).eval()
    y = layer(x)
    np.testing.assert_allclose(
        y[:3], bnorm.functional.batch_norm(x[:3], None, None, training=True), atol=1e-14
    )
    with pytest.raises(ValueError, match="virtual_batch_size=3 must divide the batch size"):
        layer(x[:4])


def test_float32_and_float16(rng):
    x = rng.normal(size=(8, 4)).astype(np.float32)
    layer = bnorm.BatchNorm1d(4, virtual_batch_size=4)
    y = layer(x)
    assert y.dtype == np.float32 and layer.backward(np.ones_like(y)).dtype == np.float32
    assert layer.grad_weight.dtype == np.float32
    ref = np.concatenate(
        [
            bnorm.functional.batch_norm(x[:4], None, None, training=True),
            bnorm.functional.batch_norm(x[4:], None, None, training=True),
        ]
    )
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert layer(x.astype(np.float16)).dtype == np.float16


def test_empty_batch_and_nonfinite(rng):
    layer = bnorm.BatchNorm1d(3, virtual_batch_size=2)
    assert layer(np.zeros((0, 3))).shape == (0, 3)
    assert int(layer.num_batches_tracked) == 1  # as plain batch norm counts an empty batch
    x = rng.normal(size=(4, 3))
    x[3, 0] = np.nan
    with pytest.warns(
        RuntimeWarning, match="the batch was skipped and the running statistics were not updated"
    ):
        layer(x)
    assert int(layer.num_batches_tracked) == 1
    np.testing.assert_array_equal(layer.running_mean, 0)


def test_config_repr_and_save_load(rng, tmp_path):
    layer = bnorm.BatchNorm2d(3, virtual_batch_size=2, virtual_batch_split="strided", convention="keras")
    assert repr(layer).endswith("virtual_batch_size=2, virtual_batch_split='strided')")
    x = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
    layer(x)
    path = tmp_path / "ghost.npz"
    bnorm.save(path, layer)
    back = bnorm.load(path)
    assert (back.virtual_batch_size, back.virtual_batch_split) == (2, "strided")
    assert repr(back) == repr(layer)
    np.testing.assert_array_equal(back(x), layer(x))
    np.testing.assert_array_equal(back.running_var, layer.running_var)
    assert repr(bnorm.BatchNorm1d(3, virtual_batch_size=4)).endswith("virtual_batch_size=4)")


# -- one test per error message --------------------------------------------------------
def test_errors(rng):
    layer = bnorm.BatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(
        ValueError,
        match=r"virtual_batch_size=4 must divide the batch size, got input of shape \(10, 3\) \(batch size 10\); "
        r"use batches whose size is a multiple of 4",
    ):
        layer(rng.normal(size=(10, 3)))
    assert int(layer.num_batches_tracked) == 0 and not layer.running_mean.any()
    with pytest.raises(
        ValueError, match="Expected more than 1 value per channel when training, got virtual batches of 1"
    ):
        bnorm.BatchNorm1d(3, virtual_batch_size=1)(rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match="the channel axis cannot be 0, got axis=0"):
        bnorm.BatchNorm(4, axis=0, virtual_batch_size=2)(rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int, got 0"):
        bnorm.BatchNorm1d(3, virtual_batch_size=0)
    with pytest.raises(TypeError, match="virtual_batch_size must be a positive int, got float"):
        bnorm.BatchNorm1d(3, virtual_batch_size=2.0)
    with pytest.raises(
        ValueError, match="virtual_batch_split must be one of 'contiguous', 'strided', got 'chunks'"
    ):
        bnorm.BatchNorm1d(3, virtual_batch_size=2, virtual_batch_split="chunks")
    with pytest.raises(
        ValueError, match=r"SyncBatchNorm does not support ghost batch norm \(virtual_batch_size\)"
    ):
        bnorm.SyncBatchNorm.from_batch_norm(bnorm.BatchNorm1d(3, virtual_batch_size=2))
    with pytest.raises(ValueError, match=r"grad_output must have the input's shape \(4, 3\), got \(2, 3\)"):
        layer(rng.normal(size=(4, 3)))
        layer.backward(np.zeros((2, 3)))


def test_peak_memory(rng):
    """Forward: the output only; backward: the output and one full-size x_hat (the textbook has more)."""
    from test_memory import peak_extra

    x = rng.standard_normal((64, 64, 14, 14), dtype=np.float32)
    g = rng.standard_normal(x.shape, dtype=np.float32)
    for split in ("contiguous", "strided"):
        layer = bnorm.BatchNorm2d(64, virtual_batch_size=16, virtual_batch_split=split)
        assert peak_extra(lambda layer=layer: layer(x)) <= 1.1 * x.nbytes, split
        assert peak_extra(lambda layer=layer: layer.backward(g)) <= 2.1 * x.nbytes, split


def test_attributes_reset_later_are_checked(rng):
    layer = bnorm.BatchNorm1d(3, virtual_batch_size=2)
    layer.virtual_batch_size = -2
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int, got -2"):
        layer(rng.normal(size=(4, 3)))
    layer.virtual_batch_size, layer.virtual_batch_split = 2, "interleaved"
    with pytest.raises(ValueError, match="virtual_batch_split must be one of"):
        layer(rng.normal(size=(4, 3)))
    layer.virtual_batch_split = "strided"
    assert layer(rng.normal(size=(4, 3))).shape == (4, 3)
    assert int(layer.num_batches_tracked) == 1
