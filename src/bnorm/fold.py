r"""Folding a batch-norm layer into the linear or convolution layer before it.

In evaluation a batch-norm layer is a fixed per-channel affine map,

.. math::
    \mathrm{bn}(z) = s \odot z + t, \qquad
    s = \frac{\gamma}{\sqrt{\sigma^2_{\mathrm{run}} + \epsilon}}, \qquad
    t = \beta - s \odot \mu_{\mathrm{run}},

so a preceding ``z = W x + b`` (linear or convolution) followed by it equals one
layer with

.. math::
    W'_{o} = s_o W_{o}, \qquad b'_o = s_o b_o + t_o = s_o (b_o - \mu_o) + \beta_o

for every output channel o.  The functions here compute ``(W', b')`` in float64
and return them in the weight's dtype.  Weights are in PyTorch's layouts:

==========================  ==================================  ====================
layer                       weight shape                        output channel of
==========================  ==================================  ====================
``Linear``                  ``(C_out, C_in)``                   axis 0
``Conv1d/2d/3d``            ``(C_out, C_in / groups, *k)``      axis 0
``ConvTranspose1d/2d/3d``   ``(C_in, C_out / groups, *k)``      group g, axis 1
==========================  ==================================  ====================

Keras kernels are laid out differently (``Dense``: (C_in, C_out); ``Conv2D``:
``(*k, C_in, C_out)``): move the output axis first, fold, and move it back.

`bn` is a bnorm batch-norm layer -- or anything with the same attributes
(``running_mean``, ``running_var``, ``eps``, ``weight``, ``bias``), such as a
PyTorch ``BatchNorm2d`` itself.  Only the running statistics are used, whatever
the layer's mode: the folded
layer reproduces the batch-norm layer in evaluation.  A missing bias is treated
as zero and a bias is always returned (the folded layer needs one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ._convert import to_numpy
from ._validation import describe

__all__ = ["fold_linear", "fold_conv", "fold_conv_transpose"]


def _bn_affine(bn: Any, c_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` in float64: the batch-norm layer's evaluation map ``s * z + t``."""
    if not hasattr(bn, "running_mean") or not hasattr(bn, "eps"):
        raise TypeError(f"bn must be a batch-norm layer, got {type(bn).__name__}")
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError(
            "bn has no running statistics (track_running_stats=False): it normalizes with batch "
            "statistics even in evaluation, so it cannot be folded into a fixed weight"
        )
    mean = to_numpy(mean, "bn.running_mean").astype(np.float64)
    c = mean.shape[0]
    if c != c_out:
        raise ValueError(f"bn has {c} channels but the weight has {c_out} output channels; they must match")
    s = 1.0 / np.sqrt(to_numpy(var, "bn.running_var").astype(np.float64) + float(bn.eps))
    if bn.weight is not None:
        s = s * to_numpy(bn.weight, "bn.weight").astype(np.float64)
    t = -mean * s
    if bn.bias is not None:
        t = t + to_numpy(bn.bias, "bn.bias").astype(np.float64)
    return s, t


def _fold(
    w: np.ndarray, bias: Any, bn: Any, c_out: int, view: tuple[int, ...], s_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Scale `w` (viewed as `view`) by ``s.reshape(s_shape)``; fold the bias."""
    s, t = _bn_affine(bn, c_out)
    if bias is None:
        b = np.zeros(c_out)
    else:
        b = to_numpy(bias, "bias")
        if b.shape != (c_out,):
            raise ValueError(
                f"bias must have shape ({c_out},) to match the weight's output channels, got {b.shape}"
            )
        b = b.astype(np.float64)
    new_w = (w.reshape(view).astype(np.float64) * s.reshape(s_shape)).reshape(w.shape)
    return new_w.astype(w.dtype), (b * s + t).astype(w.dtype)


def _weight(weight: Any, min_ndim: int, max_ndim: int | None, layout: str) -> np.ndarray:
    w = to_numpy(weight, "weight")
    if w.dtype.kind != "f":
        raise TypeError(f"weight must be a floating array, got {describe(w)}")
    if w.ndim < min_ndim or (max_ndim is not None and w.ndim > max_ndim):
        raise ValueError(f"weight must have shape {layout}, got {w.ndim}D weight of shape {w.shape}")
    return w


_RETURNS_RAISES = """Returns
    -------
    weight : ndarray
        The folded weight, same shape and dtype as `weight`.
    bias : ndarray of shape (C_out,)
        The folded bias, in the weight's dtype.

    Raises
    ------
    ValueError
        If `bn` has no running statistics, its channel count differs from
        the weight's output channels, or a shape is wrong.
    TypeError
        If `weight` is not floating or `bn` is not a batch-norm layer."""

F = TypeVar("F", bound=Callable[..., Any])


_BIAS_BN = """bias : array_like of shape (C_out,) or None
        None is a zero bias.
    bn : batch-norm layer with C_out channels
        Its running statistics, eps, weight and bias are used.

    """


def _shared_sections(func: F) -> F:
    """Fill in the docstring sections the three fold functions share."""
    doc = (func.__doc__ or "").replace("{bias_bn_returns_raises}", _BIAS_BN + "{returns_raises}")
    func.__doc__ = doc.replace("{returns_raises}", _RETURNS_RAISES)
    return func


@_shared_sections
def fold_linear(weight: Any, bias: Any, bn: Any) -> tuple[np.ndarray, np.ndarray]:
    r"""Fold `bn` (in evaluation) into the preceding fully connected layer.

    ``bn(x @ weight.T + bias) == x @ W.T + b`` with ``W = s[:, None] * weight``
    and ``b = s * (bias - running_mean) + beta``, ``s = gamma /
    sqrt(running_var + eps)``.

    Parameters
    ----------
    weight : array_like of shape (C_out, C_in)
        PyTorch ``Linear.weight`` layout (tensors accepted).
    {bias_bn_returns_raises}

    Examples
    --------
    >>> import numpy as np, bnorm
    >>> from bnorm.fold import fold_linear
    >>> rng = np.random.default_rng(0)
    >>> w, x = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
    >>> bn = bnorm.BatchNorm1d(4, dtype=np.float64)
    >>> _ = bn(rng.normal(size=(8, 4)))                  # some running statistics
    >>> bn.eval()
    BatchNorm1d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, dtype=float64)
    >>> w2, b2 = fold_linear(w, None, bn)
    >>> bool(np.allclose(x @ w2.T + b2, bn(x @ w.T)))
    True
    """
    w = _weight(weight, 2, 2, "(C_out, C_in)")
    return _fold(w, bias, bn, w.shape[0], w.shape, (w.shape[0], 1))


@_shared_sections
def fold_conv(weight: Any, bias: Any, bn: Any) -> tuple[np.ndarray, np.ndarray]:
    r"""Fold `bn` (in evaluation) into the preceding convolution (any groups).

    Output channel o of a convolution is computed by ``weight[o]`` alone, so
    ``W[o] = s[o] * weight[o]`` and ``b = s * (bias - running_mean) + beta``,
    ``s = gamma / sqrt(running_var + eps)``, whatever the number of groups.

    Parameters
    ----------
    weight : array_like of shape (C_out, C_in / groups, \*k)
        PyTorch ``Conv1d/2d/3d.weight`` layout, k the kernel size.
    {bias_bn_returns_raises}

    Examples
    --------
    >>> import numpy as np, bnorm
    >>> from bnorm.fold import fold_conv
    >>> bn = bnorm.BatchNorm2d(2, dtype=np.float64)
    >>> bn.running_var[:] = [4.0, 0.25]
    >>> w, b = fold_conv(np.ones((2, 3, 1, 1)), np.array([1.0, 2.0]), bn)
    >>> w[:, 0, 0, 0].round(6), b.round(6)
    (array([0.499999, 1.99996 ]), array([0.499999, 3.99992 ]))
    """
    w = _weight(weight, 3, None, "(C_out, C_in / groups, *kernel)")
    return _fold(w, bias, bn, w.shape[0], w.shape, (w.shape[0],) + (1,) * (w.ndim - 1))


@_shared_sections
def fold_conv_transpose(weight: Any, bias: Any, bn: Any, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    r"""Fold `bn` (in evaluation) into the preceding transposed convolution.

    A transposed convolution stores its weight input-channel first, ``(C_in,
    C_out / groups, *k)``: output channel ``o = g * (C_out / groups) + j`` is
    made by ``weight[g * (C_in / groups) : (g + 1) * (C_in / groups), j]``.  So
    the scale ``s = gamma / sqrt(running_var + eps)`` multiplies axis 1 within
    each group, not axis 0 -- folding as for a plain convolution is a classic
    silent error.  ``b = s * (bias - running_mean) + beta``.

    Parameters
    ----------
    weight : array_like of shape (C_in, C_out / groups, \*k)
        PyTorch ``ConvTranspose1d/2d/3d.weight`` layout.
    bias : array_like of shape (C_out,) or None
        None is a zero bias.
    bn : batch-norm layer with C_out = groups * weight.shape[1] channels
        Its running statistics, eps, weight and bias are used.
    groups : int, default 1
        The transposed convolution's groups; must divide C_in.

    {returns_raises}

    Examples
    --------
    >>> import numpy as np, bnorm
    >>> from bnorm.fold import fold_conv_transpose
    >>> bn = bnorm.BatchNorm2d(4, dtype=np.float64)
    >>> bn.running_var[:] = [0.25, 1.0, 4.0, 16.0]
    >>> w, b = fold_conv_transpose(np.ones((2, 2, 3, 3)), None, bn, groups=2)
    >>> w[:, :, 0, 0].round(4)          # rows: input channels; columns: outputs within the group
    array([[2.  , 1.  ],
           [0.5 , 0.25]])
    """
    w = _weight(weight, 3, None, "(C_in, C_out / groups, *kernel)")
    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    g = int(groups)
    c_in, c_per = w.shape[0], w.shape[1]
    if c_in % g:
        raise ValueError(f"groups={g} must divide the weight's input channels (weight.shape[0] = {c_in})")
    k = w.shape[2:]
    view = (g, c_in // g, c_per, *k)
    s_shape = (g, 1, c_per) + (1,) * len(k)
    return _fold(w, bias, bn, g * c_per, view, s_shape)
