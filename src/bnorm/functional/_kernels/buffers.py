r"""Output arrays without the fresh-page penalty: large outputs reuse memory the caller dropped.

Contract
--------
:func:`empty_output` returns an uninitialized C-contiguous array like
``np.empty(shape, dtype)``.  Below :data:`RECYCLE_MIN_BYTES` it *is*
``np.empty``.  Above, the array is a view of a raw byte block that bnorm keeps
in a small cache; once every array (and view) of a block is gone -- its only
references are the cache's -- the next output of the same size reuses it.  At
most :data:`RECYCLE_FREE_BLOCKS` unused blocks are kept per process; the rest
are released.  Arrays from here have ``.base`` set (the block) and
``flags.owndata`` False, like any view; their values are never shared with a
live array.

Why
---
glibc serves a large allocation with a fresh ``mmap`` (threshold 128 KiB,
raised up to 32 MiB as such blocks are freed) or from the heap, whose top it
returns to the system above twice that threshold; whether a new output gets
fresh pages depends on the allocation history.  Fresh pages are first touched
one by one by the kernel's first write: a page fault each, and the system
zeroes the page.  Measured on (32, 64, 56, 56) float32 (25.7 MB, this 2-core
machine) in a training loop (forward, backward, drop both): about 650 page
faults in every forward and every backward with one thread (2 MiB pages from
NumPy's transparent-hugepage advice; 25,000 faults with 4 KiB pages); a fresh
``np.multiply(x, 2)`` took 1.6-1.8x a write into an existing array (3x
without huge pages).  A plain ``x.copy()`` timed in a loop hides it: the
same-size block freed just before is reused.  Recycling the caller's dropped
outputs is what a training loop needs: each layer's outputs come and go at
the same sizes every step.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["RECYCLE_FREE_BLOCKS", "RECYCLE_MIN_BYTES", "RECYCLE_TRACKED", "clear", "empty_output"]

#: Outputs of at least this many bytes are recycled (NumPy's own threshold for
#: huge-page advice: where page faults start to matter).
RECYCLE_MIN_BYTES = 4 << 20

#: Unused blocks kept for reuse (memory not returned to the system until a later
#: output needs a block of another size or the process ends).
RECYCLE_FREE_BLOCKS = 2

#: Blocks tracked at most (in use or not); older ones are forgotten (their
#: arrays live on as ordinary arrays), so a call never scans a long list.
RECYCLE_TRACKED = 64

_lock = threading.Lock()
_blocks: list[np.ndarray] = []

# sys.getrefcount of a block that only the cache holds: the list's reference,
# the loop variable's and getrefcount's own argument.
_UNUSED_REFS = 3


def empty_output(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """An uninitialized C-contiguous array of `shape` and `dtype` (see the module's contract)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < RECYCLE_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    with _lock:
        unused = []
        for block in _blocks:
            if sys.getrefcount(block) <= _UNUSED_REFS:
                if block.nbytes == nbytes:
                    return block.view(dtype).reshape(shape)
                unused.append(block)
        # No unused block of this size: release the oldest unused ones beyond the bound.
        # By identity: list.remove would compare arrays with ==.
        released = {id(block) for block in unused[: max(0, len(unused) + 1 - RECYCLE_FREE_BLOCKS)]}
        _blocks[:] = [block for block in _blocks if id(block) not in released]
        del unused
        block = np.empty(nbytes, dtype=np.uint8)
        _blocks.append(block)
        if len(_blocks) > RECYCLE_TRACKED:
            del _blocks[0]
        return block.view(dtype).reshape(shape)


def _after_fork_in_child() -> None:
    # The lock may have been held by a thread that does not exist in the child.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def clear() -> None:
    """Release every cached block (arrays still in use keep their memory)."""
    with _lock:
        _blocks.clear()
