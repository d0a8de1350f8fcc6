"""Cross-checks against Keras 3 BatchNormalization on the torch backend (skipped without keras)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import bnorm

os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip("torch")
keras = pytest.importorskip("keras")


@pytest.mark.parametrize("shape", [(3, 2), (4, 5, 2), (2, 3, 4, 2)])
def test_keras_convention_several_steps(shape):
    rng = np.random.default_rng(5)
    kl = keras.layers.BatchNormalization()
    kl.build(shape)
    bb = bnorm.BatchNorm(shape[-1], convention="keras")
    for _ in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        yk = keras.ops.convert_to_numpy(kl(x, training=True))
        y = bb(x)
        np.testing.assert_allclose(y, yk, rtol=1e-5, atol=1e-5)
    mm, mv = (keras.ops.convert_to_numpy(v) for v in kl.get_weights()[2:])
    np.testing.assert_allclose(bb.running_mean, mm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bb.running_var, mv, rtol=1e-6, atol=1e-7)
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(
        bb.eval()(x), keras.ops.convert_to_numpy(kl(x, training=False)), rtol=1e-5, atol=1e-5
    )


def test_semantics_vector5():
    kl = keras.layers.BatchNormalization()
    x = np.array([[1, 2], [3, 6], [5, 10]], np.float32)
    kl(x, training=True)
    bb = bnorm.BatchNorm(2, convention="keras")
    bb(x)
    mm, mv = kl.get_weights()[2:]
    np.testing.assert_allclose(bb.running_mean, mm, rtol=1e-6)
    np.testing.assert_allclose(bb.running_var, mv, rtol=1e-6)
    np.testing.assert_allclose(bb.running_var, [1.0166667, 1.0966667], rtol=1e-6)


def test_bnorm_load_names_real_keras_files(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    model.save(tmp_path / "model.keras")
    model.save_weights(tmp_path / "model.weights.h5")
    with pytest.raises(
        ValueError, match=r"model\.keras is a Keras 3 model archive .*bnorm\.interop\.from_keras"
    ):
        bnorm.load(tmp_path / "model.keras")
    with pytest.raises(ValueError, match=r"model\.weights\.h5 is an HDF5 file .*keras\.models\.load_model"):
        bnorm.load(tmp_path / "model.weights.h5")
