r"""Moving batch-norm layers between PyTorch, Keras and bnorm.

Duck typing only: this module never imports torch or keras.  A PyTorch module is
recognized by its class name and read through its attributes and
``state_dict()``; a Keras layer through its attributes and ``get_weights()``;
tensors are converted with ``.detach().cpu().numpy()``.

=====================  ==========================  ===========================
                       PyTorch ``BatchNorm2d``     Keras 3 ``BatchNormalization``
=====================  ==========================  ===========================
running update         ``(1-m) r + m b``, m = 0.1  ``m r + (1-m) b``, m = 0.99
running variance       unbiased (n / (n - 1))      biased
eps default            1e-5                        1e-3
channel axis           1                           -1
weights                state dict by name          list: gamma, beta,
                                                   moving_mean, moving_variance
=====================  ==========================  ===========================

The converted layer keeps the source framework's convention, so it continues
training number for number as the original would.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._conventions import deliberate_momentum
from ._convert import to_numpy
from ._validation import warn_caller
from .layers import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, Module, RMSNorm
from .layers._base import StateDictKeyError
from .layers.batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _BatchNormBase,
)
from .layers.renorm import BatchRenorm, _BatchRenormBase

__all__ = ["from_torch", "from_keras", "to_keras_weights"]

_TORCH_BN = re.compile(r"^(?:Lazy)?BatchNorm([123])d$")
_TORCH_IN = re.compile(r"^(?:Lazy)?InstanceNorm([123])d$")
_BY_RANK: dict[str, type[_BatchNormBase]] = {"1": BatchNorm1d, "2": BatchNorm2d, "3": BatchNorm3d}
_IN_BY_RANK: dict[str, Callable[..., Module]] = {
    "1": InstanceNorm1d,
    "2": InstanceNorm2d,
    "3": InstanceNorm3d,
}
_TORCH_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: What from_torch converts, as the message for anything else lists it.
_TORCH_SUPPORTED = "BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm1d/2d/3d, RMSNorm"


def _float_dtype(arrays: Sequence[np.ndarray]) -> np.dtype[Any]:
    """The dtype of the first floating array (float32 if there is none)."""
    for a in arrays:
        if a.dtype.kind == "f":
            return a.dtype
    return np.dtype(np.float32)


def _what(obj: Any) -> str:
    """``Linear (torch.nn.modules.linear)``: the class of what was passed, and where it comes from."""
    cls = type(obj)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__name__} ({cls.__module__})"


def _torch_state(module: Any) -> dict[str, np.ndarray]:
    return {str(k): to_numpy(v, f"state[{k!r}]") for k, v in module.state_dict().items()}


def _torch_builder(module: Any) -> Callable[[Any, np.dtype[Any], bool], Module] | None:
    """How to build the bnorm layer for a torch norm module (from its class name), or None."""
    name = type(module).__name__
    bn, inorm = _TORCH_BN.match(name), _TORCH_IN.match(name)
    # batch and instance norm share the arguments of PyTorch's _NormBase
    cls: Callable[..., Module] | None = None
    if bn is not None:
        cls = _BY_RANK[bn.group(1)]
    elif inorm is not None:
        cls = _IN_BY_RANK[inorm.group(1)]
    elif name == "SyncBatchNorm":
        cls = BatchNorm
    if cls is not None:
        norm_cls = cls
        return lambda m, dt, has_bias: norm_cls(
            int(m.num_features),
            eps=float(m.eps),
            momentum=None if m.momentum is None else float(m.momentum),
            affine=bool(m.affine),
            track_running_stats=bool(m.track_running_stats),
            bias=has_bias,
            dtype=dt,
        )
    if name == "LayerNorm":
        return lambda m, dt, has_bias: LayerNorm(
            tuple(int(d) for d in m.normalized_shape),
            eps=float(m.eps),
            elementwise_affine=bool(m.elementwise_affine),
            bias=has_bias,
            dtype=dt,
        )
    if name == "RMSNorm":
        return lambda m, dt, has_bias: RMSNorm(
            tuple(int(d) for d in m.normalized_shape),
            eps=None if m.eps is None else float(m.eps),
            elementwise_affine=bool(m.elementwise_affine),
            dtype=dt,
        )
    if name == "GroupNorm":
        return lambda m, dt, has_bias: GroupNorm(
            int(m.num_groups),
            int(m.num_channels),
            eps=float(m.eps),
            affine=bool(m.affine),
            bias=has_bias,
            dtype=dt,
        )
    return None


def _torch_layer(module: Any, build: Callable[[Any, np.dtype[Any], bool], Module]) -> Module:
    state = _torch_state(module)
    # torch's bias=False registers no bias: the state dict, not an attribute, says (duck-typed modules too)
    with deliberate_momentum():  # a PyTorch module's momentum is PyTorch's
        layer = build(module, _float_dtype(list(state.values())), "bias" in state)
    # Not strict=True: its message suggests a strict=False that from_torch does not take.
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StateDictKeyError(
            f"the state dict of the {type(module).__name__} does not match the configuration its "
            f"attributes describe: missing keys {missing}, unexpected keys {unexpected}"
        )
    layer.train(bool(getattr(module, "training", True)))
    return layer


def _torch_model(model: Any) -> dict[str, Module]:
    """Every norm layer of a torch model, by its ``named_modules`` name, in the model's order."""
    layers: dict[str, Module] = {}
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue  # the model itself
        build = _torch_builder(module)
        if build is not None:
            layers[str(name)] = _torch_layer(module, build)
        elif "Norm" in type(module).__name__:
            skipped.append(f"{name!r} ({type(module).__name__})")
    if skipped:
        warn_caller(
            f"from_torch left out {', '.join(skipped)}: bnorm converts {_TORCH_SUPPORTED}",
            UserWarning,
        )
    return layers


def _prefixed_owners(keys: Iterable[str]) -> list[str]:
    """The module paths (``'1.'``, ``'features.4.'``) whose keys look like a batch norm's."""
    return sorted({k[: -len("running_mean")] for k in keys if k.endswith(".running_mean")})


def _from_torch_state(obj: Mapping[Any, Any], prefix: str) -> _BatchNormBase:
    keys = [str(k) for k in obj]
    if prefix:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str such as '1.', got {type(prefix).__name__}")
        prefix = prefix if prefix.endswith(".") else prefix + "."
        obj = {k[len(prefix) :]: v for k, v in zip(keys, obj.values(), strict=True) if k.startswith(prefix)}
        if not obj:
            found = ", ".join(map(repr, _prefixed_owners(keys))) or "none"
            raise ValueError(
                f"no key of the state dict starts with {prefix!r}; the batch-norm layers in it are at {found}"
            )
    state = {str(k): to_numpy(v, f"state[{prefix}{k}]") for k, v in obj.items()}
    unknown = [k for k in state if k not in _TORCH_KEYS]
    if unknown:
        owners = _prefixed_owners(state)
        hint = (
            f"; it looks like a whole model's state dict: pick one layer with prefix=, e.g. "
            f"from_torch(state, prefix={owners[0]!r}) (batch-norm layers at {', '.join(map(repr, owners))})"
            if owners
            else ""
        )
        raise StateDictKeyError(
            f"state dict must hold one batch-norm layer's keys ({', '.join(_TORCH_KEYS)}), got "
            f"unexpected keys {', '.join(map(repr, unknown[:8]))}{', ...' if len(unknown) > 8 else ''}{hint}"
        )
    vectors = [state[k] for k in _TORCH_KEYS[:4] if k in state]
    if not vectors:
        raise ValueError(
            "state dict must hold at least one of weight, bias, running_mean, running_var, "
            f"got keys {sorted(state)}"
        )
    if vectors[0].ndim != 1:
        raise ValueError(f"state dict vectors must be 1-D (C,), got shape {vectors[0].shape}")
    if ("running_mean" in state) != ("running_var" in state):
        have, lack = ("running_mean", "running_var")[:: 1 if "running_mean" in state else -1]
        raise ValueError(f"state dict has {have} but no {lack}; a batch norm keeps both or neither")
    if "bias" in state and "weight" not in state:
        raise ValueError(
            "state dict has a bias but no weight, which no PyTorch batch norm produces "
            "(bias=False drops the bias, affine=False both)"
        )
    layer = BatchNorm(
        vectors[0].shape[0],
        affine="weight" in state,
        track_running_stats="running_mean" in state or "running_var" in state,
        bias="bias" in state,
        dtype=_float_dtype(vectors),
    )
    layer.load_state_dict(state, strict=True)
    return layer


def from_torch(module_or_state_dict: Any, *, prefix: str = "") -> Any:
    r"""Bnorm layers equal to a PyTorch norm module, to every norm layer of a model, or to a state dict.

    Given a **norm module** (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` -- which
    becomes a :class:`~bnorm.BatchNorm` -- ``LayerNorm``, ``GroupNorm``,
    ``InstanceNorm1d/2d/3d``, ``RMSNorm``, and their ``Lazy`` forms once materialized), the
    result is the bnorm layer of the same class with its arguments (``eps``,
    ``momentum`` -- None included: the cumulative average --, ``affine``,
    ``bias``, ``track_running_stats``, ``normalized_shape``,
    ``elementwise_affine``, ``num_groups``; RMSNorm's ``eps=None`` stays
    None), the training flag, the dtype and copies of every parameter and
    buffer.  The result uses PyTorch's
    convention (weight ``momentum`` on the new batch, unbiased running
    variance, channel axis 1), so forward passes in both modes, and further
    training, match the module.  ``bias=False`` (PyTorch >= 2.1) gives a layer
    without a bias array, not a trainable zero bias.

    Given a **model** (any module with submodules, e.g. a ``Sequential``),
    the result is a ``dict`` from each norm layer's dotted name, as
    ``model.named_modules()`` spells it (``"1"``, ``"features.4"``), to its
    bnorm layer, in the model's order; norm layers bnorm cannot convert (such
    as ``LocalResponseNorm``) are left out with a UserWarning naming them.

    A bare **state dict** (a mapping with PyTorch's keys) gives a
    :class:`~bnorm.BatchNorm` with PyTorch's defaults (``eps=1e-5``,
    ``momentum=0.1``) -- a state dict does not record them; set ``layer.eps``
    and ``layer.momentum`` if the module used others.  ``affine``, ``bias``
    and ``track_running_stats`` follow from which keys are present.

    Parameters
    ----------
    module_or_state_dict : torch.nn.Module or mapping
        A norm module, a model containing norm modules, or one batch-norm
        layer's ``state_dict()`` (tensors or arrays).
    prefix : str, default "", keyword-only
        With a whole model's state dict: the layer to read (``"1."`` reads
        ``"1.weight"``, ``"1.running_mean"``, ...); a trailing ``.`` is added
        when missing.

    Returns
    -------
    bnorm layer, or dict of str to bnorm layer
        A layer for a norm module or a state dict; a dict for a model.  Each
        holds copies of the values.

    Raises
    ------
    TypeError
        If the object is neither a norm module, a model, nor a mapping (the
        message names what was passed).
    ValueError
        If a state dict is empty or its keys or shapes do not describe one
        batch-norm layer (a whole model's state dict without `prefix` is
        told which prefixes it holds).

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.interop import from_torch
    >>> state = {"weight": np.array([2.0, 3.0]), "bias": np.zeros(2),
    ...          "running_mean": np.array([0.5, 1.0]), "running_var": np.array([4.0, 9.0]),
    ...          "num_batches_tracked": np.array(12)}
    >>> bn = from_torch(state)
    >>> bn
    BatchNorm(2, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, dtype=float64)
    >>> bn.running_var, int(bn.num_batches_tracked)
    (array([4., 9.]), 12)

    One layer out of a whole model's state dict:

    >>> model_state = {"0.weight": np.ones((2, 2)), **{f"1.{k}": v for k, v in state.items()}}
    >>> from_torch(model_state, prefix="1.").running_mean
    array([0.5, 1. ])
    """
    obj = module_or_state_dict
    if isinstance(obj, Mapping):
        return _from_torch_state(obj, prefix)
    if prefix:
        raise TypeError(
            "prefix= selects a layer of a state dict; for a model, from_torch(model) returns every norm "
            "layer by name (pick one with [name])"
        )
    build = _torch_builder(obj)
    if build is not None:
        return _torch_layer(obj, build)
    children = getattr(obj, "children", None)
    if callable(getattr(obj, "named_modules", None)) and callable(children):
        if next(iter(children()), None) is not None:
            return _torch_model(obj)
        raise TypeError(
            f"module_or_state_dict must be a PyTorch norm module ({_TORCH_SUPPORTED}), a model "
            f"containing them, or a state dict; got a {_what(obj)} module, which is neither"
        )
    raise TypeError(
        f"module_or_state_dict must be a PyTorch norm module ({_TORCH_SUPPORTED}), a model "
        f"(torch.nn.Module) containing them, or a state dict; got {_what(obj)}"
    )


def _is_keras_batch_norm(obj: Any) -> bool:
    return any(c.__name__ == "BatchNormalization" for c in type(obj).__mro__)


def _rms_from_keras(layer: Any) -> RMSNorm:
    """A :class:`~bnorm.RMSNorm` equal to a built ``keras.layers.RMSNormalization``."""
    if not getattr(layer, "built", True):
        raise ValueError("the Keras layer is not built: call it on an input (or build it) first")
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    k = len(axes)
    if sorted(int(a) for a in axes) != list(range(-k, 0)):
        raise ValueError(
            f"Keras RMSNormalization normalizes axis={list(axes)}; bnorm's RMSNorm normalizes trailing "
            f"axes: rebuild the Keras layer with negative trailing axes (axis={list(range(-k, 0))}) or "
            "move the axes last with np.moveaxis"
        )
    scale = to_numpy(layer.get_weights()[0], "scale")
    rms = RMSNorm(scale.shape, eps=float(layer.epsilon), dtype=_float_dtype([scale]))
    rms.load_state_dict({"weight": scale}, strict=True)
    rms.eval()
    return rms


def _keras_model(model: Any, path: str, found: dict[str, Any], skipped: list[str]) -> None:
    """Collect the BatchNormalization and RMSNormalization layers of `model` (nested models too)."""
    for layer in model.layers:
        name = f"{path}{layer.name}"
        if _is_keras_batch_norm(layer) or type(layer).__name__ == "RMSNormalization":
            found[name] = from_keras(layer)
        elif isinstance(getattr(layer, "layers", None), list):
            _keras_model(layer, name + "/", found, skipped)
        elif "Normalization" in type(layer).__name__:
            skipped.append(f"{name!r} ({type(layer).__name__})")


def from_keras(
    layer_or_weights: Any,
    *,
    center: bool = True,
    scale: bool = True,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    axis: int = -1,
    renorm: bool = False,
    renorm_clipping: Mapping[str, float] | None = None,
    renorm_momentum: float = 0.99,
) -> Any:
    r"""A bnorm layer equal to a Keras ``BatchNormalization`` (or its weights); a dict of them for a model.

    A built ``keras.layers.RMSNormalization`` gives a :class:`~bnorm.RMSNorm`
    with ``eps=layer.epsilon`` (Keras default 1e-6) and the ``scale`` as its
    weight; its ``axis`` must be the trailing axes as negative indices (the
    default -1).

    The result is a :class:`~bnorm.BatchNorm` in the Keras convention:
    ``decay=momentum`` (``moving = momentum * moving + (1 - momentum) *
    batch``), the *biased* batch variance in the moving variance, ``eps =
    epsilon`` and the channel axis `axis`.  It is in evaluation mode, as a plain
    Keras call is inference: ``bn(x)`` equals ``layer(x)`` and
    ``bn(x, training=True)`` equals ``layer(x, training=True)``, moving
    statistics included.  Without `scale` the weight (gamma) is None (fixed at
    1, not trained); without `center` the bias (beta) is None.

    A layer with ``renorm=True`` (batch renormalization) becomes a
    :class:`~bnorm.BatchRenorm` in the Keras convention: ``decay=momentum``,
    ``renorm_decay=renorm_momentum``, ``r_max``/``r_min``/``d_max`` from
    ``renorm_clipping`` (missing keys unclipped), and all seven variables:
    gamma, beta, moving_mean, moving_variance, moving_stddev (``running_std``),
    renorm_mean and renorm_stddev (``renorm_std``).  Its counter starts at 0
    (Keras keeps none).

    Given a **model** (``keras.Sequential``, a functional ``keras.Model`` or a
    subclass; anything with a ``layers`` list), the result is a ``dict`` from
    each ``BatchNormalization`` layer's name to its bnorm layer, in the
    model's order; a layer of a nested model is named ``"outer/inner"``, as
    in Keras's variable paths.  Other normalization layers
    (``LayerNormalization``, ``GroupNormalization``, ...) are left out with a
    UserWarning naming them.

    Parameters
    ----------
    layer_or_weights : keras.layers.BatchNormalization, keras.Model or sequence of array_like
        A built Keras layer (its ``axis``, ``momentum``, ``epsilon``, ``center``
        and ``scale`` are read from it and the keyword arguments are ignored),
        a built model, or the list ``get_weights()`` returns: gamma (if
        `scale`), beta (if `center`), moving_mean, moving_variance, and with
        `renorm` moving_stddev, renorm_mean, renorm_stddev.
    center, scale : bool
        Whether the weight list has beta, gamma (Keras's arguments).
    momentum : float in [0, 1]
        Keras's momentum: the weight on the *old* moving value.
    epsilon : float
        Keras's epsilon (default 1e-3, not PyTorch's 1e-5).
    axis : int
        The channel axis (Keras default -1, channels-last).
    renorm, renorm_clipping, renorm_momentum
        Keras' batch-renormalization arguments (for a weight list).

    Returns
    -------
    BatchNorm or BatchRenorm, or dict of str to them
        A new layer in evaluation mode holding copies of the weights; a dict
        of them for a model.

    Raises
    ------
    TypeError
        If the object is neither a BatchNormalization layer, a model nor a
        weight list (the message names what was passed, e.g. a ``Dense``).
    ValueError
        If the layer is not built or uses several axes, the number or shapes of
        the weights do not match `center`, `scale` and `renorm`, or
        `renorm_clipping` has keys other than rmax, rmin, dmax.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.interop import from_keras, to_keras_weights
    >>> w = [np.ones(3, np.float32), np.zeros(3, np.float32),       # gamma, beta
    ...      np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)]  # moving mean, variance
    >>> bn = from_keras(w)
    >>> bn  # doctest: +NORMALIZE_WHITESPACE
    BatchNorm(3, eps=0.001, decay=0.99, affine=True, bias=True, track_running_stats=True,
              axis=-1, unbiased_running_var=False)
    >>> [a.tolist() for a in to_keras_weights(bn)][2:]
    [[0.5, 0.5, 0.5], [2.0, 2.0, 2.0]]
    """
    src = layer_or_weights
    if type(src).__name__ == "RMSNormalization":
        return _rms_from_keras(src)
    if not _is_keras_batch_norm(src) and isinstance(getattr(src, "layers", None), list):
        found: dict[str, Any] = {}
        skipped: list[str] = []
        _keras_model(src, "", found, skipped)
        if skipped:
            warn_caller(
                f"from_keras left out {', '.join(skipped)}: bnorm converts BatchNormalization and "
                "RMSNormalization layers",
                UserWarning,
            )
        return found
    if not _is_keras_batch_norm(src) and callable(getattr(src, "get_weights", None)):
        raise TypeError(
            "layer_or_weights must be a Keras BatchNormalization layer, a Keras model containing them, "
            f"or the list of a layer's weights; got a {_what(src)} layer, which is neither"
        )
    if _is_keras_batch_norm(src):
        if not getattr(src, "built", True):
            raise ValueError("the Keras layer is not built: call it on an input (or build it) first")
        ax = src.axis
        if isinstance(ax, (list, tuple)):
            if len(ax) != 1:
                raise ValueError(f"Keras layer normalizes over several axes {list(ax)}; bnorm supports one")
            ax = ax[0]
        center, scale = bool(src.center), bool(src.scale)
        momentum, epsilon, axis = float(src.momentum), float(src.epsilon), int(ax)
        renorm = bool(getattr(src, "renorm", False))
        if renorm:
            renorm_clipping = dict(getattr(src, "renorm_clipping", None) or {})
            renorm_momentum = float(src.renorm_momentum)
        weights = list(src.get_weights())
    elif isinstance(src, np.ndarray) and src.ndim == 2:
        weights = list(src)  # the weights stacked as rows
    elif isinstance(src, (str, bytes, Mapping)) or not isinstance(src, Sequence):
        raise TypeError(
            "layer_or_weights must be a Keras BatchNormalization layer, a Keras model containing them, "
            f"or the list of a layer's weights; got {_what(src)}"
        )
    else:
        weights = list(src)
    names = (["gamma"] if scale else []) + (["beta"] if center else []) + ["moving_mean", "moving_variance"]
    if renorm:
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    if len(weights) != len(names):
        raise ValueError(
            f"expected {len(names)} Keras weights ({', '.join(names)}) for center={center}, "
            f"scale={scale}{', renorm=True' if renorm else ''}, got {len(weights)}"
        )
    arrays = {n: to_numpy(w, n) for n, w in zip(names, weights, strict=True)}
    mean = arrays["moving_mean"]
    if mean.ndim != 1:
        raise ValueError(f"moving_mean must be 1-D (C,), got shape {mean.shape}")
    dtype = _float_dtype(list(arrays.values()))
    bn: BatchNorm | BatchRenorm
    if renorm:
        clip = dict(renorm_clipping or {})
        unknown = sorted(set(clip) - {"rmax", "rmin", "dmax"})
        if unknown:
            raise ValueError(f"renorm_clipping keys must be among 'rmax', 'rmin', 'dmax', got {unknown}")
        bn = BatchRenorm(
            mean.shape[0],
            eps=epsilon,
            affine=center or scale,
            r_max=clip.get("rmax"),
            r_min=clip.get("rmin"),
            d_max=clip.get("dmax"),
            renorm_decay=float(renorm_momentum),
            decay=momentum,
            axis=axis,
            convention="keras",
            dtype=dtype,
        )
    else:
        bn = BatchNorm(
            mean.shape[0],
            eps=epsilon,
            affine=center or scale,
            decay=momentum,
            axis=axis,
            unbiased_running_var=False,
            convention="keras",
            dtype=dtype,
        )
    if not scale:
        bn.weight = None
    if not center:
        bn.bias = None
    keys = {
        "gamma": "weight",
        "beta": "bias",
        "moving_mean": "running_mean",
        "moving_variance": "running_var",
        "moving_stddev": "running_std",
        "renorm_mean": "renorm_mean",
        "renorm_stddev": "renorm_std",
    }
    bn.load_state_dict({keys[n]: a for n, a in arrays.items()}, strict=True)
    bn.eval()
    return bn


def to_keras_weights(layer: Any) -> list[np.ndarray]:
    r"""The layer's arrays in Keras ``set_weights`` order.

    For an :class:`~bnorm.RMSNorm`: ``[scale]`` (its weight), for
    ``keras.layers.RMSNormalization(epsilon=layer.eps)``.

    ``[gamma, beta, moving_mean, moving_variance]``, leaving out gamma when
    the weight is None and beta when the bias is None (Keras ``scale=False`` /
    ``center=False``).  Copies, in the layer's dtype.  A batch-renormalization
    layer adds ``moving_stddev, renorm_mean, renorm_stddev`` (Keras
    ``renorm=True``); without separate renorm averages (the paper's form)
    those are its running mean and deviation.

    Build the Keras layer with the same settings, or the numbers will differ:
    ``epsilon=layer.eps`` (Keras defaults to 1e-3, PyTorch to 1e-5),
    ``axis=layer.axis`` (Keras defaults to -1, channels-last), and, for further
    training, ``momentum=layer.decay`` (or ``1 - layer.momentum`` for a
    PyTorch-convention layer).  A PyTorch-trained running variance is an
    unbiased estimate; inference uses it as it is in both frameworks.

    Parameters
    ----------
    layer : batch-norm layer
        A bnorm batch-norm layer with running statistics.

    Returns
    -------
    list of ndarray
        Two to four arrays of shape (C,).

    Raises
    ------
    ValueError
        If the layer keeps no running statistics (``track_running_stats=False``):
        a Keras layer always has moving statistics.

    Examples
    --------
    >>> import bnorm
    >>> from bnorm.interop import to_keras_weights
    >>> [w.tolist() for w in to_keras_weights(bnorm.BatchNorm1d(2))]
    [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    """
    if isinstance(layer, RMSNorm):  # Keras RMSNormalization: [scale]
        if layer.weight is None:
            raise ValueError("an RMSNorm without weight (elementwise_affine=False) has no Keras scale")
        return [np.array(layer.weight, copy=True)]
    mean, var = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
    if mean is None or var is None:
        raise ValueError(
            "layer must keep running statistics (track_running_stats=True): a Keras "
            "BatchNormalization always has moving_mean and moving_variance"
        )
    gamma, beta = getattr(layer, "weight", None), getattr(layer, "bias", None)
    arrays = [gamma, beta, mean, var]
    if isinstance(layer, _BatchRenormBase):
        separate = layer.renorm_mean is not None
        arrays += [
            layer.running_std,
            layer.renorm_mean if separate else layer.running_mean,
            layer.renorm_std if separate else layer.running_std,
        ]
    return [np.array(a, copy=True) for a in arrays if a is not None]
