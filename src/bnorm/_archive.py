r"""Reading an ``.npz`` archive with bounded memory, and naming files that are not one.

Contract: :func:`read_npz` returns ``{member name without .npy: ndarray}`` or
raises ValueError naming the file (and the member, where one is at fault).  It
never unpickles and never allocates more than the archive's declared sizes,
which are checked *before* anything is read:

* every member is a ``.npy`` array, stored or deflated, not encrypted;
* a member's declared uncompressed size is at most what its compressed bytes
  can produce (``compress_size`` for stored members, ``1032 * compress_size +
  1032`` for deflate, whose best ratio is 1032:1) and its compressed size fits
  in the file;
* the number of members (1 KiB of bookkeeping each, checked from the
  end-of-directory record before the directory is parsed) and the declared
  sizes sum to at most `max_bytes` (see :data:`DEFAULT_MAX_BYTES`);
* each ``.npy`` header's ``shape x itemsize`` plus the header's length equals
  the member's declared size, and its dtype holds no Python objects.

Only then are the arrays read, in 16 MiB chunks straight into their final
buffers (no second full-size copy); zipfile's CRC check catches data that
differs from what the directory promised.  Peak memory is the arrays
themselves plus one chunk.

Files of other frameworks are recognized by their signatures and named, with
how to get their weights into bnorm: PyTorch checkpoints (a zip with
``data.pkl``, or a legacy pickle stream), Keras 3 ``.keras`` archives, HDF5
(``.h5``, Keras 2 / tf.keras), safetensors and single ``.npy`` files.
"""

from __future__ import annotations

import os
import zipfile
from typing import IO, Any

import numpy as np

__all__ = ["DEFAULT_MAX_BYTES", "read_npz"]

#: Default bound on the total uncompressed size :func:`bnorm.load` accepts (256 MiB):
#: the state of 64 million float32 parameters, far beyond any normalization layer.
DEFAULT_MAX_BYTES = 256 * 2**20

# Deflate's best ratio is 1032:1 (258-byte matches coded in 2 bits); 1032 more bytes of slack.
_DEFLATE_RATIO = 1032
_CHUNK = 16 * 2**20
# What parsing one member costs before any array exists (zipfile's ZipInfo, names,
# dict entries: ~0.5 KiB measured, doubled): counted against max_bytes, so a file of
# millions of tiny members cannot exhaust memory in the zip directory alone.
_MEMBER_OVERHEAD = 1024
_MAX_HEADER = 10_000  # numpy's own default limit on a .npy header

_HDF5 = b"\x89HDF\r\n\x1a\n"
_NPY = b"\x93NUMPY"

_NO_PICKLE = "bnorm never unpickles a file, so it was not loaded"
_TORCH_HOW = (
    "load it with PyTorch (torch.load(path, weights_only=True)), then port the layers with "
    "bnorm.interop.from_torch(module) or copy a state dict with layer.load_state_dict(state_dict)"
)
_KERAS_HOW = (
    "bnorm does not read Keras files. Load it with Keras (keras.models.load_model(path)), then port "
    "its BatchNormalization layers with bnorm.interop.from_keras(layer)"
)


def _foreign_stream(name: str, head: bytes) -> str | None:
    """What a non-zip file is (by its first bytes), as a message; None if unknown."""
    if head.startswith(b"\x80") and len(head) > 1 and 2 <= head[1] <= 5:
        return (
            f"{name} is a Python pickle, not an .npz archive; {_NO_PICKLE}. If it is a PyTorch "
            f"checkpoint (torch.save, legacy format), {_TORCH_HOW}"
        )
    if head.startswith(_HDF5):
        return f"{name} is an HDF5 file (Keras .h5 / tf.keras weights), not an .npz archive; {_KERAS_HOW}"
    if head.startswith(_NPY):
        return (
            f"{name} is not an .npz archive: it is a single .npy array; read it with "
            "numpy.load(path, allow_pickle=False)"
        )
    if len(head) >= 10 and head[8:10] == b'{"':
        return (
            f"{name} looks like a safetensors file, not an .npz archive; read it with "
            "safetensors.numpy.load_file(path) and pass the arrays to layer.load_state_dict"
        )
    return None


def _foreign_zip(name: str, names: list[str]) -> str | None:
    """What a zip archive that is not an .npz is, as a message; None if it may be one."""
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return (
            f"{name} is a PyTorch checkpoint (a torch.save zip archive), not a bnorm file; "
            f"{_NO_PICKLE}: {_TORCH_HOW}"
        )
    if "config.json" in names and any(n.endswith(".weights.h5") or n == "metadata.json" for n in names):
        return f"{name} is a Keras 3 model archive (.keras), not a bnorm file; {_KERAS_HOW}"
    return None


def _npy_header(fp: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """``(shape, fortran_order, dtype, header_length)`` of the .npy stream `fp`."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=_MAX_HEADER)
        else:
            read = np.lib.format._read_array_header  # type: ignore[attr-defined]
            shape, fortran, dtype = read(fp, version, max_header_size=_MAX_HEADER)
    except (ValueError, SyntaxError) as err:  # a damaged stream (CRC, EOF) is reported by the caller
        raise ValueError(f"{where} is not a valid .npy array: {err}") from err
    return tuple(int(s) for s in shape), bool(fortran), dtype, fp.tell()


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    with zf.open(info) as fp:
        shape, fortran, dtype, header = _npy_header(fp, where)
        if dtype.hasobject:
            raise ValueError(f"{where} contains pickled data (Python objects); {_NO_PICKLE}")
        if dtype.subdtype is not None:  # numpy never writes one; it would reshape the array
            raise ValueError(f"{where} has a subarray dtype {dtype} in its header, which numpy never writes")
        count = 1
        for s in shape:
            count *= s
        nbytes = count * dtype.itemsize
        if header + nbytes != info.file_size:
            raise ValueError(
                f"{where} declares shape {shape} of {dtype} ({nbytes} bytes) but the member holds "
                f"{info.file_size - header} bytes of data: the file is corrupt or was tampered with"
            )
        flat = np.empty(count, dtype=dtype)
        raw = flat.view(np.uint8).reshape(-1) if nbytes else np.empty(0, np.uint8)
        pos = 0
        while pos < nbytes:
            chunk = fp.read(min(_CHUNK, nbytes - pos))
            if not chunk:
                raise ValueError(f"{where} is truncated ({pos} of {nbytes} bytes)")
            raw[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
            pos += len(chunk)
    return flat.reshape(shape, order="F" if fortran else "C")


def _check_directory(
    name: str, zf: zipfile.ZipFile, file_size: int, max_bytes: int | None
) -> list[zipfile.ZipInfo]:
    """The archive's members, after every size and type check that needs no reading."""
    infos = zf.infolist()
    foreign = _foreign_zip(name, [i.filename for i in infos])
    if foreign:
        raise ValueError(foreign)
    seen: set[str] = set()
    total = 0
    for info in infos:
        where = f"{name}: member {info.filename!r}"
        if not info.filename.endswith(".npy") or info.is_dir():
            raise ValueError(
                f"{where} is not a .npy array, so {name} is not an .npz file of arrays "
                "(bnorm.save writes one .npy member per array)"
            )
        if info.filename in seen:
            raise ValueError(f"{where} appears twice in the archive")
        seen.add(info.filename)
        if info.flag_bits & 0x1:
            raise ValueError(f"{where} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            producible = info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            producible = _DEFLATE_RATIO * (info.compress_size + 1)
        else:
            raise ValueError(
                f"{where} uses zip compression method {info.compress_type}; .npz files are stored "
                "or deflated (numpy.savez / numpy.savez_compressed)"
            )
        if info.compress_size > file_size:
            raise ValueError(
                f"{where} declares {info.compress_size} compressed bytes in a file of {file_size}: "
                "the file is truncated or corrupt"
            )
        if info.file_size > producible:
            raise ValueError(
                f"{where} declares {info.file_size} bytes, more than its {info.compress_size} "
                "compressed bytes can hold: the file is corrupt or was crafted to exhaust memory"
            )
        total += info.file_size
    if max_bytes is not None and total > max_bytes:
        raise ValueError(
            f"{name} would need {total} bytes of memory, more than max_bytes={max_bytes}; "
            "if you trust the file, pass a larger max_bytes (or max_bytes=None) to bnorm.load"
        )
    return infos


def _check_member_count(name: str, f: IO[bytes], max_bytes: int | None) -> None:
    """Bound the zip directory before :class:`zipfile.ZipFile` parses all of it.

    Reads the end-of-central-directory record (zipfile's own reader, which
    also follows zip64) for the number of members and the directory's size.
    """
    end_record = getattr(zipfile, "_EndRecData", None)
    if max_bytes is None or end_record is None:
        return
    try:
        record = end_record(f)
    except Exception:  # a damaged end record: ZipFile reports it
        record = None
    f.seek(0)
    if not record:
        return  # not a zip: ZipFile reports it
    members, size = int(record[4]), int(record[5])  # _ECD_ENTRIES_TOTAL, _ECD_SIZE
    if members * _MEMBER_OVERHEAD + size > max_bytes:
        raise ValueError(
            f"{name} declares {members} members in a {size}-byte zip directory, more than "
            f"max_bytes={max_bytes} allows for; if you trust the file, pass a larger max_bytes "
            "(or max_bytes=None) to bnorm.load"
        )


def read_npz(name: str, max_bytes: int | None = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` archive `name`, keyed by member name without ``.npy``.

    Raises
    ------
    ValueError
        The file is not an .npz archive of numeric arrays (naming what it is
        when it is a known format), is truncated or corrupt, declares more
        than it can hold, or needs more than `max_bytes`.
    FileNotFoundError, IsADirectoryError, PermissionError
        As :func:`open`.
    """
    with open(name, "rb") as f:
        head = f.read(16)
        if not head.startswith(b"PK"):
            start = f"it starts with {head[:8]!r}" if head else "it is empty"
            raise ValueError(
                _foreign_stream(name, head)
                or f"{name} is not a readable .npz file (not a zip archive): {start}; bnorm.load reads "
                "the files bnorm.save and numpy.savez write"
            )
        f.seek(0)
        file_size = os.fstat(f.fileno()).st_size
        _check_member_count(name, f, max_bytes)
        try:
            zf = zipfile.ZipFile(f)
        except MemoryError:
            raise
        except Exception as err:  # zipfile raises many kinds on damaged directories
            raise ValueError(
                f"{name} is not a readable .npz file: it is truncated or corrupt "
                f"({type(err).__name__}: {err})"
            ) from err
        with zf:
            infos = _check_directory(name, zf, file_size, max_bytes)
            arrays = {}
            for info in infos:
                where = f"{name}: member {info.filename!r}"
                try:
                    arrays[info.filename[:-4]] = _read_member(zf, info, where)
                except (ValueError, MemoryError):
                    raise
                except Exception as err:  # CRC, EOF, zlib errors, unknown versions ...
                    raise ValueError(
                        f"{name} is not a readable .npz file: it is truncated or corrupt "
                        f"(member {info.filename!r}: {type(err).__name__}: {err})"
                    ) from err
            return arrays
