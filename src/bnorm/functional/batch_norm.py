r"""Batch normalization: functional forward and backward kernels.

The functional API mirrors :func:`torch.nn.functional.batch_norm`; the
``(output, ctx)`` / ``backward(grad_output, ctx)`` pair exposes the kernels a
hand-written NumPy network needs.  The layer classes in :mod:`bnorm.layers` own
the state (parameters, running buffers, the batch counter); these functions
keep none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .._conventions import RunningAverage
from .._running import NonFinitePolicy, stage_running_update
from .._running import check_policy as _check_policy
from .._validation import (
    as_float_input,
    check_bool,
    check_buffer,
    check_channel_vector,
    check_eps,
    normalize_axis,
    shape_text,
)
from ._common import check_out, overlaps, param_grads, start_backward
from ._kernels import direct as _direct
from ._kernels import kernel_for
from ._kernels.buffers import empty_output
from ._kernels.channel import affine_pass, backward_pass
from ._kernels.moments import Moments, backward_sums, channel_moments, channel_view

__all__ = [
    "batch_norm",
    "batch_norm_forward",
    "batch_norm_backward",
    "BatchNormContext",
    "NonFinitePolicy",
    "StatsReducer",
]

# The functional default for `momentum`.  `momentum is _DEFAULT_MOMENTUM` tells the
# default from a value the caller passed (a literal 0.1 in the caller's code is a
# different float object), so `momentum=` together with `decay=` can be refused.
_DEFAULT_MOMENTUM = 0.1


class StatsReducer(Protocol):
    """Combines per-process partial statistics (SyncBatchNorm's hook).

    ``moments`` merges this process's :class:`~bnorm.functional._kernels.moments.Moments`
    with every other process's; ``sums`` adds the backward reductions
    ``(sum(g), sum(g * (x - mean)))`` over processes.  Single-process batch norm
    uses no reducer.
    """

    def moments(self, local: Moments) -> Moments:
        """The moments of the whole batch, given this process's."""
        ...

    def sums(self, sum_g: np.ndarray, sum_gx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sum(g), sum(g * (x - mean)))`` over every process, given this process's."""
        ...


@dataclass(frozen=True)
class BatchNormContext:
    """What :func:`batch_norm_backward` needs from the forward pass.

    Holds a *reference* to the input (no copy) and per-channel float64 vectors:
    backward recomputes ``x_hat`` instead of storing a second full-size array.

    Attributes
    ----------
    input : ndarray
        The forward input (float; integer input is kept as its float64 promotion).
    axis : int
        The channel axis, non-negative.
    mean, invstd : ndarray of shape (C,), float64
        The statistics the output was normalized with: the batch mean and
        ``1 / sqrt(var_biased + eps)`` when `batch_stats`, else the running ones.
    weight : ndarray of shape (C,), float64, or None
        gamma as float64 (None: gamma = 1 and no grad_weight).
    weight_dtype, bias_dtype : dtype or None
        dtypes of the given weight and bias, for the returned gradients.
    batch_stats : bool
        Whether batch statistics were used (training, or no running statistics).
    count : int
        Values per channel the statistics were taken over (the global count
        under a reducer).
    stats_updated : bool
        Whether the running buffers absorbed this batch.
    """

    input: np.ndarray
    axis: int
    mean: np.ndarray
    invstd: np.ndarray
    weight: np.ndarray | None
    weight_dtype: np.dtype[Any] | None
    bias_dtype: np.dtype[Any] | None
    batch_stats: bool
    count: int
    stats_updated: bool
    reducer: StatsReducer | None = None
    input_overwritten: bool = False


_RUNNING: dict[tuple[float | None, float | None], RunningAverage] = {}


def _running_average(momentum: Any, decay: Any) -> RunningAverage:
    """``RunningAverage.from_args`` for the functional API, remembered for plain floats.

    Validating and building the frozen dataclass costs ~1.5 us, a tenth of a
    small call; the same (momentum, decay) pair comes back every step.
    """
    plain = type(momentum) in (float, type(None)) and type(decay) in (float, type(None))
    if plain and (momentum, decay) in _RUNNING:
        return _RUNNING[(momentum, decay)]
    running = RunningAverage.from_args(momentum, decay, allow_cumulative=False)
    if plain and len(_RUNNING) < 64:
        _RUNNING[(momentum, decay)] = running
    return running


def _forward(
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    training: bool,
    running: RunningAverage,
    eps: Any,
    axis: Any,
    unbiased_running_var: bool,
    on_nonfinite: NonFinitePolicy,
    out: Any,
    *,
    num_batches_tracked: int = 0,
    reducer: StatsReducer | None = None,
    require_eval_stats: bool = True,
) -> tuple[np.ndarray, BatchNormContext]:
    """The shared forward of :func:`batch_norm_forward` and the layers.

    `running` says how to update the buffers; `num_batches_tracked` is the
    counter *after* this batch's increment (used by the cumulative average).
    Everything is validated before any buffer is written.
    """
    x = as_float_input(input, "input")
    if x.ndim < 2:
        raise ValueError(
            f"input must have at least 2 dimensions (N, C, ...), got {x.ndim}D input of shape {x.shape}"
        )
    ax = normalize_axis(axis, x.ndim)
    c = x.shape[ax]
    _check_policy(on_nonfinite)
    training = check_bool(training, "training")
    batch_stats = training or running_mean is None or running_var is None
    if not training and require_eval_stats:
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if buf is None:
                raise ValueError(f"{name} must be defined in evaluation mode")
    eps_f = check_eps(eps, training=batch_stats)
    w = check_channel_vector(weight, "weight", c, ax, x.shape)
    b = check_channel_vector(bias, "bias", c, ax, x.shape)
    if training:
        rm = None if running_mean is None else check_buffer(running_mean, "running_mean", c, ax, x.shape)
        rv = None if running_var is None else check_buffer(running_var, "running_var", c, ax, x.shape)
    else:
        rm = check_channel_vector(running_mean, "running_mean", c, ax, x.shape)
        rv = check_channel_vector(running_var, "running_var", c, ax, x.shape)
    out_dtype = x.dtype
    y = empty_output(x.shape, out_dtype) if out is None else check_out(out, x.shape, out_dtype)
    x3 = channel_view(x, ax)
    a, _, nb = x3.shape
    if batch_stats and reducer is None and a * nb == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {shape_text(x.shape)}"
        )
    gamma = None if w is None else w.astype(np.float64)
    beta = None if b is None else b.astype(np.float64)
    mean: np.ndarray | None = None
    invstd: np.ndarray | None = None
    var: np.ndarray | None = None
    written = False  # y holds the output already
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if not batch_stats:
            assert rm is not None and rv is not None
            mean = rm.astype(np.float64)
            invstd = 1.0 / np.sqrt(rv.astype(np.float64) + eps_f)
        # Which kernels serve this call: see bnorm.functional._kernels.kernel_for.
        if reducer is None and kernel_for("batch_norm", x3) == "direct":
            x2, y2 = x3.reshape(a, -1), y.reshape(a, -1)
            if out is not None and np.may_share_memory(x2, y2):
                x2 = x2.copy()  # out= over the input: a small copy keeps the bits of out=None
            if batch_stats:
                # Into a scratch array where out= must stay untouched until the stats are known.
                d2 = y2 if out is None else np.empty_like(y2)
                stats = _direct.forward_batch(x2, nb, y2, d2, gamma, beta, eps_f)
                if stats is not None:
                    mean, var, invstd = stats
                    written = True
            else:
                assert mean is not None and invstd is not None
                written = _direct.forward_eval(x2, nb, y2, mean, invstd, gamma, beta)
        if batch_stats and not written:
            # float32 sums within rows (float64 across): statistics within float32 rounding, 2-3x faster.
            local = channel_moments(x3, accumulate="compute")
            moments = local if reducer is None else reducer.moments(local)
            if moments.count == 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, got input size "
                    f"{shape_text(x.shape)} (1 value per channel over all processes)"
                )
            mean = moments.mean
            var = moments.var(ddof=0) if moments.count > 0 else np.zeros(c)
            invstd = 1.0 / np.sqrt(var + eps_f)
    assert mean is not None and invstd is not None
    n = (moments.count if not written else a * nb) if batch_stats else 0

    stats_updated = False
    new_rm = new_rv = None
    if batch_stats and training and n > 0 and (rm is not None or rv is not None):
        assert var is not None
        # The shared non-finite policy (bnorm._running), checked after the cast to the
        # buffers' dtype; the direct kernels return finite statistics only.
        updates = []
        if rm is not None:
            updates.append(("running_mean", rm, running.blend(rm, mean, num_batches_tracked)))
        if rv is not None:
            batch_var = var * (n / (n - 1)) if unbiased_running_var else var
            updates.append(("running_var", rv, running.blend(rv, batch_var, num_batches_tracked)))
        staged = stage_running_update(updates, on_nonfinite, stacklevel=4)
        if staged is not None:
            stats_updated = True
            new_rm = staged[0][1] if rm is not None else None
            new_rv = staged[-1][1] if rv is not None else None

    if not written and x.size:
        # y = (x - mean) * alpha + beta with alpha = gamma * invstd.  PyTorch's CPU kernel
        # folds the mean into the shift (x * alpha + (beta - mean * alpha)), which in
        # float32 rounds at eps * |x * alpha|: a constant channel at 1e4 comes out as
        # ~0.6 instead of 0.  Centering first keeps the error relative to |y|; where
        # |mean| <= 2 * sqrt(var + eps) the fold costs nothing and saves a pass.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            alpha = invstd if gamma is None else gamma * invstd
            shift = np.zeros(c) if beta is None else beta
            affine_pass(x3, alpha, shift, channel_view(y, ax), center=mean, spread=1.0 / invstd)

    # Every check has passed: only now touch the caller's buffers.
    if new_rm is not None:
        rm[...] = new_rm  # type: ignore[index]
    if new_rv is not None:
        rv[...] = new_rv  # type: ignore[index]

    ctx = BatchNormContext(
        input=x,
        axis=ax,
        mean=mean,
        invstd=invstd,
        weight=gamma,
        weight_dtype=None if w is None else w.dtype,
        bias_dtype=None if b is None else b.dtype,
        batch_stats=batch_stats,
        count=n if batch_stats else a * nb,
        stats_updated=stats_updated,
        reducer=reducer,
        input_overwritten=out is not None and overlaps(y, x),
    )
    return y, ctx


def batch_norm_forward(
    input: Any,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = _DEFAULT_MOMENTUM,
    eps: float = 1e-5,
    *,
    decay: float | None = None,
    axis: int = 1,
    unbiased_running_var: bool = True,
    on_nonfinite: NonFinitePolicy = "skip",
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, BatchNormContext]:
    r"""Batch-normalize `input` and return the output with the context for backward.

    Same parameters as :func:`batch_norm`; returns ``(output, ctx)`` where `ctx`
    (a :class:`BatchNormContext`) keeps a reference to `input` and per-channel
    vectors, never a second full-size array.  Pass `ctx` to
    :func:`batch_norm_backward`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import batch_norm_forward, batch_norm_backward
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    >>> y, ctx = batch_norm_forward(x, None, None, training=True)
    >>> dx, dw, db = batch_norm_backward(np.ones_like(y), ctx)
    >>> np.allclose(dx, 0), dw, db
    (True, None, None)
    """
    if decay is not None and momentum is not _DEFAULT_MOMENTUM:
        raise ValueError(
            f"give either momentum (weight on the new batch) or decay (weight on the old value), "
            f"not both: got momentum={momentum!r} and decay={decay!r}"
        )
    if momentum is None and decay is None:
        raise ValueError(
            "momentum=None (the cumulative average) needs a batch counter: use a BatchNorm layer, "
            "or pass momentum=1/num_batches_tracked"
        )
    running = _running_average(momentum, decay)
    if not isinstance(unbiased_running_var, (bool, np.bool_)):
        raise TypeError(f"unbiased_running_var must be a bool, got {type(unbiased_running_var).__name__}")
    return _forward(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        running,
        eps,
        axis,
        bool(unbiased_running_var),
        on_nonfinite,
        out,
    )


def batch_norm(
    input: Any,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = _DEFAULT_MOMENTUM,
    eps: float = 1e-5,
    *,
    decay: float | None = None,
    axis: int = 1,
    unbiased_running_var: bool = True,
    on_nonfinite: NonFinitePolicy = "skip",
    out: np.ndarray | None = None,
) -> np.ndarray:
    r"""Normalize each channel of `input` over the batch and every other axis.

    The semantics of :func:`torch.nn.functional.batch_norm`: in training, batch
    statistics are used and the running buffers (when given) are updated in
    place; in evaluation the running statistics are used.

    .. math::
        y = \gamma \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with :math:`\mu`, :math:`\sigma^2` the per-channel mean and *biased*
    variance of the batch (training) or the running statistics (evaluation).

    Parameters
    ----------
    input : array_like of shape (N, C, \*S), or channels-last with ``axis=-1``
        At least 2-D.  float16 is computed in float32 and returned as float16;
        integer and bool input is promoted to float64.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics.  In training they are updated in place (when given)::

            momentum form: r = (1 - momentum) * r + momentum * b
            decay form:    r = decay * r + (1 - decay) * b

        where ``b`` is the batch mean, and for `running_var` the batch variance,
        unbiased (``n / (n - 1)``, PyTorch) or biased (Keras, ONNX, Flax) per
        `unbiased_running_var`; ``n = N * prod(S)``.  They keep their own dtype.
        In evaluation both are required.
    weight, bias : array_like of shape (C,) or None
        gamma and beta; None means 1 and 0.
    training : bool
        Use batch statistics and update the running buffers.
    momentum : float in [0, 1]
        PyTorch's weight on the new batch statistic.
    eps : float
        Added to the variance; > 0 in training, >= 0 in evaluation.
    decay : float in [0, 1] or None
        The weight on the *old* running value (Keras/TF/ONNX/Flax/d2l
        ``momentum``, TF 1's ``decay``, the from-scratch ``moving_momentum``); the
        same average as ``momentum = 1 - decay``.  Give momentum or decay, not both.
    axis : int
        The channel axis: 1 (channels-first, PyTorch/ONNX) or -1 (channels-last,
        Keras/Flax); any axis is accepted.
    unbiased_running_var : bool
        Whether `running_var` absorbs the unbiased batch variance (PyTorch) or
        the biased one.  Normalization always uses the biased variance.
    on_nonfinite : {'skip', 'raise', 'propagate'}
        What a batch whose statistics are NaN or inf does to the running
        buffers: 'skip' leaves them unchanged with a RuntimeWarning, 'raise'
        raises FloatingPointError (nothing changed), 'propagate' updates them
        as PyTorch does.
    out : ndarray or None
        A C-contiguous array of the input's shape and dtype to write into.

    Returns
    -------
    ndarray
        Same shape and dtype as the (float) input.

    Raises
    ------
    ValueError
        Fewer than 2 dimensions; a parameter or buffer not of shape (C,); one
        value per channel with batch statistics; eps <= 0 in training or < 0;
        momentum or decay outside [0, 1] or both given; eval without running
        statistics.
    TypeError
        Complex, object or string input; a running buffer that is not a
        floating ndarray in training.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional import batch_norm
    >>> x = np.arange(15.0).reshape(5, 3)
    >>> batch_norm(x, None, None, training=True)[:, 0].round(4)
    array([-1.4142, -0.7071,  0.    ,  0.7071,  1.4142])
    >>> rm, rv = np.zeros(3), np.ones(3)
    >>> _ = batch_norm(x, rm, rv, training=True, decay=0.9, unbiased_running_var=False)
    >>> rm
    array([0.6, 0.7, 0.8])
    """
    y, _ = batch_norm_forward(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        decay=decay,
        axis=axis,
        unbiased_running_var=unbiased_running_var,
        on_nonfinite=on_nonfinite,
        out=out,
    )
    return y


def batch_norm_backward(
    grad_output: Any, ctx: BatchNormContext, *, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    r"""Gradients of batch norm with respect to input, weight and bias.

    With ``g`` the upstream gradient, ``m`` the values per channel and
    :math:`\hat x = (x - \mu)\,\mathrm{invstd}`:

    Batch statistics (training, or no running statistics)::

        dbeta  = sum(g)
        dgamma = sum(g * x_hat)
        dx     = gamma * invstd / m * (m * g - sum(g) - x_hat * sum(g * x_hat))

    Running statistics (evaluation; they are constants)::

        dx     = g * gamma / sqrt(running_var + eps)
        dgamma = sum(g * (x - running_mean)) / sqrt(running_var + eps)
        dbeta  = sum(g)

    Sums run over every axis but the channel axis.

    Parameters
    ----------
    grad_output : array_like, same shape as the forward input
        The upstream gradient.
    ctx : BatchNormContext
        From :func:`batch_norm_forward` (or a layer's forward).
    out : ndarray or None
        A C-contiguous array of the input's shape and dtype for grad_input.

    Returns
    -------
    grad_input : ndarray
        Same shape and dtype as the forward input.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        None where the forward had no weight / bias; else in their dtype.
    """
    user_out = out is not None
    if not user_out and isinstance(ctx, BatchNormContext):
        out = empty_output(ctx.input.shape, ctx.input.dtype)  # a dropped output's memory, if any
    x, g, dx = start_backward(grad_output, ctx, BatchNormContext, "batch_norm_forward", out)
    if ctx.input_overwritten:
        raise ValueError(
            "the forward pass wrote its output over its input (out=input), so the input "
            "backward needs is gone; run the forward with a separate out= to differentiate"
        )
    ax = ctx.axis
    x3 = channel_view(x, ax)
    g3 = channel_view(g, ax)
    c = x3.shape[1]
    gamma = ctx.weight if ctx.weight is not None else np.ones(c)
    k = gamma * ctx.invstd
    if x.size and ctx.reducer is None and kernel_for("batch_norm", x3, g3) == "direct":
        a, _, nb = x3.shape
        x2, g2, dx2 = x3.reshape(a, -1), g3.reshape(a, -1), dx.reshape(a, -1)
        if user_out:  # out= over an input: a small copy keeps the bits of out=None
            x2 = x2.copy() if np.may_share_memory(x2, dx2) else x2
            g2 = g2.copy() if np.may_share_memory(g2, dx2) else g2
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            sums = _direct.backward(g2, x2, nb, ctx.mean, ctx.invstd, gamma, dx2, batch_stats=ctx.batch_stats)
        if sums is not None:
            grad_weight, grad_bias = param_grads(
                sums[1] * ctx.invstd, sums[0], ctx.weight_dtype, ctx.bias_dtype
            )
            return dx, grad_weight, grad_bias
    if x.size:
        sum_g, sum_gx = backward_sums(g3, x3, ctx.mean, ctx.invstd, accumulate="compute")
    else:
        sum_g, sum_gx = np.zeros(c), np.zeros(c)
    # The parameter gradients are this process's contributions (under a reducer their
    # sum over processes is the full gradient, as with PyTorch under DDP) ...
    grad_weight, grad_bias = param_grads(sum_gx * ctx.invstd, sum_g, ctx.weight_dtype, ctx.bias_dtype)
    # ... while grad_input needs the sums over the whole (global) batch.
    if ctx.batch_stats and ctx.reducer is not None:
        sum_g, sum_gx = ctx.reducer.sums(sum_g, sum_gx)
    if x.size:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if ctx.batch_stats:
                m = ctx.count
                coef_x = -k * ctx.invstd * ctx.invstd * sum_gx / m  # -k * invstd * sum(g * x_hat) / m
                coef_c = -k * sum_g / m - coef_x * ctx.mean
                # Offset data (|mean| > 2 std): shift x by the mean first (see backward_pass).
                offset = not bool(np.all(np.abs(ctx.mean) * ctx.invstd <= 2.0))
                center = ctx.mean if offset else None
                backward_pass(g3, x3, k, coef_x, coef_c, channel_view(dx, ax), center=center)
            else:
                backward_pass(g3, x3, k, None, None, channel_view(dx, ax))
    return dx, grad_weight, grad_bias
