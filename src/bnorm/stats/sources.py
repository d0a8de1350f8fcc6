"""What ``bnorm stats`` reads: file discovery and the list of tasks.

``find_tasks(paths, ...)`` takes the given files and walks the given folders
for image files (recursively, by extension, as torchvision's ``ImageFolder``
and Keras' ``image_dataset_from_directory`` do; hidden names, starting with
".", are skipped, so ``.ipynb_checkpoints`` does not leak into a dataset).
NumPy files (``.npy``, ``.npz``) are read when they are named -- a folder is an
image dataset, and an array cached beside the images is not part of it
(``data/*.npy`` names a folder of arrays).  Files are sorted by absolute path
and counted once, so the order of the arguments and of the directory listing
never matters.  Each file becomes one or more :class:`Task` s -- an image file is one
task; an ``.npy`` array is cut into chunks of `chunk_size` images, one task
each; an ``.npz`` member is one task that streams its chunks in order -- and
the statistics are the fold of the tasks' partial moments in task order (see
:mod:`bnorm.stats.accumulate`), so the task list fixes the result bit for bit.

Only headers are read here (the ``.npy`` header of every array); pixels are
read by the workers, one task at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .arrays import ArrayInfo, array_info, check_max_value, display_path, guess_layout, npz_members
from .errors import UsageError

__all__ = ["IMAGE_EXTENSIONS", "ARRAY_EXTENSIONS", "Task", "Discovery", "find_tasks"]

#: Extensions read as images through Pillow (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

#: Extensions read as NumPy arrays.
ARRAY_EXTENSIONS = (".npy", ".npz")

#: Default chunk of an array: this many bytes of float64 pixels (the working copy).
CHUNK_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)  # one per image file: a million of them must stay small
class Task:
    """One unit of work: an image file, or images ``start:stop`` of an array.

    Attributes
    ----------
    path : str
        Absolute path of the file.
    kind : {"image", "npy", "npz"}
        How to read it.
    key : str or None
        The ``.npz`` member.
    start, stop : int
        Images of the array (0, 1 for an image file).
    chunk : int
        Images per chunk (an ``.npz`` task reads ``start:stop`` in chunks of it).
    info : ArrayInfo or None
        The array's header, layout and value scale.
    """

    path: str
    kind: str
    key: str | None = None
    start: int = 0
    stop: int = 1
    chunk: int = 1
    info: ArrayInfo | None = None

    @property
    def name(self) -> str:
        """How messages name the task: the path, with the member and image range of arrays."""
        if self.kind == "image":
            return display_path(self.path)
        assert self.info is not None
        whole = self.start == 0 and self.stop == self.info.shape[0]
        return self.info.name + ("" if whole else f"[{self.start}:{self.stop}]")


@dataclass(frozen=True)
class Discovery:
    """The tasks, and what discovery saw.

    Attributes
    ----------
    tasks : tuple of Task
        In the order of the fold.
    files : tuple of str
        The image and array files used (sorted absolute paths).
    ignored : int
        Other files in the folders (not images or arrays by their extension).
    skipped : tuple of (str, str)
        Arrays that cannot be used, with the reason: unreadable headers, no images.
    arrays_in_folders : int
        ``.npy``/``.npz`` files among the ignored ones (arrays are read when named).
    """

    tasks: tuple[Task, ...]
    files: tuple[str, ...]
    ignored: int
    skipped: tuple[tuple[str, str], ...]
    arrays_in_folders: int = 0


def _walk(root: str) -> tuple[list[str], list[str]]:
    """Image files under `root` (recursive, hidden names skipped), and the other files."""
    found: list[str] = []
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith("."):
                (found if f.lower().endswith(IMAGE_EXTENSIONS) else others).append(os.path.join(dirpath, f))
    return found, others


def _spread(files: list[str], max_files: int | None) -> list[str]:
    """`max_files` files evenly spaced through the sorted list (every class folder is represented)."""
    n = len(files)
    if max_files is None or max_files >= n:
        return files
    return [files[i * n // max_files] for i in range(max_files)]


def _chunk_images(info: ArrayInfo, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    per_image = max(1, math.prod(info.shape[1:])) * 8
    return max(1, CHUNK_BYTES // per_image)


def find_tasks(
    paths: Sequence[str],
    *,
    layout: str | None = None,
    keys: Sequence[str] = (),
    chunk_size: int | None = None,
    max_files: int | None = None,
    max_value: float | None = None,
) -> Discovery:
    """Discover the files under `paths` and cut them into tasks.

    Parameters
    ----------
    paths : sequence of str
        Files and folders.
    layout : {"NHWC", "NCHW", "NHW"} or None
        The layout of every array (None: guessed per array when unambiguous).
    keys : sequence of str
        ``.npz`` members to read (default: the one member with 3 or 4 dimensions).
    chunk_size : int or None
        Images per chunk of an array (default: 32 MiB of float64 pixels).
    max_files : int or None
        Use this many files, evenly spaced through the sorted list.
    max_value : float or None
        The value that is 1.0 on the [0, 1] scale (default: from the dtype).

    Raises
    ------
    UsageError
        A path does not exist or is not an image or array file; an array's
        layout is ambiguous or does not fit; an ``.npz`` member is missing or
        the member to read is not clear; an array's scale is unknown.
    """
    files: list[str] = []
    others: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found, rest = _walk(p)
            files.extend(found)
            others.extend(rest)
        elif os.path.isfile(p):
            if not p.lower().endswith(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS):
                raise UsageError(
                    f"{p} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a NumPy file (.npy, .npz)"
                )
            files.append(p)
        else:
            raise UsageError(f"{p} does not exist (expected a folder, an image or an .npy/.npz file)")
    unique = sorted({os.path.abspath(f) for f in files})
    unread = {os.path.abspath(f) for f in others} - set(unique)  # named files are read
    ignored = len(unread)
    arrays_in_folders = sum(f.lower().endswith(ARRAY_EXTENSIONS) for f in unread)
    unique = _spread(unique, max_files)
    tasks: list[Task] = []
    skipped: list[tuple[str, str]] = []
    for f in unique:
        ext = os.path.splitext(f)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            tasks.append(Task(f, "image"))
            continue
        members: list[str | None] = [None]
        try:
            if ext == ".npz":
                members = list(npz_members(f, keys))
            infos = [array_info(f, key) for key in members]
        except UsageError:
            raise
        except (OSError, ValueError) as exc:  # unreadable: reported and skipped, as a corrupt image
            skipped.append((display_path(f), str(exc)))
            continue
        for info in infos:
            info = guess_layout(info, layout)
            info = check_max_value(info, max_value)
            n = info.shape[0]
            if n == 0:
                skipped.append((info.name, f"no images (shape {info.shape})"))
                continue
            chunk = _chunk_images(info, chunk_size)
            if ext == ".npz":
                tasks.append(Task(f, "npz", info.key, 0, n, chunk, info))
            else:
                for start in range(0, n, chunk):
                    tasks.append(Task(f, "npy", None, start, min(n, start + chunk), chunk, info))
    return Discovery(tuple(tasks), tuple(unique), ignored, tuple(skipped), arrays_in_folders)
