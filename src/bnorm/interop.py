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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._convert import to_numpy
from .layers.batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _BatchNormBase,
)
from .layers.norms import RMSNorm

__all__ = ["from_torch", "from_keras", "to_keras_weights"]

_TORCH_CLASS = re.compile(r"^(?:Lazy)?BatchNorm([123])d$")
_BY_RANK: dict[str, type[_BatchNormBase]] = {"1": BatchNorm1d, "2": BatchNorm2d, "3": BatchNorm3d}
_TORCH_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _float_dtype(arrays: Sequence[np.ndarray]) -> np.dtype[Any]:
    """The dtype of the first floating array (float32 if there is none)."""
    for a in arrays:
        if a.dtype.kind == "f":
            return a.dtype
    return np.dtype(np.float32)


def from_torch(module_or_state_dict: Any) -> Any:
    r"""A bnorm layer equal to a PyTorch batch-norm module (or built from its state dict).

    A ``torch.nn.RMSNorm`` module gives a :class:`~bnorm.RMSNorm` with the
    same ``normalized_shape``, ``eps`` (None included) and weight.

    For a module, the class follows the module's (``BatchNorm1d/2d/3d``;
    ``SyncBatchNorm`` becomes a :class:`~bnorm.BatchNorm`), and ``eps``,
    ``momentum`` (None included: the cumulative average), ``affine``,
    ``track_running_stats``, the training flag, the dtype and every parameter
    and buffer are copied.  The result uses PyTorch's convention (weight
    ``momentum`` on the new batch, unbiased running variance, channel axis 1),
    so forward passes in both modes, and further training, match the module.

    A bare state dict (a mapping with PyTorch's keys) gives a
    :class:`~bnorm.BatchNorm` with PyTorch's defaults (``eps=1e-5``,
    ``momentum=0.1``) -- a state dict does not record them; set ``layer.eps``
    and ``layer.momentum`` if the module used others.  ``affine`` and
    ``track_running_stats`` follow from which keys are present.

    Parameters
    ----------
    module_or_state_dict : torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm, RMSNorm, or mapping
        The module, or a batch-norm module's ``state_dict()`` (tensors or arrays).

    Returns
    -------
    BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNorm or RMSNorm
        A new layer holding copies of the values.

    Raises
    ------
    TypeError
        If the object is neither a batch-norm module nor a mapping.
    ValueError
        If a state dict is empty or its keys or shapes do not describe one
        batch-norm layer.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.interop import from_torch
    >>> state = {"weight": np.array([2.0, 3.0]), "bias": np.zeros(2),
    ...          "running_mean": np.array([0.5, 1.0]), "running_var": np.array([4.0, 9.0]),
    ...          "num_batches_tracked": np.array(12)}
    >>> bn = from_torch(state)
    >>> bn
    BatchNorm(2, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, dtype=float64)
    >>> bn.running_var, int(bn.num_batches_tracked)
    (array([4., 9.]), 12)
    """
    obj = module_or_state_dict
    if isinstance(obj, Mapping):
        state = {str(k): to_numpy(v, f"state[{k!r}]") for k, v in obj.items()}
        vectors = [state[k] for k in _TORCH_KEYS[:4] if k in state]
        if not vectors:
            raise ValueError(
                "state dict must hold at least one of weight, bias, running_mean, running_var, "
                f"got keys {sorted(state)}"
            )
        if vectors[0].ndim != 1:
            raise ValueError(f"state dict vectors must be 1-D (C,), got shape {vectors[0].shape}")
        layer: _BatchNormBase = BatchNorm(
            vectors[0].shape[0],
            affine="weight" in state or "bias" in state,
            track_running_stats="running_mean" in state or "running_var" in state,
            dtype=_float_dtype(vectors),
        )
        layer.load_state_dict(state, strict=True)
        return layer
    name = type(obj).__name__
    if name == "RMSNorm":
        return _rms_from_torch(obj)
    match = _TORCH_CLASS.match(name)
    if match is None and name != "SyncBatchNorm":
        raise TypeError(
            "module_or_state_dict must be a torch BatchNorm1d/2d/3d or SyncBatchNorm module, or a "
            f"state dict, got {name}"
        )
    cls = BatchNorm if match is None else _BY_RANK[match.group(1)]
    state = {str(k): to_numpy(v, f"state[{k!r}]") for k, v in obj.state_dict().items()}
    layer = cls(
        int(obj.num_features),
        eps=float(obj.eps),
        momentum=None if obj.momentum is None else float(obj.momentum),
        affine=bool(obj.affine),
        track_running_stats=bool(obj.track_running_stats),
        dtype=_float_dtype(list(state.values())),
    )
    layer.load_state_dict(state, strict=True)
    layer.train(bool(getattr(obj, "training", True)))
    return layer


def _rms_from_torch(module: Any) -> RMSNorm:
    """A :class:`~bnorm.RMSNorm` equal to a ``torch.nn.RMSNorm`` module."""
    state = {str(k): to_numpy(v, f"state[{k!r}]") for k, v in module.state_dict().items()}
    layer = RMSNorm(
        tuple(int(d) for d in module.normalized_shape),
        eps=None if module.eps is None else float(module.eps),
        elementwise_affine=bool(module.elementwise_affine),
        dtype=_float_dtype(list(state.values())),
    )
    layer.load_state_dict(state, strict=True)
    layer.train(bool(getattr(module, "training", True)))
    return layer


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


def from_keras(
    layer_or_weights: Any,
    *,
    center: bool = True,
    scale: bool = True,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    axis: int = -1,
) -> Any:
    r"""A bnorm layer equal to a Keras ``BatchNormalization`` (or built from its weights).

    A built ``keras.layers.RMSNormalization`` gives a :class:`~bnorm.RMSNorm`
    with ``eps=layer.epsilon`` (Keras default 1e-6) and the ``scale`` as its
    weight; its ``axis`` must be the trailing axes given as negative indices
    (the default -1).

    The result is a :class:`~bnorm.BatchNorm` in the Keras convention:
    ``decay=momentum`` (``moving = momentum * moving + (1 - momentum) *
    batch``), the *biased* batch variance in the moving variance, ``eps =
    epsilon`` and the channel axis `axis`.  It is in evaluation mode, as a plain
    Keras call is inference: ``bn(x)`` equals ``layer(x)`` and
    ``bn(x, training=True)`` equals ``layer(x, training=True)``, moving
    statistics included.  Without `scale` the weight (gamma) is None (fixed at
    1, not trained); without `center` the bias (beta) is None.

    Parameters
    ----------
    layer_or_weights : keras.layers.BatchNormalization or sequence of array_like
        A built Keras layer (its ``axis``, ``momentum``, ``epsilon``, ``center``
        and ``scale`` are read from it and the keyword arguments are ignored),
        or the list ``get_weights()`` returns: gamma (if `scale`), beta (if
        `center`), moving_mean, moving_variance.
    center, scale : bool
        Whether the weight list has beta, gamma (Keras's arguments).
    momentum : float in [0, 1]
        Keras's momentum: the weight on the *old* moving value.
    epsilon : float
        Keras's epsilon (default 1e-3, not PyTorch's 1e-5).
    axis : int
        The channel axis (Keras default -1, channels-last).

    Returns
    -------
    BatchNorm
        A new layer in evaluation mode holding copies of the weights.

    Raises
    ------
    ValueError
        If the layer is not built, uses ``renorm`` or several axes, or the
        number or shapes of the weights do not match `center` and `scale`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.interop import from_keras, to_keras_weights
    >>> w = [np.ones(3, np.float32), np.zeros(3, np.float32),       # gamma, beta
    ...      np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)]  # moving mean, variance
    >>> bn = from_keras(w)
    >>> bn  # doctest: +NORMALIZE_WHITESPACE
    BatchNorm(3, eps=0.001, decay=0.99, affine=True, track_running_stats=True,
              axis=-1, unbiased_running_var=False)
    >>> [a.tolist() for a in to_keras_weights(bn)][2:]
    [[0.5, 0.5, 0.5], [2.0, 2.0, 2.0]]
    """
    src = layer_or_weights
    if type(src).__name__ == "RMSNormalization":
        return _rms_from_keras(src)
    if callable(getattr(src, "get_weights", None)):
        if getattr(src, "renorm", False):
            raise ValueError(
                "Keras BatchNormalization with renorm=True is not supported (batch renormalization)"
            )
        if not getattr(src, "built", True):
            raise ValueError("the Keras layer is not built: call it on an input (or build it) first")
        ax = src.axis
        if isinstance(ax, (list, tuple)):
            if len(ax) != 1:
                raise ValueError(f"Keras layer normalizes over several axes {list(ax)}; bnorm supports one")
            ax = ax[0]
        center, scale = bool(src.center), bool(src.scale)
        momentum, epsilon, axis = float(src.momentum), float(src.epsilon), int(ax)
        weights = list(src.get_weights())
    elif isinstance(src, np.ndarray) and src.ndim == 2:
        weights = list(src)  # the weights stacked as rows
    elif isinstance(src, (str, bytes, Mapping)) or not isinstance(src, Sequence):
        raise TypeError(
            "layer_or_weights must be a Keras BatchNormalization layer or the list of its weights, "
            f"got {type(src).__name__}"
        )
    else:
        weights = list(src)
    names = (["gamma"] if scale else []) + (["beta"] if center else []) + ["moving_mean", "moving_variance"]
    if len(weights) != len(names):
        raise ValueError(
            f"expected {len(names)} Keras weights ({', '.join(names)}) for center={center}, "
            f"scale={scale}, got {len(weights)}"
        )
    arrays = {n: to_numpy(w, n) for n, w in zip(names, weights, strict=True)}
    mean = arrays["moving_mean"]
    if mean.ndim != 1:
        raise ValueError(f"moving_mean must be 1-D (C,), got shape {mean.shape}")
    bn = BatchNorm(
        mean.shape[0],
        eps=epsilon,
        affine=center or scale,
        decay=momentum,
        axis=axis,
        unbiased_running_var=False,
        convention="keras",
        dtype=_float_dtype(list(arrays.values())),
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
    ``center=False``).  Copies, in the layer's dtype.

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
    return [np.array(a, copy=True) for a in (gamma, beta, mean, var) if a is not None]
