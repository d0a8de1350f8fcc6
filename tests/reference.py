"""A slow, obviously-correct float64 reference.

The reference moves the channel axis last, flattens the rest and applies the
textbook formulas per channel with NumPy's float64 mean/var.  Gradients are
checked with :func:`bnorm.testing.check_grad`.
"""

from __future__ import annotations

import numpy as np


def _to_rows(x: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1).reshape(-1, x.shape[axis])


def _from_rows(r: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.empty(like.shape), axis, -1).shape
    return np.moveaxis(r.reshape(moved), -1, axis)


def ref_batch_stats(x: np.ndarray, axis: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel mean, biased variance and count, in float64."""
    rows = _to_rows(x, axis)
    return rows.mean(axis=0), rows.var(axis=0), rows.shape[0]


def ref_forward(x, mean, var, gamma=None, beta=None, eps=1e-5, axis=1) -> np.ndarray:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, in float64."""
    rows = _to_rows(x, axis)
    c = rows.shape[1]
    gamma = np.ones(c) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(c) if beta is None else np.asarray(beta, np.float64)
    y = gamma * (rows - mean) / np.sqrt(var + eps) + beta
    return _from_rows(y, np.asarray(x), axis)


def ref_train(x, gamma=None, beta=None, eps=1e-5, axis=1) -> np.ndarray:
    mean, var, _ = ref_batch_stats(x, axis)
    return ref_forward(x, mean, var, gamma, beta, eps, axis)
