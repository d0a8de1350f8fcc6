r"""Group normalization: functional forward and backward kernels.

The semantics of :func:`torch.nn.functional.group_norm`: each sample's channels
are split into ``num_groups`` groups of consecutive channels, and every group
of every sample is normalized over its channels and spatial positions.  No
running statistics: training and evaluation compute the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import as_float_input, check_channel_vector, check_eps, check_positive_int
from ._common import param_grads, start_backward
from ._kernels.rowwise import RowPlan, normalize, normalize_backward, plan_for

__all__ = ["group_norm", "group_norm_forward", "group_norm_backward", "GroupNormContext"]


@dataclass(frozen=True)
class GroupNormContext:
    """What :func:`group_norm_backward` needs from the forward pass.

    Attributes
    ----------
    input : ndarray of shape ``(N, C, *S)``
        The forward input (a reference, not a copy).
    num_groups : int
        G.
    mean, invstd : ndarray of shape (N * G,), float64
        Per (sample, group) mean and ``1 / sqrt(var_biased + eps)``, row
        ``n * G + g``.
    weight : ndarray of shape (C,), or None
        gamma, a copy in the compute dtype (None: 1, and no grad_weight).
    weight_dtype, bias_dtype : dtype or None
        dtypes of the given weight and bias, for the returned gradients.
    """

    input: np.ndarray
    num_groups: int
    mean: np.ndarray
    invstd: np.ndarray
    weight: np.ndarray | None
    weight_dtype: np.dtype[Any] | None
    bias_dtype: np.dtype[Any] | None


def check_num_groups(num_groups: Any) -> int:
    """num_groups must be a positive int."""
    return check_positive_int(num_groups, "num_groups")


def grouped_plan(x: np.ndarray, num_groups: int) -> RowPlan:
    """The row-wise plan of ``(N, C, *S)`` input: ``N * G`` rows of ``C / G * prod(S)`` values."""
    n, c = x.shape[0], x.shape[1]
    return plan_for(x, n * num_groups, c // num_groups, math.prod(x.shape[2:]), num_groups)


def grouped_backward(
    grad_output: Any, ctx: Any, cls: type[Any], forward: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The backward group norm and instance norm share: checks, row kernels, parameter gradients.

    Instance norm's context has one group per channel and says whether its
    statistics were the input's own (``use_input_stats``).
    """
    x, g, dx = start_backward(grad_output, ctx, cls, forward)
    dgamma, dbeta = normalize_backward(
        g,
        x,
        dx,
        grouped_plan(x, ctx.num_groups if isinstance(ctx, GroupNormContext) else x.shape[1]),
        ctx.mean,
        ctx.invstd,
        ctx.weight,
        stats_depend=getattr(ctx, "use_input_stats", True),
        want_params=ctx.weight_dtype is not None or ctx.bias_dtype is not None,
    )
    return (dx, *param_grads(dgamma, dbeta, ctx.weight_dtype, ctx.bias_dtype))


def group_norm_forward(
    x: Any,
    num_groups: int,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, GroupNormContext]:
    r"""Group-normalize `x`; return the output and the context for backward.

    Same parameters as :func:`group_norm`.  The context keeps a reference to
    `x` and per-(sample, group) vectors, never a second full-size array.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import group_norm_forward, group_norm_backward
    >>> x = np.arange(24.0).reshape(2, 4, 3)
    >>> y, ctx = group_norm_forward(x, 2, weight=np.ones(4), bias=np.zeros(4))
    >>> dx, dw, db = group_norm_backward(np.ones_like(y), ctx)
    >>> bool(np.allclose(dx, 0)), db
    (True, array([6., 6., 6., 6.]))
    """
    x = as_float_input(x, "x")
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (N, C, ...), got {x.ndim}D input of shape {x.shape}"
        )
    groups = check_num_groups(num_groups)
    c = x.shape[1]
    if c % groups:
        raise ValueError(
            f"num_groups={groups} must divide the number of channels x.shape[1]={c} (x of shape {x.shape})"
        )
    # PyTorch's check (F.group_norm -> _verify_batch_size on [N * C // G, G, *S]): one
    # value per group overall is refused; its message and list format are kept verbatim.
    size = [x.shape[0] * c // groups, groups, *x.shape[2:]]
    if x.shape[0] * (c // groups) * math.prod(x.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    eps_f = check_eps(eps, training=False)
    w = check_channel_vector(weight, "weight", c, 1)
    b = check_channel_vector(bias, "bias", c, 1)
    plan = grouped_plan(x, groups)
    gamma = None if w is None else w.astype(plan.dtype)
    y, mean, _var, invstd = normalize(x, plan, gamma, b, eps_f)
    ctx = GroupNormContext(
        input=x,
        num_groups=groups,
        mean=mean,
        invstd=invstd,
        weight=gamma,
        weight_dtype=None if w is None else w.dtype,
        bias_dtype=None if b is None else b.dtype,
    )
    return y, ctx


def group_norm(
    x: Any,
    num_groups: int,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
) -> np.ndarray:
    r"""Normalize each group of channels of each sample (group normalization).

    The channels of ``(N, C, *S)`` input are split into G = `num_groups` groups
    of ``C / G`` consecutive channels; with :math:`\mu_{ng}`,
    :math:`\sigma^2_{ng}` the mean and *biased* variance of sample n over the
    channels of group g and all spatial positions
    (:math:`M = C/G \cdot \prod S` values):

    .. math::
        y_{ncs} = \gamma_c \, \frac{x_{ncs} - \mu_{ng(c)}}{\sqrt{\sigma^2_{ng(c)} + \epsilon}} + \beta_c

    G = 1 is layer norm over ``(C, *S)`` with per-channel affine; G = C is
    instance norm.  The semantics of :func:`torch.nn.functional.group_norm`.

    Parameters
    ----------
    x : array_like of shape ``(N, C, *S)``
        At least 2-D.  float16 is computed in float32 and returned as float16;
        integer and bool input is promoted to float64.
    num_groups : int
        G, a positive divisor of C.
    weight, bias : array_like of shape (C,) or None
        Per-channel gamma and beta; None means 1 and 0.
    eps : float, default 1e-5
        Added to the variance; >= 0 (0 is allowed, as in PyTorch, and gives NaN
        for a constant group).

    Returns
    -------
    ndarray
        Same shape and dtype as the (float) input.

    Raises
    ------
    ValueError
        Fewer than 2 dimensions; num_groups not positive or not dividing C;
        a single value in all of the input's groups together (``N * C / G *
        prod(S) == 1``, PyTorch's check and message); weight or bias not of
        shape (C,); eps negative or not finite.
    TypeError
        A non-integer num_groups, a non-number eps, or complex/object input.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import group_norm
    >>> x = np.arange(8.0).reshape(1, 4, 2)
    >>> group_norm(x, 2).round(4)        # groups {0, 1} and {2, 3}: values 0..3 and 4..7
    array([[[-1.3416, -0.4472],
            [ 0.4472,  1.3416],
            [-1.3416, -0.4472],
            [ 0.4472,  1.3416]]])
    """
    y, _ = group_norm_forward(x, num_groups, weight, bias, eps)
    return y


def group_norm_backward(
    grad_output: Any, ctx: GroupNormContext
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    r"""Gradients of group norm with respect to input, weight and bias.

    With :math:`\hat x = (x - \mu_{ng})\,\mathrm{invstd}_{ng}`,
    :math:`\hat g = g\,\gamma_c` and bars meaning the mean over the M values of
    a (sample, group) row:

    .. math::
        \frac{\partial L}{\partial x} = \mathrm{invstd}_{ng}
            \bigl(\hat g - \overline{\hat g} - \hat x\,\overline{\hat g \hat x}\bigr),\qquad
        \frac{\partial L}{\partial \gamma_c} = \sum_{n,s} g\,\hat x,\qquad
        \frac{\partial L}{\partial \beta_c} = \sum_{n,s} g

    Parameters
    ----------
    grad_output : array_like, same shape as the forward input
        The upstream gradient g.
    ctx : GroupNormContext
        From :func:`group_norm_forward`.

    Returns
    -------
    grad_input : ndarray
        Same shape and dtype as the forward input.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        None where the forward had no weight / bias; else in their dtype.

    Raises
    ------
    TypeError
        `ctx` is not a GroupNormContext.
    ValueError
        `grad_output` does not have the input's shape.
    """
    return grouped_backward(grad_output, ctx, GroupNormContext, "group_norm_forward")
