r"""Running-average conventions: who calls what "momentum", and the presets.

Two formulas are in use under the same names (see the conventions table in the
docs):

* **momentum** (PyTorch): the weight on the *new* batch,
  ``running = (1 - momentum) * running + momentum * batch``.
* **decay** (Keras, TensorFlow, ONNX, Flax, d2l, CS231n, and the from-scratch
  tutorials' ``moving_momentum``): the weight on the *old* value,
  ``running = decay * running + (1 - decay) * batch``.

``decay = d`` is the same average as ``momentum = 1 - d``; bnorm evaluates each in
its own form, so results agree with the framework number for number.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ._validation import check_call, check_fraction, warn_caller

__all__ = [
    "CONVENTIONS",
    "Convention",
    "MomentumConventionWarning",
    "RunningAverage",
    "check_momentum",
    "deliberate_momentum",
    "resolve_layer_convention",
    "records_explicit",
]


class MomentumConventionWarning(UserWarning):
    """A PyTorch-style ``momentum`` in (0.5, 1) that looks like a Keras/TensorFlow decay.

    Keras, TensorFlow, ONNX, Flax and d2l call the weight on the *old* value
    "momentum" (0.99, 0.9); bnorm's ``momentum`` is PyTorch's weight on the *new*
    batch (0.1).  Pass the value as ``decay=`` to say which one you mean, or
    silence the warning with the standard filters::

        warnings.filterwarnings("ignore", category=bnorm.MomentumConventionWarning)

    It is a UserWarning, so Python's default filter shows it once per calling
    line: a layer built in a loop warns once, a second mistaken line warns again.
    (Once per process would hide the second line, and would make the warning
    depend on what ran before.)  Where the value is PyTorch's by construction --
    :func:`bnorm.interop.from_torch`, :func:`bnorm.load`, conversions between
    bnorm layers -- there is no warning.
    """


_WARN_DECAY_LOOK = contextvars.ContextVar("bnorm_warn_decay_look", default=True)


@contextlib.contextmanager
def deliberate_momentum() -> Iterator[None]:
    """Build layers whose momentum is PyTorch's by construction, without the warning.

    For :func:`bnorm.interop.from_torch` (the value comes from a PyTorch
    module), :func:`bnorm.load` (the layer was built, and warned about, when it
    was saved) and conversions between bnorm layers.
    """
    token = _WARN_DECAY_LOOK.set(False)
    try:
        yield
    finally:
        _WARN_DECAY_LOOK.reset(token)


def check_momentum(value: Any, name: str = "momentum", *, allow_none: bool = True) -> float | None:
    """A PyTorch momentum in [0, 1] (None where allowed); warn when it looks like a decay.

    A value strictly between 0.5 and 1 keeps less than half of the running
    statistics per batch -- legal, but almost always a Keras ``momentum=0.99``
    written where PyTorch's convention is meant.
    """
    v = check_fraction(value, name, allow_none=allow_none)
    if v is not None and 0.5 < v < 1.0 and _WARN_DECAY_LOOK.get():
        warn_caller(
            f"{name}={value!r} looks like a Keras/TensorFlow momentum (the weight on the old value); "
            f"bnorm's {name} is PyTorch's weight on the new batch, so the running statistics would "
            f"follow each batch almost entirely. For Keras' momentum={value!r} write decay={value!r} "
            f"(or {name}={1.0 - v:.12g}); if you mean PyTorch's {name}={value!r}, silence this with "
            'warnings.filterwarnings("ignore", category=bnorm.MomentumConventionWarning)',
            MomentumConventionWarning,
        )
    return v


@dataclass(frozen=True)
class Convention:
    """A preset: what a framework's BatchNorm layer does by default."""

    name: str
    momentum: float | None
    decay: float | None
    eps: float
    axis: int
    unbiased_running_var: bool
    source: str


CONVENTIONS: dict[str, Convention] = {
    "torch": Convention("torch", 0.1, None, 1e-5, 1, True, "PyTorch nn.BatchNorm*d"),
    "keras": Convention("keras", None, 0.99, 1e-3, -1, False, "Keras 3 BatchNormalization"),
    "onnx": Convention("onnx", None, 0.9, 1e-5, 1, False, "ONNX BatchNormalization-15"),
    "flax": Convention("flax", None, 0.99, 1e-5, -1, False, "Flax linen.BatchNorm"),
    "d2l": Convention("d2l", None, 0.9, 1e-5, 1, False, "d2l.ai batch_norm (and CS231n)"),
}


@dataclass(frozen=True)
class RunningAverage:
    """How running statistics absorb a batch statistic.

    Exactly one of the three forms holds:

    * ``momentum`` set: ``r = (1 - momentum) * r + momentum * b`` (PyTorch);
    * ``decay`` set: ``r = r * decay + b * (1 - decay)`` (Keras, ONNX, Flax, d2l);
    * neither (PyTorch's ``momentum=None``): the cumulative average, with
      factor ``1 / num_batches_tracked`` counted after the increment.
    """

    momentum: float | None = 0.1
    decay: float | None = None

    @classmethod
    def from_args(cls, momentum: Any, decay: Any, *, allow_cumulative: bool) -> RunningAverage:
        """Validate a momentum/decay pair; the caller has already excluded 'both given'."""
        if decay is not None:
            return cls(momentum=None, decay=check_fraction(decay, "decay"))
        return cls(momentum=check_momentum(momentum, allow_none=allow_cumulative), decay=None)

    @property
    def cumulative(self) -> bool:
        return self.momentum is None and self.decay is None

    def blend(self, running: np.ndarray, batch: np.ndarray, num_batches_tracked: int = 0) -> np.ndarray:
        """The new running value in float64 (a new array; `running` is not modified).

        The arithmetic runs in float64 on the per-channel vectors; the caller
        casts it to the buffer's dtype once (see :mod:`bnorm._running`, which
        checks the cast), as a framework that keeps float32 buffers computes
        ``a * r + b * x`` with float32 rounding of a float64 result up to one ulp.
        """
        r = running.astype(np.float64)
        if self.decay is not None:
            new: np.ndarray = r * self.decay + batch * (1.0 - self.decay)
        else:
            m = 1.0 / num_batches_tracked if self.momentum is None else self.momentum
            new = (1.0 - m) * r + m * batch
        return new

    def update(self, running: np.ndarray, batch: np.ndarray, num_batches_tracked: int = 0) -> np.ndarray:
        """:meth:`blend` cast to the buffer's dtype, unchecked (a new array)."""
        return self.blend(running, batch, num_batches_tracked).astype(running.dtype, copy=False)


F = TypeVar("F", bound=Callable[..., Any])


def records_explicit(init: F) -> F:
    """Decorate an ``__init__`` so it can tell explicit arguments from defaults.

    The wrapped function receives the names the caller actually passed as
    ``self._explicit_args`` (set before the body runs).  The signature shown to
    users and to ``inspect`` is the undecorated one.  A subclass that forwards
    its arguments to such an ``__init__`` must forward only what it received
    (``**kwargs``), or every preset value will look explicit.
    """
    sig = inspect.signature(init)
    unbound = sig.replace(parameters=list(sig.parameters.values())[1:])

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_call(type(self).__name__, unbound, args, kwargs)
        explicit = frozenset(sig.bind(self, *args, **kwargs).arguments) - {"self"}
        # The innermost decorated __init__ that runs first (a subclass's) wins.
        if not hasattr(self, "_explicit_args"):
            object.__setattr__(self, "_explicit_args", explicit)
        return init(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def resolve_layer_convention(
    convention: str | None,
    explicit: frozenset[str],
    *,
    momentum: Any,
    decay: Any,
    eps: Any,
    axis: Any,
    unbiased_running_var: Any,
) -> tuple[RunningAverage, Any, Any, bool]:
    """Apply a preset, letting explicitly passed arguments override it.

    Returns ``(running_average, eps, axis, unbiased_running_var)``.
    """
    if convention is not None:
        if not isinstance(convention, str):
            valid = ", ".join(repr(k) for k in CONVENTIONS)
            raise TypeError(
                f"convention must be a str, one of {valid} (or None), "
                f"got {type(convention).__name__} {convention!r}"
            )
        if convention not in CONVENTIONS:
            valid = ", ".join(repr(k) for k in CONVENTIONS)
            raise ValueError(f"convention must be one of {valid} (or None), got {convention!r}")
        preset = CONVENTIONS[convention]
        if "eps" not in explicit:
            eps = preset.eps
        if "axis" not in explicit:
            axis = preset.axis
        if "unbiased_running_var" not in explicit:
            unbiased_running_var = preset.unbiased_running_var
        if "momentum" not in explicit and "decay" not in explicit:
            momentum, decay = preset.momentum, preset.decay
    if decay is not None and "momentum" in explicit:
        raise ValueError(
            f"give either momentum (weight on the new batch) or decay (weight on the old "
            f"value), not both: got momentum={momentum!r} and decay={decay!r}"
        )
    if not isinstance(unbiased_running_var, (bool, np.bool_)):
        raise TypeError(f"unbiased_running_var must be a bool, got {type(unbiased_running_var).__name__}")
    running = RunningAverage.from_args(momentum, decay, allow_cumulative=True)
    return running, eps, axis, bool(unbiased_running_var)
