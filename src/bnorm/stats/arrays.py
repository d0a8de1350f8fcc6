"""NumPy inputs of ``bnorm stats``: ``.npy`` files and ``.npz`` members, read in chunks.

An array holds images along its first axis in one of three layouts:
``NHWC`` (channels last), ``NCHW`` (channels first) or ``NHW`` (one channel).
:func:`guess_layout` takes the layout from the shape when only one reading
makes sense (channels are 1, 3 or 4) and otherwise asks for ``--layout``.

Reading never unpickles (object dtypes are refused from the header) and never
holds more than one chunk: an ``.npy`` file is memory-mapped and sliced
``start:stop``; an ``.npz`` member (a zip entry, possibly compressed) is
streamed, ``chunk`` images per read, after its header.  A header's shape is
checked against the bytes present, so no file makes a read allocate more than
its chunk.  Chunks come back as float64 ``(k, C, H, W)`` on the [0, 1] scale:
the stored value divided by the dtype's maximum (uint8 255, uint16 65535,
bool 1, float 1) or by ``--max-value``.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any

import numpy as np

from .errors import UsageError

__all__ = [
    "display_path",
    "LAYOUTS",
    "ArrayInfo",
    "array_info",
    "guess_layout",
    "check_max_value",
    "npz_members",
    "chunks",
]

#: The layouts an array may have (N images first).
LAYOUTS = ("NHWC", "NCHW", "NHW")

#: Channel counts that mark a channel axis when the layout is guessed.
_CHANNEL_COUNTS = (1, 3, 4)

#: The value that is 1.0 on the [0, 1] scale, by dtype.
_DTYPE_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.bool_): 1.0}


def display_path(path: str) -> str:
    """`path` as messages show it: relative to the current folder when it is inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel


@dataclass(frozen=True)
class ArrayInfo:
    """The header of one array: where it is, its shape and dtype, and how to read it."""

    path: str
    key: str | None
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran: bool
    offset: int
    layout: str | None = None
    max_value: float = 1.0

    @property
    def name(self) -> str:
        """The path, with ``['member']`` for an ``.npz`` member."""
        shown = display_path(self.path)
        return shown if self.key is None else f"{shown}[{self.key!r}]"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        s = self.shape
        if self.layout == "NHWC":
            return (s[1], s[2], s[3])
        if self.layout == "NCHW":
            return (s[2], s[3], s[1])
        return (s[1], s[2], 1)


def _read_header(fp: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as exc:
        raise ValueError(f"{name} is not a readable .npy array: {exc}") from None
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise ValueError(f"{name} has dtype {dtype}; expected real numbers (bool, integer or float)")
    return tuple(int(s) for s in shape), bool(fortran), dtype


def npz_members(path: str, keys: Sequence[str]) -> list[str]:
    """The members of the ``.npz`` `path` to read: `keys`, or its one image-like member.

    Raises
    ------
    UsageError
        A key is not a member, or several members have 3 or 4 dimensions.
    ValueError
        The file is not a readable zip of ``.npy`` arrays, or has no member
        with 3 or 4 dimensions (the file is skipped).
    """
    shown = display_path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if keys:
                missing = [k for k in keys if k not in names]
                if missing:
                    raise UsageError(f"{shown} has no member {missing[0]!r}; its members are {names}")
                return list(keys)
            shapes = {}
            for n in names:
                with zf.open(n + ".npy") as fp:
                    shapes[n] = _read_header(fp, f"{shown}[{n!r}]")[0]
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{shown} is not a readable .npz file: {exc}") from None
    images = [n for n in names if len(shapes[n]) in (3, 4)]
    if len(images) == 1:
        return images
    listing = ", ".join(f"{n} {shapes[n]}" for n in names)
    if not images:
        raise ValueError(f"{shown} has no member with 3 or 4 dimensions (images); its members: {listing}")
    raise UsageError(
        f"{shown} has several image arrays ({listing}): pass --key NAME for each to read "
        "(statistics for normalization come from the training set only)"
    )


def array_info(path: str, key: str | None) -> ArrayInfo:
    """The header of the ``.npy`` file `path`, or of member `key` of the ``.npz`` `path`.

    Raises
    ------
    ValueError
        The file cannot be read, is not an array of real numbers, or is shorter
        than its header says.
    """
    name = display_path(path) if key is None else f"{display_path(path)}[{key!r}]"
    try:
        if key is None:
            with open(path, "rb") as fp:
                shape, fortran, dtype = _read_header(fp, name)
                offset = fp.tell()
            needed = offset + math.prod(shape) * dtype.itemsize
            if os.path.getsize(path) < needed:
                raise ValueError(
                    f"{name} is truncated: its header says shape {shape} of {dtype} "
                    f"({needed} bytes), the file has {os.path.getsize(path)}"
                )
        else:
            with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as fp:
                shape, fortran, dtype = _read_header(fp, name)
                offset = fp.tell()
                size = zf.getinfo(key + ".npy").file_size
            if size < offset + math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{name} is truncated: its header says shape {shape} of {dtype}")
            if fortran and len(shape) > 1:
                raise ValueError(f"{name} is stored in Fortran order; save it with np.ascontiguousarray")
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{name} cannot be read: {exc}") from None
    return ArrayInfo(path, key, shape, dtype, fortran, offset)


def guess_layout(info: ArrayInfo, layout: str | None) -> ArrayInfo:
    """`info` with its layout: `layout` if given (checked), else guessed from the shape."""
    s = info.shape
    if layout is not None:
        if len(s) != len(layout):
            raise UsageError(
                f"{info.name} has shape {s} ({len(s)} dimensions), which is not --layout {layout}"
            )
        return replace(info, layout=layout)
    if len(s) == 3:
        if s[2] in (3, 4):
            raise UsageError(
                f"{info.name} has shape {s}: {s[0]} images of {s[1]}x{s[2]} (NHW), or one "
                f"{s[0]}x{s[1]} image with {s[2]} channels? Pass --layout NHW for the first; "
                "save one image as shape (1, H, W, C) for the second"
            )
        return replace(info, layout="NHW")
    if len(s) == 4:
        first, last = s[1] in _CHANNEL_COUNTS, s[3] in _CHANNEL_COUNTS
        if last and not first:
            return replace(info, layout="NHWC")
        if first and not last:
            return replace(info, layout="NCHW")
        raise UsageError(
            f"{info.name} has shape {s}: the channel axis is not clear; pass --layout NHWC "
            f"({s[3]} channels of {s[1]}x{s[2]}) or --layout NCHW ({s[1]} channels of {s[2]}x{s[3]})"
        )
    raise UsageError(f"{info.name} has shape {s}; expected images: 3 dimensions (NHW) or 4 (NHWC, NCHW)")


def check_max_value(info: ArrayInfo, max_value: float | None) -> ArrayInfo:
    """`info` with the value that maps to 1.0: `max_value`, or the dtype's own."""
    if max_value is not None:
        return replace(info, max_value=float(max_value))
    native = info.dtype.newbyteorder("=")  # '>u2' (big-endian) is 16-bit too
    if native in _DTYPE_MAX:
        return replace(info, max_value=_DTYPE_MAX[native])
    if info.dtype.kind == "f":
        return replace(info, max_value=1.0)
    raise UsageError(
        f"{info.name} has dtype {info.dtype}, whose pixel scale is not known: pass --max-value "
        "(the value that is 1.0 on the [0, 1] scale, e.g. 255 for 8-bit pixel values)"
    )


def _nchw(x: np.ndarray, layout: str | None) -> np.ndarray:
    if layout == "NHWC":
        return np.moveaxis(x, -1, 1)
    if layout == "NHW":
        return x[:, np.newaxis]
    return x


def _scaled(raw: np.ndarray, info: ArrayInfo) -> np.ndarray:
    view = _nchw(raw, info.layout)
    y = np.empty(view.shape, dtype=np.float64)  # C-contiguous, channels first: long rows per channel
    np.divide(view, info.max_value, out=y)  # correctly rounded: k / 255 exactly as the [0, 1] value of k
    return y


def chunks(info: ArrayInfo, start: int, stop: int, chunk: int) -> Iterator[np.ndarray]:
    """Images ``start:stop`` of the array, `chunk` at a time, as float64 ``(k, C, H, W)`` in [0, 1]."""
    if info.key is None:
        mm = np.memmap(
            info.path,
            dtype=info.dtype,
            mode="r",
            offset=info.offset,
            shape=info.shape,
            order="F" if info.fortran else "C",
        )
        for a in range(start, stop, chunk):
            yield _scaled(mm[a : min(stop, a + chunk)], info)
        return
    row = math.prod(info.shape[1:]) * info.dtype.itemsize
    with zipfile.ZipFile(info.path) as zf, zf.open(info.key + ".npy") as fp:
        fp.seek(info.offset + start * row)
        for a in range(start, stop, chunk):
            k = min(stop, a + chunk) - a
            data = fp.read(k * row)
            if len(data) != k * row:
                raise ValueError(f"{info.name} ends early, at image {a + len(data) // max(row, 1)}")
            raw = np.frombuffer(data, dtype=info.dtype).reshape((k, *info.shape[1:]))
            yield _scaled(raw, info)
