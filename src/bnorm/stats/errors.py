"""The two kinds of failure of ``bnorm stats`` that are not a file's own fault.

:class:`UsageError` -- the arguments do not fit the data (exit status 2);
:class:`DataError` -- the data cannot give statistics as asked (exit status 3).
A file that cannot be read is neither: it is reported and skipped (or stops the
run with ``--strict``).
"""

from __future__ import annotations

__all__ = ["UsageError", "DataError"]


class UsageError(ValueError):
    """The arguments do not fit the data: a missing path, a layout or scale to give, ..."""


class DataError(ValueError):
    """The data cannot give statistics as asked: empty, mixed channel counts or sizes, ..."""
