"""Exact dataset statistics for folders of images and NumPy arrays: ``bnorm stats``.

``bnorm stats PATH ...`` (console script; also ``python -m bnorm stats``) and
:func:`compute` read every image once -- one image or chunk in memory at a
time besides the accumulators -- and return the per-channel mean, standard
deviation, min and max that normalization needs, exact to float64 rounding
(per-task float64 moments, Chan merge in a fixed order), identical for any
``--workers`` and any number of MPI ranks.

Modules: :mod:`~bnorm.stats.sources` (discovery and tasks),
:mod:`~bnorm.stats.images` (Pillow), :mod:`~bnorm.stats.arrays` (``.npy`` and
``.npz``), :mod:`~bnorm.stats.transforms` (crop, channels),
:mod:`~bnorm.stats.accumulate` (partials and the fold),
:mod:`~bnorm.stats.dataset` (:func:`compute`), :mod:`~bnorm.stats.report`
(summary, paste-ready lines, JSON), :mod:`~bnorm.stats.figure` (PNGs) and
:mod:`~bnorm.stats.command` (the command line).
"""

from __future__ import annotations

from .dataset import DatasetStats, compute
from .errors import DataError, UsageError

__all__ = ["compute", "DatasetStats", "DataError", "UsageError"]
