r"""RMS normalization: functional forward and backward kernels.

The semantics of :func:`torch.nn.functional.rms_norm` (Zhang & Sennrich 2019,
the normalization of LLaMA, T5 and Gemma): every sample is divided by the root
mean square of its trailing ``normalized_shape`` values, with an elementwise
scale of that shape; nothing is subtracted.  It runs on layer norm's row-wise
kernels (:mod:`bnorm.functional._kernels.rowwise`) without the centering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import check_eps, compute_dtype
from ._common import start_backward
from ._kernels.rowwise import normalize, normalize_backward
from .layer_norm import trailing_inputs, trailing_plan

__all__ = ["rms_norm", "rms_norm_forward", "rms_norm_backward", "RMSNormContext", "default_rms_eps"]


@dataclass(frozen=True)
class RMSNormContext:
    """What :func:`rms_norm_backward` needs from the forward pass.

    Attributes
    ----------
    input : ndarray of shape ``(*B, *normalized_shape)``
        The forward input (a reference, not a copy).
    normalized_shape : tuple of int
        The trailing shape normalized over.
    invstd : ndarray of shape (prod(B),), float64
        Per-row ``1 / sqrt(mean(x**2) + eps)``.
    eps : float
        The eps the forward used (the resolved default when it was None).
    weight : ndarray of shape (prod(normalized_shape),), or None
        gamma, flattened, a copy in the compute dtype (None: 1, and no grad_weight).
    weight_dtype : dtype or None
        dtype of the given weight, for the returned gradient.
    """

    input: np.ndarray
    normalized_shape: tuple[int, ...]
    invstd: np.ndarray
    eps: float
    weight: np.ndarray | None
    weight_dtype: np.dtype[Any] | None


def default_rms_eps(dtype: Any) -> float:
    """PyTorch's ``eps=None`` for input of `dtype`: the machine epsilon of its compute dtype.

    ``torch.finfo(dtype).eps`` for float32 and float64; float16 (and bfloat16)
    input is computed in float32 and gets float32's epsilon, as PyTorch's
    ``rms_norm`` does (its "opmath" type).  The weight's dtype plays no part.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import default_rms_eps
    >>> default_rms_eps(np.float32), default_rms_eps(np.float16) == default_rms_eps(np.float32)
    (1.1920928955078125e-07, True)
    """
    return float(np.finfo(compute_dtype(np.dtype(dtype))).eps)


def rms_norm_forward(
    x: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    eps: float | None = None,
) -> tuple[np.ndarray, RMSNormContext]:
    r"""RMS-normalize `x`; return the output and the context for backward.

    Same parameters as :func:`rms_norm`.  The context keeps a reference to `x`
    and one float64 value per row, never a second full-size array.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import rms_norm_forward, rms_norm_backward
    >>> x = np.array([[3.0, 4.0], [1.0, -1.0]])
    >>> y, ctx = rms_norm_forward(x, 2, weight=np.ones(2), eps=0.0)
    >>> y.round(4)
    array([[ 0.8485,  1.1314],
           [ 1.    , -1.    ]])
    >>> dx, dw = rms_norm_backward(np.ones_like(y), ctx)
    >>> dw.round(4)
    array([1.8485, 0.1314])
    """
    arr, shape, w = trailing_inputs(x, normalized_shape, weight)
    eps_f = default_rms_eps(arr.dtype) if eps is None else check_eps(eps, training=False)
    plan = trailing_plan(arr, shape, center=False)
    gamma = None if w is None else w.astype(plan.dtype).ravel()
    y, _mean, _ms, invstd = normalize(arr, plan, gamma, None, eps_f)
    ctx = RMSNormContext(
        input=arr,
        normalized_shape=shape,
        invstd=invstd,
        eps=eps_f,
        weight=gamma,
        weight_dtype=None if w is None else w.dtype,
    )
    return y, ctx


def rms_norm(
    x: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    eps: float | None = None,
) -> np.ndarray:
    r"""Divide each sample of `x` by the root mean square of its trailing `normalized_shape` axes.

    For input of shape ``(*B, *F)`` with ``F = normalized_shape``, each of the
    ``prod(B)`` rows of :math:`M = \prod F` values is scaled by the inverse of
    its root mean square, then elementwise by gamma:

    .. math::
        y = \frac{x}{\sqrt{\frac{1}{M}\sum_{j=1}^{M} x_j^2 + \epsilon}} \odot \gamma

    Nothing is subtracted and there is no beta.  The semantics of
    :func:`torch.nn.functional.rms_norm` (and :class:`torch.nn.RMSNorm`).

    Parameters
    ----------
    x : array_like of shape ``(*B, *normalized_shape)``
        float16 is computed in float32 and returned as float16; integer and
        bool input is promoted to float64.
    normalized_shape : int or sequence of int
        F, the trailing shape to normalize over (an int means ``(int,)``).
    weight : array_like of shape normalized_shape, or None
        Elementwise gamma; None means 1.
    eps : float or None, default None
        Added to the mean square; >= 0.  None is PyTorch's default, the machine
        epsilon of the input's compute dtype (:func:`default_rms_eps`:
        ``1.19e-07`` for float32 and float16 input, ``2.22e-16`` for float64),
        whatever the weight's dtype.

    Returns
    -------
    ndarray
        Same shape and dtype as the (float) input.

    Raises
    ------
    ValueError
        The input's trailing shape is not `normalized_shape`; `normalized_shape`
        empty or negative; weight not of shape `normalized_shape`; eps
        negative or not finite.
    TypeError
        `normalized_shape` not an int or a sequence of ints; a non-number eps;
        complex/object input.

    Notes
    -----
    Other frameworks' forms of the same normalization, and how to get them:

    * **Keras 3** ``keras.layers.RMSNormalization(axis=-1, epsilon=1e-6)``
      computes the same formula with the weight called ``scale`` and a default
      epsilon of ``1e-6``: ``rms_norm(x, x.shape[-1:], scale, eps=1e-6)``.
      Its ``axis`` lists the normalized axes; bnorm normalizes trailing axes,
      so ``axis=-1`` is ``normalized_shape=x.shape[-1:]`` and ``axis=[-2, -1]``
      is ``x.shape[-2:]``; for other axes move them last first
      (``np.moveaxis``).
    * **ONNX** ``RMSNormalization`` (opset 23) normalizes over the axes
      ``axis, ..., rank - 1`` (default ``axis=-1``) with ``epsilon=1e-5`` by
      default, an attribute stored as float32:
      ``rms_norm(x, x.shape[axis:], scale, eps=float(np.float32(1e-5)))``.
      Its ``stash_type`` (default 1, float32) names the compute precision;
      bnorm computes float64 input in float64 (ONNX's reference
      implementation does so too) and float16 in float32.
    * **Flax** ``nn.RMSNorm(epsilon=1e-6)`` is the Keras form
      (``eps=1e-6``) over the last axis.

    The backward (:func:`rms_norm_backward`), with :math:`r = (\overline{x^2}
    + \epsilon)^{-1/2}` and :math:`\hat g = g \odot \gamma`:
    :math:`dx = r\,\hat g - x\,r^3\,\overline{\hat g\,x}`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import rms_norm
    >>> rms_norm(np.array([[3.0, 4.0]]), 2, eps=0.0).round(4)     # rms = sqrt(12.5)
    array([[0.8485, 1.1314]])
    """
    y, _ = rms_norm_forward(x, normalized_shape, weight, eps)
    return y


def rms_norm_backward(grad_output: Any, ctx: RMSNormContext) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Gradients of RMS norm with respect to input and weight.

    With :math:`r = (\overline{x^2} + \epsilon)^{-1/2}` per row,
    :math:`\hat g = g \odot \gamma` and bars the mean over the M values of a
    row:

    .. math::
        \frac{\partial L}{\partial x} = r\,\hat g - x\,r^3\,\overline{\hat g\,x},\qquad
        \frac{\partial L}{\partial \gamma} = \sum_{\text{rows}} g \odot x\,r

    Parameters
    ----------
    grad_output : array_like, same shape as the forward input
        The upstream gradient g.
    ctx : RMSNormContext
        From :func:`rms_norm_forward`.

    Returns
    -------
    grad_input : ndarray
        Same shape and dtype as the forward input.
    grad_weight : ndarray of shape normalized_shape, or None
        None where the forward had no weight; else in its dtype.  (RMSNorm has
        no bias, so the pair is one gradient per input of the forward; layer
        norm's backward returns a third, grad_bias.)

    Raises
    ------
    TypeError
        `ctx` is not an RMSNormContext.
    ValueError
        `grad_output` does not have the input's shape.
    """
    x, g, dx = start_backward(grad_output, ctx, RMSNormContext, "rms_norm_forward")
    plan = trailing_plan(x, ctx.normalized_shape, center=False)
    zero_mean = np.zeros(plan.rows)
    dgamma, _ = normalize_backward(
        g, x, dx, plan, zero_mean, ctx.invstd, ctx.weight, want_params=ctx.weight_dtype is not None
    )
    gw = None if ctx.weight_dtype is None else dgamma.reshape(ctx.normalized_shape).astype(ctx.weight_dtype)
    return dx, gw
