r"""Instance normalization: functional forward and backward kernels.

The semantics of :func:`torch.nn.functional.instance_norm`: every channel of
every sample is normalized over its spatial positions.  Optional running
statistics follow PyTorch exactly: each instance's mean and *unbiased* variance
enter the running average and the result is averaged over the batch.
It shares its kernels with group norm (:mod:`bnorm.functional._kernels.rowwise`):
instance norm is group norm with one channel per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._conventions import RunningAverage
from .._running import NonFinitePolicy, check_policy, stage_running_update
from .._validation import (
    as_float_input,
    check_buffer,
    check_channel_vector,
    check_eps,
    check_fraction,
    describe,
    shape_text,
)
from ._kernels.buffers import empty_output
from ._kernels.rowwise import as_rows, normalize, row_apply
from .group_norm import grouped_backward, grouped_plan

__all__ = ["instance_norm", "instance_norm_forward", "instance_norm_backward", "InstanceNormContext"]


@dataclass(frozen=True)
class InstanceNormContext:
    """What :func:`instance_norm_backward` needs from the forward pass.

    Attributes
    ----------
    input : ndarray of shape ``(N, C, *S)``
        The forward input (a reference, not a copy).
    mean, invstd : ndarray of shape (N * C,), float64
        Per (sample, channel) statistics the output was normalized with, row
        ``n * C + c``: the instance's mean and ``1 / sqrt(var_biased + eps)``
        when `use_input_stats`, else the running ones repeated over samples.
    weight : ndarray of shape (C,), or None
        gamma, a copy in the compute dtype (None: 1, and no grad_weight).
    weight_dtype, bias_dtype : dtype or None
        dtypes of the given weight and bias, for the returned gradients.
    use_input_stats : bool
        Whether the statistics were the input's own (they then depend on x).
    stats_updated : bool
        Whether the running buffers absorbed this batch.
    """

    input: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    weight: np.ndarray | None
    weight_dtype: np.dtype[Any] | None
    bias_dtype: np.dtype[Any] | None
    use_input_stats: bool
    stats_updated: bool


def instance_norm_forward(
    x: Any,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    weight: Any = None,
    bias: Any = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    on_nonfinite: NonFinitePolicy = "skip",
) -> tuple[np.ndarray, InstanceNormContext]:
    r"""Instance-normalize `x`; return the output and the context for backward.

    Same parameters as :func:`instance_norm`.  The context keeps a reference to
    `x` and per-(sample, channel) vectors, never a second full-size array.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import instance_norm_forward, instance_norm_backward
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 5))
    >>> y, ctx = instance_norm_forward(x, weight=np.full(3, 2.0), bias=np.zeros(3))
    >>> dx, dw, db = instance_norm_backward(np.ones_like(y), ctx)
    >>> bool(np.allclose(dx, 0)), db
    (True, array([10., 10., 10.]))
    """
    arr = as_float_input(x, "x")
    if arr.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (N, C, ...), got {arr.ndim}D input of shape {arr.shape}"
        )
    n, c = arr.shape[0], arr.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not isinstance(use_input_stats, (bool, np.bool_)):
        raise TypeError(f"use_input_stats must be a bool, got {describe(use_input_stats)}")
    use_input = bool(use_input_stats)
    mom = check_fraction(momentum, "momentum")
    assert mom is not None
    eps_f = check_eps(eps, training=False)
    policy = check_policy(on_nonfinite)
    w = check_channel_vector(weight, "weight", c, 1)
    b = check_channel_vector(bias, "bias", c, 1)
    plan = grouped_plan(arr, c)  # one group per channel
    gamma = None if w is None else w.astype(plan.dtype)
    new_rm = new_rv = None
    if use_input:
        spatial = plan.spatial
        if spatial == 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size {shape_text(arr.shape)}"
            )
        rm = None if running_mean is None else check_buffer(running_mean, "running_mean", c, 1)
        rv = None if running_var is None else check_buffer(running_var, "running_var", c, 1)
        y, mean, var, invstd = normalize(arr, plan, gamma, b, eps_f)
        if rm is not None and rv is not None and n > 0 and spatial > 0:
            # PyTorch: every instance updates a copy of the running buffer with its own
            # mean and unbiased variance; the copies are then averaged over the batch.
            # (PyTorch turns the buffers into NaN on an empty batch; bnorm leaves them as they are.)
            average = RunningAverage(momentum=mom)
            unbiased = var * (spatial / (spatial - 1))
            staged = stage_running_update(
                [
                    ("running_mean", rm, average.blend(rm, mean.reshape(n, c).mean(axis=0))),
                    ("running_var", rv, average.blend(rv, unbiased.reshape(n, c).mean(axis=0))),
                ],
                policy,
                stacklevel=3,
            )
            if staged is not None:
                new_rm, new_rv = staged[0][1], staged[1][1]
    else:
        if running_mean is None or running_var is None:
            raise ValueError(
                "Expected running_mean and running_var to be defined when use_input_stats is false"
            )
        rm_r = check_channel_vector(running_mean, "running_mean", c, 1)
        rv_r = check_channel_vector(running_var, "running_var", c, 1)
        assert rm_r is not None and rv_r is not None
        mean = np.tile(rm_r.astype(np.float64), n)
        with np.errstate(divide="ignore", invalid="ignore"):
            invstd = 1.0 / np.sqrt(np.tile(rv_r.astype(np.float64), n) + eps_f)
        y = empty_output(arr.shape, arr.dtype)
        row_apply(as_rows(arr, plan.rows), plan, mean, invstd, gamma, b, as_rows(y, plan.rows))

    # Every check has passed: only now touch the caller's buffers.
    if new_rm is not None and new_rv is not None:
        running_mean[...] = new_rm  # type: ignore[index]
        running_var[...] = new_rv  # type: ignore[index]
    ctx = InstanceNormContext(
        input=arr,
        mean=mean,
        invstd=invstd,
        weight=gamma,
        weight_dtype=None if w is None else w.dtype,
        bias_dtype=None if b is None else b.dtype,
        use_input_stats=use_input,
        stats_updated=new_rm is not None,
    )
    return y, ctx


def instance_norm(
    x: Any,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    weight: Any = None,
    bias: Any = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    on_nonfinite: NonFinitePolicy = "skip",
) -> np.ndarray:
    r"""Normalize each channel of each sample over its spatial positions.

    For ``(N, C, *S)`` input, with :math:`\mu_{nc}`, :math:`\sigma^2_{nc}` the
    mean and *biased* variance of sample n, channel c over the
    :math:`L = \prod S` spatial positions (`use_input_stats`), or the running
    statistics (``use_input_stats=False``):

    .. math::
        y_{ncs} = \gamma_c \, \frac{x_{ncs} - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}} + \beta_c

    The semantics of :func:`torch.nn.functional.instance_norm`; batch norm with
    batch size 1 is instance norm.

    Parameters
    ----------
    x : array_like of shape ``(N, C, *S)``
        At least 2-D.  float16 is computed in float32 and returned as float16;
        integer and bool input is promoted to float64.
    running_mean, running_var : ndarray of shape (C,) or None
        Both or neither.  With `use_input_stats` they are updated in place, as
        PyTorch does: every instance's mean and *unbiased* variance
        (``L / (L - 1)``) are averaged over the batch, then
        ``r = (1 - momentum) * r + momentum * batch_average``.  They keep their
        own dtype; an empty batch leaves them unchanged.  Without
        `use_input_stats` they are the statistics to normalize with (required).
    weight, bias : array_like of shape (C,) or None
        Per-channel gamma and beta; None means 1 and 0.
    use_input_stats : bool, default True
        Normalize with each instance's own statistics (PyTorch's training, and
        evaluation without running statistics).
    momentum : float in [0, 1], default 0.1
        PyTorch's weight on the new statistic.
    eps : float, default 1e-5
        Added to the variance; >= 0.
    on_nonfinite : {'skip', 'raise', 'propagate'}, default 'skip', keyword-only
        What an update of the running buffers that would not be finite does
        (NaN or inf in the input, or statistics that overflow the buffers'
        dtype): 'skip' leaves them unchanged with a RuntimeWarning, 'raise'
        raises FloatingPointError (nothing changed), 'propagate' writes it as
        PyTorch does.  The same policy as batch norm's.

    Returns
    -------
    ndarray
        Same shape and dtype as the (float) input.

    Raises
    ------
    ValueError
        Fewer than 2 dimensions; one spatial element with `use_input_stats`;
        only one of the running buffers given; no running statistics without
        `use_input_stats`; a parameter or buffer not of shape (C,); momentum
        outside [0, 1]; eps negative.
    TypeError
        A running buffer that is not a floating ndarray when it must be
        updated; a non-bool `use_input_stats`; complex/object input.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import instance_norm
    >>> x = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]]])     # N=1, C=2, L=3
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> instance_norm(x, rm, rv).round(4)
    array([[[-1.2247,  0.    ,  1.2247],
            [-0.7071, -0.7071,  1.4142]]])
    >>> rm, rv                       # 0.1 * mean, 0.9 + 0.1 * unbiased var
    (array([0.2, 0.2]), array([1. , 2.1]))
    """
    y, _ = instance_norm_forward(
        x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, on_nonfinite=on_nonfinite
    )
    return y


def instance_norm_backward(
    grad_output: Any, ctx: InstanceNormContext
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    r"""Gradients of instance norm with respect to input, weight and bias.

    With :math:`\hat x = (x - \mu_{nc})\,\mathrm{invstd}_{nc}`, and bars the
    mean over the L spatial positions of one (sample, channel):

    .. math::
        \frac{\partial L}{\partial x} = \gamma_c\,\mathrm{invstd}_{nc}
            \bigl(g - \bar g - \hat x\,\overline{g \hat x}\bigr),\qquad
        \frac{\partial L}{\partial \gamma_c} = \sum_{n,s} g\,\hat x,\qquad
        \frac{\partial L}{\partial \beta_c} = \sum_{n,s} g

    With running statistics (``use_input_stats=False``) the statistics are
    constants and ``dx = g * gamma_c * invstd_c``.

    Parameters
    ----------
    grad_output : array_like, same shape as the forward input
        The upstream gradient g.
    ctx : InstanceNormContext
        From :func:`instance_norm_forward`.

    Returns
    -------
    grad_input : ndarray
        Same shape and dtype as the forward input.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        None where the forward had no weight / bias; else in their dtype.

    Raises
    ------
    TypeError
        `ctx` is not an InstanceNormContext.
    ValueError
        `grad_output` does not have the input's shape.
    """
    return grouped_backward(grad_output, ctx, InstanceNormContext, "instance_norm_forward")
