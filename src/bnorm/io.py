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
* Writes are atomic (:mod:`bnorm._files`): the archive is written to a
  temporary file in the target's directory, flushed and fsync'ed, then renamed
  over the target with :func:`os.replace`.  A crash or an error leaves either
  the old file or the new one, never a half-written file; the temporary file is
  removed on error, and one left by a killed process is removed by the next
  save to that path.  A symlink is followed; a read-only target is refused.
* Loads are bounded (:mod:`bnorm._archive`): every size the archive declares is
  checked against what its bytes can hold and against ``max_bytes`` before
  anything is allocated, and a layer's saved arguments are checked against the
  saved arrays before the layer is built.
* A truncated, corrupt or foreign file (a PyTorch or Keras checkpoint, HDF5,
  a pickle) raises ValueError saying what it is and how to proceed.
"""

from __future__ import annotations

import inspect
import json
import os
import zipfile
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from ._archive import DEFAULT_MAX_BYTES, read_npz
from ._conventions import deliberate_momentum
from ._convert import to_numpy
from ._files import write_atomic
from .layers._base import Module

__all__ = ["save", "load", "FORMAT_VERSION", "DEFAULT_MAX_BYTES"]

#: Version of the ``__bnorm__`` metadata written by :func:`save`.
FORMAT_VERSION = 1
_META_KEY = "__bnorm__"
_JSON_EXPANSION = 8
#: Deepest nesting of mappings a file may describe (a deeper one is refused, not recursed into).
MAX_DEPTH = 100

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


_ACCEPTS = (
    "save accepts a bnorm layer, a state dict (a mapping of str to arrays or tensors) "
    "or a mapping whose values are those or further mappings"
)


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _model_hint(obj: Any) -> str:
    """For a PyTorch module or Keras model, how to save it; else ''."""
    if callable(getattr(obj, "state_dict", None)) or hasattr(obj, "get_weights"):
        return (
            "; for a PyTorch or Keras model, save its weights (model.state_dict()) or port its "
            "normalization layers first (bnorm.interop.from_torch / from_keras)"
        )
    return ""


def _unsupported(obj: Any, where: str) -> TypeError:
    return TypeError(
        f"cannot save {where}: got {_type_name(obj)}, not an array or tensor; {_ACCEPTS}{_model_hint(obj)}"
    )


def _leaf(value: Any, where: str) -> np.ndarray:
    try:
        arr = to_numpy(value, where, allow_object=True)
    except TypeError as err:
        raise _unsupported(value, where) from err
    if arr.dtype.hasobject:
        if not isinstance(value, np.ndarray):  # a module, a set, any object numpy wraps
            raise _unsupported(value, where)
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


def _write_npz(arrays: Mapping[str, np.ndarray]) -> Any:
    """A writer for :func:`bnorm._files.write_atomic`: `arrays` as an uncompressed ``.npz``."""

    def write(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, arr in arrays.items():
                with zf.open(key + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, arr, allow_pickle=False)

    return write


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
        hint = _model_hint(obj)
        if not hint and (isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "__array__")):
            hint = "; to save one array, name it: save(path, {'x': x})"
        raise TypeError(
            "obj must be a bnorm layer, a state dict (a mapping of str to arrays or tensors) or a "
            f"mapping of names to those, got {_type_name(obj)}{hint}"
        )
    writer = _Writer()
    tree = writer.encode(obj, ())
    meta = json.dumps({"format": "bnorm", "version": FORMAT_VERSION, "root": tree}, allow_nan=False)
    write_atomic(path, _write_npz({_META_KEY: np.array(meta), **writer.arrays}))


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


def _check_config(cls: type[Module], config: dict[str, Any], max_bytes: int | None) -> int:
    """Check saved constructor arguments against `cls`'s signature, before building anything.

    Returns the bytes the constructor will allocate (an upper bound).  Raises
    ValueError or TypeError (wrapped by the caller) for an argument the
    constructor does not take, a value that is not a JSON scalar or list, or a
    size beyond `max_bytes`.
    """
    params = {
        n: p
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise TypeError(f"{cls.__name__} takes no argument(s) {', '.join(map(repr, unknown))}")

    def scalars(v: Any, depth: int = 0) -> list[Any]:
        if isinstance(v, list) and depth < 4:
            return [x for item in v for x in scalars(item, depth + 1)]
        if v is None or isinstance(v, (bool, int, float, str)):
            return [v]
        raise TypeError(f"saved arguments must be numbers, strings, bools, None or short lists, got {v!r}")

    values = [x for v in config.values() for x in scalars(v)]
    shapes = cls._state_shapes(config)
    if shapes is None:
        # Unknown allocation: bound it by the product of the integer arguments.
        elements = 1
        for x in values:
            if isinstance(x, int) and not isinstance(x, bool) and x > 0:
                elements *= x
    else:
        elements = sum(int(np.prod(s, dtype=object)) for s in shapes.values())
    nbytes = 8 * int(elements)  # float64 at most
    if max_bytes is not None and nbytes > max_bytes:
        raise ValueError(
            f"its arguments describe {nbytes} bytes of parameters and buffers, more than "
            f"max_bytes={max_bytes}"
        )
    return nbytes


class _Reader:
    def __init__(
        self, path: str, arrays: dict[str, np.ndarray], rebuild: bool, max_bytes: int | None
    ) -> None:
        self.path = path
        self.arrays = arrays
        self.used: set[str] = set()
        self.rebuild = rebuild
        self.budget = max_bytes

    def bad(self, what: str) -> ValueError:
        return ValueError(f"{self.path} is not a valid bnorm file: {what} (in member {_META_KEY}.npy)")

    def array(self, key: Any) -> np.ndarray:
        if not isinstance(key, str) or key not in self.arrays:
            raise self.bad(f"array {key!r} is described but missing")
        self.used.add(key)
        return self.arrays[key]

    def decode(self, node: Any, where: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self.bad(f"mappings nested more than {MAX_DEPTH} deep at {where[:80]}...")
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
                out[item[0]] = self.decode(item[1], f"{where}/{item[0]}", depth + 1)
            return out
        if kind == "layer":
            return self.layer(node, where)
        raise self.bad(f"unknown entry kind {kind!r} at {where}")

    def layer(self, node: dict[str, Any], where: str) -> Any:
        state_keys, config = node.get("state"), node.get("config")
        absent, name = node.get("absent", []), node.get("class")
        training = node.get("training", True)
        if not (
            isinstance(state_keys, dict)
            and isinstance(config, dict)
            and isinstance(absent, list)
            and all(isinstance(n, str) for n in absent)
            and isinstance(training, bool)
        ):
            raise self.bad(f"malformed layer at {where}")
        state = {str(k): self.array(v) for k, v in state_keys.items()}
        if not self.rebuild:
            return state
        classes = _layer_classes()
        if not isinstance(name, str) or name not in classes:
            raise ValueError(
                f"{self.path}: the layer at {where} is a {name!r}, which this version of bnorm does "
                "not define; load(path, rebuild=False) returns its state dict instead"
            )
        cls = classes[name]

        def cannot(err: Exception) -> ValueError:
            return ValueError(
                f"{self.path}: cannot rebuild the {name} at {where} from its saved arguments ({err}); "
                "load(path, rebuild=False) returns its state dict instead"
            )

        # Everything about the arguments is checked before the constructor allocates.
        try:
            nbytes = _check_config(cls, config, self.budget)
            shapes = cls._state_shapes(config)
        except (TypeError, ValueError) as err:
            raise cannot(err) from err
        for n, arr in state.items():
            if shapes is not None and n in shapes and arr.shape != shapes[n]:
                raise self.bad(
                    f"the state of the {name} at {where} does not fit it: its arguments give {n!r} "
                    f"the shape {shapes[n]}, the file holds {arr.shape}"
                )
        if self.budget is not None:
            self.budget -= nbytes
        try:
            with deliberate_momentum():  # warned about when it was built, not again on load
                layer = cls(**config)
        except (TypeError, ValueError) as err:
            raise cannot(err) from err
        for n in absent:
            if n in (*cls._parameters, *cls._buffers):
                setattr(layer, n, None)
        try:
            layer.load_state_dict(state, strict=True)
        except (KeyError, ValueError, TypeError) as err:
            raise self.bad(f"the state of the {name} at {where} does not fit it: {err}") from err
        for n, arr in state.items():  # keep the saved arrays themselves: exact dtypes
            setattr(layer, n, arr)
        layer.train(training)
        return layer


def load(path: PathLike, *, rebuild: bool = True, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Any:
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
    max_bytes : int or None, default DEFAULT_MAX_BYTES (256 MiB), keyword-only
        The most memory the file may make bnorm allocate: the arrays' total
        uncompressed size, and the parameters a rebuilt layer's saved
        arguments describe.  Checked against the sizes the archive declares
        before anything is read; None removes the limit (for a file you trust).

    Returns
    -------
    Module or dict
        Whatever was saved, with the same nesting.

    Raises
    ------
    ValueError
        If the file holds Python objects / pickled data (never unpickled), is
        truncated or corrupt, declares more than its bytes can hold or more
        than `max_bytes`, is another framework's file (PyTorch, Keras, HDF5:
        the message says how to port it), or its bnorm metadata is malformed,
        describes a layer whose arguments do not fit its arrays, or is from a
        newer format version.  The message names the file and the member.
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
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0
    ):
        raise TypeError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    budget = None if max_bytes is None else int(max_bytes)
    arrays = read_npz(name, budget)
    meta = arrays.pop(_META_KEY, None)
    if meta is None:
        return arrays
    where = f"{name} is not a valid bnorm file (member {_META_KEY}.npy)"
    if meta.dtype.kind != "U" or meta.shape != ():
        raise ValueError(f"{where}: the metadata must be a 0-d string")
    # Parsed JSON takes up to ~7x the 4 bytes per character of the string (small
    # dicts); 8x is counted against the limit before parsing.
    if budget is not None and _JSON_EXPANSION * meta.nbytes > budget:
        raise ValueError(
            f"{where}: {meta.nbytes // 4} characters of metadata would take more than "
            f"max_bytes={budget} to parse; if you trust the file, pass a larger max_bytes"
        )
    try:
        info = json.loads(str(meta[()]))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: unreadable metadata ({err})") from err
    except RecursionError as err:
        raise ValueError(f"{where}: the metadata is nested too deeply to be bnorm's") from err
    if not isinstance(info, dict) or info.get("format") != "bnorm" or "root" not in info:
        raise ValueError(f"{where}: unknown metadata")
    version = info.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{name} was written in bnorm file format {version!r}; this bnorm reads format "
            f"{FORMAT_VERSION} and older: upgrade bnorm"
        )
    # The layers' constructors allocate before their state is copied in: a budget of its own.
    reader = _Reader(name, arrays, rebuild, budget)
    result = reader.decode(info["root"], "root")
    extra = sorted(set(arrays) - reader.used)
    if extra:
        raise reader.bad(f"arrays {extra} are not described by its metadata")
    return result
