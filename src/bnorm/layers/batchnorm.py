r"""Batch-normalization layers: ``BatchNorm`` (any rank) and ``BatchNorm1d/2d/3d``."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .._conventions import RunningAverage, check_momentum, records_explicit, resolve_layer_convention
from .._running import NonFinitePolicy, check_policy, nonfinite, stage_running_update
from .._validation import (
    as_array,
    as_float_input,
    channels_last_hint,
    check_bool,
    check_eps,
    check_float_dtype,
    check_fraction,
    check_positive_int,
    describe,
    normalize_axis,
)
from ..functional._kernels.moments import Moments, channel_moments, channel_view, merge_moments
from ..functional.batch_norm import (
    BatchNormContext,
    StatsReducer,
    _forward,
    batch_norm_backward,
)
from ._base import Module

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


_SECTIONS = inspect.cleandoc(
    r"""
    Parameters
    ----------
    num_features : int
        C, the number of channels (the size of the input along `axis`).
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float in [0, 1] or None, default 0.1
        PyTorch's weight on the new batch:
        ``running = (1 - momentum) * running + momentum * batch``.  None is the
        cumulative average: the factor is ``1 / num_batches_tracked``.
    affine : bool, default True
        Learnable gamma (``weight``, init 1) and beta (``bias``, init 0).
    track_running_stats : bool, default True
        Keep running statistics and use them in evaluation; False uses batch
        statistics in evaluation too and keeps no buffers (they are None).
    bias : bool, default True, keyword-only
        With `affine`, whether beta is learned too (PyTorch 2.13's ``bias=``):
        ``bias=False`` keeps gamma only -- :attr:`bias` is None, the state dict
        has no ``bias`` key and the shift is 0.  Without `affine` there is
        neither weight nor bias, whatever `bias` says.
    decay : float in [0, 1] or None, keyword-only
        The weight on the *old* value, ``running = decay * running + (1 - decay)
        * batch`` (Keras/TF/ONNX/Flax ``momentum``, d2l.ai, the from-scratch
        tutorials' ``moving_momentum``).  Give momentum or decay, not both.
    axis : int, default 1, keyword-only
        The channel axis: 1 channels-first, -1 channels-last.
    unbiased_running_var : bool, default True, keyword-only
        running_var absorbs the unbiased batch variance ``n / (n - 1) * var``
        (PyTorch) or the biased one (Keras, ONNX, Flax).  Normalization always
        uses the biased variance.
    convention : {'torch', 'keras', 'onnx', 'flax', 'd2l'} or None, keyword-only
        A preset of decay/momentum, eps, axis and unbiased_running_var (see
        :data:`bnorm.CONVENTIONS`); arguments given explicitly override it.
    dtype : dtype, default float32, keyword-only
        dtype of the parameters and running buffers.
    on_nonfinite : {'skip', 'raise', 'propagate'}, default 'skip', keyword-only
        What a batch with non-finite statistics does to the running buffers:
        skipped with a RuntimeWarning (and not counted), FloatingPointError, or
        absorbed as PyTorch does.

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
        gamma and beta (also reachable as :attr:`gamma`, :attr:`beta`).
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics (init 0 and 1).
    num_batches_tracked : ndarray of shape (), int64
        Training batches absorbed so far.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Set by :meth:`backward`.
    training : bool
        The mode; see :meth:`train` and :meth:`eval`.
    """
)
_DECAY_ENTRY = "decay : float in [0, 1] or None, keyword-only"


def _layer_doc(summary: str, examples: str = "", extra_params: str = "") -> str:
    """Compose a layer's docstring: its summary, the shared sections, its examples.

    `extra_params` (numpydoc entries, unindented) go before the ``decay`` entry,
    for subclasses with more keyword-only arguments.
    """
    sections = _SECTIONS
    if extra_params:
        sections = sections.replace(_DECAY_ENTRY, inspect.cleandoc(extra_params) + "\n" + _DECAY_ENTRY, 1)
    parts = [inspect.cleandoc(summary), sections]
    if examples:
        parts.append(inspect.cleandoc(examples))
    return "\n\n".join(parts) + "\n"


class _BatchNormBase(Module):
    __doc__ = _layer_doc("Shared state and behaviour of every batch-norm layer.")

    _expected_dims: tuple[int, ...] | None = None
    _parameters = ("weight", "bias")
    _buffers = ("running_mean", "running_var", "num_batches_tracked")

    @records_explicit
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        bias: bool = True,
        decay: float | None = None,
        axis: int = 1,
        unbiased_running_var: bool = True,
        convention: str | None = None,
        dtype: DTypeLike = np.float32,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        super().__init__()
        check_positive_int(num_features, "num_features")
        affine = check_bool(affine, "affine")
        track_running_stats = check_bool(track_running_stats, "track_running_stats")
        use_bias = check_bool(bias, "bias")
        explicit: frozenset[str] = getattr(self, "_explicit_args", frozenset())
        running, eps, axis, unbiased = resolve_layer_convention(
            convention,
            explicit,
            momentum=momentum,
            decay=decay,
            eps=eps,
            axis=axis,
            unbiased_running_var=unbiased_running_var,
        )
        eps_f = check_eps(eps, training=True)
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int, got {describe(axis)}")
        dt = check_float_dtype(dtype)
        check_policy(on_nonfinite)
        self.num_features = int(num_features)
        self.eps = eps_f
        self._running = running
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = int(axis)
        self.unbiased_running_var = unbiased
        self.convention = convention
        self.dtype = dt
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.weight: np.ndarray | None = np.ones(num_features, dt) if self.affine else None
        self.bias: np.ndarray | None = np.zeros(num_features, dt) if self.affine and use_bias else None
        self.running_mean: np.ndarray | None = None
        self.running_var: np.ndarray | None = None
        self.num_batches_tracked: np.ndarray | None = None
        if self.track_running_stats:
            self.running_mean = np.zeros(num_features, dt)
            self.running_var = np.ones(num_features, dt)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._ctx: BatchNormContext | None = None

    # -- conventions -----------------------------------------------------------
    @property
    def momentum(self) -> float | None:
        """PyTorch's weight on the new batch (``1 - decay`` in the decay form; None: cumulative).

        Setting it switches the layer to the momentum form.
        """
        r = self._running
        return (1.0 - r.decay) if r.decay is not None else r.momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        self._running = RunningAverage(check_momentum(value), None)

    @property
    def decay(self) -> float | None:
        """The weight on the old value when the layer uses the decay form, else None.

        Setting it switches the layer to the decay form.
        """
        return self._running.decay

    @decay.setter
    def decay(self, value: float) -> None:
        self._running = RunningAverage(None, check_fraction(value, "decay"))

    # -- parameters ------------------------------------------------------------
    @property
    def gamma(self) -> np.ndarray | None:
        """Alias of :attr:`weight`."""
        return self.weight

    @gamma.setter
    def gamma(self, value: np.ndarray | None) -> None:
        self.weight = value

    @property
    def beta(self) -> np.ndarray | None:
        """Alias of :attr:`bias`."""
        return self.bias

    @beta.setter
    def beta(self, value: np.ndarray | None) -> None:
        self.bias = value

    def reset_running_stats(self) -> None:
        """Zero the running mean and the counter, set the running variance to 1."""
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked.fill(0)

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        # weight or bias alone may be None (a Keras layer with scale=False or center=False).
        if self.weight is not None:
            self.weight.fill(1)
        if self.bias is not None:
            self.bias.fill(0)

    @classmethod
    def _state_shapes(cls, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
        args = cls._bound_config(config)
        c = (check_positive_int(args["num_features"], "num_features"),)
        shapes: dict[str, tuple[int, ...]] = {}
        if args["affine"]:
            shapes["weight"] = c
            if args.get("bias", True):
                shapes["bias"] = c
        if args["track_running_stats"]:
            shapes.update(running_mean=c, running_var=c, num_batches_tracked=())
        return shapes

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        # One of the two forms of the running average (passing both is an error).
        config.pop("momentum" if self._running.decay is not None else "decay", None)
        if "bias" in config:  # the flag, not the array of the same name
            config["bias"] = self.bias is not None
        return config

    def recompute_running_stats(self, batches: Iterable[Any]) -> Any:
        r"""Set the running statistics to the exact statistics of `batches` ("precise BN").

        After training, the running averages lag behind the final weights;
        this replaces them with the population mean and variance over every
        value of every batch, merged exactly (Chan et al., see
        :func:`~bnorm.functional._kernels.moments.merge_moments`), not averaged per batch:

        .. math::
            \mu = \frac{1}{n}\sum_i x_i, \qquad
            \sigma^2 = \frac{1}{n - 1}\sum_i (x_i - \mu)^2 \ \text{(unbiased_running_var)}
            \ \text{or}\ \frac{1}{n}\sum_i (x_i - \mu)^2

        per channel, with n the number of values per channel over all batches.
        The weights, the momentum and :attr:`training` are untouched;
        :attr:`num_batches_tracked` becomes the number of batches absorbed (as
        :func:`torch.optim.swa_utils.update_bn` leaves it), so a later
        cumulative average (``momentum=None``) continues as if those batches
        had been seen.  :class:`~bnorm.SyncBatchNorm` merges the totals
        over its processes (see its own method).

        Parameters
        ----------
        batches : iterable of array_like
            Inputs as :meth:`forward` takes them (same rank check, channel axis
            and channel count); consumed once, so a generator works.

        Returns
        -------
        self
            The layer, for chaining.

        Raises
        ------
        ValueError
            If there are no batches (single process), no values, one value
            per channel with the unbiased variance, a batch of the wrong
            shape, or the layer keeps no running statistics.  Nothing is
            changed when anything raises, including an exception from the
            iterable itself.
        FloatingPointError
            If a batch has non-finite statistics and ``on_nonfinite='raise'``
            ('skip' skips it with a RuntimeWarning, 'propagate' absorbs it).

        Examples
        --------
        >>> import numpy as np, bnorm
        >>> bn = bnorm.BatchNorm1d(2)
        >>> data = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0], [7.0, 14.0]])
        >>> bn = bn.recompute_running_stats([data[:1], data[1:]])
        >>> bn.running_mean, bn.running_var, int(bn.num_batches_tracked)
        (array([4., 8.], dtype=float32), array([ 6.6666665, 26.666666 ], dtype=float32), 2)
        """
        self._check_recompute()
        total, absorbed, seen = self._absorb(batches)
        if seen == 0:
            raise ValueError("batches must contain at least one batch, got an empty iterable")
        self._set_population_stats(total, absorbed)
        return self

    def _check_recompute(self) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            raise ValueError(
                "recompute_running_stats needs running statistics: the layer was built with "
                "track_running_stats=False"
            )

    def _absorb(self, batches: Iterable[Any]) -> tuple[Moments, int, int]:
        """Merge the batches' moments: ``(moments, batches absorbed, batches seen)``; changes no state.

        Non-finite batches follow :attr:`on_nonfinite` (skipped ones are seen, not absorbed).
        """
        total = Moments.empty(self.num_features)
        absorbed = 0
        seen = 0
        for x in batches:
            seen += 1
            arr = as_float_input(x, "batch")
            self._check_input_dim(arr)
            ax = self._check_channels(arr)
            m = channel_moments(channel_view(arr, ax))
            if m.count and not (np.isfinite(m.mean).all() and np.isfinite(m.m2).all()):
                reason = f"batch {seen - 1} has non-finite statistics (NaN or inf in the input)"
                # stacklevel 3: the caller of recompute_running_stats, two frames up
                if not nonfinite(self.on_nonfinite, reason, stacklevel=3):
                    continue
            total = merge_moments(total, m)
            absorbed += 1
        return total, absorbed, seen

    def _set_population_stats(self, total: Moments, absorbed: int) -> None:
        """Write the running buffers from `total` (ValueError, nothing written, if too few values)."""
        ddof = 1 if self.unbiased_running_var else 0
        if total.count <= ddof:
            raise ValueError(
                f"batches must hold more than {ddof} value(s) per channel to compute the "
                f"{'unbiased' if ddof else 'biased'} variance, got {total.count}"
            )
        assert self.running_mean is not None and self.running_var is not None
        staged = stage_running_update(
            [
                ("running_mean", self.running_mean, total.mean),
                ("running_var", self.running_var, total.var(ddof)),
            ],
            self.on_nonfinite,
            stacklevel=3,  # the caller of recompute_running_stats
        )
        if staged is None:  # skipped (on_nonfinite='skip'): buffers and counter unchanged
            return
        for buffer, value in staged:
            buffer[...] = value
        assert self.num_batches_tracked is not None
        self.num_batches_tracked[...] = absorbed

    # -- forward / backward ----------------------------------------------------
    def _check_input_dim(self, x: np.ndarray) -> None:
        dims = self._expected_dims
        if dims is None:
            if x.ndim < 2:
                raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
            return
        if x.ndim not in dims:
            want = " or ".join(f"{d}D" for d in dims)
            raise ValueError(f"expected {want} input (got {x.ndim}D input)")

    def _check_channels(self, x: np.ndarray) -> int:
        ax = normalize_axis(self.axis, x.ndim)
        if x.shape[ax] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels on axis {self.axis}, "
                f"got input of shape {x.shape}{channels_last_hint(x.shape, self.num_features, self.axis)}"
            )
        return ax

    def _reducer(self) -> StatsReducer | None:
        """Hook for layers that combine statistics across processes (SyncBatchNorm)."""
        return None

    def forward(self, x: Any, *, training: bool | None = None) -> np.ndarray:
        r"""Normalize `x` and remember what :meth:`backward` needs.

        Training (or ``track_running_stats=False``) uses the batch statistics
        and, while tracking, updates the running buffers and increments
        :attr:`num_batches_tracked`; evaluation uses the running statistics.

        Parameters
        ----------
        x : array_like
            ``(N, C, *S)``, or channels-last for ``axis=-1``.
        training : bool or None
            Overrides :attr:`training` for this call only.

        Returns
        -------
        ndarray
            Same shape and dtype as `x` (float16 stays float16).
        """
        arr = as_array(x, "input")
        self._check_input_dim(arr)
        self._check_channels(arr)
        mode = self._mode(training)
        tracking = mode and self.track_running_stats
        count = 0
        if tracking:
            assert self.num_batches_tracked is not None
            count = int(self.num_batches_tracked) + 1
        use_running = self.track_running_stats
        y, ctx = _forward(
            arr,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            mode,
            self._running,
            self.eps,
            self.axis,
            self.unbiased_running_var,
            self.on_nonfinite,
            None,
            num_batches_tracked=count,
            reducer=self._reducer(),
            require_eval_stats=False,
        )
        # PyTorch counts every training step, an empty batch included; a batch
        # skipped for non-finite statistics is not counted (it was not absorbed).
        if tracking and (ctx.stats_updated or ctx.count == 0):
            assert self.num_batches_tracked is not None
            self.num_batches_tracked += 1
        self._ctx = ctx
        return y

    def backward(self, grad_output: Any) -> np.ndarray:
        r"""Backpropagate through the last :meth:`forward`.

        Returns grad_input and stores :attr:`grad_weight` and :attr:`grad_bias`
        (overwritten, not accumulated; None without affine).  The formulas are
        in :func:`bnorm.functional.batch_norm_backward`.
        """
        if self._ctx is None:
            raise RuntimeError("backward called before forward: run forward(x) first")
        dx, dw, db = batch_norm_backward(grad_output, self._ctx)
        self.grad_weight, self.grad_bias = dw, db
        return dx

    # -- presentation ----------------------------------------------------------
    def extra_repr(self) -> str:
        r = self._running
        parts = [f"{self.num_features}", f"eps={self.eps!r}"]
        parts.append(f"decay={r.decay!r}" if r.decay is not None else f"momentum={r.momentum!r}")
        # PyTorch 2.13's order; ``bias`` is whether a bias array exists, as torch prints it.
        parts += [f"affine={self.affine}", f"bias={self.bias is not None}"]
        parts.append(f"track_running_stats={self.track_running_stats}")
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        if not self.unbiased_running_var:
            parts.append("unbiased_running_var=False")
        if self.dtype != np.float32:
            parts.append(f"dtype={self.dtype.name}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class BatchNorm(_BatchNormBase):  # noqa: D101 (docstring assigned below)
    __doc__ = _layer_doc(
        r"""Batch normalization over any input of rank >= 2, channel axis `axis`.

    .. math::
        y = \gamma \, \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    Statistics are per channel, over every other axis; Var is the biased
    variance.  Which running-average formula is used is chosen by `momentum`,
    `decay` or a `convention` preset:

    ==========  ==================================  =====  ====  ===========
    convention  running update                      eps    axis  running var
    ==========  ==================================  =====  ====  ===========
    torch       ``r = (1 - 0.1) * r + 0.1 * b``     1e-5   1     unbiased
    keras       ``r = 0.99 * r + (1 - 0.99) * b``    1e-3   -1    biased
    onnx        ``r = 0.9 * r + (1 - 0.9) * b``      1e-5   1     biased
    flax        ``r = 0.99 * r + (1 - 0.99) * b``    1e-5   -1    biased
    d2l         ``r = 0.9 * r + (1 - 0.9) * b``      1e-5   1     biased
    ==========  ==================================  =====  ====  ===========
    """,
        r"""
    Examples
    --------
    >>> import numpy as np
    >>> import bnorm
    >>> bn = bnorm.BatchNorm(3, convention="keras")     # channels-last, decay 0.99
    >>> y = bn(np.arange(24.0).reshape(2, 4, 3))
    >>> bn.running_mean.round(3)
    array([0.105, 0.115, 0.125], dtype=float32)
    """,
    )


class BatchNorm1d(_BatchNormBase):  # noqa: D101 (docstring assigned below)
    __doc__ = _layer_doc(
        r"""Batch normalization over 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    .. math::
        y = \gamma \, \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    Same arguments and conventions as :class:`BatchNorm`; PyTorch's rank check
    (``expected 2D or 3D input (got 4D input)``).
    """,
        r"""
    Examples
    --------
    >>> import numpy as np
    >>> import bnorm
    >>> bn = bnorm.BatchNorm1d(16)
    >>> _ = bn(np.random.default_rng(0).random((100, 16, 784)))
    >>> bool(np.allclose(bn.running_mean, 0.05, atol=1e-3))
    True
    """,
    )
    _expected_dims = (2, 3)


class BatchNorm2d(_BatchNormBase):  # noqa: D101 (docstring assigned below)
    __doc__ = _layer_doc(
        r"""Batch normalization over 4D ``(N, C, H, W)`` input (``(N, H, W, C)`` with ``axis=-1``).

    .. math::
        y = \gamma \, \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    Same arguments and conventions as :class:`BatchNorm`; PyTorch's rank check
    (``expected 4D input (got 3D input)``).
    """,
        r"""
    Examples
    --------
    >>> import numpy as np
    >>> import bnorm
    >>> bn = bnorm.BatchNorm2d(2)
    >>> x = np.arange(24.0).reshape(1, 2, 3, 4)
    >>> y = bn(x)
    >>> c0 = x[:, 0]
    >>> bool(np.isclose(y[0, 0, 0, 0], (c0[0, 0, 0] - c0.mean()) / np.sqrt(c0.var() + 1e-5)))
    True
    """,
    )
    _expected_dims = (4,)


class BatchNorm3d(_BatchNormBase):  # noqa: D101 (docstring assigned below)
    __doc__ = _layer_doc(
        r"""Batch normalization over 5D ``(N, C, D, H, W)`` input.

    .. math::
        y = \gamma \, \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    Same arguments and conventions as :class:`BatchNorm`; PyTorch's rank check
    (``expected 5D input (got 4D input)``).
    """,
    )
    _expected_dims = (5,)
