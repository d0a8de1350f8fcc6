"""Ghost batch norm and batch renormalization against tf.keras (skipped without tf_keras).

Ghost batches: ``BatchNormalization(virtual_batch_size=...)``.
tf.keras forms its virtual batches by reshaping the batch to ``(v, N / v, ...)``
and reducing over the first axis, so virtual batch j holds samples ``j, j + G,
j + 2G, ...``: bnorm's ``virtual_batch_split="strided"``.  Its moving averages
absorb the mean of the virtual batches' means and of their biased variances
(the non-fused path it takes with virtual batches), ``moving = moving * m +
value * (1 - m)``.  TensorFlow computes in float32, so the match is at float32
rounding.

Batch renormalization: tf.keras's ``renorm=True`` is the algorithm Keras 3
kept (r and d against ``renorm_mean``/``renorm_stddev`` floored at
``sqrt(eps)``, ``moving_variance = relu(moving_stddev**2 - eps)``), so
``BatchRenorm(convention="keras")`` matches it too.

Not installed in CI (TensorFlow is large); run locally with
``pip install tensorflow-cpu tf_keras`` in a separate environment.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import bnorm

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf_keras = pytest.importorskip("tf_keras")
tf = pytest.importorskip("tensorflow")


def _tf_step(kl, x, u):
    """A training call of tf.keras layer `kl` and the gradients of <u, y> for x, gamma and beta."""
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        yk = kl(xt, training=True)
        loss = tf.reduce_sum(yk * u)
    return (yk, *tape.gradient(loss, [xt, kl.gamma, kl.beta]))


def _close(actual, expected, what):
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-6 * scale, err_msg=what)


@pytest.mark.parametrize(
    "shape,v,axis",
    [
        ((12, 4), 3, -1),
        ((8, 5, 3), 4, -1),
        ((6, 2, 3, 3), 2, -1),
        ((8, 3, 4), 2, 1),
        ((8, 2, 2, 2, 3), 4, -1),
    ],
)
def test_strided_split_matches_tf_keras(shape, v, axis):
    rng = np.random.default_rng(0)
    c = shape[axis]
    kl = tf_keras.layers.BatchNormalization(virtual_batch_size=v, momentum=0.9, axis=axis)
    kl.build(shape)
    gamma, beta = rng.uniform(0.5, 2, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    kl.set_weights([gamma.reshape(kl.gamma.shape), beta.reshape(kl.beta.shape), *kl.get_weights()[2:]])
    layer = bnorm.BatchNorm(
        c, convention="keras", decay=0.9, axis=axis, virtual_batch_size=v, virtual_batch_split="strided"
    )
    layer.weight[...], layer.bias[...] = gamma, beta
    for step in range(3):
        x = (rng.normal(size=shape) * (step + 1) + step).astype(np.float32)
        u = rng.normal(size=shape).astype(np.float32)
        yk, gx, gg, gb = _tf_step(kl, x, u)
        _close(layer(x), yk.numpy(), "output")
        _close(layer.backward(u), gx.numpy(), "dx")
        _close(layer.grad_weight, gg.numpy().reshape(-1), "dgamma")
        _close(layer.grad_bias, gb.numpy().reshape(-1), "dbeta")
        mm, mv = (w.reshape(-1) for w in kl.get_weights()[2:])
        _close(layer.running_mean, mm, "moving_mean")
        _close(layer.running_var, mv, "moving_variance")
    x = rng.normal(size=(2, *shape[1:])).astype(np.float32)
    _close(layer.eval()(x), kl(x, training=False).numpy(), "inference")


@pytest.mark.parametrize("clipping", [{}, {"rmax": 1.4, "rmin": 0.8, "dmax": 0.3}])
@pytest.mark.parametrize("shape,axis", [((8, 4), -1), ((4, 3, 3, 2), -1)])
def test_renorm_matches_tf_keras(shape, axis, clipping):
    rng = np.random.default_rng(1)
    c = shape[axis]
    kl = tf_keras.layers.BatchNormalization(
        momentum=0.8, renorm=True, renorm_clipping=dict(clipping), renorm_momentum=0.7, axis=axis
    )
    kl.build(shape)
    gamma, beta = rng.uniform(0.5, 2, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    kl.gamma.assign(gamma)
    kl.beta.assign(beta)
    layer = bnorm.BatchRenorm(
        c,
        convention="keras",
        decay=0.8,
        renorm_decay=0.7,
        axis=axis,
        r_max=clipping.get("rmax"),
        r_min=clipping.get("rmin"),
        d_max=clipping.get("dmax"),
    )
    layer.weight[...], layer.bias[...] = gamma, beta
    names = {
        "moving_mean": "running_mean",
        "moving_variance": "running_var",
        "moving_stddev": "running_std",
        "renorm_mean": "renorm_mean",
        "renorm_stddev": "renorm_std",
    }
    for step in range(4):
        x = (rng.normal(size=shape) * (1 + step) + step).astype(np.float32)
        u = rng.normal(size=shape).astype(np.float32)
        yk, gx, gg, gb = _tf_step(kl, x, u)
        _close(layer(x), yk.numpy(), "output")
        _close(layer.backward(u), gx.numpy(), "dx")
        _close(layer.grad_weight, gg.numpy(), "dgamma")
        _close(layer.grad_bias, gb.numpy(), "dbeta")
        for var in kl.non_trainable_weights:
            key = var.name.split("/")[-1].split(":")[0]
            _close(getattr(layer, names[key]), var.numpy(), key)
