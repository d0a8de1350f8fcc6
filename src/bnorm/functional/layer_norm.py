r"""Layer normalization: functional forward and backward kernels.

The semantics of :func:`torch.nn.functional.layer_norm`: every sample (every
index of the leading "batch" axes) is normalized over its trailing
``normalized_shape`` axes, with an elementwise affine of that shape.

Layout.  The input is the ``(R, M)`` matrix of ``R = prod(batch axes)`` rows
of ``M = prod(normalized_shape)`` values, normalized by the fused row-wise
kernels of :mod:`bnorm.functional._kernels.rowwise` (statistics and the
affine on one cached tile of rows; float64 row statistics; the centered
form, so a constant row gives exactly beta).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import as_float_input, check_eps, describe
from ._common import param_grads, start_backward
from ._kernels.rowwise import RowPlan, normalize, normalize_backward, plan_for

__all__ = [
    "layer_norm",
    "layer_norm_forward",
    "layer_norm_backward",
    "LayerNormContext",
    "check_normalized_shape",
    "check_trailing_shape",
    "check_elementwise",
    "trailing_plan",
    "trailing_inputs",
]


@dataclass(frozen=True)
class LayerNormContext:
    """What :func:`layer_norm_backward` needs from the forward pass.

    Attributes
    ----------
    input : ndarray of shape ``(*B, *normalized_shape)``
        The forward input (a reference, not a copy).
    normalized_shape : tuple of int
        The trailing shape normalized over.
    mean, invstd : ndarray of shape (prod(B),), float64
        Per-row mean and ``1 / sqrt(var_biased + eps)``.
    weight : ndarray of shape (prod(normalized_shape),), or None
        gamma, flattened, a copy in the compute dtype (None: 1, and no grad_weight).
    weight_dtype, bias_dtype : dtype or None
        dtypes of the given weight and bias, for the returned gradients.
    """

    input: np.ndarray
    normalized_shape: tuple[int, ...]
    mean: np.ndarray
    invstd: np.ndarray
    weight: np.ndarray | None
    weight_dtype: np.dtype[Any] | None
    bias_dtype: np.dtype[Any] | None


def check_normalized_shape(normalized_shape: Any) -> tuple[int, ...]:
    """`normalized_shape` as a non-empty tuple of non-negative ints (an int is a 1-tuple)."""
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, (bool, np.bool_)):
        items: Sequence[Any] = (normalized_shape,)
    elif isinstance(normalized_shape, (tuple, list)) or (
        isinstance(normalized_shape, np.ndarray) and normalized_shape.ndim == 1
    ):
        items = tuple(normalized_shape)
    else:
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, got {describe(normalized_shape)}"
        )
    for d in items:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"normalized_shape must contain only ints, got {tuple(items)!r}")
        if d < 0:
            raise ValueError(f"normalized_shape must contain only non-negative sizes, got {tuple(items)!r}")
    if not items:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    return tuple(int(d) for d in items)


def trailing_inputs(
    x: Any, normalized_shape: Any, weight: Any
) -> tuple[np.ndarray, tuple[int, ...], np.ndarray | None]:
    """Layer norm's and RMSNorm's checks: float `x` ending with `normalized_shape`, and the weight."""
    arr = as_float_input(x, "x")
    shape = check_normalized_shape(normalized_shape)
    check_trailing_shape(arr, shape)
    return arr, shape, check_elementwise(weight, "weight", shape)


def trailing_plan(x: np.ndarray, shape: tuple[int, ...], *, center: bool = True) -> RowPlan:
    """The row-wise plan of `x` normalized over its trailing `shape`: rows of prod(shape) values."""
    m = math.prod(shape)
    return plan_for(
        x, x.size // m if m else math.prod(x.shape[: x.ndim - len(shape)]), m, 1, 1, center=center
    )


def check_trailing_shape(x: np.ndarray, shape: tuple[int, ...]) -> None:
    """`x` must end with `shape` (layer norm's and RMSNorm's normalized_shape)."""
    k = len(shape)
    if x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"x must end with normalized_shape={shape}: expected input of shape (*, "
            f"{', '.join(map(str, shape))}), got {x.shape}"
        )


def check_elementwise(value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """An elementwise parameter of shape `shape` (layer norm's and RMSNorm's weight and bias)."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real floating array, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape normalized_shape={shape}, got {arr.shape}")
    return arr


def layer_norm_forward(
    x: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, LayerNormContext]:
    r"""Layer-normalize `x`; return the output and the context for backward.

    Same parameters as :func:`layer_norm`.  The context keeps a reference to
    `x` and per-row vectors, never a second full-size array.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import layer_norm_forward, layer_norm_backward
    >>> x = np.arange(6.0).reshape(2, 3)
    >>> y, ctx = layer_norm_forward(x, 3, weight=np.ones(3), bias=np.zeros(3))
    >>> dx, dw, db = layer_norm_backward(np.ones_like(y), ctx)
    >>> bool(np.allclose(dx, 0)), db
    (True, array([2., 2., 2.]))
    """
    arr, shape, w = trailing_inputs(x, normalized_shape, weight)
    eps_f = check_eps(eps, training=False)
    b = check_elementwise(bias, "bias", shape)
    plan = trailing_plan(arr, shape)
    gamma = None if w is None else w.astype(plan.dtype).ravel()
    y, mean, _var, invstd = normalize(arr, plan, gamma, b, eps_f)
    ctx = LayerNormContext(
        input=arr,
        normalized_shape=shape,
        mean=mean,
        invstd=invstd,
        weight=gamma,
        weight_dtype=None if w is None else w.dtype,
        bias_dtype=None if b is None else b.dtype,
    )
    return y, ctx


def layer_norm(
    x: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
) -> np.ndarray:
    r"""Normalize each sample of `x` over its trailing `normalized_shape` axes.

    For input of shape ``(*B, *F)`` with ``F = normalized_shape``, each of the
    ``prod(B)`` rows of :math:`M = \prod F` values is normalized with its own mean
    :math:`\mu` and *biased* variance :math:`\sigma^2`, then scaled and shifted
    elementwise:

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \odot \gamma + \beta

    The semantics of :func:`torch.nn.functional.layer_norm`.

    Parameters
    ----------
    x : array_like of shape ``(*B, *normalized_shape)``
        float16 is computed in float32 and returned as float16; integer and bool
        input is promoted to float64.
    normalized_shape : int or sequence of int
        F, the trailing shape to normalize over (an int means ``(int,)``).
    weight, bias : array_like of shape normalized_shape, or None
        Elementwise gamma and beta; None means 1 and 0.
    eps : float, default 1e-5
        Added to the variance; >= 0 (0 is allowed, as in PyTorch, and gives NaN
        for a constant row).

    Returns
    -------
    ndarray
        Same shape and dtype as the (float) input.

    Raises
    ------
    ValueError
        The input's trailing shape is not `normalized_shape`; `normalized_shape`
        empty or negative; weight or bias not of shape `normalized_shape`; eps
        negative or not finite.
    TypeError
        `normalized_shape` not an int or a sequence of ints; complex/object input.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import layer_norm
    >>> layer_norm(np.array([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]]), 3).round(4)
    array([[-1.2247,  0.    ,  1.2247],
           [-0.7071, -0.7071,  1.4142]])
    """
    y, _ = layer_norm_forward(x, normalized_shape, weight, bias, eps)
    return y


def layer_norm_backward(
    grad_output: Any, ctx: LayerNormContext
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    r"""Gradients of layer norm with respect to input, weight and bias.

    With :math:`\hat x = (x - \mu_r)\,\mathrm{invstd}_r`, :math:`\hat g = g
    \odot \gamma` and bars the mean over the M values of row r:

    .. math::
        \frac{\partial L}{\partial x} = \mathrm{invstd}_r
            \bigl(\hat g - \overline{\hat g} - \hat x\,\overline{\hat g \hat x}\bigr),\qquad
        \frac{\partial L}{\partial \gamma} = \sum_r g \odot \hat x,\qquad
        \frac{\partial L}{\partial \beta} = \sum_r g

    Computed tile by tile of whole rows (:func:`~bnorm.functional._kernels.rowwise.row_backward`):
    per tile ``x - mean``, the column sums of ``g`` and ``g * x_hat`` and the
    row sums of ``g_hat`` and ``g_hat * (x - mean)`` (BLAS against ones,
    gamma and invstd), then dx; x_hat is recomputed, never stored.

    Parameters
    ----------
    grad_output : array_like, same shape as the forward input
        The upstream gradient g.
    ctx : LayerNormContext
        From :func:`layer_norm_forward`.

    Returns
    -------
    grad_input : ndarray
        Same shape and dtype as the forward input.
    grad_weight, grad_bias : ndarray of shape normalized_shape, or None
        None where the forward had no weight / bias; else in their dtype.

    Raises
    ------
    TypeError
        `ctx` is not a LayerNormContext.
    ValueError
        `grad_output` does not have the input's shape.
    """
    x, g, dx = start_backward(grad_output, ctx, LayerNormContext, "layer_norm_forward")
    dgamma, dbeta = normalize_backward(
        g,
        x,
        dx,
        trailing_plan(x, ctx.normalized_shape),
        ctx.mean,
        ctx.invstd,
        ctx.weight,
        want_params=ctx.weight_dtype is not None or ctx.bias_dtype is not None,
    )
    shape = ctx.normalized_shape
    return (dx, *param_grads(dgamma, dbeta, ctx.weight_dtype, ctx.bias_dtype, shape))
