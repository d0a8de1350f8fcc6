r"""Batch renormalization (Ioffe 2017): functional forward and backward kernels.

Batch renormalization corrects each training batch's normalization towards
the moving statistics, so the output a layer trains on is the output it will
give at inference:

.. math::
    \hat x = \frac{x - \mu_B}{\sigma_B}, \quad
    r = \mathrm{clip}_{[r_{min},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big), \quad
    d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big), \quad
    y = \gamma\,(r\,\hat x + d) + \beta

per channel, with :math:`\mu_B` and :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] +
\epsilon}` the batch mean and standard deviation (biased variance),
:math:`\mu` and :math:`\sigma` the moving ones (``running_mean``,
``running_std``), and :math:`\sigma` floored at :math:`\sqrt{\epsilon}`
before dividing (as Keras does).  r and d are constants for
differentiation (the paper's stop-gradient), so the training gradients are
batch norm's with gamma replaced by ``r * gamma``:

.. math::
    \frac{\partial L}{\partial \gamma} = \sum g\,(r \hat x + d), \quad
    \frac{\partial L}{\partial \beta} = \sum g, \quad
    \frac{\partial L}{\partial x} = \text{batch norm's } dx \text{ with } \gamma \to r\gamma.

Shapes: `input` is ``(N, C, *S)`` (or channels-last with ``axis=-1``); every
per-channel vector is ``(C,)``.  Numerics: the statistics are those of
:func:`bnorm.functional.batch_norm` (float64 per-channel vectors); r and d are
float64.  The arithmetic is batch norm's: the output is one affine pass with
the batch statistics, the composed scale ``r * gamma`` and the composed shift
``d * gamma + beta``, and backward is :func:`batch_norm_backward` on that pass.
"""

from __future__ import annotations

import math
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
    describe,
    normalize_axis,
)
from ._batch_pass import batch_moments, normalize_with
from ._common import start_backward
from .batch_norm import (
    _DEFAULT_MOMENTUM,
    BatchNormContext,
    batch_norm_backward,
    batch_norm_forward,
)

__all__ = [
    "BatchRenormContext",
    "batch_renorm",
    "batch_renorm_forward",
    "batch_renorm_backward",
    "check_clipping",
]


@dataclass(frozen=True)
class BatchRenormContext:
    r"""What :func:`batch_renorm_backward` needs from the forward pass.

    Attributes
    ----------
    bn : BatchNormContext
        The batch-norm pass the output was computed with (scale ``r * gamma``,
        shift ``d * gamma + beta``; a reference to the input, no copy).
    r, d : ndarray of shape (C,), float64
        The corrections used (ones and zeros in evaluation).
    batch_mean, batch_std : ndarray of shape (C,), float64, or None
        :math:`\mu_B` and :math:`\sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}`
        (None in evaluation).
    weight_dtype, bias_dtype : dtype or None
        dtypes of the given weight and bias (None: no such parameter, no gradient).
    """

    bn: BatchNormContext
    r: np.ndarray
    d: np.ndarray
    batch_mean: np.ndarray | None
    batch_std: np.ndarray | None
    weight_dtype: np.dtype[Any] | None
    bias_dtype: np.dtype[Any] | None


def _check_limit(value: Any, name: str, *, positive: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number or None (unclipped), got {describe(value)}")
    v = float(value)
    if math.isnan(v) or v < 0 or (positive and v == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {bound} (or None for no clipping), got {value!r}")
    return v


def check_clipping(r_max: Any, r_min: Any, d_max: Any) -> tuple[float | None, float | None, float | None]:
    """Validate renorm clipping limits: ``r_max > 0``, ``r_min >= 0``, ``r_min <= r_max``, ``d_max >= 0``.

    None (or ``inf`` for `r_max` and `d_max`) means no clipping on that side.
    Returns the limits as floats (None kept).
    """
    rmax = _check_limit(r_max, "r_max", positive=True)
    rmin = _check_limit(r_min, "r_min", positive=False)
    dmax = _check_limit(d_max, "d_max", positive=False)
    if rmax is not None and rmin is not None and rmin > rmax:
        raise ValueError(
            f"r_min must be <= r_max, got r_min={r_min!r} and r_max={r_max!r} "
            "(the paper's schedule clips r to [1 / r_max, r_max])"
        )
    return rmax, rmin, dmax


def corrections(
    batch_mean: np.ndarray,
    batch_std: np.ndarray,
    mean: Any,
    std: Any,
    eps: float,
    clipping: tuple[float | None, float | None, float | None],
) -> tuple[np.ndarray, np.ndarray]:
    """R and d (float64) of a batch against moving statistics `mean`, `std`.

    ``std`` is floored at ``sqrt(eps)`` (Keras' guard against dividing by a
    near-zero moving deviation); r is raised to `r_min` and then lowered to
    `r_max` (Keras' order), d is clipped to ``[-d_max, d_max]``.
    """
    rmax, rmin, dmax = clipping
    sigma = np.maximum(np.asarray(std, dtype=np.float64), math.sqrt(eps))
    with np.errstate(invalid="ignore"):
        r = batch_std / sigma
        d = (batch_mean - np.asarray(mean, dtype=np.float64)) / sigma
        if rmin is not None:
            r = np.maximum(r, rmin)
        if rmax is not None:
            r = np.minimum(r, rmax)
        if dmax is not None:
            d = np.clip(d, -dmax, dmax)
    return r, d


def renorm_pass(
    x: np.ndarray,
    ax: int,
    mean: Any,
    std: Any,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    clipping: tuple[float | None, float | None, float | None],
    out: Any = None,
) -> tuple[np.ndarray, BatchRenormContext]:
    """The training forward against moving statistics `mean`, `std`; updates nothing.

    `x` is a float array, `ax` its non-negative channel axis, `weight` and
    `bias` checked vectors or None.  The caller updates whichever moving
    statistics it keeps from ``ctx.batch_mean`` and ``ctx.batch_std``.
    """
    batch_mean, var, n = batch_moments(x, ax)
    c = batch_mean.shape[0]
    batch_std = np.sqrt(var + eps)
    r, d = corrections(batch_mean, batch_std, mean, std, eps, clipping)
    gamma = np.ones(c) if weight is None else weight.astype(np.float64)
    beta = np.zeros(c) if bias is None else bias.astype(np.float64)
    # gamma * (r * x_hat + d) + beta = x_hat * (r * gamma) + (d * gamma + beta): batch
    # norm's single pass with the composed scale and shift.
    y, bn = normalize_with(x, ax, batch_mean, var, n, r * gamma, d * gamma + beta, eps, out)
    ctx = BatchRenormContext(
        bn=bn,
        r=r,
        d=d,
        batch_mean=batch_mean,
        batch_std=batch_std,
        weight_dtype=None if weight is None else weight.dtype,
        bias_dtype=None if bias is None else bias.dtype,
    )
    return y, ctx


def batch_renorm_forward(
    input: Any,
    running_mean: np.ndarray,
    running_std: np.ndarray,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = _DEFAULT_MOMENTUM,
    eps: float = 1e-5,
    *,
    decay: float | None = None,
    r_max: float | None = None,
    r_min: float | None = None,
    d_max: float | None = None,
    axis: int = 1,
    on_nonfinite: NonFinitePolicy = "skip",
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, BatchRenormContext]:
    r"""Batch-renormalize `input`; return the output and the context for backward.

    The paper's algorithm (Ioffe 2017, Algorithm 1) with one pair of moving
    statistics, :math:`\mu` (`running_mean`) and :math:`\sigma`
    (`running_std`), used both for the corrections and for inference.

    Training::

        sigma_B = sqrt(var_B + eps)                    (biased batch variance)
        r = clip(sigma_B / max(sigma, sqrt(eps)), r_min, r_max)
        d = clip((mu_B - mu) / max(sigma, sqrt(eps)), -d_max, d_max)
        y = gamma * (r * (x - mu_B) / sigma_B + d) + beta

    then, in place, ``mu <- (1 - momentum) * mu + momentum * mu_B`` and
    ``sigma <- (1 - momentum) * sigma + momentum * sigma_B`` (or the `decay`
    form ``mu <- decay * mu + (1 - decay) * mu_B``).  Evaluation::

        y = gamma * (x - mu) / sigma + beta

    Parameters
    ----------
    input : array_like of shape (N, C, \*S), or channels-last with ``axis=-1``
        At least 2-D.
    running_mean, running_std : ndarray of shape (C,)
        :math:`\mu` and :math:`\sigma` (init 0 and 1).  Updated in place in
        training (floating, writeable arrays then).
    weight, bias : array_like of shape (C,) or None
        gamma and beta; None means 1 and 0.
    training : bool
        Batch statistics with the corrections, and update the moving statistics.
    momentum : float in [0, 1]
        PyTorch's weight on the new batch.
    eps : float
        Added to the batch variance, > 0.
    decay : float in [0, 1] or None, keyword-only
        The weight on the old value instead (Keras' ``momentum``); give
        momentum or decay, not both.
    r_max, r_min, d_max : float or None, keyword-only
        Clipping of r to ``[r_min, r_max]`` and of d to ``[-d_max, d_max]``;
        None is no clipping on that side (Keras' ``renorm_clipping`` keys
        ``rmax``, ``rmin``, ``dmax``).  The paper clips r to ``[1 / r_max, r_max]``:
        pass ``r_min=1 / r_max``.  ``r_max = r_min = 1, d_max = 0`` is batch norm.
    axis : int, keyword-only
        The channel axis.
    on_nonfinite : {'skip', 'raise', 'propagate'}, keyword-only
        What non-finite batch statistics do to the moving statistics (as in
        :func:`batch_norm`).
    out : ndarray or None, keyword-only
        A C-contiguous array of the input's shape and dtype to write into.

    Returns
    -------
    output : ndarray
        Same shape and dtype as the (float) input.
    ctx : BatchRenormContext
        For :func:`batch_renorm_backward`; ``ctx.r`` and ``ctx.d`` are the
        corrections used.

    Raises
    ------
    ValueError
        As :func:`batch_norm`, and for clipping limits out of range
        (``r_max <= 0``, ``r_min < 0``, ``r_min > r_max``, ``d_max < 0``).

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import batch_renorm_forward, batch_renorm_backward
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    >>> mu, sigma = np.zeros(2), np.ones(2)
    >>> y, ctx = batch_renorm_forward(x, mu, sigma, training=True, r_max=3.0, r_min=1 / 3, d_max=5.0)
    >>> ctx.r, ctx.d                       # clipped: sigma_B = 1.63 and 3.27 against sigma = 1
    (array([1.63299622, 3.        ]), array([3., 5.]))
    >>> mu, sigma.round(4)                 # the moving statistics moved by momentum 0.1
    (array([0.3, 0.6]), array([1.0633, 1.2266]))
    >>> dx, dgamma, dbeta = batch_renorm_backward(np.ones_like(y), ctx)
    """
    if decay is not None and momentum is not _DEFAULT_MOMENTUM:
        raise ValueError(
            f"give either momentum (weight on the new batch) or decay (weight on the old value), "
            f"not both: got momentum={momentum!r} and decay={decay!r}"
        )
    running = RunningAverage.from_args(momentum, decay, allow_cumulative=False)
    clipping = check_clipping(r_max, r_min, d_max)
    policy = check_policy(on_nonfinite)
    x = as_float_input(input, "input")
    if x.ndim < 2:
        raise ValueError(
            f"input must have at least 2 dimensions (N, C, ...), got {x.ndim}D input of shape {x.shape}"
        )
    ax = normalize_axis(axis, x.ndim)
    c = x.shape[ax]
    for name, buf in (("running_mean", running_mean), ("running_std", running_std)):
        if buf is None:
            raise ValueError(
                f"{name} must be given: batch renormalization corrects towards the moving statistics "
                "(start from zeros and ones)"
            )
    w = check_channel_vector(weight, "weight", c, ax)
    b = check_channel_vector(bias, "bias", c, ax)
    if not training:
        mu = check_channel_vector(running_mean, "running_mean", c, ax)
        sigma = check_channel_vector(running_std, "running_std", c, ax)
        assert mu is not None and sigma is not None
        eps_f = check_eps(eps, training=False)
        # (x - mu) / sigma through batch norm's evaluation pass: var = sigma**2 - eps.
        var = np.maximum(sigma.astype(np.float64) ** 2 - eps_f, 0.0)
        y, bn = batch_norm_forward(x, mu, var, w, b, False, eps=eps_f, axis=ax, out=out)
        ones, zeros = np.ones(c), np.zeros(c)
        ctx = BatchRenormContext(bn, ones, zeros, None, None, bn.weight_dtype, bn.bias_dtype)
        return y, ctx
    eps_f = check_eps(eps, training=True)
    mu = check_buffer(running_mean, "running_mean", c, ax)
    sigma = check_buffer(running_std, "running_std", c, ax)
    y, ctx = renorm_pass(x, ax, mu, sigma, w, b, eps_f, clipping, out)
    assert ctx.batch_mean is not None and ctx.batch_std is not None
    if ctx.bn.count > 0:
        # the shared non-finite policy, checked after the cast to the buffers' dtype
        updates = [
            ("running_mean", mu, running.blend(mu, ctx.batch_mean)),
            ("running_std", sigma, running.blend(sigma, ctx.batch_std)),
        ]
        for buffer, value in stage_running_update(updates, policy, stacklevel=2) or ():
            buffer[...] = value
    return y, ctx


def batch_renorm(
    input: Any,
    running_mean: np.ndarray,
    running_std: np.ndarray,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = _DEFAULT_MOMENTUM,
    eps: float = 1e-5,
    *,
    decay: float | None = None,
    r_max: float | None = None,
    r_min: float | None = None,
    d_max: float | None = None,
    axis: int = 1,
    on_nonfinite: NonFinitePolicy = "skip",
    out: np.ndarray | None = None,
) -> np.ndarray:
    r"""Batch renormalization; the output of :func:`batch_renorm_forward` (see there).

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import batch_renorm, batch_norm
    >>> x = np.random.default_rng(0).normal(size=(8, 3))
    >>> y = batch_renorm(x, np.zeros(3), np.ones(3), training=True, r_max=1, r_min=1, d_max=0)
    >>> bool(np.allclose(y, batch_norm(x, None, None, training=True)))   # no correction: batch norm
    True
    """
    y, _ = batch_renorm_forward(
        input,
        running_mean,
        running_std,
        weight,
        bias,
        training,
        momentum,
        eps,
        decay=decay,
        r_max=r_max,
        r_min=r_min,
        d_max=d_max,
        axis=axis,
        on_nonfinite=on_nonfinite,
        out=out,
    )
    return y


def batch_renorm_backward(
    grad_output: Any, ctx: BatchRenormContext, *, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    r"""Gradients of batch renormalization with respect to input, weight and bias.

    r and d are constants (the paper's stop-gradient).  With ``g`` the
    upstream gradient, ``m`` values per channel and ``x_hat = (x - mu_B) / sigma_B``::

        dbeta  = sum(g)
        dgamma = sum(g * (r * x_hat + d))
        dx     = r * gamma / sigma_B / m * (m * g - sum(g) - x_hat * sum(g * x_hat))

    (batch norm's training gradient with gamma replaced by ``r * gamma``).
    In evaluation the moving statistics are constants: ``dx = g * gamma / sigma``,
    ``dgamma = sum(g * (x - mu) / sigma)``, ``dbeta = sum(g)``.

    Parameters
    ----------
    grad_output : array_like, same shape as the forward input
        The upstream gradient.
    ctx : BatchRenormContext
        From :func:`batch_renorm_forward` (or :class:`bnorm.BatchRenorm`'s forward).
    out : ndarray or None, keyword-only
        A C-contiguous array of the input's shape and dtype for grad_input.

    Returns
    -------
    grad_input : ndarray
        Same shape and dtype as the forward input.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        None where the forward had no weight / bias; else in their dtypes.
    """
    if not isinstance(ctx, BatchRenormContext):
        # the standard message ("ctx must be the BatchRenormContext returned by ...")
        start_backward(grad_output, ctx, BatchRenormContext, "batch_renorm_forward")
    dx, sum_gxhat, sum_g = batch_norm_backward(grad_output, ctx.bn, out=out)
    grad_weight = grad_bias = None
    if ctx.weight_dtype is not None:
        if ctx.batch_mean is None:  # evaluation: the pass's weight was gamma itself
            dgamma = sum_gxhat
        else:  # the pass's weight was r * gamma, its gradient sum(g * x_hat)
            assert sum_gxhat is not None and sum_g is not None
            dgamma = ctx.r * sum_gxhat.astype(np.float64) + ctx.d * sum_g.astype(np.float64)
        assert dgamma is not None
        grad_weight = dgamma.astype(ctx.weight_dtype)
    if ctx.bias_dtype is not None:
        assert sum_g is not None
        grad_bias = sum_g.astype(ctx.bias_dtype)
    return dx, grad_weight, grad_bias
