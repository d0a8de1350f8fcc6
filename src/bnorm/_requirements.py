"""The NumPy floor, checked when bnorm is imported.

bnorm's kernels call functions NumPy added in 2.0 (``np.vecdot``).  pip keeps
an older NumPy out through the ``numpy>=2.0`` requirement; this check covers the
environments pip did not resolve (``--no-deps``, a vendored copy, a conda
environment pinned to ``numpy<2``), so that the first forward pass does not fail
with ``AttributeError: module 'numpy' has no attribute 'vecdot'``.
"""

from __future__ import annotations

import re

import numpy as np

#: The oldest NumPy bnorm supports (and CI tests): the same as pyproject.toml.
MIN_NUMPY = (2, 0)


def check_numpy(version: str) -> None:
    """Raise ImportError when `version` (a NumPy version string) is below :data:`MIN_NUMPY`.

    Examples
    --------
    >>> check_numpy("2.0.2")
    >>> check_numpy("1.26.4")
    Traceback (most recent call last):
    ...
    ImportError: bnorm needs NumPy >= 2.0, found NumPy 1.26.4: pip install "numpy>=2.0"
    """
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) >= MIN_NUMPY:
        return
    floor = ".".join(map(str, MIN_NUMPY))
    raise ImportError(f'bnorm needs NumPy >= {floor}, found NumPy {version}: pip install "numpy>={floor}"')


check_numpy(np.__version__)
