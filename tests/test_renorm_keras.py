"""Batch renormalization against Keras 3 ``BatchNormalization(renorm=True)`` on the torch backend.

Keras computes batch normalization in float32 whatever the dtype policy (its
``result_type(float64, "float32")`` is float32), so the comparison is at
float32 rounding: forward, gradients from torch autograd (random upstream
gradient, random gamma), and every moving variable, over several steps.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import bnorm
from bnorm.interop import from_keras, to_keras_weights

os.environ.setdefault("KERAS_BACKEND", "torch")
torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

VARIABLES = [
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
    ("moving_stddev", "running_std"),
    ("renorm_mean", "renorm_mean"),
    ("renorm_stddev", "renorm_std"),
]


def _close(actual, expected, what):
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-6 * scale, err_msg=what)


def _keras_vars(kl):
    return {v.name: keras.ops.convert_to_numpy(v) for v in kl.weights}


def _step(kl, layer, x, u):
    """One training step in both; compares output, dx, dgamma, dbeta and every moving variable."""
    xt = torch.tensor(x, requires_grad=True)
    yk = kl(xt, training=True)
    (yk * torch.tensor(u)).sum().backward()
    y = layer(x)
    dx = layer.backward(u)
    _close(y, yk.detach().numpy(), "output")
    _close(dx, xt.grad.numpy(), "dx")
    checks = 2
    for name, grad in (("gamma", layer.grad_weight), ("beta", layer.grad_bias)):
        var = getattr(kl, name)
        if var is not None:
            _close(grad, var.value.grad.numpy(), f"d{name}")
            var.value.grad = None
            checks += 1
    kv = _keras_vars(kl)
    for kname, bname in VARIABLES:
        _close(getattr(layer, bname), kv[kname], kname)
        checks += 1
    return checks


CLIPPINGS = [
    {},
    {"rmax": 1.5, "rmin": 0.7, "dmax": 0.4},
    {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0},
    {"dmax": 0.1},
]
SHAPES = [((8, 4), -1), ((4, 3, 5), -1), ((3, 4, 2, 2), 1), ((2, 3, 3, 2, 4), -1)]


@pytest.mark.parametrize(
    "clipping", CLIPPINGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "unclipped"
)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=lambda s: str(s))
def test_several_steps_match_keras(shape, axis, clipping):
    rng = np.random.default_rng(17)
    c = shape[axis]
    kl = keras.layers.BatchNormalization(
        axis=axis, momentum=0.8, renorm=True, renorm_clipping=dict(clipping), renorm_momentum=0.7
    )
    kl.build(shape)
    gamma, beta = rng.uniform(0.5, 2, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    kl.gamma.assign(gamma)
    kl.beta.assign(beta)
    layer = bnorm.BatchRenorm(
        c,
        convention="keras",
        axis=axis,
        decay=0.8,
        renorm_decay=0.7,
        r_max=clipping.get("rmax"),
        r_min=clipping.get("rmin"),
        d_max=clipping.get("dmax"),
    )
    layer.weight[...], layer.bias[...] = gamma, beta
    for step in range(4):
        # batches that drift, so r and d move away from 1 and 0
        x = (rng.normal(size=shape) * (1 + step) + step).astype(np.float32)
        u = rng.normal(size=shape).astype(np.float32)
        _step(kl, layer, x, u)
    x = rng.normal(size=shape).astype(np.float32)
    _close(layer.eval()(x), keras.ops.convert_to_numpy(kl(x, training=False)), "inference")


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_without_gamma_or_beta(center, scale):
    rng = np.random.default_rng(3)
    kl = keras.layers.BatchNormalization(center=center, scale=scale, renorm=True, renorm_clipping={"rmax": 2})
    kl.build((6, 3))
    for _ in range(3):
        x = (rng.normal(size=(6, 3)) * 3 + 1).astype(np.float32)
        kl(x, training=True)
    layer = from_keras(kl)
    assert isinstance(layer, bnorm.BatchRenorm)
    assert (layer.weight is None) == (not scale) and (layer.bias is None) == (not center)
    layer.train()
    for _ in range(3):
        x = (rng.normal(size=(6, 3)) * 2 - 1).astype(np.float32)
        _step(kl, layer, x, rng.normal(size=(6, 3)).astype(np.float32))


def test_from_keras_reads_every_variable_and_continues_training():
    rng = np.random.default_rng(11)
    clip = {"rmax": 3.0, "rmin": 0.25, "dmax": 2.0}
    kl = keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-4, renorm=True, renorm_clipping=clip, renorm_momentum=0.6
    )
    kl.build((5, 4))
    kl.gamma.assign(rng.uniform(0.5, 2, 4).astype(np.float32))
    for _ in range(3):
        kl((rng.normal(size=(5, 4)) * 2 + 3).astype(np.float32), training=True)
    layer = from_keras(kl)
    assert isinstance(layer, bnorm.BatchRenorm) and not layer.training
    assert (layer.r_max, layer.r_min, layer.d_max) == (3.0, 0.25, 2.0)
    assert (layer.decay, layer.renorm_decay, layer.eps, layer.axis) == (0.9, 0.6, 1e-4, -1)
    kv = _keras_vars(kl)
    for kname, bname in [("gamma", "weight"), ("beta", "bias"), *VARIABLES]:
        np.testing.assert_array_equal(getattr(layer, bname), kv[kname], err_msg=kname)
    for a, b in zip(to_keras_weights(layer), kl.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    _close(layer(x), keras.ops.convert_to_numpy(kl(x, training=False)), "inference after conversion")
    layer.train()
    for _ in range(3):
        x = (rng.normal(size=(5, 4)) + 1).astype(np.float32)
        _step(kl, layer, x, rng.normal(size=(5, 4)).astype(np.float32))
    # and back: a Keras layer given bnorm's weights continues identically
    k2 = keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-4, renorm=True, renorm_clipping=clip, renorm_momentum=0.6
    )
    k2.build((5, 4))
    k2.set_weights(to_keras_weights(layer))
    x = rng.normal(size=(5, 4)).astype(np.float32)
    _close(layer(x), keras.ops.convert_to_numpy(k2(x, training=True)), "output after set_weights")


def test_from_keras_model_converts_renorm_layers():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0}, name="brn"),
            keras.layers.BatchNormalization(name="bn"),
        ]
    )
    layers = from_keras(model)
    assert list(layers) == ["brn", "bn"]
    assert isinstance(layers["brn"], bnorm.BatchRenorm) and layers["brn"].r_max == 2.0
    assert type(layers["bn"]) is bnorm.BatchNorm
