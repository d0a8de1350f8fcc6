"""Slow float64 references shared by the norm-family tests (gradients: bnorm.testing.check_grad)."""

from __future__ import annotations

import numpy as np


def ref_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm straight from the definition, one sample row at a time (float64)."""
    x = np.asarray(x, dtype=np.float64)
    k = len(normalized_shape)
    rows = x.reshape((-1, *tuple(normalized_shape)))
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        mu = row.sum() / row.size
        var = ((row - mu) ** 2).sum() / row.size
        out[i] = (row - mu) / np.sqrt(var + eps)
    if weight is not None:
        out = out * np.asarray(weight, np.float64)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    assert k >= 1
    return out.reshape(x.shape)


def ref_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm from the definition: loop over samples and groups (float64)."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    cg = c // num_groups
    out = np.empty_like(x)
    for i in range(n):
        for g in range(num_groups):
            blk = x[i, g * cg : (g + 1) * cg]
            mu = blk.mean()
            var = ((blk - mu) ** 2).mean()
            out[i, g * cg : (g + 1) * cg] = (blk - mu) / np.sqrt(var + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        out = out * np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        out = out + np.asarray(bias, np.float64).reshape(shape)
    return out


def ref_instance_norm(x, weight=None, bias=None, eps=1e-5, mean=None, var=None):
    """Instance norm from the definition; `mean`/`var` of shape (C,) are running stats."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    out = np.empty_like(x)
    for i in range(n):
        for j in range(c):
            v = x[i, j]
            mu = v.mean() if mean is None else mean[j]
            s2 = ((v - v.mean()) ** 2).mean() if var is None else var[j]
            out[i, j] = (v - mu) / np.sqrt(s2 + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        out = out * np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        out = out + np.asarray(bias, np.float64).reshape(shape)
    return out
