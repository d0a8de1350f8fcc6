"""bnorm.interop against real PyTorch modules and Keras 3 layers (torch backend)."""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # before anything imports keras

import subprocess
import sys

import numpy as np
import pytest

import bnorm
from bnorm.interop import from_keras, from_torch, to_keras_weights


def test_bnorm_never_imports_torch_or_keras():
    code = (
        "import sys, bnorm, bnorm.interop, bnorm.fold, bnorm.io;"
        "assert not {'torch', 'keras', 'tensorflow'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")},
    )


# -- PyTorch ---------------------------------------------------------------------
def torch_trained(torch, dims, momentum, affine, track, dtype, steps=4, seed=0):
    """A torch BatchNorm{dims}d after `steps` SGD steps on a random loss."""
    g = torch.Generator().manual_seed(seed)
    m = getattr(torch.nn, f"BatchNorm{dims}d")(
        3, eps=1e-4, momentum=momentum, affine=affine, track_running_stats=track
    ).to(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1) if affine else None
    shape = (5, 3) + (4,) * dims if dims > 1 else (5, 3)
    for _ in range(steps):
        x = 1 + 2 * torch.randn(*shape, generator=g, dtype=dtype)
        loss = (m(x) * torch.randn(*shape, generator=g, dtype=dtype)).sum()
        if opt:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m, shape


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)])
def test_from_torch_module_matches_in_eval_and_train(dims, momentum, affine, track):
    torch = pytest.importorskip("torch")
    m, shape = torch_trained(torch, dims, momentum, affine, track, torch.float64)
    bn = from_torch(m)
    assert type(bn) is getattr(bnorm, f"BatchNorm{dims}d")
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-4, momentum, affine, track)
    assert bn.training and bn.dtype == np.float64
    tsd = m.state_dict()
    assert list(bn.state_dict()) == list(tsd)
    for k, v in tsd.items():
        np.testing.assert_array_equal(bn.state_dict()[k], v.detach().numpy())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mode in (False, True, True, False):  # eval, two more training steps, eval again
            m.train(mode)
            bn.train(mode)
            x = 1 + 2 * torch.randn(*shape, generator=g, dtype=torch.float64)
            np.testing.assert_allclose(bn(x.numpy()), m(x).numpy(), rtol=1e-12, atol=1e-12)
    for k, v in m.state_dict().items():
        np.testing.assert_allclose(bn.state_dict()[k], v.numpy(), rtol=1e-12)


def test_from_torch_float32_and_eval_mode():
    torch = pytest.importorskip("torch")
    m, shape = torch_trained(torch, 2, 0.1, True, True, torch.float32)
    m.eval()
    bn = from_torch(m)
    assert bn.dtype == np.float32 and bn.training is False
    x = torch.randn(*shape)
    with torch.no_grad():
        np.testing.assert_allclose(bn(x.numpy()), m(x).numpy(), rtol=1e-5, atol=1e-6)


def test_from_torch_state_dict_gives_batchnorm():
    torch = pytest.importorskip("torch")
    m, shape = torch_trained(torch, 2, 0.1, True, True, torch.float64)
    m.eps = 1e-5
    bn = from_torch(m.state_dict())
    assert type(bn) is bnorm.BatchNorm and (bn.eps, bn.momentum) == (1e-5, 0.1)
    assert int(bn.num_batches_tracked) == 4
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(bn.eval()(x.numpy()), m.eval()(x).numpy(), rtol=1e-12)
    st = from_torch(torch.nn.BatchNorm1d(3, affine=False).state_dict())
    assert (st.affine, st.track_running_stats) == (False, True)


def test_from_torch_syncbatchnorm():
    torch = pytest.importorskip("torch")
    m = torch.nn.SyncBatchNorm(3, momentum=0.2)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    bn = from_torch(m)
    assert type(bn) is bnorm.BatchNorm and bn.momentum == 0.2 and bn.axis == 1
    np.testing.assert_array_equal(bn.running_mean, [1, 2, 3])


def test_from_torch_duck_typed_module_without_torch():
    class BatchNorm1d:  # looks like torch's to from_torch
        num_features, eps, momentum, affine, track_running_stats, training = 2, 1e-3, 0.5, True, True, False

        def state_dict(self):
            return {
                "weight": [2.0, 3.0],
                "bias": [0.0, 1.0],
                "running_mean": [1.0, 1.0],
                "running_var": [4.0, 4.0],
                "num_batches_tracked": 3,
            }

    bn = from_torch(BatchNorm1d())
    assert type(bn) is bnorm.BatchNorm1d and bn.training is False and bn.momentum == 0.5
    assert bn.dtype == np.float64 and int(bn.num_batches_tracked) == 3


def test_from_torch_errors():
    class Linear:
        pass

    with pytest.raises(
        TypeError,
        match=r"must be a PyTorch norm module \(BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm1d/2d/3d, RMSNorm\), a model \(torch.nn.Module\) containing them, or a state dict; got Linear \(test_interop\)",
    ):
        from_torch(Linear())
    with pytest.raises(
        ValueError, match="state dict must hold at least one of weight, bias, running_mean, running_var"
    ):
        from_torch({})
    with pytest.raises(KeyError, match=r"unexpected keys 'bn.weight'"):
        from_torch({"weight": np.ones(2), "bias": np.ones(2), "bn.weight": np.ones(2)})


# -- Keras -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def keras_trained(keras, shape, seed=0, steps=3, **kw):
    rng = np.random.default_rng(seed)
    layer = keras.layers.BatchNormalization(**kw)
    layer.build(shape)
    layer.set_weights(
        [
            rng.normal(size=w.shape).astype(np.float32) if i < len(layer.get_weights()) - 2 else w
            for i, w in enumerate(layer.get_weights())
        ]
    )
    for _ in range(steps):
        layer(rng.normal(1.0, 2.0, size=shape).astype(np.float32), training=True)
    return layer


def to_np(t):
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t)


@pytest.mark.parametrize(
    "kw, shape",
    [
        ({}, (6, 3)),
        ({"momentum": 0.9, "epsilon": 1e-5}, (4, 5, 5, 3)),
        ({"axis": 1, "center": False}, (4, 3, 5, 5)),
        ({"scale": False}, (4, 7, 3)),
        ({"center": False, "scale": False, "momentum": 0.5}, (6, 3)),
    ],
)
def test_from_keras_layer_matches_inference_and_training(keras, kw, shape):
    layer = keras_trained(keras, shape, **kw)
    bn = from_keras(layer)
    assert bn.training is False and bn.unbiased_running_var is False
    assert bn.decay == layer.momentum and bn.eps == layer.epsilon and bn.axis == layer.axis
    assert (bn.weight is None) == (not layer.scale) and (bn.bias is None) == (not layer.center)
    for ours, theirs in zip(to_keras_weights(bn), layer.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    rng = np.random.default_rng(5)
    for training in (False, True, True, False):
        x = rng.normal(1.0, 2.0, size=shape).astype(np.float32)
        np.testing.assert_allclose(
            bn(x, training=training), to_np(layer(x, training=training)), rtol=1e-5, atol=1e-5
        )
    for ours, theirs in zip(to_keras_weights(bn), layer.get_weights(), strict=True):
        # Keras reduces in float32, bnorm in float64: float32 agreement (see semantics.md)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_keras_test_vector(keras):
    layer = keras.layers.BatchNormalization()
    layer.build((3, 2))
    bn = from_keras(layer)
    x = np.array([[1, 2], [3, 6], [5, 10]], np.float32)
    layer(x, training=True)
    bn(x, training=True)
    np.testing.assert_allclose(bn.running_mean, [0.03, 0.06], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, [1.0166667, 1.0966667], rtol=1e-6)
    np.testing.assert_allclose(to_keras_weights(bn)[3], layer.get_weights()[3], rtol=1e-6)


def test_to_keras_weights_sets_a_keras_layer(keras):
    src = bnorm.BatchNorm(3, convention="keras")
    rng = np.random.default_rng(0)
    src.weight[...] = rng.normal(size=3)
    src(rng.normal(size=(8, 4, 3)))
    src.eval()
    layer = keras.layers.BatchNormalization(epsilon=src.eps, momentum=src.decay)
    layer.build((8, 4, 3))
    layer.set_weights(to_keras_weights(src))
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(to_np(layer(x)), src(x), rtol=1e-5, atol=1e-6)


def test_from_keras_weight_list():
    w = [np.array([2.0, 3.0]), np.array([0.5, 1.0]), np.array([1.5, 2.5])]
    bn = from_keras(w, center=False, momentum=0.9, epsilon=1e-5, axis=1)
    assert bn.bias is None and bn.decay == 0.9 and bn.eps == 1e-5 and bn.axis == 1
    assert bn.dtype == np.float64 and list(bn.state_dict()) == [
        "weight",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]
    np.testing.assert_array_equal(bn.running_var, [1.5, 2.5])


def test_to_keras_weights_order_and_absent():
    bn = bnorm.BatchNorm1d(2, affine=False)
    assert len(to_keras_weights(bn)) == 2
    with pytest.raises(ValueError, match="layer must keep running statistics"):
        to_keras_weights(bnorm.BatchNorm1d(2, track_running_stats=False))


def test_from_keras_errors(keras):
    with pytest.raises(
        ValueError,
        match=r"expected 3 Keras weights \(beta, moving_mean, moving_variance\) for center=True, scale=False, got 4",
    ):
        from_keras([np.ones(2)] * 4, scale=False)
    with pytest.raises(ValueError, match=r"moving_mean must be 1-D \(C,\), got shape \(2, 2\)"):
        from_keras([np.ones((2, 2))] * 4)
    with pytest.raises(
        TypeError,
        match="layer_or_weights must be a Keras BatchNormalization layer, a Keras model containing them, or the list of a layer's weights; got dict",
    ):
        from_keras({"gamma": 1})
    with pytest.raises(ValueError, match="the Keras layer is not built"):
        from_keras(keras.layers.BatchNormalization())
    renorm = keras.layers.BatchNormalization(renorm=True)
    renorm.build((2, 3))
    with pytest.raises(ValueError, match=r"expected 7 Keras weights .* renorm=True, got 4"):
        from_keras(renorm.get_weights()[:4], renorm=True)


# -- the documentation's examples run ----------------------------------------------
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


@pytest.mark.parametrize("page", ["persistence.md", "folding.md", "porting-pytorch.md", "porting-keras.md"])
def test_doc_examples_run(page, tmp_path, monkeypatch):
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        text = f.read()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks, page
    code = "\n".join(blocks)
    for module in ("torch", "keras"):
        if f"import {module}" in code:
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, page, "exec"), {"__name__": "__doc_example__"})


def test_from_keras_stacked_weights():
    stacked = np.array([[1.0, 2.0], [0.0, 1.0], [0.5, 0.5], [4.0, 9.0]])
    bn = from_keras(stacked)
    np.testing.assert_array_equal(np.stack(to_keras_weights(bn)), stacked)
