r"""Statistics and gradients across processes: the MPI side of :class:`~bnorm.SyncBatchNorm`.

A communicator is anything shaped like an `mpi4py <https://mpi4py.readthedocs.io>`_
``Comm``: ``Get_size()``, ``Get_rank()`` and ``Allgather(sendbuf, recvbuf)``
on NumPy buffers (preferred: no pickling) or ``allgather(obj)`` on objects;
a `timeout` also needs the non-blocking ``Iallgather(sendbuf, recvbuf)``.
bnorm never imports mpi4py at import time; :func:`world` imports it on demand
(``pip install "bnorm[mpi]"``).

Every exchange here is one collective *operation* made of two Allgathers:

1. a **header** of 8 float64 per rank, the same size for every operation:
   ``[magic, status, operation, step, width, length, 0, 0]``.  Every rank
   checks every header before anything else is sent: the same operation
   (forward, backward, allreduce_grads, ...), the same step, the same width
   (channels or values) and payload length, and no peer that failed.
   Otherwise every rank raises :class:`PeerError` naming what it and its
   peers were doing, and the payload is never sent;
2. the **payload**, a packed float64 row of the agreed length, followed by
   the same arithmetic in rank order on every rank:

   * moments ``(count, mean, M2)`` are merged with the Chan et al. update
     (:func:`~bnorm.functional._kernels.moments.merge_moments`), weighted by count,
     ranks with no samples skipped;
   * sums (backward reductions, gradients) are added row by row, rank 0 first.

Why a separate header: an MPI Allgather whose ranks pass rows of different
lengths is erroneous -- with MPICH one rank silently receives garbage while
another aborts on "Message truncated".  Rows of a header fixed in size pair
safely whatever each rank is doing, so out-of-step ranks are caught *before*
a payload could be misread.  It costs one more collective of 64 bytes per
rank and operation: about 8 us per training step for two ranks on one
machine, 4 % of the smallest step measured (see ``docs/distributed.md``).

Because each rank receives the same rows and runs the same operations in the
same order, the results are *bitwise identical on every rank* -- which an
``Allreduce`` does not promise (the MPI standard only recommends it), and a
user-defined reduction op for the Chan merge, which is not associative in
floating point, could not promise either.

With a `timeout` (seconds) each Allgather is posted non-blocking and polled
against a deadline; a peer that does not arrive in time raises
:class:`PeerTimeoutError` on the waiting ranks.  The abandoned collective
may still complete later, so from then on every bnorm collective on that
communicator raises at once: the job should abort (``comm.Abort()``).
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple, Protocol

import numpy as np

from ._validation import describe
from .functional._kernels.moments import Moments, merge_moments

__all__ = [
    "Communicator",
    "MPIStatsReducer",
    "PeerError",
    "PeerTimeoutError",
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

# -- the header ----------------------------------------------------------------
_MAGIC = 1651339122.0  # b"bnor" as a big-endian int: marks a bnorm header (exact in float64)
_HEADER = 8  # [magic, status, operation, step, width, length, 0, 0]

# Operation codes and how a header with that code reads in a message.
_FORWARD, _BACKWARD, _GRADS, _RECOMPUTE = 1, 2, 3, 4
_MOMENTS, _SUM, _STATS_SHAPE, _STATS = 5, 6, 7, 8
_OP_NAMES = {
    _FORWARD: "SyncBatchNorm({width}).forward",
    _BACKWARD: "SyncBatchNorm({width}).backward",
    _GRADS: "allreduce_grads ({width} values)",
    _RECOMPUTE: "SyncBatchNorm({width}).recompute_running_stats",
    _MOMENTS: "allreduce_moments ({width} channels)",
    _SUM: "allreduce_sum ({width} values)",
    _STATS_SHAPE: "allreduce_running_stats (feature shapes)",
    _STATS: "allreduce_running_stats ({width} features)",
}
_STEPPED = (_FORWARD, _BACKWARD, _GRADS, _RECOMPUTE)  # layer operations: their step is meaningful


class _Op(NamedTuple):
    """One collective operation as a rank announces it in its header.

    Attributes
    ----------
    code : int
        A layer operation (forward, backward, allreduce_grads,
        recompute_running_stats) or one of this module's helpers; see ``_OP_NAMES``.
    step : int
        The layer's training step: forward of step k is its k-th training
        forward; backward and allreduce_grads after it carry k too, and
        recompute_running_stats carries the number of training forwards so
        far.  0 for the helpers.
    width : int
        Channels (layer operations, moments) or values (sums, gradients).
    label : str or None
        Replaces the generated name of *this* rank's operation in messages.
    """

    code: int
    step: int
    width: int
    label: str | None = None

    def describe(self) -> str:
        """E.g. ``SyncBatchNorm(4).forward of step 3``."""
        if self.label is not None:
            return self.label
        name = _OP_NAMES.get(self.code, f"operation {self.code}").format(width=self.width)
        return f"{name} of step {self.step}" if self.code in _STEPPED else name


def _op_of(head: np.ndarray) -> _Op:
    return _Op(int(head[2]), int(head[3]), int(head[4]))


class Communicator(Protocol):
    """What bnorm needs of a communicator (satisfied by ``mpi4py.MPI.Comm``).

    Besides these two methods a communicator has ``Allgather(sendbuf,
    recvbuf)`` (buffer form, preferred) or ``allgather(obj) -> list`` (object
    form), and for a `timeout` ``Iallgather(sendbuf, recvbuf) -> request``
    with ``request.Test() -> bool``.
    """

    def Get_size(self) -> int:
        """The number of processes."""
        ...

    def Get_rank(self) -> int:
        """The index of this process, 0 to size - 1."""
        ...


class PeerError(RuntimeError):
    """Raised when the ranks cannot complete a collective operation together.

    Raised on every rank (or every waiting rank, for a timeout) instead of
    pairing the wrong collectives or waiting forever.  The call that raises
    changes no state.  The message says which of these happened:

    * a peer rejected its part (wrong shape, channels or dtype, no
      gradients): that rank raises its own error (ValueError, TypeError,
      RuntimeError, ...), the others ``PeerError: <operation> failed on rank
      r of P``;
    * the ranks are out of step -- different operations, steps or layers
      (an extra forward on one rank, allreduce_grads on one rank while the
      others run backward, a rank in evaluation mode that skipped a training
      forward): ``PeerError: SyncBatchNorm ranks are out of step: this rank
      (r of P) is in <operation> of step s, but rank q is in <operation> of
      step t``, on every rank;
    * a peer never arrived within the `timeout`: :class:`PeerTimeoutError`.
    """


class PeerTimeoutError(PeerError, TimeoutError):
    """Raised on a rank whose peers did not join a collective within `timeout` seconds.

    Also a :class:`TimeoutError`.  The call changed no state, but the
    abandoned collective stays posted on the communicator (MPI cannot cancel
    a collective), so every later bnorm collective on that communicator
    raises PeerError at once: abort the job (``comm.Abort()``).
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


def _check_timeout(timeout: Any, comm: Any = None, name: str = "timeout") -> float | None:
    """`timeout` as float seconds (None: wait forever); TypeError/ValueError naming `name`."""
    if timeout is None:
        return None
    if isinstance(timeout, (bool, np.bool_)) or not isinstance(
        timeout, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a number of seconds or None (no timeout), got {describe(timeout)}")
    t = float(timeout)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(
            f"{name} must be a positive, finite number of seconds or None (no timeout), got {t!r}"
        )
    if comm is not None and _size(comm) > 1 and not callable(getattr(comm, "Iallgather", None)):
        raise TypeError(
            f"{name}= needs a communicator with the non-blocking Iallgather (mpi4py's Comm has it), "
            f"got {describe(comm)}; pass timeout=None to wait without a deadline"
        )
    return t


def _size(comm: Any) -> int:
    return 1 if comm is None else int(comm.Get_size())


def allgather_rows(comm: Any, row: Any) -> np.ndarray:
    """Gather one float64 row from every rank: ``out[r]`` is rank r's row.

    A bare collective, without the header that bnorm's operations send first:
    every rank must pass a row of the same length.

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


# -- waiting with a deadline ---------------------------------------------------
# A peer that is about to arrive should cost no sleep, and a peer that is an hour
# late should cost little CPU: poll busily for 200 us, then sleep 50 us doubling up to
# 1 ms.  (MPICH advances a non-blocking collective only inside MPI calls, so the
# sleeps also pace its progress; 1 ms bounds what a late peer adds to the wait.)
_SPIN_SECONDS = 2e-4
_FIRST_SLEEP = 5e-5
_MAX_SLEEP = 1e-3


def _wait(request: Any, deadline: float) -> bool:
    """Poll ``request.Test()`` until it completes (True) or `deadline` passes (False)."""
    spin_until = time.monotonic() + _SPIN_SECONDS
    delay = _FIRST_SLEEP
    while not request.Test():
        now = time.monotonic()
        if now >= deadline:
            return False
        if now >= spin_until:
            time.sleep(min(delay, deadline - now))
            delay = min(2.0 * delay, _MAX_SLEEP)
    return True


class _Abandoned(NamedTuple):
    """A collective that timed out: its buffers must outlive it (MPI may still write into them)."""

    comm: Any
    request: Any
    send: np.ndarray
    recv: np.ndarray
    op: _Op


_ABANDONED: list[_Abandoned] = []


def _abandoned_on(comm: Any) -> _Abandoned | None:
    return next((a for a in _ABANDONED if a.comm is comm), None)


def _gather(comm: Any, send: np.ndarray, timeout: float | None, op: _Op) -> np.ndarray:
    """Gather `send` from every rank, through ``Iallgather`` when the communicator has it.

    Always non-blocking where possible, because MPI never pairs a blocking
    collective with a non-blocking one: ranks with and without a timeout must
    still meet.  (``Iallgather`` + ``Wait`` costs 0.6 us more than
    ``Allgather``: 2.7 against 2.1 us for two ranks.)  With a `timeout`, the
    request is polled until the deadline.
    """
    if not callable(getattr(comm, "Iallgather", None)):
        return allgather_rows(comm, send)
    recv = np.empty((_size(comm), send.size), dtype=np.float64)
    request = comm.Iallgather(send, recv)
    if timeout is None:
        request.Wait()
    elif not _wait(request, time.monotonic() + timeout):
        _ABANDONED.append(_Abandoned(comm, request, send, recv, op))
        raise PeerTimeoutError(
            f"{op.describe()} timed out after {timeout:g} s on rank {int(comm.Get_rank())} of "
            f"{_size(comm)}: a peer did not join the collective (slower than the timeout, stopped, "
            "in evaluation mode -- which makes no collective -- or making other calls). This call "
            "changed no state, but the abandoned collective stays posted on the communicator, so "
            "no later bnorm collective can use it: abort the job (comm.Abort())"
        )
    return recv


# -- one collective operation: header, checks, payload -------------------------
def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return f"ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}"


def _check_heads(heads: np.ndarray, header: np.ndarray, comm: Any, op: _Op) -> None:
    """Raise PeerError unless every rank sent this rank's `header` (`op`, its length, no failure)."""
    if (heads == header).all():  # in step: one comparison (the diagnosis below costs 10 us)
        return
    rank, size, length = int(comm.Get_rank()), len(heads), int(header[5])
    strangers = [r for r, h in enumerate(heads) if h[0] != _MAGIC]
    if strangers:
        raise PeerError(
            f"{op.describe()} on rank {rank} of {size}: {_ranks(strangers)} sent a row that is not a "
            "bnorm header (a collective of your own on the same communicator, paired with bnorm's?). "
            "This call changed no state"
        )
    mine = (op.code, op.step, op.width)
    groups: dict[str, list[int]] = {}
    for r, h in enumerate(heads):
        theirs = _op_of(h)
        if (theirs.code, theirs.step, theirs.width) != mine:
            groups.setdefault(theirs.describe(), []).append(r)
    if groups:
        peers = "; ".join(
            f"{_ranks(rs)} {'is' if len(rs) == 1 else 'are'} in {d}" for d, rs in groups.items()
        )
        layers = op.code in _STEPPED or any(int(h[2]) in _STEPPED for h in heads)
        calls = (
            ": forward in the same mode (a training forward communicates, an evaluation forward "
            "does not), backward, allreduce_grads and recompute_running_stats, on the same layers"
            if layers
            else ", with the same sizes"
        )
        raise PeerError(
            f"{'SyncBatchNorm ranks' if layers else 'The ranks'} are out of step: this rank ({rank} of "
            f"{size}) is in {op.describe()}, but {peers}. Every rank must make the same calls in the "
            f"same order{calls}. This call changed no state on any rank"
        )
    failed = [r for r, h in enumerate(heads) if h[1] != _OK]
    if failed:
        raise PeerError(
            f"{op.describe()} failed on {_ranks(failed)} of {size} (see the error raised there); rank "
            f"{rank} raises too, so that no rank is left waiting in a collective, and changed no state"
        )
    lengths = sorted({length, *(int(h[5]) for h in heads)})
    if lengths != [length]:
        raise PeerError(
            f"{op.describe()}: the ranks send {' and '.join(map(str, lengths))} values; every rank must "
            "send the same number. This call changed no state"
        )


def _collective(comm: Any, op: _Op, row: np.ndarray | None, timeout: float | None) -> np.ndarray | None:
    """Exchange headers, check them, then gather the payload rows ``(P, len(row))``.

    ``row=None`` joins as a failed rank (it raises its own error afterwards):
    only the header is sent, errors are not raised, and None is returned.
    """
    abandoned = _abandoned_on(comm)
    if abandoned is not None:
        if row is None:
            return None
        raise PeerError(
            f"{op.describe()} cannot run on rank {int(comm.Get_rank())}: an earlier "
            f"{abandoned.op.describe()} timed out on this communicator and may still be pending, so "
            "collectives can no longer be paired safely: abort the job (comm.Abort()). This call "
            "changed no state"
        )
    send = None if row is None else np.ascontiguousarray(row, dtype=np.float64).reshape(-1)
    header = np.zeros(_HEADER)
    header[:6] = (
        _MAGIC,
        _FAILED if send is None else _OK,
        op.code,
        op.step,
        op.width,
        -1 if send is None else send.size,
    )
    if send is None:
        try:
            _gather(comm, header, timeout, op)
        except PeerError:  # a timeout while failing: the rank's own error is the one to raise
            pass
        return None
    heads = _gather(comm, header, timeout, op)
    _check_heads(heads, header, comm, op)
    return _gather(comm, send, timeout, op)


def _sum_rows(rows: np.ndarray) -> np.ndarray:
    """Rows added in rank order (the same operations, hence the same bits, on every rank)."""
    total: np.ndarray = rows[0].copy()
    for r in rows[1:]:
        total += r
    return total


def _moments_row(local: Moments | None, c: int, extra: tuple[float, ...] = ()) -> np.ndarray | None:
    """``[*extra, count, mean (c), m2 (c)]``; None stays None (a failed rank)."""
    if local is None:
        return None
    k = len(extra)
    row = np.empty(k + 1 + 2 * c)
    row[:k] = extra
    row[k] = local.count
    row[k + 1 : k + 1 + c] = np.ravel(local.mean)
    row[k + 1 + c :] = np.ravel(local.m2)
    return row


def _merge_rows(rows: np.ndarray, shape: tuple[int, ...]) -> Moments:
    """The Chan merge of rows ``[count, mean (c), m2 (c)]`` in rank order, reshaped to `shape`."""
    c = (rows.shape[1] - 1) // 2
    merged = Moments(0, np.zeros(c), np.zeros(c))
    for r in rows:
        merged = merge_moments(merged, Moments(int(r[0]), r[1 : 1 + c], r[1 + c :]))
    return Moments(merged.count, merged.mean.reshape(shape).copy(), merged.m2.reshape(shape).copy())


def _exchange_moments(comm: Any, op: _Op, local: Moments | None, timeout: float | None) -> Moments | None:
    """One operation carrying ``[count, mean, m2]``; the merged moments (None for a failed rank)."""
    rows = _collective(comm, op, _moments_row(local, op.width), timeout)
    if rows is None or local is None:
        return None
    return _merge_rows(rows, np.shape(local.mean))


def allreduce_sum(
    comm: Any,
    values: Any,
    *,
    ok: bool = True,
    what: str | None = None,
    timeout: float | None = None,
) -> np.ndarray:
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
    what : str or None, keyword-only
        Names the operation in that error (default ``allreduce_sum (n values)``).
    timeout : float or None, keyword-only
        Seconds to wait for the peers (None: no limit).

    Returns
    -------
    ndarray, float64
        The sum over ranks, bitwise identical on every rank.

    Raises
    ------
    PeerError
        If another rank passed ``ok=False``, or called something else.
    PeerTimeoutError
        If a peer did not arrive within `timeout`.

    Examples
    --------
    >>> from bnorm.distributed import allreduce_sum
    >>> allreduce_sum(None, [1.0, 2.0])
    array([1., 2.])
    """
    v = np.array(values, dtype=np.float64).reshape(-1)  # a copy: the caller's array is never returned
    if _size(comm) == 1:
        return v
    timeout = _check_timeout(timeout, comm)
    rows = _collective(comm, _Op(_SUM, 0, v.size, what), v if ok else None, timeout)
    return v if rows is None else _sum_rows(rows)


def allreduce_moments(local: Moments, comm: Any, *, timeout: float | None = None) -> Moments:
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
    timeout : float or None, keyword-only
        Seconds to wait for the peers (None: no limit).

    Returns
    -------
    Moments
        The global count, mean and M2; bitwise identical on every rank.

    Raises
    ------
    TypeError
        If `local` is not a Moments or `comm` not a communicator.
    PeerError
        If the ranks' moments have different sizes, or a peer called something else.

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
    timeout = _check_timeout(timeout, comm)
    c = int(np.prod(np.shape(local.mean), dtype=np.int64))
    merged = _exchange_moments(comm, _Op(_MOMENTS, 0, c), local, timeout)
    assert merged is not None
    return merged


class MPIStatsReducer:
    """The :class:`~bnorm.functional.batch_norm.StatsReducer` of one SyncBatchNorm step.

    :meth:`moments` (forward) and :meth:`sums` (backward) each make one
    collective operation: the 64-byte header that names the operation and
    `step` (checked on every rank before anything else is sent), then the
    packed float64 payload, ``1 + 2 C`` values forward and ``2 C`` backward.
    :meth:`abort_moments` / :meth:`abort_sums` join the pending operation with
    the failure flag set, so a rank whose input was rejected before the
    collective does not leave the others waiting.

    Parameters
    ----------
    comm : Communicator
        With more than one rank.
    num_channels : int
        C, the length of the per-channel vectors.
    step : int, keyword-only
        The layer's training step this forward/backward belongs to.
    timeout : float or None, keyword-only
        Seconds to wait for the peers at each exchange (None: no limit).

    Examples
    --------
    >>> from bnorm.distributed import MPIStatsReducer
    >>> MPIStatsReducer(None, 4).row_bytes()
    (136, 128)
    """

    def __init__(self, comm: Any, num_channels: int, *, step: int = 0, timeout: float | None = None) -> None:
        self.comm = comm
        self.num_channels = int(num_channels)
        self.step = int(step)
        self.timeout = timeout
        self.moments_started = False
        self.sums_started = False

    def row_bytes(self) -> tuple[int, int]:
        """Bytes each rank sends per step, headers included: ``(forward, backward)``.

        Each rank receives P times as much.
        """
        c = self.num_channels
        return 8 * (_HEADER + 1 + 2 * c), 8 * (_HEADER + 2 * c)

    def _op(self, code: int) -> _Op:
        return _Op(code, self.step, self.num_channels)

    def moments(self, local: Moments) -> Moments:
        """The global moments (see :func:`allreduce_moments`)."""
        self.moments_started = True
        merged = _exchange_moments(self.comm, self._op(_FORWARD), local, self.timeout)
        assert merged is not None
        return merged

    def sums(self, sum_g: np.ndarray, sum_gx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sum(g), sum(g * (x - mean)))`` summed over ranks in rank order."""
        self.sums_started = True
        c = self.num_channels
        rows = _collective(self.comm, self._op(_BACKWARD), np.concatenate([sum_g, sum_gx]), self.timeout)
        assert rows is not None
        total = _sum_rows(rows)
        return total[:c], total[c:]

    def recompute(self, local: Moments | None, absorbed: int) -> tuple[Moments, int] | None:
        """The global moments and the number of batches absorbed on all ranks (None: `local` None, failed)."""
        self.moments_started = True
        c = self.num_channels
        row = _moments_row(local, c, (float(absorbed),))
        rows = _collective(self.comm, self._op(_RECOMPUTE), row, self.timeout)
        if rows is None:
            return None
        return _merge_rows(rows[:, 1:], (c,)), int(rows[:, 0].sum())

    def abort_moments(self) -> None:
        """Join the forward collective as a failed rank, unless it was already joined."""
        if not self.moments_started:
            self.moments_started = True
            _collective(self.comm, self._op(_FORWARD), None, self.timeout)

    def abort_sums(self) -> None:
        """Join the backward collective as a failed rank, unless it was already joined."""
        if not self.sums_started:
            self.sums_started = True
            _collective(self.comm, self._op(_BACKWARD), None, self.timeout)


def _comm_of(layers: list[Any], comm: Any) -> Any:
    if comm is not None:
        return check_comm(comm)
    comms = {id(c): c for c in (getattr(layer, "comm", None) for layer in layers) if c is not None}
    if len(comms) > 1:
        raise ValueError("the layers use different communicators: pass comm= explicitly")
    return next(iter(comms.values()), None)


def allreduce_grads(
    layers: Any, comm: Any = None, *, average: bool = False, timeout: float | None = None
) -> None:
    r"""Sum (or average) ``grad_weight`` and ``grad_bias`` of batch-norm layers over ranks.

    After :meth:`SyncBatchNorm.backward <bnorm.SyncBatchNorm.backward>` each
    rank holds its own contribution :math:`\partial L_r / \partial\gamma`; the
    full gradient of :math:`L = \sum_r L_r` is their sum, as with PyTorch's
    SyncBatchNorm under DDP.  This makes one collective operation for all
    `layers` together and replaces each layer's ``grad_weight`` and
    ``grad_bias`` with new arrays (same dtype), bitwise identical on every rank.

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
    timeout : float or None, keyword-only
        Seconds to wait for the peers.  Default: the largest ``timeout`` of
        the layers (None: no limit).

    Raises
    ------
    RuntimeError
        On a rank where an affine layer has no gradients yet (run backward
        first); the other ranks raise :class:`PeerError`.
    PeerError
        If a peer is doing something else (for example still in backward),
        on every rank; nothing is changed.
    PeerTimeoutError
        If a peer did not arrive within `timeout`.

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
    if timeout is None:
        timeout = max(
            (t for t in (getattr(layer, "timeout", None) for layer in items) if t is not None), default=None
        )
    timeout = _check_timeout(timeout, comm)
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
    flat = np.concatenate(parts) if parts else np.zeros(0)
    if size == 1:
        if missing:
            raise RuntimeError(missing)
        total = flat
    else:
        # The step of the layers' last training forward: allreduce_grads belongs to that step.
        step = max((int(getattr(layer, "_sync_step", 0)) for layer in items), default=0)
        rows = _collective(comm, _Op(_GRADS, step, flat.size), None if missing else flat, timeout)
        if missing or rows is None:
            raise RuntimeError(missing)
        total = _sum_rows(rows)
    if average:
        total = total / size
    start = 0
    for layer, name, n in slots:
        old = getattr(layer, name)
        setattr(layer, name, total[start : start + n].astype(old.dtype))
        start += n


def allreduce_running_stats(stats: Any, comm: Any, *, timeout: float | None = None) -> Any:
    """Merge a ``RunningStats`` over ranks so every rank holds the statistics of all the data.

    Dataset statistics computed in parallel -- each rank streams its own files
    into a :class:`bnorm.preprocessing.RunningStats` -- are combined exactly
    (Chan merge of ``(count, mean, M2)`` in rank order; ranks that saw no data
    are skipped).  `stats` is updated in place: its ``moments`` attribute is
    replaced by the global :class:`~bnorm.functional._kernels.moments.Moments`.  Two
    collective operations: the feature shapes, then the moments.

    Parameters
    ----------
    stats : RunningStats
        Any object whose ``moments`` attribute is a Moments (or None before
        any data); the feature shape must agree on every rank that has data.
    comm : Communicator or None
        None (or one rank) leaves `stats` as it is.
    timeout : float or None, keyword-only
        Seconds to wait for the peers (None: no limit).

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
    timeout = _check_timeout(timeout, comm)
    local = getattr(stats, "moments", None)
    ok = local is None or isinstance(local, Moments)
    # A rank that saw no data (moments None, or count 0 as a fresh RunningStats
    # holds) sends ndim -1 and adopts the others' feature shape.
    has_data = ok and local is not None and local.count > 0
    # First [ndim, *shape] (ndim -1: no data yet), so shapes are checked on every
    # rank before the moments, whose length depends on them, are sent.
    shape_row = np.full(1 + _MAX_DIMS, -1.0)
    shape: tuple[int, ...] = ()
    if has_data:
        assert local is not None
        known = getattr(stats, "feature_shape", None)
        shape = tuple(int(s) for s in (known if known is not None else np.shape(local.mean)))
        if len(shape) > _MAX_DIMS:
            ok = False
        else:
            shape_row[0] = len(shape)
            shape_row[1 : 1 + len(shape)] = shape
    label = "allreduce_running_stats"
    heads = _collective(comm, _Op(_STATS_SHAPE, 0, 0, label), shape_row if ok else None, timeout)
    if heads is None:
        if local is not None and not isinstance(local, Moments):
            raise TypeError(f"stats.moments must be a bnorm Moments or None, got {describe(local)}")
        raise ValueError(f"RunningStats over more than {_MAX_DIMS} dimensions cannot be merged across ranks")
    shapes = {tuple(int(s) for s in h[1 : 1 + int(h[0])]) for h in heads if h[0] >= 0}
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
    merged = _exchange_moments(comm, _Op(_STATS, 0, k, label), mine, timeout)
    assert merged is not None
    stats.moments = merged
    if hasattr(stats, "feature_shape"):
        stats.feature_shape = shape
    return stats
