"""``compute(paths, ...)``: the statistics of a dataset on disk, as a :class:`DatasetStats`.

The Python side of ``bnorm stats``: discovery (:mod:`~bnorm.stats.sources`),
the ordered fold of per-task partial moments (:mod:`~bnorm.stats.accumulate`)
on threads and MPI ranks, and the result: per-channel count, mean, standard
deviation, variance, min and max on the [0, 1] scale (multiply by 255 for the
[0, 255] scale), optionally the mean and std *images* and per-channel
histograms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .accumulate import Fold, Options, Partial, compute_partial, mpi_partials, ordered_map
from .errors import DataError, UsageError
from .images import PILLOW_HINT, have_pillow
from .sources import Discovery, find_tasks

__all__ = ["DatasetStats", "compute"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class DatasetStats:
    """The statistics of a dataset; per-channel vectors on the [0, 1] scale.

    Attributes
    ----------
    images : int
        Images counted.
    pixels : int
        Values per channel (images x H x W).
    mean, std, var, min, max : ndarray of shape (C,)
        float64 per channel; `std` and `var` with `ddof`.
    ddof : int
        Delta degrees of freedom of `std` and `var`.
    channel_names : tuple of str
        ("R", "G", "B"), ("B", "G", "R"), ("gray",), or ("c0", "c1", ...) when
        the order is not known (arrays).
    image_size : (int, int) or None
        (H, W) when every image has it, else None.
    files : tuple of str
        The files read (sorted absolute paths).
    skipped : tuple of (str, str)
        What could not be read, with the reason.
    ignored : int
        Other files in the folders (not images by their extension).
    unread_arrays : int
        ``.npy``/``.npz`` files among them (arrays are read when named).
    modes : tuple of str
        The Pillow modes (``"mode RGB"``) and array dtypes and layouts seen.
    pixel_mean, pixel_std : ndarray of shape (H, W, C) or None
        The mean and std images (per-pixel statistics over the images).
    pixel_note : str or None
        Why there are no per-pixel statistics when they were asked for.
    hist : ndarray of shape (C, 258) or None
        Counts per channel of the levels ``round(255 x)``: bin 0 below 0,
        bins 1..256 the levels 0..255, bin 257 above 1.
    """

    images: int
    pixels: int
    mean: np.ndarray
    std: np.ndarray
    var: np.ndarray
    min: np.ndarray
    max: np.ndarray
    ddof: int
    channel_names: tuple[str, ...]
    image_size: tuple[int, int] | None
    files: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    ignored: int
    modes: tuple[str, ...]
    unread_arrays: int = 0
    pixel_mean: np.ndarray | None = None
    pixel_std: np.ndarray | None = None
    pixel_note: str | None = None
    hist: np.ndarray | None = None

    @property
    def num_channels(self) -> int:
        """C."""
        return int(self.mean.shape[0])


def _names(channels: str | None, c: int, arrays: bool) -> tuple[str, ...]:
    if channels == "bgr" or (channels is None and c == 3 and not arrays):
        return ("B", "G", "R") if channels == "bgr" else ("R", "G", "B")
    if channels == "rgb":
        return ("R", "G", "B")
    if c == 1:
        return ("gray",)
    return tuple(f"c{i}" for i in range(c))


def _result(fold: Fold, found: Discovery, channels: str | None, ddof: int) -> DatasetStats:
    n = fold.channel.count
    if n == 0:
        reasons = "; ".join(f"{name}: {why}" if name not in why else why for name, why in fold.skipped[:3])
        more = f" (and {len(fold.skipped) - 3} more)" if len(fold.skipped) > 3 else ""
        raise DataError(
            "no images could be read"
            + (f": {reasons}{more}" if reasons else " (no image or array files found)")
        )
    if n <= ddof:
        raise DataError(f"--ddof {ddof} needs more than {ddof} values per channel, got {n}")
    assert fold.lo is not None and fold.hi is not None
    pixel_mean = pixel_std = None
    note = fold.pixel_note
    if fold.pixel is not None:
        if fold.pixel.count > ddof:
            # (C, H, W) -> (H, W, C): images as they are displayed and saved.
            pixel_mean = np.ascontiguousarray(np.moveaxis(fold.pixel.mean, 0, -1))
            pixel_std = np.ascontiguousarray(np.moveaxis(fold.pixel.std(ddof), 0, -1))
        else:
            note = f"--ddof {ddof} needs more than {ddof} images for the std image, got {fold.pixel.count}"
    arrays = any(not m.startswith("mode ") for m in fold.modes)
    c = int(fold.channel.mean.shape[0])
    return DatasetStats(
        images=fold.images,
        pixels=n,
        mean=fold.channel.mean,
        std=fold.channel.std(ddof),
        var=fold.channel.var(ddof),
        min=fold.lo,
        max=fold.hi,
        ddof=ddof,
        channel_names=_names(channels, c, arrays),
        image_size=next(iter(fold.sizes)) if len(fold.sizes) == 1 else None,
        files=tuple(sorted(fold.files)),
        skipped=tuple(sorted(found.skipped + tuple(fold.skipped))),
        ignored=found.ignored,
        unread_arrays=found.arrays_in_folders,
        modes=tuple(fold.modes),
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        pixel_note=note,
        hist=fold.hist,
    )


def _from_rank0(comm: Any, work: Callable[[], _T], others: Callable[[], None] = lambda: None) -> _T:
    """`work()` on rank 0 (the other ranks run `others()`); its result, or its error, on every rank."""
    outcome: tuple[Exception | None, _T | None] = (None, None)
    if comm is None or int(comm.Get_rank()) == 0:
        try:
            outcome = (None, work())
        except (UsageError, DataError, ImportError) as exc:
            outcome = (exc, None)
    else:
        others()
    if comm is not None and int(comm.Get_size()) > 1:
        outcome = comm.bcast(outcome, root=0)
    if outcome[0] is not None:
        raise outcome[0]
    result: _T = outcome[1]  # type: ignore[assignment]
    return result


def _discover(
    paths: list[str],
    layout: str | None,
    keys: Sequence[str],
    chunk_size: int | None,
    max_files: int | None,
    max_value: float | None,
    strict: bool,
    resize: int | None,
) -> Discovery:
    found = find_tasks(
        paths, layout=layout, keys=keys, chunk_size=chunk_size, max_files=max_files, max_value=max_value
    )
    if any(t.kind == "image" for t in found.tasks) and not have_pillow():
        raise ImportError(f"image files are read through Pillow, which is not installed: {PILLOW_HINT}")
    array = next((t for t in found.tasks if t.kind != "image"), None)
    if resize is not None and array is not None:
        raise UsageError(
            f"--resize applies to image files, and {array.name} is an array: leave out --resize "
            "(arrays are used at their size; --center-crop works on both)"
        )
    if strict and found.skipped:
        name, why = found.skipped[0]
        raise DataError(f"{name}: {why} (--strict stops at the first file that cannot be read)")
    return found


def _check_int(value: Any, name: str, low: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")


def compute(
    paths: str | Sequence[str],
    *,
    channels: str | None = None,
    layout: str | None = None,
    keys: Sequence[str] = (),
    resize: int | None = None,
    center_crop: int | None = None,
    max_value: float | None = None,
    ddof: int = 0,
    max_files: int | None = None,
    workers: int = 1,
    per_pixel: bool | str = False,
    histograms: bool = False,
    strict: bool = False,
    chunk_size: int | None = None,
    comm: Any = None,
    progress: Callable[[Iterator[Partial], int], Iterator[Partial]] | None = None,
) -> DatasetStats:
    """The per-channel statistics of the images under `paths`, streamed and exact.

    Parameters
    ----------
    paths : str or sequence of str
        Folders (searched recursively for image files), image files and
        ``.npy``/``.npz`` files.
    channels : {"rgb", "bgr", "gray"} or None
        Convert every image to this form on read (None: as stored; see
        :mod:`bnorm.stats.images`).
    layout : {"NHWC", "NCHW", "NHW"} or None
        The layout of the arrays (None: guessed when unambiguous).
    keys : sequence of str
        ``.npz`` members to read.
    resize, center_crop : int or None
        torchvision's ``Resize(resize)`` then ``CenterCrop(center_crop)``.
    max_value : float or None
        The stored value that is 1.0 on the [0, 1] scale (default: 255 for
        8-bit, 65535 for 16-bit, 1 for float data).
    ddof : int, default 0
        Delta degrees of freedom of the std (0: population, as torchvision's
        usual recipe and NumPy's default).
    max_files : int or None
        Read this many files, evenly spaced through the sorted list.
    workers : int, default 1
        Tasks decoded at a time (threads); the result is the same for any value.
    per_pixel : bool or "try"
        Also the mean and std images (True: images of different sizes are an
        error; "try": dropped, with a note, if the sizes differ).
    histograms : bool
        Also the per-channel histogram of the levels ``round(255 x)``.
    strict : bool
        Stop at the first file that cannot be read (DataError) instead of
        skipping it.
    chunk_size : int or None
        Images per chunk of an array (default: 32 MiB of float64 pixels).
    comm : mpi4py communicator or None
        Shard the tasks over its ranks; every rank must call and every rank
        gets the result (identical to one process, bit for bit).
    progress : callable or None
        ``progress(partials, total)`` wraps the iterator of partials (rank 0),
        e.g. with a progress bar.

    Returns
    -------
    DatasetStats

    Raises
    ------
    UsageError
        The arguments do not fit the data (missing path, ambiguous layout, ...).
    DataError
        No image could be read; mixed channel counts; different sizes with
        ``per_pixel=True``; an unreadable file with `strict`.
    ImportError
        Image files and no Pillow.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from bnorm.stats import compute
    >>> folder = tempfile.mkdtemp()
    >>> np.save(os.path.join(folder, "x.npy"), np.array([[[0, 255]], [[51, 102]]], dtype=np.uint8))
    >>> s = compute(os.path.join(folder, "x.npy"))
    >>> s.images, s.pixels, s.mean.round(4).tolist(), s.std.round(4).tolist()
    (2, 4, [0.4], [0.3742])
    """
    path_list = [paths] if isinstance(paths, str) else list(paths)
    if not path_list:
        raise UsageError("paths must name at least one folder or file")
    if channels not in (None, "rgb", "bgr", "gray"):
        raise UsageError(f"channels must be 'rgb', 'bgr', 'gray' or None, got {channels!r}")
    for value, name, low in (
        (resize, "resize", 1),
        (center_crop, "center_crop", 1),
        (max_files, "max_files", 1),
        (chunk_size, "chunk_size", 1),
    ):
        _check_int(value, name, low)
    _check_int(ddof, "ddof", 0, allow_none=False)
    _check_int(workers, "workers", 1, allow_none=False)
    if max_value is not None and not (np.isfinite(max_value) and max_value > 0):
        raise UsageError(f"max_value must be a positive finite number, got {max_value!r}")
    opts = Options(channels, resize, center_crop, max_value, per_pixel is not False, histograms)
    found = _from_rank0(
        comm, lambda: _discover(path_list, layout, keys, chunk_size, max_files, max_value, strict, resize)
    )
    tasks = found.tasks

    def compute_one(i: int) -> Partial:
        return compute_partial(tasks[i], i, opts)

    if comm is not None and int(comm.Get_size()) > 1:
        parts: Iterator[Partial] = mpi_partials(tasks, opts, workers, comm)
    else:
        parts = ordered_map(compute_one, range(len(tasks)), workers)

    def fold_all() -> DatasetStats:
        fold = Fold("need" if per_pixel is True else ("try" if per_pixel else "no"), strict)
        try:
            for part in parts if progress is None else progress(parts, len(tasks)):
                fold.add(part, tasks[part.index].path)
        finally:
            close = getattr(parts, "close", None)
            if close is not None:
                close()  # under MPI: receives what the other ranks still send
        return _result(fold, found, channels, ddof)

    def send_all() -> None:
        for _ in parts:  # computes this rank's tasks and sends them to rank 0
            pass

    return _from_rank0(comm, fold_all, send_all)
