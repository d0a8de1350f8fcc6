r"""Saving and loading layers and state dicts: plain ``.npz`` files, never pickle.

A file written by :func:`save` is an ordinary NumPy ``.npz`` archive that
``numpy.load(path, allow_pickle=False)`` reads: one ``.npy`` member per array,
named by its path in the saved object (``"weight"``, ``"encoder/bn1/running_mean"``),
plus one member ``__bnorm__`` holding a JSON description of the structure (a
0-d unicode array) -- which entries are layers, their class, constructor
arguments and mode, and the nesting of mappings.

Safety
------
* No pickle, ever: arrays of Python objects are refused when saving and when
  loading (ValueError), and loading always passes ``allow_pickle=False``, so a
  file carrying a pickle payload is rejected without running it.  Layers are
  rebuilt only from bnorm's own classes, by name, with JSON arguments.
* Writes are atomic: the archive is written to a temporary file in the target's
  directory, flushed and fsync'ed, then renamed over the target with
  :func:`os.replace`.  A crash or an error leaves either the old file or the new
  one, never a half-written file; the temporary file is removed on error.
* A truncated or corrupt file raises ValueError saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._conventions import deliberate_momentum
from ._convert import to_numpy
from .layers._base import Module

__all__ = ["save", "load", "FORMAT_VERSION"]

#: Version of the ``__bnorm__`` metadata written by :func:`save`.
FORMAT_VERSION = 1
_META_KEY = "__bnorm__"

PathLike = str | os.PathLike[str]


# -- encoding ------------------------------------------------------------------
def _json_value(value: Any, where: str) -> Any:
    """A constructor argument as a JSON value (tuples become lists)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    raise TypeError(f"cannot save {where}: {type(value).__name__} is not a JSON value")


def _json_config(layer: Module, where: str) -> dict[str, Any]:
    """The layer's constructor arguments that are plain values.

    Others (a communicator, an array) are not saved: the rebuilt layer gets
    their defaults.  Arrays belong to the state dict anyway.
    """
    config: dict[str, Any] = {}
    for k, v in layer._config().items():
        try:
            config[k] = _json_value(v, f"{where} argument {k!r}")
        except TypeError:
            continue
    return config


def _leaf(value: Any, where: str) -> np.ndarray:
    arr = to_numpy(value, where, allow_object=True)
    if arr.dtype.hasobject:
        raise ValueError(
            f"cannot save {where}: it is an array of Python objects (dtype {arr.dtype}); "
            "bnorm files never contain pickled objects"
        )
    return arr


class _Writer:
    """Collects arrays under unique member names derived from their paths."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, path: tuple[str, ...], arr: np.ndarray) -> str:
        base = "/".join(path).replace("\x00", "_") or "_"  # zip names end at a NUL
        key, i = base, 1
        while key in self.arrays or key == _META_KEY:
            key, i = f"{base}#{i}", i + 1
        self.arrays[key] = arr
        return key

    def encode(self, obj: Any, path: tuple[str, ...]) -> dict[str, Any]:
        where = "/".join(path) or "obj"
        if isinstance(obj, Module):
            cls = type(obj)
            config = _json_config(obj, where)
            absent = [n for n in (*cls._parameters, *cls._buffers) if getattr(obj, n, None) is None]
            state = {n: self.put((*path, n), a) for n, a in obj.state_dict().items()}
            return {
                "kind": "layer",
                "class": cls.__name__,
                "config": config,
                "training": bool(obj.training),
                "absent": absent,
                "state": state,
            }
        if isinstance(obj, Mapping):
            items = []
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise TypeError(f"cannot save {where}: keys must be str, got {type(k).__name__} {k!r}")
                items.append([k, self.encode(v, (*path, k))])
            return {"kind": "dict", "items": items}
        return {"kind": "array", "key": self.put(path, _leaf(obj, where))}


def _write_atomic(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` as an ``.npz`` at `path` via a temporary file, fsync and rename."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    stem = os.path.basename(target)[:200]  # file names are limited to 255 bytes
    tmp = os.path.join(directory, f".{stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key, arr in arrays.items():
                    with zf.open(key + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            # keep the permissions of a file being replaced
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # make the rename itself durable (POSIX; not possible on every platform)
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save(path: PathLike, obj: Any) -> None:
    r"""Save a layer, a state dict, or a nested mapping of them to a ``.npz`` file.

    The file is written exactly at `path` (no suffix is added), atomically:
    either the complete new file is there afterwards, or -- after an error or a
    crash -- whatever was there before.  Arrays are stored bit for bit in their
    own dtype; nothing is pickled.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its directory must exist.
    obj : Module, mapping of str to array_like, or nested mapping
        A layer (stored as its :meth:`~bnorm.Module.state_dict` plus its class,
        constructor arguments and training flag; arguments that are not plain
        values -- numbers, strings, bools, None, lists of them -- such as a
        communicator are not stored, and a rebuilt layer gets their defaults),
        a state dict (a mapping of
        names to arrays or tensors), or a mapping whose values are any of these
        or further mappings.  Keys must be str.

    Raises
    ------
    ValueError
        If an array holds Python objects (dtype object); nothing is written.
    TypeError
        If `obj` is not a layer or a mapping, a key is not a str, or a value
        cannot be converted to an array; nothing is written.

    See Also
    --------
    load : Read the file back.

    Examples
    --------
    >>> import os, tempfile, numpy as np, bnorm
    >>> bn = bnorm.BatchNorm2d(3).eval()
    >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
    >>> bnorm.save(path, {"stem": {"bn": bn}, "extra": {"step": np.int64(7)}})
    >>> sorted(np.load(path, allow_pickle=False).files)[:3]
    ['__bnorm__', 'extra/step', 'stem/bn/bias']
    >>> back = bnorm.load(path)
    >>> back["stem"]["bn"], back["stem"]["bn"].training, int(back["extra"]["step"])
    (BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True), False, 7)
    """
    if not isinstance(obj, (Module, Mapping)):
        raise TypeError(
            f"obj must be a layer, a state dict or a mapping of names to those, got {type(obj).__name__}"
        )
    writer = _Writer()
    tree = writer.encode(obj, ())
    meta = json.dumps({"format": "bnorm", "version": FORMAT_VERSION, "root": tree}, allow_nan=False)
    _write_atomic(path, {_META_KEY: np.array(meta), **writer.arrays})


# -- decoding ------------------------------------------------------------------
def _layer_classes() -> dict[str, type[Module]]:
    """Bnorm's public layer classes by name: the only classes a file can rebuild."""
    found: dict[str, type[Module]] = {}
    todo = list(Module.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] == "bnorm" and not cls.__name__.startswith("_"):
            found.setdefault(cls.__name__, cls)
    return found


class _Reader:
    def __init__(self, path: str, arrays: dict[str, np.ndarray], rebuild: bool) -> None:
        self.path = path
        self.arrays = arrays
        self.used: set[str] = set()
        self.rebuild = rebuild

    def bad(self, what: str) -> ValueError:
        return ValueError(f"{self.path} is not a valid bnorm file: {what}")

    def array(self, key: Any) -> np.ndarray:
        if not isinstance(key, str) or key not in self.arrays:
            raise self.bad(f"array {key!r} is described but missing")
        self.used.add(key)
        return self.arrays[key]

    def decode(self, node: Any, where: str) -> Any:
        if not isinstance(node, dict) or "kind" not in node:
            raise self.bad(f"malformed entry at {where}")
        kind = node["kind"]
        if kind == "array":
            return self.array(node.get("key"))
        if kind == "dict":
            items = node.get("items")
            if not isinstance(items, list):
                raise self.bad(f"malformed mapping at {where}")
            out: dict[str, Any] = {}
            for item in items:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                    raise self.bad(f"malformed mapping item at {where}")
                out[item[0]] = self.decode(item[1], f"{where}/{item[0]}")
            return out
        if kind == "layer":
            return self.layer(node, where)
        raise self.bad(f"unknown entry kind {kind!r} at {where}")

    def layer(self, node: dict[str, Any], where: str) -> Any:
        state_keys, config = node.get("state"), node.get("config")
        absent, name = node.get("absent", []), node.get("class")
        if not (isinstance(state_keys, dict) and isinstance(config, dict) and isinstance(absent, list)):
            raise self.bad(f"malformed layer at {where}")
        state = {str(k): self.array(v) for k, v in state_keys.items()}
        if not self.rebuild:
            return state
        classes = _layer_classes()
        if name not in classes:
            raise ValueError(
                f"{self.path}: the layer at {where} is a {name!r}, which this version of bnorm does "
                "not define; load(path, rebuild=False) returns its state dict instead"
            )
        cls = classes[name]
        try:
            with deliberate_momentum():  # warned about when it was built, not again on load
                layer = cls(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{self.path}: cannot rebuild the {name} at {where} from its saved arguments ({err}); "
                "load(path, rebuild=False) returns its state dict instead"
            ) from err
        for n in absent:
            if n in (*cls._parameters, *cls._buffers):
                setattr(layer, n, None)
        try:
            layer.load_state_dict(state, strict=True)
        except (KeyError, ValueError, TypeError) as err:
            raise self.bad(f"the state of the {name} at {where} does not fit it: {err}") from err
        for n, arr in state.items():  # keep the saved arrays themselves: exact dtypes
            setattr(layer, n, arr)
        layer.train(bool(node.get("training", True)))
        return layer


def _read_npz(path: PathLike) -> dict[str, np.ndarray]:
    name = os.fspath(path)
    with open(name, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x80") and len(magic) > 1 and 2 <= magic[1] <= 5:
        raise ValueError(
            f"{name} is a Python pickle, not an .npz archive; bnorm never unpickles a file, "
            "so it was not loaded"
        )
    if magic.startswith(b"\x93NUMPY"):
        raise ValueError(f"{name} is not an .npz archive: it is a single .npy array")
    if not magic.startswith(b"PK"):
        raise ValueError(f"{name} is not a readable .npz file (not a zip archive)")
    try:
        with np.load(name, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except ValueError as err:
        if "pickle" in str(err) or "Object arrays" in str(err):
            raise ValueError(
                f"{name} contains pickled data (Python objects); bnorm never unpickles a file, "
                "so it was not loaded"
            ) from err
        raise ValueError(f"{name} is not a readable .npz file: it is truncated or corrupt ({err})") from err
    except Exception as err:  # zipfile.BadZipFile, EOFError, zlib.error, OSError ...
        raise ValueError(
            f"{name} is not a readable .npz file: it is truncated or corrupt ({type(err).__name__}: {err})"
        ) from err


def load(path: PathLike, *, rebuild: bool = True) -> Any:
    r"""Load what :func:`save` wrote (or any plain ``.npz`` of numeric arrays).

    The nesting is the saved one.  Layers come back as layers: an instance of
    the saved bnorm class, built with the saved constructor arguments, in the
    saved mode (train/eval), holding the saved arrays exactly (dtypes
    included) -- ready to use, with no need to know its configuration.  State
    dicts come back as dicts of ndarrays, which
    :meth:`~bnorm.Module.load_state_dict` accepts.  A plain ``.npz`` without
    bnorm's metadata (e.g. from ``numpy.savez``) comes back as a flat dict.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    rebuild : bool, default True, keyword-only
        False returns every layer as its state dict instead of rebuilding it
        (e.g. for a layer class this version of bnorm does not know).

    Returns
    -------
    Module or dict
        Whatever was saved, with the same nesting.

    Raises
    ------
    ValueError
        If the file holds Python objects / pickled data (never unpickled),
        is truncated or corrupt, or its bnorm metadata is malformed or from a
        newer format version.
    FileNotFoundError
        If there is no file at `path`.

    Examples
    --------
    >>> import os, tempfile, numpy as np, bnorm
    >>> path = os.path.join(tempfile.mkdtemp(), "bn.npz")
    >>> bn = bnorm.BatchNorm1d(2, momentum=None, dtype=np.float64)
    >>> _ = bn(np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]]))
    >>> bnorm.save(path, bn)
    >>> bnorm.load(path)
    BatchNorm1d(2, eps=1e-05, momentum=None, affine=True, bias=True, track_running_stats=True, dtype=float64)
    >>> bnorm.load(path, rebuild=False)["running_var"]
    array([ 4., 16.])
    """
    name = os.fspath(path)
    arrays = _read_npz(name)
    for key, arr in arrays.items():
        if arr.dtype.hasobject:  # unreachable with allow_pickle=False; kept as a guard
            raise ValueError(f"{name}: array {key!r} holds Python objects; refusing to load it")
    meta = arrays.pop(_META_KEY, None)
    if meta is None:
        return arrays
    if meta.dtype.kind != "U" or meta.shape != ():
        raise ValueError(f"{name} is not a valid bnorm file: {_META_KEY} must be a 0-d string")
    try:
        info = json.loads(str(meta[()]))
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} is not a valid bnorm file: unreadable metadata ({err})") from err
    if not isinstance(info, dict) or info.get("format") != "bnorm" or "root" not in info:
        raise ValueError(f"{name} is not a valid bnorm file: unknown metadata")
    version = info.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{name} was written in bnorm file format {version!r}; this bnorm reads format "
            f"{FORMAT_VERSION} and older: upgrade bnorm"
        )
    reader = _Reader(name, arrays, rebuild)
    result = reader.decode(info["root"], "root")
    extra = sorted(set(arrays) - reader.used)
    if extra:
        raise reader.bad(f"arrays {extra} are not described by its metadata")
    return result
