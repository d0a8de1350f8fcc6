r"""Input preprocessing.

Dataset statistics, ``Normalize``, centering, standardization, min-max scaling,
and the ImageNet constants.

Every function takes `axis`, the *feature* (channel) axis that is **kept**:
statistics run over all the other axes, exactly as batch norm's per-channel
statistics do.  ``axis=1`` on ``(N, C, H, W)`` images gives one mean per
channel; ``axis=-1`` on a ``(samples, features)`` table or channels-last
images gives one per feature; a tuple keeps several axes, e.g.
``axis=(1, 2, 3)`` gives per-pixel statistics of shape ``(C, H, W)``.

Statistics are accumulated in float64 as :class:`~bnorm.functional._kernels.moments.Moments`
(count, mean, sum of squared deviations) and merged with the update of Chan,
Golub & LeVeque, so streaming a dataset batch by batch gives the whole-data
statistics to float64 rounding, whatever the split and whatever the offset of
the data (1e8 included).  See the guide page "How to compute dataset
statistics correctly" for the pitfalls this avoids.

Constant features
-----------------
A feature whose values are all equal has standard deviation 0 (and min = max).
:func:`standardize`, :func:`minmax_scale` and :meth:`Normalize.from_stats` map it
to the centre of the output range -- 0 -- instead of dividing by zero, as
scikit-learn's scalers do.  A variance below the rounding error of its own
computation (``var <= (n * |mean| * eps64)**2``, scikit-learn's bound) counts as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ._validation import as_float_input, describe, normalize_axis
from .functional._kernels.channel import affine_pass
from .functional._kernels.moments import Moments, channel_moments, merge_moments

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RunningStats",
    "dataset_stats",
    "Normalize",
    "center",
    "standardize",
    "minmax_scale",
    "rgb_to_bgr",
    "bgr_to_rgb",
    "to_grayscale",
]

#: Per-channel mean of ImageNet-1k (ILSVRC-2012) training images, RGB order,
#: pixel values scaled to [0, 1].  Provenance: Facebook's fb.resnet.torch
#: (2016, ``datasets/imagenet.lua``: "Computed from random subset of ImageNet
#: training images"), adopted by torchvision, whose pretrained models expect
#: inputs normalized with them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)

#: Per-channel standard deviation matching :data:`IMAGENET_MEAN` (RGB, [0, 1]).
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Axis = int | Sequence[int]

_EPS64 = float(np.finfo(np.float64).eps)


# -- layout ------------------------------------------------------------------------


def _check_axis_arg(axis: Any) -> tuple[int, ...]:
    """`axis` as a non-empty tuple of ints (not yet normalized against a rank)."""
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, (bool, np.bool_)):
        return (int(axis),)
    if isinstance(axis, (tuple, list)) and axis:
        for a in axis:
            if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
                raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}")
        return tuple(int(a) for a in axis)
    raise TypeError(f"axis must be an int or a non-empty tuple of ints, got {axis!r}")


def _kept_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    axes = tuple(normalize_axis(a, ndim) for a in _check_axis_arg(axis))
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis must not repeat an axis, got {axis!r}")
    return tuple(sorted(axes))


class _Layout:
    """How an array maps onto the ``(A, K, B)`` view with the kept axes in the middle."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
        self.shape = shape
        self.axes = axes
        self.feature_shape = tuple(shape[a] for a in axes)
        self.k = math.prod(self.feature_shape)
        self.contiguous = axes == tuple(range(axes[0], axes[-1] + 1))
        nd = len(shape)
        if self.contiguous:
            a = math.prod(shape[: axes[0]])
            b = math.prod(shape[axes[-1] + 1 :])
            self.shape3 = (a, self.k, b)
            self.moved: tuple[int, ...] = tuple(range(nd))
        else:
            # Kept axes moved to the end: (rest..., kept...) -> (A, K, 1).
            rest = [i for i in range(nd) if i not in axes]
            self.moved = tuple(rest) + axes
            self.shape3 = (math.prod(shape[i] for i in rest), self.k, 1)

    def view(self, x: np.ndarray) -> np.ndarray:
        """The ``(A, K, B)`` array of `x` (a view for C-contiguous x with adjacent kept axes)."""
        if self.contiguous:
            return x.reshape(self.shape3)
        return np.transpose(x, self.moved).reshape(self.shape3)

    def apply(self, x: np.ndarray, scale: np.ndarray, shift: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
        """``x * scale + shift`` per feature (float64 vectors of length K), as a new array."""
        if self.contiguous:
            y = np.empty(self.shape, dtype=dtype)
            if y.size:
                affine_pass(self.view(x), scale, shift, y.reshape(self.shape3))
            return y
        moved_shape = tuple(self.shape[i] for i in self.moved)
        ym = np.empty(moved_shape, dtype=dtype)
        if ym.size:
            affine_pass(self.view(x), scale, shift, ym.reshape(self.shape3))
        return np.transpose(ym, np.argsort(self.moved))


def _as_data(x: Any, name: str) -> np.ndarray:
    """A real numeric array; integers and bools are kept (reductions promote them)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name} must have a real floating, integer or bool dtype, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    return arr


def _check_ddof(ddof: Any) -> int:
    if isinstance(ddof, (bool, np.bool_)) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative int, got {ddof!r}")
    return int(ddof)


def _variance(moments: Moments, ddof: int) -> np.ndarray:
    """The variance per feature with rounding-level variances snapped to 0."""
    n = moments.count
    if n == 0:
        raise ValueError(
            "no data: the statistics need at least one value per feature (call update(batch) first)"
        )
    if n <= ddof:
        raise ValueError(f"ddof={ddof} needs more than {ddof} values per feature, got {n}")
    var = moments.m2 / (n - ddof)
    # Rounding noise of a constant feature (scikit-learn's bound, _incremental_mean_and_var).
    bound = (n * np.abs(moments.mean) * _EPS64) ** 2
    return np.where(var <= bound, 0.0, var)


# -- streaming statistics ----------------------------------------------------------


class RunningStats:
    r"""Streaming per-feature count, mean and variance, exact for any batching.

    Each :meth:`update` computes the batch's float64 moments with two passes
    (mean, then squared deviations from it) and merges them into the total with
    the Chan, Golub & LeVeque update

    .. math::
        n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad
        \bar x = \bar x_a + \delta \frac{n_b}{n},\quad
        M_2 = M_{2,a} + M_{2,b} + \delta^2 \frac{n_a n_b}{n}

    so the result equals the whole-data statistics to float64 rounding
    (relative error far below 1e-6 even at an offset of 1e8), and two
    RunningStats over disjoint data :meth:`merge` exactly (threads, files, ranks).

    Parameters
    ----------
    axis : int or tuple of int, default 1
        The feature axis (or axes) kept; statistics run over all others.  Every
        batch must have the same feature shape; other axes may vary.

    Attributes
    ----------
    axis : int or tuple of int
        As given.
    moments : Moments
        The state: ``count`` (values per feature), ``mean`` and ``m2`` (sum of
        squared deviations), float64 vectors of length ``prod(feature_shape)``.
    feature_shape : tuple of int or None
        Sizes of the kept axes (None before the first batch).

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.preprocessing import RunningStats
    >>> x = np.random.default_rng(0).normal(1e8, 2.0, size=(1000, 3))
    >>> stats = RunningStats(axis=1)
    >>> for batch in np.array_split(x, 7):
    ...     _ = stats.update(batch)
    >>> stats.count
    1000
    >>> bool(np.allclose(stats.std(), x.std(axis=0), rtol=1e-12))
    True
    """

    def __init__(self, axis: Axis = 1) -> None:
        _check_axis_arg(axis)
        self.axis = axis
        self.moments: Moments = Moments.empty(0)
        self.feature_shape: tuple[int, ...] | None = None

    def update(self, batch: Any) -> RunningStats:
        """Add a batch (any array_like of real numbers); returns self.

        Raises
        ------
        ValueError
            The batch's feature shape differs from earlier batches', or `axis`
            is out of range for it.
        """
        arr = _as_data(batch, "batch")
        layout = _Layout(arr.shape, _kept_axes(self.axis, arr.ndim))
        if self.feature_shape is not None and layout.feature_shape != self.feature_shape:
            raise ValueError(
                f"batch has feature shape {layout.feature_shape} on axis {self.axis!r}, expected "
                f"{self.feature_shape} as in the earlier batches"
            )
        part = channel_moments(layout.view(as_float_input(arr, "batch")))
        if self.moments.count == 0:
            self.moments = part if part.count else Moments.empty(layout.k)
        else:
            self.moments = merge_moments(self.moments, part)
        self.feature_shape = layout.feature_shape
        return self

    def merge(self, other: RunningStats) -> RunningStats:
        """Absorb the statistics of `other` (disjoint data, same axis and features); returns self."""
        if not isinstance(other, RunningStats):
            raise TypeError(f"other must be a RunningStats, got {describe(other)}")
        if other.axis != self.axis:
            raise ValueError(f"other must keep the same axis, got axis={other.axis!r} and axis={self.axis!r}")
        if (
            None not in (self.feature_shape, other.feature_shape)
            and self.feature_shape != other.feature_shape
        ):
            raise ValueError(
                f"other must have the same feature shape, got {other.feature_shape} and {self.feature_shape}"
            )
        if other.moments.count:
            self.moments = (
                other.moments if self.moments.count == 0 else merge_moments(self.moments, other.moments)
            )
        if self.feature_shape is None:
            self.feature_shape = other.feature_shape
        return self

    def allreduce(self, comm: Any, *, timeout: float | None = None) -> RunningStats:
        """Merge with the RunningStats of every rank of `comm` (MPI); returns self.

        Every rank ends with the exact statistics of all ranks' data (Chan
        merge in rank order, so bitwise identical everywhere; ranks without
        data take part and receive the result).  Collective: every rank
        of `comm` must call it.  See :func:`bnorm.distributed.allreduce_running_stats`.

        Parameters
        ----------
        comm : mpi4py communicator or None
            None, or a single rank, leaves the statistics as they are.
        timeout : float or None, keyword-only
            Seconds to wait for the peers (None: no limit); see
            :class:`bnorm.distributed.PeerTimeoutError`.

        Examples
        --------
        >>> from mpi4py import MPI  # doctest: +SKIP
        >>> stats = RunningStats().update(my_shard).allreduce(MPI.COMM_WORLD)  # doctest: +SKIP
        """
        from .distributed import allreduce_running_stats

        result: RunningStats = allreduce_running_stats(self, comm, timeout=timeout)
        return result

    def reset(self) -> None:
        """Forget all data."""
        self.moments = Moments.empty(0)
        self.feature_shape = None

    @property
    def count(self) -> int:
        """Values seen per feature."""
        return int(self.moments.count)

    def _shaped(self, v: np.ndarray) -> np.ndarray:
        # feature_shape is None only when `moments` was set from outside (e.g. merged
        # from other processes) on an instance that saw no batch: keep the flat vector.
        return v if self.feature_shape is None else v.reshape(self.feature_shape)

    @property
    def mean(self) -> np.ndarray:
        """The mean per feature, float64, of shape `feature_shape`."""
        if self.moments.count == 0:
            raise ValueError(
                "no data: the statistics need at least one value per feature (call update(batch) first)"
            )
        return self._shaped(self.moments.mean.copy())

    def var(self, ddof: int = 0) -> np.ndarray:
        """The variance per feature: ``m2 / (count - ddof)``; 0 for constant features."""
        return self._shaped(_variance(self.moments, _check_ddof(ddof)))

    def std(self, ddof: int = 0) -> np.ndarray:
        """The standard deviation per feature, ``sqrt(var(ddof))``."""
        std: np.ndarray = np.sqrt(self.var(ddof))
        return std

    def __repr__(self) -> str:
        return f"RunningStats(axis={self.axis!r}, count={self.count}, feature_shape={self.feature_shape})"


def _inputs_of(batch: Any) -> Any:
    """The inputs of a data-loader batch: ``(inputs, targets, ...)`` -> inputs."""
    if isinstance(batch, (tuple, list)) and batch and hasattr(batch[0], "shape"):
        return batch[0]
    return batch


def dataset_stats(
    batches: Iterable[Any],
    axis: Axis = 1,
    ddof: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Per-feature mean and standard deviation of a whole dataset, streamed by batch.

    Exactly the statistics of the concatenated batches (float64, Chan et al.
    merge; see :class:`RunningStats`), with memory for one batch at a time.
    Not the average of per-batch standard deviations, which is wrong whenever
    batch means differ.

    Parameters
    ----------
    batches : iterable of array_like
        The data, e.g. a generator over files or a data loader.  A batch that is
        a tuple or list whose first element is an array (or tensor) is taken to
        be ``(inputs, targets, ...)``, as data loaders yield, and its first
        element is used.
    axis : int or tuple of int, default 1
        The feature axis kept (1 for ``(N, C, H, W)`` images).
    ddof : int, default 0
        Delta degrees of freedom of the variance (0: population, what
        normalization constants use; 1: sample).
    progress : bool, default False
        Show a progress bar (needs the optional package ``tqdm``).

    Returns
    -------
    mean, std : ndarray of shape feature_shape, float64

    Raises
    ------
    ValueError
        `batches` is empty; batches disagree in feature shape.
    ImportError
        ``progress=True`` without tqdm installed.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.preprocessing import dataset_stats
    >>> images = np.random.default_rng(0).random((50, 3, 8, 8))
    >>> mean, std = dataset_stats(np.array_split(images, 5), axis=1)
    >>> bool(np.allclose(mean, images.mean(axis=(0, 2, 3))))
    True
    """
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be a bool, got {describe(progress)}")
    ddof_i = _check_ddof(ddof)
    stats = RunningStats(axis)
    it: Iterable[Any] = batches
    if progress:
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]
        except ImportError as exc:  # pragma: no cover - exercised with tqdm hidden
            raise ImportError(
                "progress=True needs the optional package tqdm: pip install tqdm (or pass progress=False)"
            ) from exc
        it = tqdm(batches, desc="dataset statistics", unit="batch")
    for batch in it:
        stats.update(_inputs_of(batch))
    if stats.count == 0:
        raise ValueError("batches is empty: no data to compute statistics from")
    return stats.mean, stats.std(ddof_i)


# -- normalization transforms ------------------------------------------------------


def _feature_vector(value: Any, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


class Normalize:
    r"""``y = (x - mean) / std`` per feature (channel), and its inverse.

    The transform every image pipeline applies before a network (torchvision's
    ``Normalize``), with `axis` the channel axis kept.  A model pretrained on
    normalized data must be fed data normalized with the *same* constants.

    Parameters
    ----------
    mean, std : array_like of shape feature_shape
        Per-feature constants, e.g. :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`;
        std must be > 0 (use :meth:`from_stats` for data that may contain
        constant features).  A scalar (or size-1) value is repeated to the
        other's shape; two scalars mean one feature.
    axis : int or tuple of int, default 1
        The feature axis kept (1 for ``(N, C, H, W)``; -1 for channels-last).

    Notes
    -----
    Evaluated as ``x * (1 / std) + (-mean / std)`` with the coefficients in
    float64, cast once to the input's dtype (float16 computes in float32);
    integer input (e.g. uint8 images) is promoted to float64.  The output keeps
    the float input's dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.preprocessing import Normalize, IMAGENET_MEAN, IMAGENET_STD
    >>> norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    >>> x = np.full((1, 3, 2, 2), 0.5, dtype=np.float32)
    >>> y = norm(x)
    >>> y[0, :, 0, 0].round(4)
    array([0.0655, 0.1964, 0.4178], dtype=float32)
    >>> bool(np.allclose(norm.inverse(y), x))
    True
    >>> mnist = Normalize(0.5, 0.5)          # (x/255 - 0.5) / 0.5: [0, 1] -> [-1, 1]
    >>> mnist(np.array([[0.0], [1.0]])).ravel()
    array([-1.,  1.])
    """

    def __init__(self, mean: Any, std: Any, axis: Axis = 1) -> None:
        _check_axis_arg(axis)
        m = _feature_vector(mean, "mean")
        s = _feature_vector(std, "std")
        if m.shape != s.shape:
            if m.size != 1 and s.size != 1:
                raise ValueError(f"mean and std must have the same shape, got {m.shape} and {s.shape}")
            shape = m.shape if m.size > 1 else s.shape
            m, s = np.broadcast_to(m, shape).copy(), np.broadcast_to(s, shape).copy()
        if (s <= 0).any():
            bad = np.flatnonzero(s.ravel() <= 0).tolist()
            raise ValueError(
                f"std must be > 0 for every feature, got {s.tolist()} (not at flat index {bad}); a constant "
                "feature has std 0: build the transform with Normalize.from_stats, which maps it to 0"
            )
        m.flags.writeable = False
        s.flags.writeable = False
        self.mean = m
        self.std = s
        self.axis = axis
        self._scale = 1.0 / s.ravel()
        self._shift = -m.ravel() * self._scale

    @classmethod
    def from_stats(cls, stats: Any, *, axis: Axis | None = None, ddof: int = 0) -> Normalize:
        """The transform standardizing with dataset statistics.

        Parameters
        ----------
        stats : RunningStats or (mean, std) pair
            A :class:`RunningStats` (its `axis` is used unless `axis` is given)
            or what :func:`dataset_stats` returns.
        axis : int or tuple of int or None, keyword-only
            The feature axis; default: the RunningStats' axis, else 1.
        ddof : int, default 0, keyword-only
            For a RunningStats: delta degrees of freedom of the std.

        Returns
        -------
        Normalize
            With std 0 (constant features) replaced by 1, so they map to 0.
        """
        if isinstance(stats, RunningStats):
            mean, std = stats.mean, stats.std(ddof)
            ax = stats.axis if axis is None else axis
        elif isinstance(stats, (tuple, list)) and len(stats) == 2:
            mean, std = np.asarray(stats[0]), np.asarray(stats[1])
            ax = 1 if axis is None else axis
        else:
            raise TypeError(f"stats must be a RunningStats or a (mean, std) pair, got {describe(stats)}")
        std_f = _feature_vector(std, "std")
        norm = cls(mean, np.where(std_f == 0, 1.0, std_f), ax)
        # A constant feature maps to exactly 0 (x - mean could leave a rounding residue).
        constant = std_f.ravel() == 0
        norm._scale[constant] = 0.0
        norm._shift[constant] = 0.0
        return norm

    @classmethod
    def imagenet(cls, max_value: float = 1.0, axis: Axis = 1) -> Normalize:
        """Torchvision's ImageNet normalization for RGB input in ``[0, max_value]``.

        ``max_value=255`` serves uint8 images without a prior division by 255
        (mean and std are scaled instead).
        """
        if (
            isinstance(max_value, (bool, np.bool_))
            or not isinstance(max_value, (int, float, np.number))
            or not (max_value > 0 and math.isfinite(float(max_value)))
        ):
            raise ValueError(f"max_value must be a positive number, got {max_value!r}")
        v = float(max_value)
        return cls(np.array(IMAGENET_MEAN) * v, np.array(IMAGENET_STD) * v, axis)

    def _run(self, x: Any, scale: np.ndarray, shift: np.ndarray, name: str) -> np.ndarray:
        arr = as_float_input(x, name)
        if arr.ndim == 0:
            raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
        layout = _Layout(arr.shape, _kept_axes(self.axis, arr.ndim))
        if layout.k != scale.size or (self.mean.ndim > 1 and layout.feature_shape != self.mean.shape):
            raise ValueError(
                f"{name} has feature shape {layout.feature_shape} on axis {self.axis!r}, but mean and std "
                f"have shape {self.mean.shape}"
            )
        return layout.apply(arr, scale, shift, arr.dtype)

    def __call__(self, x: Any) -> np.ndarray:
        """``(x - mean) / std`` per feature; a new array of x's (float) dtype."""
        return self._run(x, self._scale, self._shift, "x")

    def inverse(self, y: Any) -> np.ndarray:
        """``y * std + mean`` per feature: undo the transform (e.g. to display images)."""
        return self._run(y, self.std.ravel(), self.mean.ravel(), "y")

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()}, axis={self.axis!r})"


def _moments_of(x: Any, axis: Axis) -> tuple[np.ndarray, _Layout, Moments]:
    arr = as_float_input(x, "x")
    if arr.ndim == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    layout = _Layout(arr.shape, _kept_axes(axis, arr.ndim))
    return arr, layout, channel_moments(layout.view(arr))


def center(x: Any, axis: Axis = 1) -> np.ndarray:
    r"""Subtract each feature's mean: ``y = x - mean(x)`` over all axes but `axis`.

    Parameters
    ----------
    x : array_like
        Real numbers (integers are promoted to float64).
    axis : int or tuple of int, default 1
        The feature axis kept.

    Returns
    -------
    ndarray
        Same shape and (float) dtype as `x`; every feature has mean 0.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.preprocessing import center
    >>> center(np.array([[1.0, 10.0], [3.0, 30.0]]))
    array([[ -1., -10.],
           [  1.,  10.]])
    """
    arr, layout, mom = _moments_of(x, axis)
    return layout.apply(arr, np.ones(layout.k), -mom.mean, arr.dtype)


def standardize(x: Any, axis: Axis = 1, ddof: int = 0) -> np.ndarray:
    r"""Center and scale each feature to unit variance: ``y = (x - mean) / std``.

    Constant features (std 0) map to 0, never NaN.

    Parameters
    ----------
    x : array_like
        Real numbers (integers are promoted to float64).
    axis : int or tuple of int, default 1
        The feature axis kept.
    ddof : int, default 0
        Delta degrees of freedom of the std (0: population, as scikit-learn's
        StandardScaler; 1: sample).

    Returns
    -------
    ndarray
        Same shape and (float) dtype as `x`.

    Raises
    ------
    ValueError
        Not more than `ddof` values per feature.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.preprocessing import standardize
    >>> standardize(np.array([[1.0, 5.0], [3.0, 5.0]]))
    array([[-1.,  0.],
           [ 1.,  0.]])
    """
    arr, layout, mom = _moments_of(x, axis)
    std = np.sqrt(_variance(mom, _check_ddof(ddof)))
    scale = np.where(std == 0, 0.0, 1.0 / np.where(std == 0, 1.0, std))  # constant features -> exactly 0
    return layout.apply(arr, scale, -mom.mean * scale, arr.dtype)


def _check_range(feature_range: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in feature_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"feature_range must be a pair (min, max) of numbers, got {feature_range!r}"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"feature_range must be (min, max) with finite min < max, got {feature_range!r}")
    return lo, hi


def minmax_scale(x: Any, feature_range: tuple[float, float] = (-1.0, 1.0), axis: Axis = 1) -> np.ndarray:
    r"""Scale each feature linearly so its minimum and maximum become `feature_range`.

    .. math::
        y = lo + (x - \min x)\,\frac{hi - lo}{\max x - \min x}

    A constant feature (min = max) maps to the centre ``(lo + hi) / 2`` of the
    range -- 0 for the default (-1, 1) -- never NaN.  (scikit-learn's
    ``minmax_scale`` maps it to ``lo`` instead.)

    Parameters
    ----------
    x : array_like
        Real numbers (integers are promoted to float64).
    feature_range : (float, float), default (-1, 1)
        ``(lo, hi)`` with lo < hi.
    axis : int or tuple of int, default 1
        The feature axis kept.

    Returns
    -------
    ndarray
        Same shape and (float) dtype as `x`.

    Raises
    ------
    ValueError
        A bad `feature_range`; no values per feature.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.preprocessing import minmax_scale
    >>> minmax_scale(np.array([[0.0, 7.0], [5.0, 7.0], [10.0, 7.0]]))
    array([[-1.,  0.],
           [ 0.,  0.],
           [ 1.,  0.]])
    >>> minmax_scale(np.array([[0.0], [255.0]]), feature_range=(0, 1)).ravel()
    array([0., 1.])
    """
    lo, hi = _check_range(feature_range)
    arr = as_float_input(x, "x")
    if arr.ndim == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    layout = _Layout(arr.shape, _kept_axes(axis, arr.ndim))
    x3 = layout.view(arr)
    if x3.shape[0] * x3.shape[2] == 0:
        if layout.k == 0:
            return np.empty(arr.shape, arr.dtype)
        raise ValueError(f"x must have at least one value per feature, got shape {arr.shape}")
    xmin = x3.min(axis=(0, 2)).astype(np.float64)
    xmax = x3.max(axis=(0, 2)).astype(np.float64)
    span = xmax - xmin
    constant = span == 0
    with np.errstate(over="ignore"):
        scale = np.where(constant, 0.0, (hi - lo) / np.where(constant, 1.0, span))
    shift = np.where(constant, (lo + hi) / 2, lo - xmin * scale)
    return layout.apply(arr, scale, shift, arr.dtype)


# -- colour layout helpers ---------------------------------------------------------


def _three_channels(x: Any, axis: int, what: str) -> tuple[np.ndarray, int]:
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    ax = normalize_axis(axis, arr.ndim)
    if arr.shape[ax] != 3:
        raise ValueError(f"x must have 3 channels ({what}) on axis {axis}, got shape {arr.shape}")
    return arr, ax


def rgb_to_bgr(x: Any, axis: int = 1) -> np.ndarray:
    """Reverse the channel order, RGB <-> BGR (Caffe/OpenCV models expect BGR).

    Returns a view of `x` with the 3 channels on `axis` reversed (copy it before
    writing to it).

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.preprocessing import rgb_to_bgr
    >>> rgb_to_bgr(np.array([[1, 2, 3]]), axis=-1)
    array([[3, 2, 1]])
    """
    arr, ax = _three_channels(x, axis, "RGB or BGR")
    return np.flip(arr, axis=ax)


#: Alias of :func:`rgb_to_bgr` (reversing the channels is its own inverse).
bgr_to_rgb = rgb_to_bgr

#: ITU-R BT.601 luma weights of R, G, B (PIL's ``convert("L")``).
_LUMA = (0.299, 0.587, 0.114)


def to_grayscale(x: Any, axis: int = 1, keepdims: bool = True) -> np.ndarray:
    r"""RGB to grayscale with the ITU-R BT.601 luma weights.

    .. math:: Y = 0.299 R + 0.587 G + 0.114 B

    (PIL's ``convert("L")``; torchvision's tensor path uses 0.2989 for R.)

    Parameters
    ----------
    x : array_like
        RGB images with the 3 channels on `axis`; integers are promoted to
        float64 (no rounding back to uint8).
    axis : int, default 1
        The channel axis.
    keepdims : bool, default True
        Keep the channel axis with size 1.

    Examples
    --------
    >>> import numpy as np
    >>> from bnorm.preprocessing import to_grayscale
    >>> to_grayscale(np.array([[255.0, 255.0, 255.0], [255.0, 0.0, 0.0]]), axis=1)
    array([[255.   ],
           [ 76.245]])
    """
    arr, ax = _three_channels(x, axis, "RGB")
    arr = as_float_input(arr, "x")
    r, g, b = (np.take(arr, i, axis=ax) for i in range(3))
    y = r * arr.dtype.type(_LUMA[0])
    y += g * arr.dtype.type(_LUMA[1])
    y += b * arr.dtype.type(_LUMA[2])
    return np.expand_dims(y, ax) if keepdims else y
