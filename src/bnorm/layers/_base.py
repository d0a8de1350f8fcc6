"""The base of every stateful layer: mode switching and the forward/backward protocol."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from .._convert import to_numpy
from .._validation import check_bool, check_call

__all__ = ["Module", "IncompatibleKeys", "StateDictKeyError"]


class StateDictKeyError(KeyError, ValueError, RuntimeError):
    """A strict :meth:`Module.load_state_dict` found missing or unexpected keys.

    A KeyError (a key problem), a ValueError (bad input, as every bnorm check)
    and a RuntimeError (what PyTorch raises), so any of the three catches it.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IncompatibleKeys(NamedTuple):
    """What :meth:`Module.load_state_dict` did not match (as PyTorch's ``_IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _checked_value(key: str, src: np.ndarray, dtype: np.dtype[Any], *, nonnegative: bool) -> np.ndarray:
    """`src` converted to the state entry's `dtype` (a new array), or raise naming `key`.

    Floating entries (parameters, running statistics) take floating arrays
    only (an integer or bool array is refused: its dtype says it is not one),
    and a finite value must stay finite in `dtype` (no silent overflow to
    inf).  Integer entries (the batch counter) take integer values only, within
    the range of `dtype` -- a float or a bool is refused rather than rounded.
    """
    name = f"state[{key!r}]"
    if dtype.kind == "f":
        if src.dtype.kind != "f":
            raise TypeError(
                f"{name} must be a floating array (a parameter or running statistic), got dtype "
                f"{src.dtype}; convert it with .astype(np.{dtype.name}) if the values are right"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            value = src.astype(dtype, copy=True)
        overflow = np.isfinite(src) & ~np.isfinite(value)
        if overflow.any():
            worst = float(np.max(np.abs(src[overflow])))
            raise ValueError(
                f"{name} holds {worst:.6g}, beyond the largest {dtype.name} "
                f"({float(np.finfo(dtype).max):.6g}); it would load as inf"
            )
        if nonnegative and np.any(value < 0):
            raise ValueError(
                f"{name} must be >= 0 (it is a variance), got minimum {float(np.nanmin(value))!r}"
            )
        return value
    if src.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array (a counter), got dtype {src.dtype}")
    info = np.iinfo(dtype)
    low = 0 if nonnegative else info.min
    if src.size and (int(src.min()) < low or int(src.max()) > info.max):
        bad = src.min() if int(src.min()) < low else src.max()
        raise ValueError(f"{name} must be >= {low} and <= {info.max} (it is {dtype.name}), got {bad}")
    return src.astype(dtype, copy=True)


def _sub_state(state: Mapping[str, Any], prefix: Any, owner: str) -> dict[str, Any]:
    """The entries of `state` under `prefix` (a dotted module path), with the prefix removed."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str such as '1.' or 'features.3.', got {type(prefix).__name__}")
    if not prefix.endswith("."):
        prefix += "."
    sub = {str(k)[len(prefix) :]: v for k, v in state.items() if str(k).startswith(prefix)}
    if not sub:
        owners = sorted({str(k).rsplit(".", 1)[0] + "." for k in state if "." in str(k)})
        shown = ", ".join(repr(p) for p in owners[:12]) + (", ..." if len(owners) > 12 else "")
        raise StateDictKeyError(
            f"no key of state starts with {prefix!r}, so there is nothing to load into {owner}; "
            f"the prefixes in state are {shown or 'none (its keys have no dots)'}"
        )
    return sub


_SIGNATURES: dict[type, inspect.Signature] = {}


def _init_signature(cls: type) -> inspect.Signature:
    """``cls.__init__``'s signature without ``self`` (computed once per class)."""
    sig = _SIGNATURES.get(cls)
    if sig is None:
        full = inspect.signature(cls.__init__)  # type: ignore[misc]
        sig = _SIGNATURES[cls] = full.replace(parameters=list(full.parameters.values())[1:])
    return sig


class Module:
    """A minimal PyTorch-like layer: ``training`` flag, ``__call__`` -> ``forward``.

    Subclasses implement :meth:`forward` and :meth:`backward`.  ``layer(x,
    training=...)`` overrides the mode for one call and leaves
    :attr:`training` alone.

    Notes
    -----
    A subclass declares which attributes are its state:
    ``_parameters = ("weight", "bias")`` (learnable) and ``_buffers =
    ("running_mean", "running_var", "num_batches_tracked")`` (``()`` for a
    layer without buffers).  An attribute whose value is None (``affine=False``,
    ``track_running_stats=False``) is absent from the state.  :meth:`state_dict`
    and :meth:`load_state_dict` serve every layer from these two tuples.
    """

    training: bool

    #: Names of the learnable arrays, in state-dict order.
    _parameters: tuple[str, ...] = ()
    #: Names of the non-learnable arrays (running statistics, counters).
    _buffers: tuple[str, ...] = ()
    #: State keys an old checkpoint may lack; loading without them keeps the current value.
    _optional_state: tuple[str, ...] = ("num_batches_tracked",)
    #: State entries that cannot be negative (a variance, a counter); loading a negative value raises.
    _nonnegative_state: tuple[str, ...] = ("running_var", "num_batches_tracked")

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Check the call against the subclass's own signature before __init__ runs, so a
        # mistyped keyword names the class the user wrote and the closest valid keyword.
        # (No arguments at all is also how copy and pickle create instances: nothing to check.)
        if args or kwargs:
            check_call(cls.__name__, _init_signature(cls), args, kwargs)
        self = super().__new__(cls)
        # Record the constructor's arguments (defaults applied) for _config: some are
        # not kept as attributes of their own name (``bias=False`` leaves ``bias`` None).
        try:
            bound = _init_signature(cls).bind(*args, **kwargs)
        except TypeError:
            return self  # copy/pickle: __dict__ (with _init_args) is restored afterwards
        bound.apply_defaults()
        object.__setattr__(self, "_init_args", dict(bound.arguments))
        return self

    def __init__(self) -> None:
        self.training = True

    def train(self, mode: bool = True) -> Any:
        """Set training mode (``mode=False`` is evaluation); returns self."""
        self.training = check_bool(mode, "mode")
        return self

    def _mode(self, training: Any) -> bool:
        """The mode of one call: :attr:`training`, or the per-call override (a real bool)."""
        return self.training if training is None else check_bool(training, "training")

    def eval(self) -> Any:
        """Set evaluation mode; returns self."""
        return self.train(False)

    def forward(self, x: Any, *, training: bool | None = None) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x: Any, *, training: bool | None = None) -> np.ndarray:
        """Same as :meth:`forward`; `training` overrides :attr:`training` for this call only."""
        return self.forward(x, training=training)

    # -- state -------------------------------------------------------------------
    def _state_names(self) -> list[str]:
        """Names of the state entries this layer holds now (None attributes excluded)."""
        names = list(self._parameters) + list(self._buffers)
        return [n for n in names if getattr(self, n, None) is not None]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Return copies of the layer's parameters and buffers, keyed as in PyTorch.

        Parameters come first, then buffers, in the order the class declares
        them (for batch norm: ``weight, bias, running_mean, running_var,
        num_batches_tracked``).  Entries that are None are left out, so
        ``affine=False`` drops ``weight``/``bias`` and
        ``track_running_stats=False`` drops the buffers, as PyTorch does.

        Returns
        -------
        dict of str to ndarray
            New arrays (changing them does not change the layer) in the layer's
            dtype; ``num_batches_tracked`` is a 0-d int64 array.

        Examples
        --------
        >>> import bnorm
        >>> sd = bnorm.BatchNorm1d(3).state_dict()
        >>> list(sd)
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
        >>> sd["num_batches_tracked"].dtype, sd["num_batches_tracked"].shape
        (dtype('int64'), ())
        """
        return {n: np.array(getattr(self, n), copy=True) for n in self._state_names()}

    def load_state_dict(
        self, state: Mapping[str, Any], strict: bool = True, *, prefix: str = ""
    ) -> IncompatibleKeys:
        """Copy `state` into the layer's parameters and buffers.

        Values may be NumPy arrays, PyTorch tensors (converted by duck typing,
        ``.detach().cpu().numpy()``, without importing torch) or any array-like;
        each is copied into the layer's own array, in the layer's dtype.
        Everything is validated before anything is assigned, so a load that
        raises leaves the layer exactly as it was.  A state without
        ``num_batches_tracked`` (an old checkpoint) loads and leaves the counter
        as it was.

        Parameters
        ----------
        state : mapping of str to array_like
            As returned by :meth:`state_dict` (or by PyTorch's).
        strict : bool, default True
            Require the keys to match exactly; otherwise load the keys that
            match and report the others.
        prefix : str, default "", keyword-only
            Load one layer out of a whole model's state dict: only the keys
            that start with ``prefix`` are read, with the prefix removed
            (``prefix="1."`` reads ``"1.running_mean"`` as ``running_mean``);
            the other layers' keys are ignored, not unexpected.  A trailing
            ``.`` is added when missing (``"1"`` is ``"1."``), so ``"1"`` never
            picks up ``"10.weight"``.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``; both empty after a strict load.

        Raises
        ------
        StateDictKeyError
            In strict mode, naming every missing and every unexpected key (a
            subclass of KeyError, ValueError and RuntimeError); with `prefix`,
            in either mode, when no key starts with it (the message lists the
            prefixes the state holds).
        ValueError
            If a value's shape differs from the layer's, a finite value would
            overflow the layer's dtype, ``running_var`` is negative, or
            ``num_batches_tracked`` is outside ``[0, 2**63 - 1]`` (each message
            names the key).
        TypeError
            If `state` is not a mapping, a parameter or running statistic is
            not a floating array (an integer or bool ``weight`` is refused,
            not converted), or ``num_batches_tracked`` is not an integer array.

        Examples
        --------
        >>> import numpy as np, bnorm
        >>> a, b = bnorm.BatchNorm1d(2), bnorm.BatchNorm1d(2)
        >>> _ = a(np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]]))
        >>> b.load_state_dict(a.state_dict())
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        >>> b.running_mean, int(b.num_batches_tracked)
        (array([0.3, 0.6], dtype=float32), 1)

        One layer of a whole model's state dict (here PyTorch's
        ``Sequential(Linear, BatchNorm1d)``):

        >>> model_state = {"0.weight": np.ones((2, 2)), "0.bias": np.zeros(2),
        ...                **{f"1.{k}": v for k, v in a.state_dict().items()}}
        >>> b.load_state_dict(model_state, prefix="1.")
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
        if prefix:
            state = _sub_state(state, prefix, type(self).__name__)
        names = self._state_names()
        unexpected = [str(k) for k in state if k not in names]
        missing = [n for n in names if n not in state and n not in self._optional_state]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append("missing keys " + ", ".join(repr(k) for k in missing))
            if unexpected:
                parts.append("unexpected keys " + ", ".join(repr(k) for k in unexpected))
            raise StateDictKeyError(
                f"state does not match {type(self).__name__}: "
                + "; ".join(parts)
                + " (pass strict=False to load the matching keys only)"
            )
        staged: list[tuple[np.ndarray, np.ndarray]] = []
        for n in names:
            if n not in state:
                continue
            dst: np.ndarray = getattr(self, n)
            if not dst.flags.writeable:
                raise ValueError(f"{type(self).__name__}.{n} is a read-only array; cannot load into it")
            src = to_numpy(state[n], f"state[{n!r}]")
            if src.shape != dst.shape:
                raise ValueError(
                    f"state[{n!r}] must have shape {dst.shape} to match {type(self).__name__}, "
                    f"got {src.shape}"
                )
            if dst.dtype.kind == "f" and src.dtype.kind in "iu" and not hasattr(state[n], "dtype"):
                src = src.astype(np.float64)  # Python numbers ([1, 2]) carry no dtype to check
            value = _checked_value(n, src, dst.dtype, nonnegative=n in self._nonnegative_state)
            staged.append((dst, value))
        for dst, value in staged:
            dst[...] = value
        return IncompatibleKeys(missing, unexpected)

    def _config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this layer (used by :func:`bnorm.save`).

        For every parameter of ``__init__``: the attribute of the same name
        when the instance has one (so ``layer.eps = 1e-3`` after construction
        is saved), except for names that are also state entries (``bias`` is
        both a flag and an array) -- those, and parameters not stored as
        attributes, take the value passed to the constructor (recorded by
        :meth:`__new__`).  A subclass gets this without writing anything;
        layers whose attributes mean something else than their arguments
        override it.
        """
        config: dict[str, Any] = {}
        state = {*self._parameters, *self._buffers}
        recorded: Mapping[str, Any] = self.__dict__.get("_init_args", {})
        for name, p in _init_signature(type(self)).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if name not in state and hasattr(self, name):
                value = getattr(self, name)
            elif name in recorded:
                value = recorded[name]
            else:
                continue
            if isinstance(value, type) and issubclass(value, np.generic):
                value = np.dtype(value)  # dtype=np.float64 as passed
            config[name] = value.name if isinstance(value, np.dtype) else value
        return config

    @classmethod
    def _bound_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """`config` as the constructor would see it, defaults filled in (TypeError if it does not bind)."""
        bound = _init_signature(cls).bind(**config)
        bound.apply_defaults()
        return dict(bound.arguments)

    @classmethod
    def _state_shapes(cls, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
        """Shapes of the arrays ``cls(**config)`` allocates, computed without building it.

        :func:`bnorm.load` compares them with the saved arrays before it
        builds anything, so a tampered size fails fast instead of allocating.
        None (the default) means unknown: the loader then bounds the product
        of the configuration's integers instead.  Raises ValueError or
        TypeError for a configuration the constructor would refuse.
        """
        return None
