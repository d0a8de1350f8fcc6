r"""Batch-renormalization layers: ``BatchRenorm`` (any rank) and ``BatchRenorm1d/2d/3d``.

The layer owns the moving statistics and the clipping limits; the arithmetic
is :mod:`bnorm.functional.batch_renorm`.  Two sets of moving statistics exist
when the corrections use their own average (Keras 3): ``renorm_mean`` /
``renorm_std`` (weight ``renorm_momentum`` / ``renorm_decay``) give r and d,
``running_mean`` / ``running_std`` (weight ``momentum`` / ``decay``) serve
inference.  Without a renorm average (the paper) one set serves both and the
``renorm_*`` buffers are None.  ``running_var`` is derived,
``max(running_std**2 - eps, 0)``, so evaluation is exactly batch norm with
``running_mean`` and ``running_var`` (as Keras computes it).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .._conventions import RunningAverage, check_momentum, records_explicit
from .._running import NonFinitePolicy, stage_running_update
from .._validation import as_float_input, check_fraction, check_positive_int
from ..functional.batch_norm import BatchNormContext, batch_norm_backward, batch_norm_forward
from ..functional.batch_renorm import (
    BatchRenormContext,
    batch_renorm_backward,
    check_clipping,
    renorm_pass,
)
from .batchnorm import _BatchNormBase

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]

_DOC = inspect.cleandoc(
    r"""
    Parameters
    ----------
    num_features : int
        C, the number of channels (the size of the input along `axis`).
    eps : float, default 1e-5
        Added to the batch variance: :math:`\sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}`.
    momentum : float in [0, 1] or None, default 0.1
        PyTorch-style weight on the new batch of the moving statistics
        ``running_mean`` and ``running_std``; None is the cumulative average.
    affine : bool, default True
        Learnable gamma (``weight``, init 1) and beta (``bias``, init 0).
    r_max, r_min, d_max : float or None, keyword-only
        Clipping: r to ``[r_min, r_max]``, d to ``[-d_max, d_max]``; None is
        unclipped on that side, as a missing key of Keras' ``renorm_clipping``
        (``rmax``, ``rmin``, ``dmax``).  The paper clips r to ``[1/r_max,
        r_max]``: set ``r_min = 1 / r_max``.  Attributes: change them between
        steps for a warm-up schedule (see the Examples).
    renorm_momentum, renorm_decay : float in [0, 1] or None, keyword-only
        The moving statistics r and d are measured against (``renorm_mean``,
        ``renorm_std``), as `momentum` / `decay` but for those: weight on the
        new batch / on the old value.  Keras' ``renorm_momentum=0.99`` is
        ``renorm_decay=0.99``.  Both None (default): r and d use ``running_mean``
        and ``running_std`` themselves, as in the paper.
    decay : float in [0, 1] or None, keyword-only
        Weight on the old value of ``running_mean`` / ``running_std`` instead of
        `momentum` (Keras' ``momentum``).  Give momentum or decay, not both.
    axis : int, default 1, keyword-only
        The channel axis: 1 channels-first, -1 channels-last.
    convention : {'keras', 'torch', 'onnx', 'flax', 'd2l'} or None, keyword-only
        A preset of eps, axis and momentum/decay (:data:`bnorm.CONVENTIONS`);
        'keras' also sets ``renorm_decay=0.99``, so ``convention="keras"`` with
        Keras' arguments is Keras 3 ``BatchNormalization(renorm=True)``.
        Explicit arguments override the preset.
    dtype : dtype, default float32, keyword-only
        dtype of the parameters and moving statistics.
    on_nonfinite : {'skip', 'raise', 'propagate'}, default 'skip', keyword-only
        What a batch whose moving-statistics update is not finite (NaN or inf
        in the input, or an overflow of the buffers' dtype) does: skipped with a
        RuntimeWarning (and not counted), FloatingPointError, or written as
        PyTorch's batch norm would.

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
        gamma and beta.
    running_mean, running_std : ndarray of shape (C,)
        Moving :math:`\mu` and :math:`\sigma` (init 0 and 1; Keras
        ``moving_mean``, ``moving_stddev``).
    running_var : ndarray of shape (C,)
        What evaluation normalizes with (Keras ``moving_variance``): init 1,
        then ``max(running_std**2 - eps, 0)`` after every training step.
    renorm_mean, renorm_std : ndarray of shape (C,) or None
        The separate averages r and d use (Keras ``renorm_mean``,
        ``renorm_stddev``); None without `renorm_momentum` / `renorm_decay`.
    num_batches_tracked : ndarray of shape (), int64
        Training batches absorbed (for schedules; Keras keeps no counter).
    r, d : ndarray of shape (C,) or None
        The corrections of the last training forward.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Set by :meth:`backward`.

    Notes
    -----
    Training, per channel, with :math:`\mu, \sigma` the renorm averages (or
    the running ones):

    .. math::
        r = \mathrm{clip}_{[r_{min}, r_{max}]}\frac{\sigma_B}{\max(\sigma, \sqrt\epsilon)}, \quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\frac{\mu_B - \mu}{\max(\sigma, \sqrt\epsilon)}, \quad
        y = \gamma \Big(r \frac{x - \mu_B}{\sigma_B} + d\Big) + \beta

    with r and d constants in backward.  Then every moving statistic absorbs
    the batch's :math:`\mu_B` or :math:`\sigma_B` by its own weight
    (``renorm_*`` first when separate; all use the values from before this
    step), and ``running_var = max(running_std**2 - eps, 0)``.  Evaluation:
    :math:`y = \gamma (x - \mu_{run}) / \sqrt{\mathrm{running\_var} + \epsilon} + \beta`.

    bnorm's own form (``convention=None``) is the paper's algorithm (Ioffe 2017)
    with PyTorch's momentum (``r = (1 - 0.1) * r + 0.1 * b``) and eps 1e-5,
    channels-first.  ``convention="keras"``: decay 0.99, ``renorm_decay``
    0.99, eps 1e-3, channels-last -- Keras 3's algorithm step for step.
    The paper's warm-up (r_max from 1 to 3, d_max from 0 to 5) is a schedule
    applied by hand: Keras builds none in (its ``renorm_clipping`` is fixed
    per layer); here the limits are attributes to set between steps.
    """
)

_EXAMPLES = inspect.cleandoc(
    r"""
    Examples
    --------
    The paper's warm-up: train as batch norm first (r = 1, d = 0), then open
    the clipping gradually.  The limits are attributes, set before each step:

    >>> import numpy as np
    >>> import bnorm
    >>> brn = bnorm.BatchRenorm1d(4, r_max=1.0, r_min=1.0, d_max=0.0)
    >>> def schedule(step):          # r_max 1 -> 3 and d_max 0 -> 5 over 5k-40k / 5k-25k steps
    ...     t_r = min(max((step - 5_000) / 35_000, 0.0), 1.0)
    ...     t_d = min(max((step - 5_000) / 20_000, 0.0), 1.0)
    ...     return 1.0 + 2.0 * t_r, 5.0 * t_d
    >>> rng = np.random.default_rng(0)
    >>> for step in (0, 20_000, 40_000):
    ...     brn.r_max, brn.d_max = schedule(step)
    ...     brn.r_min = 1.0 / brn.r_max
    ...     y = brn(rng.normal(size=(16, 4)))
    >>> brn.r_max, brn.d_max, int(brn.num_batches_tracked)
    (3.0, 5.0, 3)

    Keras 3 ``BatchNormalization(renorm=True, renorm_clipping={"rmax": 3, "dmax": 5})``:

    >>> k = bnorm.BatchRenorm(4, r_max=3, d_max=5, convention="keras")
    >>> k
    BatchRenorm(4, eps=0.001, decay=0.99, renorm_decay=0.99, r_max=3.0, d_max=5.0, axis=-1)
    """
)


class _BatchRenormBase(_BatchNormBase):
    __doc__ = "Shared state and behaviour of the batch-renormalization layers.\n\n" + _DOC + "\n"

    _buffers: tuple[str, ...] = (
        "running_mean",
        "running_var",
        "running_std",
        "renorm_mean",
        "renorm_std",
        "num_batches_tracked",
    )

    @records_explicit
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        *,
        r_max: float | None = None,
        r_min: float | None = None,
        d_max: float | None = None,
        renorm_momentum: float | None = None,
        renorm_decay: float | None = None,
        decay: float | None = None,
        axis: int = 1,
        convention: str | None = None,
        dtype: DTypeLike = np.float32,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        explicit: frozenset[str] = getattr(self, "_explicit_args", frozenset())
        clipping = check_clipping(r_max, r_min, d_max)
        if renorm_momentum is not None and renorm_decay is not None:
            raise ValueError(
                "give either renorm_momentum (weight on the new batch) or renorm_decay (weight on "
                f"the old value), not both: got renorm_momentum={renorm_momentum!r} and "
                f"renorm_decay={renorm_decay!r}"
            )
        if convention == "keras" and not {"renorm_momentum", "renorm_decay"} & explicit:
            renorm_decay = 0.99  # Keras' renorm_momentum default (a weight on the old value)
        renorm: RunningAverage | None = None
        if renorm_decay is not None:
            renorm = RunningAverage(None, check_fraction(renorm_decay, "renorm_decay"))
        elif renorm_momentum is not None:  # warns where it looks like Keras' renorm_momentum=0.99
            renorm = RunningAverage(
                check_momentum(renorm_momentum, "renorm_momentum", allow_none=False), None
            )
        # The base resolves the preset, validates and creates weight, bias,
        # running_mean, running_var and the counter.
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            True,
            decay=decay,
            axis=axis,
            convention=convention,
            dtype=dtype,
            on_nonfinite=on_nonfinite,
        )
        # sigma_B uses the biased variance in every convention (the paper, Keras)
        self.unbiased_running_var = False
        self._renorm = renorm
        self._r_max, self._r_min, self._d_max = clipping
        dt = self.dtype
        self.running_std: np.ndarray | None = np.ones(num_features, dt)
        self.renorm_mean: np.ndarray | None = None if renorm is None else np.zeros(num_features, dt)
        self.renorm_std: np.ndarray | None = None if renorm is None else np.ones(num_features, dt)
        self.r: np.ndarray | None = None
        self.d: np.ndarray | None = None
        self._renorm_ctx: BatchRenormContext | None = None

    # -- clipping: attributes a warm-up schedule changes between steps ---------
    @property
    def r_max(self) -> float | None:
        """Upper limit of r (None: unclipped); may change between steps."""
        return self._r_max

    @r_max.setter
    def r_max(self, value: float | None) -> None:
        self._r_max = check_clipping(value, None, None)[0]

    @property
    def r_min(self) -> float | None:
        """Lower limit of r (None: unclipped; the paper uses ``1 / r_max``); may change between steps."""
        return self._r_min

    @r_min.setter
    def r_min(self, value: float | None) -> None:
        self._r_min = check_clipping(None, value, None)[1]

    @property
    def d_max(self) -> float | None:
        """D is clipped to ``[-d_max, d_max]`` (None: unclipped); may change between steps."""
        return self._d_max

    @d_max.setter
    def d_max(self, value: float | None) -> None:
        self._d_max = check_clipping(None, None, value)[2]

    @property
    def renorm_momentum(self) -> float | None:
        """Weight on the new batch of ``renorm_mean`` / ``renorm_std`` (None: no separate average)."""
        r = self._renorm
        if r is None:
            return None
        return (1.0 - r.decay) if r.decay is not None else r.momentum

    @property
    def renorm_decay(self) -> float | None:
        """Weight on the old value of the renorm averages, when given in that form, else None."""
        return None if self._renorm is None else self._renorm.decay

    # -- state -------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Moving means to 0, deviations and ``running_var`` to 1 (Keras' initial values), counter to 0."""
        super().reset_running_stats()
        assert self.running_std is not None and self.running_var is not None
        self.running_std.fill(1)
        if self.renorm_mean is not None and self.renorm_std is not None:
            self.renorm_mean.fill(0)
            self.renorm_std.fill(1)

    @classmethod
    def _state_shapes(cls, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
        args = cls._bound_config(config)
        c = (check_positive_int(args["num_features"], "num_features"),)
        shapes: dict[str, tuple[int, ...]] = {}
        if args["affine"]:
            shapes.update(weight=c, bias=c)
        shapes.update(running_mean=c, running_var=c, running_std=c, num_batches_tracked=())
        separate = args["renorm_momentum"] is not None or args["renorm_decay"] is not None
        if separate or args["convention"] == "keras":
            shapes.update(renorm_mean=c, renorm_std=c)
        return shapes

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        if "bias" in config:  # the base's bias= flag is not an argument of the renorm layers
            config.pop("bias")
        if self._renorm is not None:
            config.pop("renorm_momentum" if self._renorm.decay is not None else "renorm_decay", None)
        return config

    def recompute_running_stats(self, batches: Iterable[Any]) -> Any:
        r"""Set ``running_mean``, ``running_std`` and ``running_var`` to the exact statistics of `batches`.

        As :meth:`BatchNorm.recompute_running_stats` with the biased variance
        (``running_std = sqrt(var + eps)``, ``running_var = var``); the renorm
        averages, which steer training, are left alone.
        """
        super().recompute_running_stats(batches)
        assert self.running_var is not None and self.running_std is not None
        self.running_std[...] = np.sqrt(self.running_var.astype(np.float64) + self.eps)
        return self

    # -- forward / backward ----------------------------------------------------
    def forward(self, x: Any, *, training: bool | None = None) -> np.ndarray:
        r"""Renormalize `x` (training) or batch-normalize it with the moving statistics (evaluation).

        Training computes r and d against the renorm averages (or the running
        ones), stores them as :attr:`r` and :attr:`d`, updates every moving
        statistic and increments :attr:`num_batches_tracked`.

        Parameters
        ----------
        x : array_like
            ``(N, C, *S)``, or channels-last for ``axis=-1``.
        training : bool or None
            Overrides :attr:`training` for this call only.

        Returns
        -------
        ndarray
            Same shape and dtype as `x`.
        """
        arr = np.asarray(x)
        self._check_input_dim(arr)
        ax = self._check_channels(arr)
        mode = self.training if training is None else bool(training)
        if not mode:
            y, bn = batch_norm_forward(
                arr, self.running_mean, self.running_var, self.weight, self.bias, False, eps=self.eps, axis=ax
            )
            self._ctx, self._renorm_ctx = bn, None
            return y
        clipping = check_clipping(self._r_max, self._r_min, self._d_max)  # the limits may have been set apart
        assert self.running_mean is not None and self.running_std is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        separate = self.renorm_mean is not None and self.renorm_std is not None
        mu, sigma = (self.renorm_mean, self.renorm_std) if separate else (self.running_mean, self.running_std)
        arrx = as_float_input(arr, "input")
        y, ctx = renorm_pass(arrx, ax, mu, sigma, self.weight, self.bias, self.eps, clipping)
        assert ctx.batch_mean is not None and ctx.batch_std is not None
        count = int(self.num_batches_tracked) + 1
        if ctx.bn.count > 0:
            updates: list[tuple[str, np.ndarray, np.ndarray]] = []
            if separate:
                assert (
                    self._renorm is not None and self.renorm_mean is not None and self.renorm_std is not None
                )
                updates.append(
                    ("renorm_mean", self.renorm_mean, self._renorm.blend(self.renorm_mean, ctx.batch_mean))
                )
                updates.append(
                    ("renorm_std", self.renorm_std, self._renorm.blend(self.renorm_std, ctx.batch_std))
                )
            new_mean = self._running.blend(self.running_mean, ctx.batch_mean, count)
            new_std = self._running.blend(self.running_std, ctx.batch_std, count)
            # Keras: moving_variance = relu(moving_stddev**2 - eps), from moving_stddev as stored
            # (float64 here, then cast: an overflow of the buffer's dtype is the policy's to handle)
            with np.errstate(over="ignore", invalid="ignore"):
                std_stored = new_std.astype(self.running_std.dtype).astype(np.float64)
            new_var = np.maximum(std_stored * std_stored - self.eps, 0.0)
            updates += [
                ("running_mean", self.running_mean, new_mean),
                ("running_std", self.running_std, new_std),
                ("running_var", self.running_var, new_var),
            ]
            staged = stage_running_update(updates, self.on_nonfinite, stacklevel=3)
            for buffer, value in staged or ():
                buffer[...] = value
            if staged is not None:
                self.num_batches_tracked += 1
        else:
            self.num_batches_tracked += 1  # counted, as batch norm counts an empty batch
        self.r, self.d = ctx.r, ctx.d
        self._ctx, self._renorm_ctx = None, ctx
        return y

    def backward(self, grad_output: Any) -> np.ndarray:
        r"""Backpropagate through the last :meth:`forward` (r and d constants).

        Returns grad_input and stores :attr:`grad_weight` and :attr:`grad_bias`;
        the formulas are in :func:`bnorm.functional.batch_renorm_backward`.
        """
        if self._renorm_ctx is not None:
            dx, dw, db = batch_renorm_backward(grad_output, self._renorm_ctx)
        elif isinstance(self._ctx, BatchNormContext):  # evaluation
            dx, dw, db = batch_norm_backward(grad_output, self._ctx)
        else:
            raise RuntimeError("backward called before forward: run forward(x) first")
        self.grad_weight, self.grad_bias = dw, db
        return dx

    def extra_repr(self) -> str:
        r = self._running
        parts = [f"{self.num_features}", f"eps={self.eps!r}"]
        parts.append(f"decay={r.decay!r}" if r.decay is not None else f"momentum={r.momentum!r}")
        if self._renorm is not None:
            rn = self._renorm
            parts.append(
                f"renorm_decay={rn.decay!r}" if rn.decay is not None else f"renorm_momentum={rn.momentum!r}"
            )
        if not self.affine:
            parts.append("affine=False")
        for name in ("r_max", "r_min", "d_max"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        if self.dtype != np.float32:
            parts.append(f"dtype={self.dtype.name}")
        return ", ".join(parts)


def _doc(summary: str, examples: str = "") -> str:
    return "\n\n".join(p for p in (inspect.cleandoc(summary), _DOC, examples) if p) + "\n"


class BatchRenorm(_BatchRenormBase):  # noqa: D101 (docstring assigned below)
    __doc__ = _doc(
        r"""Batch renormalization (Ioffe 2017) over any input of rank >= 2, channel axis `axis`.

    Batch norm whose training output is corrected towards the moving
    statistics, so that training and inference agree even with small or
    non-i.i.d. batches: ``y = gamma * (r * x_hat + d) + beta``.
    """,
        _EXAMPLES,
    )


class BatchRenorm1d(_BatchRenormBase):  # noqa: D101 (docstring assigned below)
    __doc__ = _doc(
        r"""Batch renormalization over 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    Same arguments as :class:`BatchRenorm`; PyTorch's rank check
    (``expected 2D or 3D input (got 4D input)``).
    """
    )
    _expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenormBase):  # noqa: D101 (docstring assigned below)
    __doc__ = _doc(
        r"""Batch renormalization over 4D ``(N, C, H, W)`` input (``(N, H, W, C)`` with ``axis=-1``).

    Same arguments as :class:`BatchRenorm`; PyTorch's rank check
    (``expected 4D input (got 3D input)``).
    """
    )
    _expected_dims = (4,)


class BatchRenorm3d(_BatchRenormBase):  # noqa: D101 (docstring assigned below)
    __doc__ = _doc(
        r"""Batch renormalization over 5D ``(N, C, D, H, W)`` input.

    Same arguments as :class:`BatchRenorm`; PyTorch's rank check
    (``expected 5D input (got 4D input)``).
    """
    )
    _expected_dims = (5,)
