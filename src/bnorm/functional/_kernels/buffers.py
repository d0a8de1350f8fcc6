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
glibc serves allocations above 32 MiB with a fresh ``mmap`` and returns them to
the system on free, so every new large output is first touched page by page:
the kernel takes a page fault and zeroes the page before the kernel's first
write lands.  Measured on (32, 64, 56, 56) float32 (103 MB, 2 cores) in a
training loop (forward, backward, drop both): about 650 page faults per call
(2 MiB pages, NumPy's transparent-hugepage advice; 25,000 with 4 KiB pages),
and a fresh ``np.multiply(x, 2)`` took 1.6-1.8x a write into an existing array
(3x without huge pages).  A plain ``x.copy()`` timed in a loop can hide it:
glibc sometimes keeps the block for the next call of the same size.  Reusing
the caller's dropped output is what a training loop needs: its forward and
backward outputs of each layer come and go at the same sizes every step.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["RECYCLE_FREE_BLOCKS", "RECYCLE_MIN_BYTES", "clear", "empty_output"]

#: Outputs of at least this many bytes are recycled: glibc's largest
#: ``mmap`` threshold, above which every allocation is fresh pages.
RECYCLE_MIN_BYTES = 32 << 20

#: Unused blocks kept for reuse (memory not returned to the system until a later
#: output needs a block of another size or the process ends).
RECYCLE_FREE_BLOCKS = 2

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
        for block in unused[: max(0, len(unused) + 1 - RECYCLE_FREE_BLOCKS)]:
            _blocks.remove(block)
        del unused
        block = np.empty(nbytes, dtype=np.uint8)
        _blocks.append(block)
        return block.view(dtype).reshape(shape)


def clear() -> None:
    """Release every cached block (arrays still in use keep their memory)."""
    with _lock:
        _blocks.clear()
