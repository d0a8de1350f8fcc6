r"""``SyncBatchNorm``: batch normalization over a batch split across MPI processes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .._conventions import deliberate_momentum, records_explicit
from .._validation import describe
from ..distributed import MPIStatsReducer, _check_timeout, allreduce_grads, check_comm
from ..functional.batch_norm import NonFinitePolicy, StatsReducer
from .batchnorm import BatchNorm, _BatchNormBase, _layer_doc

__all__ = ["SyncBatchNorm"]

_COMM_DOC = """
comm : Communicator or None, keyword-only
    An mpi4py communicator (duck-typed: ``Get_size``, ``Get_rank`` and
    ``Allgather`` or ``allgather``) over the processes that share the
    batch.  None, or a communicator of one rank, is plain BatchNorm.
timeout : float or None, default None, keyword-only
    Seconds a rank waits for its peers at each collective exchange before
    raising :class:`bnorm.distributed.PeerTimeoutError` (None: wait
    forever, as MPI does).  Needs a communicator with ``Iallgather``
    (mpi4py's has it).  After a timeout the communicator may hold a
    half-finished collective: abort the job (``comm.Abort()``).
"""


def _state_kwargs(layer: _BatchNormBase) -> dict[str, Any]:
    """Constructor arguments that rebuild `layer`'s configuration exactly (no preset)."""
    running = layer._running
    kw: dict[str, Any] = {
        "eps": layer.eps,
        "affine": layer.affine,
        "track_running_stats": layer.track_running_stats,
        "bias": layer.bias is not None or not layer.affine,
        "axis": layer.axis,
        "unbiased_running_var": layer.unbiased_running_var,
        "dtype": layer.dtype,
        "on_nonfinite": layer.on_nonfinite,
    }
    if running.decay is not None:
        kw["decay"] = running.decay
    else:
        kw["momentum"] = running.momentum
    return kw


def _copy_state(src: _BatchNormBase, dst: _BatchNormBase) -> None:
    """Copy parameters, buffers, counter, mode and convention name (new arrays, no aliasing)."""
    dst._running = src._running
    dst.convention = src.convention
    dst.training = src.training
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        value = getattr(src, name)
        setattr(dst, name, None if value is None else np.array(value, copy=True))


class SyncBatchNorm(_BatchNormBase):  # noqa: D101 (docstring assigned below)
    __doc__ = _layer_doc(
        r"""Batch normalization over a batch split across processes (MPI), exact for any split.

    .. math::
        y = \gamma \, \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    with E and Var (biased) per channel over the **global** batch: the union of
    every rank's shard.  A training forward makes one collective carrying
    each rank's ``(count, mean, M2)`` per channel; they are merged weighted by
    count (Chan et al.), so the result equals :class:`BatchNorm` on the
    concatenated batch for any shard sizes, including ranks with no samples
    (the global count must exceed 1).  Backward makes one collective of
    ``sum(g)`` and ``sum(g * (x - mean))``, so ``grad_input`` is the gradient
    of the whole-batch loss; :attr:`grad_weight` and :attr:`grad_bias` are this
    rank's contributions -- sum them with :meth:`allreduce_grads` (as PyTorch's
    SyncBatchNorm under DDP).  The running statistics are the same on every
    rank (unbiased over the global count in the torch convention); evaluation
    uses them and does not communicate (with ``track_running_stats=False``,
    evaluation uses each rank's own batch statistics, as PyTorch does).

    Every rank must call forward, backward, :meth:`allreduce_grads` and
    :meth:`recompute_running_stats` in step (same mode, same number of calls,
    same order), as with any collective.  Each collective first exchanges a
    small header naming the operation and the layer's training step, so
    out-of-step ranks (an extra forward on one rank, allreduce_grads on one
    rank while the others run backward) raise
    :class:`bnorm.distributed.PeerError` on every rank instead of pairing the
    wrong collectives.  If a rank rejects its input (wrong shape or channels,
    a non-finite batch with ``on_nonfinite='raise'``) every rank raises -- the
    others PeerError -- and no state changes anywhere.  A rank in evaluation
    mode makes no collective, so training peers wait for it: they raise when
    that rank next communicates (PeerError), after `timeout` seconds
    (:class:`~bnorm.distributed.PeerTimeoutError`), or, with no timeout,
    wait forever.
    """,
        r"""
    Examples
    --------
    >>> import numpy as np
    >>> import bnorm
    >>> bn = bnorm.SyncBatchNorm(3)          # comm=None: exactly BatchNorm
    >>> y = bn(np.arange(12.0).reshape(4, 3))
    >>> bn.running_mean
    array([0.45, 0.55, 0.65], dtype=float32)

    Under ``mpiexec -n 4 python train.py``:

    >>> from mpi4py import MPI                                 # doctest: +SKIP
    >>> bn = bnorm.SyncBatchNorm(64, comm=MPI.COMM_WORLD)      # doctest: +SKIP
    >>> y = bn(x_shard); dx = bn.backward(g_shard)             # doctest: +SKIP
    >>> bn.allreduce_grads()                                   # doctest: +SKIP
    """,
        extra_params=_COMM_DOC,
    )

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
        comm: Any = None,
        timeout: float | None = None,
        decay: float | None = None,
        axis: int = 1,
        unbiased_running_var: bool = True,
        convention: str | None = None,
        dtype: DTypeLike = np.float32,
        on_nonfinite: NonFinitePolicy = "skip",
    ) -> None:
        check_comm(comm)
        # Forward only what the caller passed, so a convention preset still applies.
        passed: frozenset[str] = getattr(self, "_explicit_args", frozenset())
        given: dict[str, Any] = {
            "eps": eps,
            "momentum": momentum,
            "affine": affine,
            "track_running_stats": track_running_stats,
            "bias": bias,
            "decay": decay,
            "axis": axis,
            "unbiased_running_var": unbiased_running_var,
            "convention": convention,
            "dtype": dtype,
            "on_nonfinite": on_nonfinite,
        }
        super().__init__(num_features, **{k: v for k, v in given.items() if k in passed})
        self._timeout = _check_timeout(timeout)
        self.comm = comm
        self._step: MPIStatsReducer | None = None
        # Training forwards completed (the step every collective header carries):
        # per layer, so a layer rebuilt on one rank only shows up as out of step.
        self._sync_step = 0

    @property
    def comm(self) -> Any:
        """The communicator (None: a single process)."""
        return self._comm

    @comm.setter
    def comm(self, value: Any) -> None:
        check_comm(value)
        _check_timeout(self._timeout, value)
        self._comm = value
        self._world_size = 1 if value is None else int(value.Get_size())

    @property
    def timeout(self) -> float | None:
        """Seconds to wait for the peers at each collective exchange (None: no limit)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = _check_timeout(value, self._comm)

    def _new_step(self, step: int) -> MPIStatsReducer:
        return MPIStatsReducer(self._comm, self.num_features, step=step, timeout=self._timeout)

    # -- conversion ------------------------------------------------------------
    @classmethod
    def from_batch_norm(
        cls, layer: _BatchNormBase, comm: Any = None, *, timeout: float | None = None
    ) -> SyncBatchNorm:
        """A SyncBatchNorm with `layer`'s configuration and state (copied, not shared).

        Parameters
        ----------
        layer : BatchNorm, BatchNorm1d/2d/3d or SyncBatchNorm
            Its weight, bias, running buffers, counter, momentum/decay, eps,
            axis, running-variance convention, dtype, on_nonfinite and mode
            are kept; arrays are copied.
        comm : Communicator or None
            The communicator of the new layer.
        timeout : float or None, keyword-only
            Its :attr:`timeout`.

        Returns
        -------
        SyncBatchNorm

        Raises
        ------
        TypeError
            If `layer` is not a bnorm batch-norm layer or `comm` not a communicator.

        Examples
        --------
        >>> import bnorm
        >>> sbn = bnorm.SyncBatchNorm.from_batch_norm(bnorm.BatchNorm2d(8, convention="keras"))
        >>> sbn.axis, sbn.decay, sbn.convention
        (-1, 0.99, 'keras')
        """
        if not isinstance(layer, _BatchNormBase):
            raise TypeError(f"layer must be a bnorm batch-norm layer, got {describe(layer)}")
        with deliberate_momentum():  # the layer's own momentum, not a new spelling
            new = cls(layer.num_features, comm=comm, timeout=timeout, **_state_kwargs(layer))
        _copy_state(layer, new)
        return new

    def to_batch_norm(self) -> BatchNorm:
        """A single-process :class:`BatchNorm` with this layer's configuration and state (copied).

        Returns
        -------
        BatchNorm

        Examples
        --------
        >>> import bnorm
        >>> bnorm.SyncBatchNorm(4, momentum=None).to_batch_norm()
        BatchNorm(4, eps=1e-05, momentum=None, affine=True, bias=True, track_running_stats=True)
        """
        with deliberate_momentum():
            new = BatchNorm(self.num_features, **_state_kwargs(self))
        _copy_state(self, new)
        return new

    # -- forward / backward ----------------------------------------------------
    def _reducer(self) -> StatsReducer | None:
        return self._step

    def forward(self, x: Any, *, training: bool | None = None) -> np.ndarray:
        r"""Normalize this rank's shard with the statistics of the global batch.

        Training makes one collective (every rank must call it); evaluation
        makes none.  See :meth:`BatchNorm.forward <bnorm.BatchNorm.forward>`.

        Parameters
        ----------
        x : array_like
            This rank's shard, ``(N_r, C, *S)`` (or channels-last for
            ``axis=-1``); ``N_r`` may be 0.
        training : bool or None
            Overrides :attr:`training` for this call only.

        Returns
        -------
        ndarray
            Same shape and dtype as `x`.

        Raises
        ------
        ValueError, TypeError, FloatingPointError
            This rank's input was rejected (as :class:`BatchNorm`).
        bnorm.distributed.PeerError
            Another rank's input was rejected, or the ranks are out of step
            (another rank is in backward, allreduce_grads, ...).
        bnorm.distributed.PeerTimeoutError
            A peer did not arrive within :attr:`timeout`.
        """
        mode = self._mode(training)
        if self._world_size == 1 or not mode:
            self._step = None
            return super().forward(x, training=training)
        step = self._step = self._new_step(self._sync_step + 1)
        try:
            y = super().forward(x, training=training)
        except Exception:
            step.abort_moments()
            raise
        finally:
            self._step = None
        self._sync_step += 1
        return y

    def backward(self, grad_output: Any) -> np.ndarray:
        r"""Backpropagate through the last forward; one collective after a training forward.

        grad_input is the gradient of the global-batch loss with respect to
        this rank's shard; :attr:`grad_weight` and :attr:`grad_bias` are this
        rank's contributions (sum them over ranks with :meth:`allreduce_grads`).

        Parameters
        ----------
        grad_output : array_like
            Same shape as the forward input.

        Returns
        -------
        ndarray
            grad_input, same shape and dtype as the forward input.

        Raises
        ------
        ValueError
            grad_output has the wrong shape (every other rank raises
            :class:`bnorm.distributed.PeerError`).
        bnorm.distributed.PeerError
            The ranks are out of step (another rank is in forward,
            allreduce_grads, ...), on every rank; nothing is changed.
        bnorm.distributed.PeerTimeoutError
            A peer did not arrive within the forward's :attr:`timeout`.
        """
        ctx = self._ctx
        step = ctx.reducer if ctx is not None and isinstance(ctx.reducer, MPIStatsReducer) else None
        if step is not None:
            step.sums_started = False
        try:
            dx = super().backward(grad_output)
        except Exception:
            if step is not None:
                step.abort_sums()
            raise
        return dx

    def allreduce_grads(self, *, average: bool = False) -> None:
        """Sum :attr:`grad_weight` and :attr:`grad_bias` over the ranks of :attr:`comm`.

        One collective; see :func:`bnorm.distributed.allreduce_grads` (which
        also takes several layers at once).

        Parameters
        ----------
        average : bool, keyword-only
            Divide by the number of ranks instead.

        Examples
        --------
        >>> import numpy as np, bnorm
        >>> bn = bnorm.SyncBatchNorm(2)
        >>> _ = bn(np.arange(8.0).reshape(4, 2)); _ = bn.backward(np.ones((4, 2)))
        >>> bn.allreduce_grads()   # one process: unchanged
        >>> bn.grad_bias
        array([4., 4.], dtype=float32)
        """
        allreduce_grads([self], self._comm, average=average, timeout=self._timeout)

    def recompute_running_stats(self, batches: Iterable[Any]) -> SyncBatchNorm:
        r"""Set the running statistics to the exact statistics of every rank's `batches`.

        Each rank merges its own batches' moments ``(count, mean, M2)``; one
        collective operation merges the ranks' totals (Chan et al., in rank
        order), so every rank ends with the same running buffers: those
        :meth:`BatchNorm.recompute_running_stats
        <bnorm.BatchNorm.recompute_running_stats>` computes on all ranks'
        batches together, :attr:`num_batches_tracked` included (the number of
        batches absorbed on all ranks).  Every rank must call it; a rank with
        no batches (an empty shard, an empty iterator) takes part and receives
        the result.

        Parameters
        ----------
        batches : iterable of array_like
            This rank's inputs, as :meth:`forward` takes them; consumed once.

        Returns
        -------
        self
            The layer, for chaining.

        Raises
        ------
        ValueError
            On every rank, if all ranks together hold no values (or one value
            per channel with the unbiased variance); on one rank, if its batch
            has the wrong shape or the layer keeps no running statistics.
        FloatingPointError
            On one rank, for a non-finite batch with ``on_nonfinite='raise'``.
        bnorm.distributed.PeerError
            On the other ranks when one rank raised (any exception, one from
            its iterator included), or if the ranks are out of step.
            Nothing is changed on any rank when anything raises.
        bnorm.distributed.PeerTimeoutError
            A peer did not arrive within :attr:`timeout`.

        Examples
        --------
        >>> import numpy as np, bnorm
        >>> bn = bnorm.SyncBatchNorm(2)   # comm=None: as BatchNorm
        >>> bn = bn.recompute_running_stats([np.array([[1.0, 2.0], [3.0, 6.0]])])
        >>> bn.running_mean
        array([2., 4.], dtype=float32)

        Under ``mpiexec``, rank r passes its own shard (possibly empty):

        >>> bn.recompute_running_stats(my_batches(comm.Get_rank()))  # doctest: +SKIP
        """
        if self._world_size == 1:
            result: SyncBatchNorm = super().recompute_running_stats(batches)
            return result
        step = self._new_step(self._sync_step)
        try:
            self._check_recompute()
            local, absorbed, _ = self._absorb(batches)
        except Exception:
            step.recompute(None, 0)  # join as a failed rank, so nobody waits for this one
            raise
        merged = step.recompute(local, absorbed)
        assert merged is not None
        total, absorbed_everywhere = merged
        self._set_population_stats(total, absorbed_everywhere)
        return self
