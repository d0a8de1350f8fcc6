"""The non-finite policy every running-statistics update goes through.

Contract: a layer (batch, instance, sync batch norm, and any later one) computes
the new running values in float64 and hands them to :func:`stage_running_update`
with its buffers.  The values are converted to each buffer's dtype *first* and
checked *after* the conversion, so a finite batch whose statistics do not fit
the buffer (a variance of 1e6 in a float16 buffer, 1e40 in float32) is caught
exactly like a NaN in the input.  Nothing non-finite reaches a buffer unless the
policy is ``'propagate'`` (PyTorch's behaviour):

* ``'skip'`` (default) -- the buffers keep their values, a RuntimeWarning says
  why, and the caller does not count the batch;
* ``'raise'`` -- FloatingPointError, nothing changed;
* ``'propagate'`` -- the converted values are written, inf and NaN included.

The caller writes the staged values only after every other check has passed,
so a call that raises changes no state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = ["NonFinitePolicy", "NONFINITE_POLICIES", "check_policy", "nonfinite", "stage_running_update"]

NonFinitePolicy = Literal["skip", "raise", "propagate"]
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "raise", "propagate")

_FIXES = "Pass on_nonfinite='skip' to skip such batches or 'propagate' to update anyway as PyTorch does"


def check_policy(on_nonfinite: Any) -> NonFinitePolicy:
    """`on_nonfinite` if it is one of the three policies, else ValueError."""
    if not isinstance(on_nonfinite, str) or on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"on_nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, got {on_nonfinite!r}"
        )
    return on_nonfinite  # type: ignore[return-value]


def nonfinite(policy: NonFinitePolicy, reason: str, *, stacklevel: int) -> bool:
    """Apply `policy` to an update that would not be finite; True means "write it anyway".

    `reason` says what is not finite, as a sentence start ("batch statistics are
    not finite (NaN or inf in the input)").  'raise' raises FloatingPointError,
    'skip' warns (RuntimeWarning, attributed `stacklevel` frames up) and returns
    False, 'propagate' returns True.
    """
    if policy == "propagate":
        return True
    if policy == "raise":
        raise FloatingPointError(f"{reason}; running statistics left unchanged. {_FIXES}")
    warnings.warn(
        f"{reason}: the batch was skipped and the running statistics were not updated with it "
        "(on_nonfinite='skip')",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
    return False


def stage_running_update(
    updates: Sequence[tuple[str, np.ndarray, np.ndarray]],
    policy: NonFinitePolicy,
    *,
    stacklevel: int,
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Convert and check new running values; return ``[(buffer, value)]`` to write, or None (skip).

    Parameters
    ----------
    updates : sequence of (name, buffer, new_value)
        `new_value` (float64, the buffer's shape) is what `buffer` should become.
    policy : {'skip', 'raise', 'propagate'}
    stacklevel : int
        Frames above the caller to attribute the 'skip' warning to.

    Returns
    -------
    list of (buffer, value) or None
        `value` is `new_value` in the buffer's dtype; None when the batch is skipped.

    Raises
    ------
    FloatingPointError
        Under 'raise', if any converted value is NaN or inf.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        staged = [(buffer, np.asarray(value).astype(buffer.dtype)) for _, buffer, value in updates]
        # The common case in one reduction per buffer: a sum is finite only if every
        # value is (a NaN or inf makes it NaN or inf).  A finite sum that overflows
        # (values near the dtype's largest) only sends the call to the exact check.
        if all(math.isfinite(np.add.reduce(converted, axis=None)) for _, converted in staged):
            return staged
    bad_source: list[str] = []
    overflow: list[str] = []
    for (name, _, value), (_, converted) in zip(updates, staged, strict=True):
        if not np.isfinite(converted).all():
            (overflow if np.isfinite(value).all() else bad_source).append(name)
    if not bad_source and not overflow:
        return staged
    if bad_source:
        reason = "batch statistics are not finite (NaN or inf in the input)"
    else:
        dtype = next(b.dtype for n, b, _ in updates if n == overflow[0])
        reason = (
            f"the updated {' and '.join(overflow)} would overflow the buffer's dtype {dtype} "
            f"(largest finite value {float(np.finfo(dtype).max):.6g}); keep the buffers in a wider "
            "dtype (dtype=np.float32 or np.float64) or rescale the input"
        )
    return staged if nonfinite(policy, reason, stacklevel=stacklevel + 1) else None
