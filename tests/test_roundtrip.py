"""Every public layer class, with every constructor flag combination, round-trips through save/load.

The classes are discovered from ``bnorm.__all__`` (every subclass of
:class:`bnorm.Module`), so a layer added later is covered without editing this
file; its required arguments come from :data:`REQUIRED` by parameter name.
"""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest

import bnorm

#: A value for each required constructor argument, by name.
REQUIRED = {"num_features": 4, "num_channels": 4, "num_groups": 2, "normalized_shape": (2, 3)}

#: Non-boolean alternatives tried one at a time on top of the defaults.
ALTERNATIVES = {
    "eps": [1e-3],
    "momentum": [None, 0.3],
    "decay": [0.9],
    "axis": [-1],
    "dtype": [np.float16, np.float64],
    "convention": sorted(bnorm.CONVENTIONS),
    "on_nonfinite": ["raise", "propagate"],
}


def layer_classes():
    found = []
    for name in bnorm.__all__:
        obj = getattr(bnorm, name)
        if isinstance(obj, type) and issubclass(obj, bnorm.Module) and obj is not bnorm.Module:
            found.append(obj)
    return found


def _params(cls):
    return {
        n: p
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def configurations(cls):
    """(id, kwargs) for every combination of the boolean flags and each alternative value."""
    params = _params(cls)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in REQUIRED]
    assert not missing, f"{cls.__name__}: add a value for {missing} to REQUIRED"
    base = {n: REQUIRED[n] for n, p in params.items() if p.default is p.empty}
    flags = [n for n, p in params.items() if isinstance(p.default, bool)]
    out = []
    for values in itertools.product([True, False], repeat=len(flags)):
        kw = {**base, **dict(zip(flags, values, strict=True))}
        out.append(("-".join(f"{f}={v}" for f, v in zip(flags, values, strict=True)) or "default", kw))
    for name, alts in ALTERNATIVES.items():
        if name in params:
            out += [(f"{name}={getattr(v, '__name__', v)}", {**base, name: v}) for v in alts]
    return out


CASES = [
    pytest.param(cls, kw, training, id=f"{cls.__name__}-{label}-{'train' if training else 'eval'}")
    for cls in layer_classes()
    for label, kw in configurations(cls)
    for training in (True, False)
]


def randomize_state(layer, seed):
    """Give every array of the layer a distinct value, so the test sees whether it was kept."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, arr in layer.state_dict().items():
        if arr.dtype.kind == "f":
            value = rng.uniform(0.5, 2.0, size=arr.shape)
        else:
            value = rng.integers(0, 1000, size=arr.shape)
        state[name] = value.astype(arr.dtype)
    layer.load_state_dict(state)


def test_every_public_layer_class_is_covered():
    names = {cls.__name__ for cls in layer_classes()}
    assert {"BatchNorm", "BatchNorm2d", "SyncBatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm2d"} <= names


@pytest.mark.parametrize(("cls", "kwargs", "training"), CASES)
def test_layer_round_trips_with_rebuild(tmp_path, cls, kwargs, training):
    layer = cls(**kwargs).train(training)
    randomize_state(layer, 0)
    path = tmp_path / "layer.npz"
    bnorm.save(path, {"model": {"0": layer}})
    back = bnorm.load(path)["model"]["0"]
    assert type(back) is cls
    assert repr(back) == repr(layer)
    assert back.training is training
    assert back._config() == layer._config()
    for name in (*cls._parameters, *cls._buffers):
        a, b = getattr(layer, name, None), getattr(back, name, None)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_parameter_removed_after_construction_stays_removed(tmp_path):
    # Keras' scale=False / center=False: the layer keeps weight or bias only.
    bn = bnorm.BatchNorm2d(3)
    bn.bias = None
    bnorm.save(tmp_path / "bn.npz", bn)
    back = bnorm.load(tmp_path / "bn.npz")
    assert back.bias is None and back.weight is not None
    assert list(back.state_dict()) == list(bn.state_dict())
