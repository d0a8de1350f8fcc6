"""Porting whole models: ``bias=False`` as PyTorch 2.13, every norm layer of a model by name."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras

import re

import numpy as np
import pytest

import bnorm
from bnorm.interop import from_keras, from_torch

torch = pytest.importorskip("torch")


def _sd(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


# -- bias= as PyTorch 2.13 ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("torch_cls", "bnorm_cls"),
    [
        (torch.nn.BatchNorm1d, bnorm.BatchNorm1d),
        (torch.nn.BatchNorm2d, bnorm.BatchNorm2d),
        (torch.nn.BatchNorm3d, bnorm.BatchNorm3d),
        (torch.nn.SyncBatchNorm, bnorm.SyncBatchNorm),
    ],
)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_bias_flag_state_keys_attributes_and_repr_as_torch(torch_cls, bnorm_cls, affine, bias):
    ref = torch_cls(4, affine=affine, bias=bias)
    bn = bnorm_cls(4, affine=affine, bias=bias)
    assert list(bn.state_dict()) == list(ref.state_dict())
    assert (bn.bias is None) == (ref.bias is None)
    assert (bn.weight is None) == (ref.weight is None)
    assert repr(bn) == repr(ref).replace("SyncBatchNorm", bnorm_cls.__name__)


def test_bias_is_keyword_only_as_in_torch():
    import inspect

    for cls in (bnorm.BatchNorm, bnorm.BatchNorm2d, bnorm.SyncBatchNorm):
        assert inspect.signature(cls).parameters["bias"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(torch.nn.BatchNorm2d).parameters["bias"].kind is inspect.Parameter.KEYWORD_ONLY


def test_bias_false_trains_as_torch_and_has_no_bias_gradient(rng):
    ref = torch.nn.BatchNorm2d(3, bias=False).double()
    bn = bnorm.BatchNorm2d(3, bias=False, dtype=np.float64)
    gamma = rng.uniform(0.5, 2.0, 3)
    ref.weight.data[:] = torch.from_numpy(gamma)
    bn.weight[...] = gamma
    x, g = rng.normal(size=(4, 3, 5, 5)) + 2.0, rng.normal(size=(4, 3, 5, 5))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(g))
    y = bn(x)
    dx = bn.backward(g)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, ref.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert bn.grad_bias is None
    np.testing.assert_allclose(bn.running_var, ref.running_var.numpy(), rtol=1e-12)


def test_from_torch_reads_bias_false_without_a_trainable_zero_bias():
    ref = torch.nn.BatchNorm2d(4, bias=False)
    bn = from_torch(ref)
    assert bn.bias is None and "bias" not in bn.state_dict() and repr(bn) == repr(ref)


def test_bias_false_round_trips_through_save(tmp_path):
    bn = bnorm.BatchNorm1d(3, bias=False)
    bnorm.save(tmp_path / "m.npz", bn)
    back = bnorm.load(tmp_path / "m.npz")
    assert back.bias is None and repr(back) == repr(bn)


def test_sync_batch_norm_conversion_keeps_bias_false():
    sbn = bnorm.SyncBatchNorm.from_batch_norm(bnorm.BatchNorm2d(3, bias=False))
    assert sbn.bias is None and sbn.to_batch_norm().bias is None


# -- whole torch models -------------------------------------------------------------------------
def _torch_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(4, bias=False, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Sequential(
            torch.nn.Conv2d(4, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.InstanceNorm2d(4, affine=True)
        ),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 5),
        torch.nn.LayerNorm(5, bias=False),
        torch.nn.BatchNorm1d(5, eps=1e-3),
    ).double()
    for _ in range(3):  # give every running statistic a non-trivial value
        model(torch.randn(8, 2, 3, 3, dtype=torch.float64))
    return model.eval()


def test_from_torch_whole_model_returns_every_norm_layer_by_dotted_name():
    model = _torch_model()
    layers = from_torch(model)
    assert list(layers) == ["1", "3.1", "3.2", "6", "7"]
    torch_modules = dict(model.named_modules())
    for name, layer in layers.items():
        ref = torch_modules[name]
        assert type(layer).__name__ == type(ref).__name__
        assert layer.training is False
        state = layer.state_dict()
        assert list(state) == list(ref.state_dict())
        for key, value in _sd(ref).items():
            np.testing.assert_array_equal(state[key], value)
    assert layers["1"].momentum is None and layers["1"].bias is None and layers["7"].eps == 1e-3


def test_from_torch_whole_model_runs_as_torch(rng):
    model = _torch_model()
    layers = from_torch(model)
    x = rng.normal(size=(6, 4, 3, 3))
    with torch.no_grad():
        for name in ("1", "3.1", "3.2"):
            np.testing.assert_allclose(
                layers[name](x),
                dict(model.named_modules())[name](torch.from_numpy(x)).numpy(),
                rtol=1e-11,
                atol=1e-12,
            )


def test_from_torch_model_without_norm_layers_is_empty():
    assert from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())) == {}


def test_from_torch_leaves_out_what_it_cannot_convert_with_a_warning():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Sequential(torch.nn.LocalResponseNorm(2)))
    with pytest.warns(
        UserWarning, match=re.escape("from_torch left out '1.0' (LocalResponseNorm): bnorm converts")
    ):
        layers = from_torch(model)
    assert list(layers) == ["0"]


def test_from_torch_leaf_module_that_is_not_a_norm_is_a_type_error():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "module_or_state_dict must be a PyTorch norm module (BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, "
            "GroupNorm, InstanceNorm1d/2d/3d, RMSNorm), a model containing them, or a state dict; got a Linear "
            "(torch.nn.modules.linear) module, which is neither"
        ),
    ):
        from_torch(torch.nn.Linear(2, 2))


def test_from_torch_other_objects_are_type_errors_naming_them():
    with pytest.raises(TypeError, match=re.escape("or a state dict; got str")):
        from_torch("model.pt")


def test_from_torch_state_dict_with_prefix():
    model = _torch_model()
    state = model.state_dict()
    bn = from_torch(state, prefix="1")
    assert bn.bias is None and bn.weight is not None
    np.testing.assert_array_equal(bn.running_mean, state["1.running_mean"].numpy())
    layer = bnorm.BatchNorm1d(5, eps=1e-3, dtype=np.float64)
    assert layer.load_state_dict(state, prefix="7.") == ([], [])
    np.testing.assert_array_equal(layer.running_var, state["7.running_var"].numpy())


def test_from_torch_whole_model_state_dict_without_prefix_says_which_prefixes():
    state = _torch_model().state_dict()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "it looks like a whole model's state dict: pick one layer with prefix=, e.g. from_torch(state, "
            "prefix='1.') (batch-norm layers at '1.', '7.')"
        ),
    ) as info:
        from_torch(state)
    assert "strict=False" not in str(info.value)  # from_torch takes no strict=


def test_from_torch_prefix_that_matches_nothing():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "no key of the state dict starts with '9.'; the batch-norm layers in it are at '1.', '7.'"
        ),
    ):
        from_torch(_torch_model().state_dict(), prefix="9.")


def test_from_torch_state_dict_missing_running_var():
    with pytest.raises(
        ValueError,
        match=re.escape("state dict has running_mean but no running_var; a batch norm keeps both or neither"),
    ):
        from_torch({"weight": np.ones(2), "running_mean": np.zeros(2)})


def test_from_torch_prefix_on_a_module_is_a_type_error():
    with pytest.raises(TypeError, match=re.escape("prefix= selects a layer of a state dict")):
        from_torch(torch.nn.BatchNorm1d(2), prefix="1.")


# -- whole Keras models -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def test_from_keras_whole_model_returns_every_batch_norm_by_name(keras, rng):
    inner = keras.Sequential(
        [keras.layers.Dense(4), keras.layers.BatchNormalization(center=False, name="bn_in")], name="inner"
    )
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(momentum=0.9, name="bn_out"),
            inner,
        ]
    )
    x = rng.normal(size=(16, 3)).astype(np.float32)
    model(x, training=True)
    layers = from_keras(model)
    assert list(layers) == ["bn_out", "inner/bn_in"]
    assert layers["bn_out"].decay == 0.9 and layers["inner/bn_in"].bias is None
    for bn, ref in (
        (layers["bn_out"], model.get_layer("bn_out")),
        (layers["inner/bn_in"], inner.get_layer("bn_in")),
    ):
        np.testing.assert_allclose(bn.running_var, keras.ops.convert_to_numpy(ref.moving_variance), rtol=1e-6)
        assert bn.training is False


def test_from_keras_sequential_no_longer_raises_attribute_error(keras):
    assert from_keras(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])) == {}


def test_from_keras_leaves_out_other_normalizations_with_a_warning(keras):
    model = keras.Sequential([keras.Input((2,)), keras.layers.LayerNormalization(name="ln")])
    with pytest.warns(UserWarning, match=re.escape("from_keras left out 'ln' (LayerNormalization)")):
        assert from_keras(model) == {}


def test_from_keras_other_layer_is_a_type_error_naming_it(keras):
    with pytest.raises(
        TypeError,
        match=re.escape(
            "layer_or_weights must be a Keras BatchNormalization layer, a Keras model containing them, or "
            "the list of a layer's weights; got a Dense (keras.src.layers.core.dense) layer, which is neither"
        ),
    ):
        from_keras(keras.layers.Dense(2))


def test_from_torch_inconsistent_module_does_not_suggest_strict_false():
    class BatchNorm1d:  # duck-typed: says it tracks statistics, but its state dict has none
        num_features, eps, momentum, affine, track_running_stats, training = 2, 1e-5, 0.1, True, True, True

        def state_dict(self):
            return {"weight": np.ones(2), "bias": np.zeros(2)}

    with pytest.raises(
        bnorm.layers._base.StateDictKeyError,
        match=re.escape(
            "the state dict of the BatchNorm1d does not match the configuration its attributes describe: "
            "missing keys ['running_mean', 'running_var'], unexpected keys []"
        ),
    ) as info:
        from_torch(BatchNorm1d())
    assert "strict=False" not in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda nn: nn.InstanceNorm2d(4),
        lambda nn: nn.InstanceNorm1d(4, affine=True, bias=False, track_running_stats=True),
        lambda nn: nn.GroupNorm(2, 4),
        lambda nn: nn.GroupNorm(2, 4, bias=False),
        lambda nn: nn.LayerNorm(4, bias=False),
    ],
)
def test_the_other_norms_repr_and_convert_as_torch(make):
    ref = make(torch.nn)
    assert repr(make(bnorm)) == repr(ref)
    converted = from_torch(ref)
    assert repr(converted) == repr(ref) and list(converted.state_dict()) == list(ref.state_dict())
