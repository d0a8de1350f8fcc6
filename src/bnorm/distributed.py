r"""Statistics and gradients across processes: the MPI side of :class:`~bnorm.SyncBatchNorm`.

A communicator is anything shaped like an `mpi4py <https://mpi4py.readthedocs.io>`_
``Comm``: ``Get_size()``, ``Get_rank()`` and ``Allgather(sendbuf, recvbuf)``
on NumPy buffers (preferred: no pickling) or ``allgather(obj)`` on objects.
bnorm never imports mpi4py at import time; :func:`world` imports it on demand
(``pip install "bnorm[mpi]"``).

Every exchange here is **one Allgather of a packed float64 row** per rank,
followed by the same arithmetic in rank order on every rank:

* moments ``(count, mean, M2)`` are merged with the Chan et al. update
  (:func:`~bnorm.functional._kernels.moments.merge_moments`), weighted by count, ranks
  with no samples skipped;
* sums (backward reductions, gradients) are added row by row, rank 0 first.

Because each rank receives the same rows and runs the same operations in the
same order, the results are *bitwise identical on every rank* -- which an
``Allreduce`` does not promise (the MPI standard only recommends it), and a
user-defined reduction op for the Chan merge, which is not associative in
floating point, could not promise either.  Each row starts with a status flag, so
a rank whose input was rejected still takes part in the collective and every
other rank raises :class:`PeerError` instead of waiting forever.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ._validation import describe
from .functional._kernels.moments import Moments, merge_moments

__all__ = [
    "Communicator",
    "MPIStatsReducer",
    "PeerError",
    "allgather_rows",
    "allreduce_grads",
    "allreduce_moments",
    "allreduce_running_stats",
    "allreduce_sum",
    "check_comm",
    "world",
]

_OK = 0.0
_FAILED = 1.0
_MAX_DIMS = 8  # header room for the shape of a RunningStats' moments


class Communicator(Protocol):
    """What bnorm needs of a communicator (satisfied by ``mpi4py.MPI.Comm``).

    Besides these two methods a communicator has ``Allgather(sendbuf,
    recvbuf)`` (buffer form, preferred) or ``allgather(obj) -> list`` (object
    form).
    """

    def Get_size(self) -> int:
        """The number of processes."""
        ...

    def Get_rank(self) -> int:
        """The index of this process, 0 to size - 1."""
        ...


class PeerError(RuntimeError):
    """Raised on every rank whose peer rejected its part of a collective step.

    The rank that failed raises its own error (ValueError, TypeError,
    FloatingPointError, ...); the others raise PeerError so that no rank is
    left blocked in a collective.  No state was changed on any rank.
    """


def world() -> Any:
    """``mpi4py.MPI.COMM_WORLD``, importing mpi4py on first use.

    Returns
    -------
    mpi4py.MPI.Comm
        The world communicator (all processes started by ``mpiexec``).

    Raises
    ------
    ImportError
        If mpi4py is not installed, with the command that installs it.

    Examples
    --------
    >>> from bnorm.distributed import world
    >>> comm = world()  # doctest: +SKIP
    >>> comm.Get_size()  # doctest: +SKIP
    1
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'mpi4py is needed for multi-process batch norm: pip install "bnorm[mpi]" '
            "(mpi4py and the MPICH wheels, which bring mpiexec)"
        ) from exc
    return MPI.COMM_WORLD


def check_comm(comm: Any, name: str = "comm") -> Any:
    """Return `comm` if it can serve as a communicator (None passes), else raise TypeError.

    Parameters
    ----------
    comm : Communicator or None
        An mpi4py communicator or any object with ``Get_size``, ``Get_rank`` and
        ``Allgather`` or ``allgather``.
    name : str
        The argument name for the error message.

    Returns
    -------
    Communicator or None
        `comm` itself.

    Raises
    ------
    TypeError
        If a method is missing.

    Examples
    --------
    >>> from bnorm.distributed import check_comm
    >>> check_comm(None) is None
    True
    """
    if comm is None:
        return None
    has_gather = callable(getattr(comm, "Allgather", None)) or callable(getattr(comm, "allgather", None))
    if not (
        callable(getattr(comm, "Get_size", None)) and callable(getattr(comm, "Get_rank", None)) and has_gather
    ):
        raise TypeError(
            f"{name} must be an MPI communicator such as mpi4py.MPI.COMM_WORLD (with Get_size, "
            f"Get_rank and Allgather or allgather) or None, got {describe(comm)}"
        )
    return comm


def _size(comm: Any) -> int:
    return 1 if comm is None else int(comm.Get_size())


def allgather_rows(comm: Any, row: Any) -> np.ndarray:
    """Gather one float64 row from every rank: ``out[r]`` is rank r's row.

    Parameters
    ----------
    comm : Communicator
        Uses ``Allgather`` on NumPy buffers when the communicator has it,
        else the object method ``allgather``.
    row : array_like, 1-D
        This rank's row, converted to float64; the same length on every rank.

    Returns
    -------
    ndarray of shape (P, len(row)), float64
        P = ``comm.Get_size()``.

    Raises
    ------
    RuntimeError
        If the object form returns rows of different lengths.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.distributed import allgather_rows
    >>> class Solo:  # a one-rank communicator
    ...     def Get_size(self): return 1
    ...     def Get_rank(self): return 0
    ...     def allgather(self, obj): return [obj]
    >>> allgather_rows(Solo(), [1.0, 2.0])
    array([[1., 2.]])
    """
    send = np.ascontiguousarray(row, dtype=np.float64).reshape(-1)
    size = _size(comm)
    if callable(getattr(comm, "Allgather", None)):
        out = np.empty((size, send.size), dtype=np.float64)
        comm.Allgather(send, out)
        return out
    rows = comm.allgather(send)
    if len(rows) != size or any(np.shape(r) != send.shape for r in rows):
        raise RuntimeError(
            f"allgather returned rows of shapes {[np.shape(r) for r in rows]}; every rank "
            f"must send a row of shape {send.shape}"
        )
    return np.stack([np.asarray(r, dtype=np.float64) for r in rows])


def _sum_rows(rows: np.ndarray) -> np.ndarray:
    """Rows added in rank order (the same operations, hence the same bits, on every rank)."""
    total: np.ndarray = rows[0].copy()
    for r in rows[1:]:
        total += r
    return total


def _raise_for_peers(flags: np.ndarray, comm: Any, what: str) -> None:
    failed = [r for r, f in enumerate(flags) if f != _OK]
    if failed:
        raise PeerError(
            f"{what} failed on rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of "
            f"{len(flags)} (see the error raised there); rank {int(comm.Get_rank())} raises too, so that "
            "no rank is left waiting in a collective, and changed no state"
        )


def allreduce_sum(comm: Any, values: Any, *, ok: bool = True, what: str = "allreduce_sum") -> np.ndarray:
    """Sum a float64 vector over ranks, rank 0 first, with a status flag.

    Parameters
    ----------
    comm : Communicator or None
        None (or one rank) returns `values` as float64.
    values : array_like, 1-D
        This rank's contribution; the same length on every rank.
    ok : bool, keyword-only
        False says this rank failed: it still takes part (with `values`
        ignored) and every other rank raises :class:`PeerError`.
    what : str, keyword-only
        Names the operation in that error.

    Returns
    -------
    ndarray, float64
        The sum over ranks, bitwise identical on every rank.

    Raises
    ------
    PeerError
        If another rank passed ``ok=False``.

    Examples
    --------
    >>> from bnorm.distributed import allreduce_sum
    >>> allreduce_sum(None, [1.0, 2.0])
    array([1., 2.])
    """
    v = np.array(values, dtype=np.float64).reshape(-1)  # a copy: the caller's array is never returned
    if _size(comm) == 1:
        return v
    row = np.empty(v.size + 1)
    row[0] = _OK if ok else _FAILED
    row[1:] = v if ok else 0.0
    rows = allgather_rows(comm, row)
    if ok:
        _raise_for_peers(rows[:, 0], comm, what)
    return _sum_rows(rows[:, 1:])


def _exchange_moments(comm: Any, local: Moments, *, ok: bool, what: str) -> Moments:
    """One Allgather of ``[flag, count, mean, m2]``; the Chan merge in rank order."""
    shape = np.shape(local.mean)
    c = int(np.prod(shape, dtype=np.int64))
    row = np.zeros(2 + 2 * c)
    row[0] = _OK if ok else _FAILED
    if ok:
        row[1] = local.count
        row[2 : 2 + c] = np.ravel(local.mean)
        row[2 + c :] = np.ravel(local.m2)
    rows = allgather_rows(comm, row)
    if not ok:
        return local
    _raise_for_peers(rows[:, 0], comm, what)
    merged = Moments(0, np.zeros(c), np.zeros(c))
    for r in rows:
        merged = merge_moments(merged, Moments(int(r[1]), r[2 : 2 + c], r[2 + c :]))
    return Moments(merged.count, merged.mean.reshape(shape).copy(), merged.m2.reshape(shape).copy())


def allreduce_moments(local: Moments, comm: Any) -> Moments:
    r"""Merge every rank's moments into the moments of the union of their data.

    .. math::
        n = \sum_r n_r,\quad
        \bar x = \bar x_{(r-1)} + (\bar x_r - \bar x_{(r-1)})\frac{n_r}{n_{(r)}},\quad
        M_2 = M_{2,(r-1)} + M_{2,r} + (\bar x_r - \bar x_{(r-1)})^2 \frac{n_{(r-1)} n_r}{n_{(r)}}

    applied for r = 0, 1, ..., P-1 (Chan, Golub & LeVeque), where the
    subscript (r) denotes the running merge of ranks 0..r.  Ranks with
    ``count == 0`` change nothing.

    Parameters
    ----------
    local : Moments
        This rank's count, mean and M2 (any shape, the same on every rank; use
        ``Moments.empty(C)`` on a rank without data).
    comm : Communicator or None
        None (or one rank) returns `local`.

    Returns
    -------
    Moments
        The global count, mean and M2; bitwise identical on every rank.

    Raises
    ------
    TypeError
        If `local` is not a Moments or `comm` not a communicator.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.functional._kernels.moments import channel_moments
    >>> from bnorm.distributed import allreduce_moments
    >>> m = allreduce_moments(channel_moments(np.arange(6.0).reshape(3, 2, 1)), None)
    >>> m.count, m.mean
    (3, array([2., 3.]))
    """
    if not isinstance(local, Moments):
        raise TypeError(f"local must be a bnorm Moments (count, mean, m2), got {describe(local)}")
    check_comm(comm)
    if _size(comm) == 1:
        return local
    return _exchange_moments(comm, local, ok=True, what="allreduce_moments")


class MPIStatsReducer:
    """The :class:`~bnorm.functional.batch_norm.StatsReducer` of one SyncBatchNorm step.

    :meth:`moments` (forward) and :meth:`sums` (backward) each make one
    Allgather of a packed float64 row ``[flag, ...]``: ``2 + 2 C`` values
    forward, ``1 + 2 C`` backward.  :meth:`abort_moments` / :meth:`abort_sums`
    join the pending collective with the failure flag set, so a rank whose input
    was rejected before the collective does not leave the others waiting.

    Parameters
    ----------
    comm : Communicator
        With more than one rank.
    num_channels : int
        C, the length of the per-channel vectors.

    Examples
    --------
    >>> from bnorm.distributed import MPIStatsReducer
    >>> MPIStatsReducer(None, 4).row_bytes()
    (80, 72)
    """

    def __init__(self, comm: Any, num_channels: int) -> None:
        self.comm = comm
        self.num_channels = int(num_channels)
        self.moments_started = False
        self.sums_started = False

    def row_bytes(self) -> tuple[int, int]:
        """Bytes each rank sends per step: ``(forward, backward)``; each receives P times as much."""
        c = self.num_channels
        return 8 * (2 + 2 * c), 8 * (1 + 2 * c)

    def moments(self, local: Moments) -> Moments:
        """The global moments (see :func:`allreduce_moments`)."""
        self.moments_started = True
        return _exchange_moments(self.comm, local, ok=True, what="SyncBatchNorm.forward")

    def sums(self, sum_g: np.ndarray, sum_gx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sum(g), sum(g * (x - mean)))`` summed over ranks in rank order."""
        self.sums_started = True
        c = self.num_channels
        total = allreduce_sum(self.comm, np.concatenate([sum_g, sum_gx]), what="SyncBatchNorm.backward")
        return total[:c], total[c:]

    def abort_moments(self) -> None:
        """Join the forward collective as a failed rank, unless it was already joined."""
        if not self.moments_started:
            self.moments_started = True
            _exchange_moments(self.comm, Moments.empty(self.num_channels), ok=False, what="")

    def abort_sums(self) -> None:
        """Join the backward collective as a failed rank, unless it was already joined."""
        if not self.sums_started:
            self.sums_started = True
            allreduce_sum(self.comm, np.zeros(2 * self.num_channels), ok=False)


def _comm_of(layers: list[Any], comm: Any) -> Any:
    if comm is not None:
        return check_comm(comm)
    comms = {id(c): c for c in (getattr(layer, "comm", None) for layer in layers) if c is not None}
    if len(comms) > 1:
        raise ValueError("the layers use different communicators: pass comm= explicitly")
    return next(iter(comms.values()), None)


def allreduce_grads(layers: Any, comm: Any = None, *, average: bool = False) -> None:
    r"""Sum (or average) ``grad_weight`` and ``grad_bias`` of batch-norm layers over ranks.

    After :meth:`SyncBatchNorm.backward <bnorm.SyncBatchNorm.backward>` each
    rank holds its own contribution :math:`\partial L_r / \partial\gamma`; the
    full gradient of :math:`L = \sum_r L_r` is their sum, as with PyTorch's
    SyncBatchNorm under DDP.  This makes one collective for all `layers`
    together and replaces each layer's ``grad_weight`` and ``grad_bias`` with
    new arrays (same dtype), bitwise identical on every rank.

    Parameters
    ----------
    layers : layer or iterable of layers
        Objects with ``affine``, ``grad_weight``, ``grad_bias`` (any bnorm
        batch-norm layer; layers without affine parameters are skipped).  Every
        rank passes the same layers in the same order.
    comm : Communicator or None
        Default: the layers' own ``comm`` attribute.  None everywhere (or one
        rank) leaves the gradients as they are, except for `average`.
    average : bool, keyword-only
        Divide the sum by the number of ranks (what DDP does for a loss that
        is a mean per rank).

    Raises
    ------
    RuntimeError
        On a rank where an affine layer has no gradients yet (run backward
        first); the other ranks raise :class:`PeerError`.

    Examples
    --------
    >>> import numpy as np, bnorm
    >>> bn = bnorm.SyncBatchNorm(2)   # comm=None: a single process
    >>> _ = bn(np.arange(8.0).reshape(4, 2))
    >>> _ = bn.backward(np.ones((4, 2)))
    >>> bnorm.distributed.allreduce_grads([bn])
    >>> bn.grad_bias
    array([4., 4.], dtype=float32)
    """
    items = [layers] if hasattr(layers, "grad_weight") else list(layers)
    comm = _comm_of(items, comm)
    size = _size(comm)
    slots: list[tuple[Any, str, int]] = []
    parts: list[np.ndarray] = []
    missing = None
    for i, layer in enumerate(items):
        if not getattr(layer, "affine", False):
            continue
        for name in ("grad_weight", "grad_bias"):
            g = getattr(layer, name)
            n = int(layer.num_features)
            if g is None:
                missing = missing or f"layer {i} ({type(layer).__name__}) has no {name}: run backward first"
                g = np.zeros(n)
            slots.append((layer, name, n))
            parts.append(np.asarray(g, dtype=np.float64).reshape(-1))
    if size == 1:
        if missing:
            raise RuntimeError(missing)
        total = np.concatenate(parts) if parts else np.zeros(0)
    else:
        flat = np.concatenate(parts) if parts else np.zeros(0)
        total = allreduce_sum(comm, flat, ok=missing is None, what="allreduce_grads")
        if missing:
            raise RuntimeError(missing)
    if average:
        total = total / size
    start = 0
    for layer, name, n in slots:
        old = getattr(layer, name)
        setattr(layer, name, total[start : start + n].astype(old.dtype))
        start += n


def allreduce_running_stats(stats: Any, comm: Any) -> Any:
    """Merge a ``RunningStats`` over ranks so every rank holds the statistics of all the data.

    Dataset statistics computed in parallel -- each rank streams its own files
    into a :class:`bnorm.preprocessing.RunningStats` -- are combined exactly
    (Chan merge of ``(count, mean, M2)`` in rank order; ranks that saw no data
    are skipped).  `stats` is updated in place: its ``moments`` attribute is
    replaced by the global :class:`~bnorm.functional._kernels.moments.Moments`.

    Parameters
    ----------
    stats : RunningStats
        Any object whose ``moments`` attribute is a Moments (or None before
        any data); the feature shape must agree on every rank that has data.
    comm : Communicator or None
        None (or one rank) leaves `stats` as it is.

    Returns
    -------
    RunningStats
        `stats` itself.

    Raises
    ------
    ValueError
        On every rank, if the ranks' feature shapes differ.
    TypeError
        If ``stats.moments`` is neither a Moments nor None (the other ranks
        raise :class:`PeerError`).

    Examples
    --------
    >>> from mpi4py import MPI  # doctest: +SKIP
    >>> stats = RunningStats().update(my_shard)  # doctest: +SKIP
    >>> allreduce_running_stats(stats, MPI.COMM_WORLD)  # doctest: +SKIP
    """
    check_comm(comm)
    if _size(comm) == 1:
        return stats
    local = getattr(stats, "moments", None)
    ok = local is None or isinstance(local, Moments)
    # A rank that saw no data (moments None, or count 0 as a fresh RunningStats
    # holds) sends ndim -1 and adopts the others' feature shape.
    has_data = ok and local is not None and local.count > 0
    # Header: [flag, ndim, *shape] (ndim -1: no data yet), so shapes are checked
    # on every rank before the data rows, whose length depends on them, are sent.
    header = np.full(2 + _MAX_DIMS, -1.0)
    header[0] = _OK if ok else _FAILED
    shape: tuple[int, ...] = ()
    if has_data:
        assert local is not None
        known = getattr(stats, "feature_shape", None)
        shape = tuple(int(s) for s in (known if known is not None else np.shape(local.mean)))
        if len(shape) > _MAX_DIMS:
            ok = False
            header[0] = _FAILED
        else:
            header[1] = len(shape)
            header[2 : 2 + len(shape)] = shape
    heads = allgather_rows(comm, header)
    if not ok:
        if local is not None and not isinstance(local, Moments):
            raise TypeError(f"stats.moments must be a bnorm Moments or None, got {describe(local)}")
        raise ValueError(f"RunningStats over more than {_MAX_DIMS} dimensions cannot be merged across ranks")
    _raise_for_peers(heads[:, 0], comm, "allreduce_running_stats")
    shapes = {tuple(int(s) for s in h[2 : 2 + int(h[1])]) for h in heads if h[1] >= 0}
    if len(shapes) > 1:
        raise ValueError(
            f"the ranks' RunningStats have different feature shapes {sorted(shapes)}; "
            "they must agree to be merged"
        )
    if not shapes:
        return stats
    (shape,) = shapes
    k = int(np.prod(shape, dtype=np.int64))
    if has_data and local is not None:
        mine = local
    else:
        # RunningStats keeps flat (k,) moments beside its feature_shape; a bare
        # Moments holder keeps them in the feature shape itself.
        layout = (k,) if hasattr(stats, "feature_shape") else shape
        mine = Moments(0, np.zeros(layout), np.zeros(layout))
    stats.moments = _exchange_moments(comm, mine, ok=True, what="allreduce_running_stats")
    if hasattr(stats, "feature_shape"):
        stats.feature_shape = shape
    return stats
