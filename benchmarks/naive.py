"""The textbook NumPy normalizations: the baselines bnorm is measured against.

Each is the formula as tutorials and NumPy ports write it -- mean and variance
with ``np.mean``/``np.var``, ``x_hat`` kept by the forward for the backward
pass, the backward in its usual closed form:

* batch norm: the CS231n / d2l.ai five lines (``forward_train``; no running-stat
  update, which bnorm's training forward also does) and the CS231n backward;
* layer norm: the four lines of the NumPy ports of GPT-2 (picoGPT's
  ``layer_norm``: ``mean``, ``var``, normalize, scale and shift, over the last axis);
* group norm and instance norm: the same normalization of ``x.reshape(N, G, -1)``
  (instance norm: G = C), then the per-channel scale and shift;
* RMSNorm: ``x / sqrt(mean(x**2) + eps) * gamma`` over the last axis.

Every ``*_forward`` returns ``(y, cache)`` and every ``*_backward(dy, cache)``
returns ``(dx, dgamma, dbeta)`` (RMSNorm: ``(dx, dgamma)``).  They are correct
(float64-accurate enough for benchmarking; tests/test_benchmarks.py checks them
against bnorm) and make several full-size temporaries; that is the point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Cache = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...], int]


def _axes(ndim: int, axis: int) -> tuple[int, ...]:
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def _bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = v.shape[0]
    return v.reshape(shape)


def forward_train(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5, axis: int = 1
) -> tuple[np.ndarray, Cache]:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with batch statistics."""
    axes = _axes(x.ndim, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    std = np.sqrt(var + eps)
    x_hat = (x - mean) / std
    g = _bcast(gamma, x.ndim, axis)
    y = g * x_hat + _bcast(beta, x.ndim, axis)
    return y, (x_hat, g, std, axes, x.size // x.shape[axis])


def forward_eval(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = 1e-5,
    axis: int = 1,
) -> np.ndarray:
    """y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""
    n = x.ndim
    x_hat = (x - _bcast(running_mean, n, axis)) / np.sqrt(_bcast(running_var, n, axis) + eps)
    return _bcast(gamma, n, axis) * x_hat + _bcast(beta, n, axis)


def backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, Any, Any]:
    """dx, dgamma, dbeta of the training forward (the CS231n closed form)."""
    x_hat, g, std, axes, m = cache
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    dx_hat = dy * g
    dx = (
        m * dx_hat
        - dx_hat.sum(axis=axes, keepdims=True)
        - x_hat * (dx_hat * x_hat).sum(axis=axes, keepdims=True)
    ) / (m * std)
    return dx, dgamma, dbeta


# ---- the row-wise norms: normalization over the last axis of a view (layer, group, instance norm)
RowCache = tuple[np.ndarray, np.ndarray]


def _rows_forward(xr: np.ndarray, eps: float) -> RowCache:
    """x_hat and std of the normalization over the last axis of `xr`."""
    mean = np.mean(xr, axis=-1, keepdims=True)
    variance = np.var(xr, axis=-1, keepdims=True)
    std = np.sqrt(variance + eps)
    return (xr - mean) / std, std


def _rows_backward(dx_hat: np.ndarray, x_hat: np.ndarray, std: np.ndarray) -> np.ndarray:
    """dx of x_hat = (x - mean) / std over the last axis, given dL/dx_hat."""
    return (
        dx_hat - dx_hat.mean(axis=-1, keepdims=True) - x_hat * (dx_hat * x_hat).mean(axis=-1, keepdims=True)
    ) / std


def layer_norm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, Cache]:
    """picoGPT's layer norm over the last axis; the cache keeps x_hat."""
    x_hat, std = _rows_forward(x, eps)
    return gamma * x_hat + beta, (x_hat, gamma, std, tuple(range(x.ndim - 1)), x.shape[-1])


def layer_norm_backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, Any, Any]:
    """dx, dgamma, dbeta of :func:`layer_norm_forward`."""
    x_hat, gamma, std, axes, _ = cache
    return _rows_backward(dy * gamma, x_hat, std), (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)


def group_norm_forward(
    x: np.ndarray, num_groups: int, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, Cache]:
    """Group norm by reshape: statistics of ``x.reshape(N, G, -1)``, then gamma and beta per channel."""
    x_hat, std = _rows_forward(x.reshape(x.shape[0], num_groups, -1), eps)
    x_hat = x_hat.reshape(x.shape)
    g = _bcast(gamma, x.ndim, 1)
    return g * x_hat + _bcast(beta, x.ndim, 1), (x_hat, g, std, (0, *range(2, x.ndim)), num_groups)


def group_norm_backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, Any, Any]:
    """dx, dgamma, dbeta of :func:`group_norm_forward`."""
    x_hat, g, std, axes, num_groups = cache
    n = dy.shape[0]
    dx = _rows_backward((dy * g).reshape(n, num_groups, -1), x_hat.reshape(n, num_groups, -1), std)
    return dx.reshape(dy.shape), (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)


def instance_norm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, Cache]:
    """Instance norm by reshape: group norm with one channel per group."""
    return group_norm_forward(x, x.shape[1], gamma, beta, eps)


instance_norm_backward = group_norm_backward


def rms_norm_forward(
    x: np.ndarray, gamma: np.ndarray, eps: float = 1e-6
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * gamma``; the cache keeps x_hat."""
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    x_hat = x / rms
    return gamma * x_hat, (x_hat, gamma, rms)


def rms_norm_backward(
    dy: np.ndarray, cache: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """dx, dgamma of :func:`rms_norm_forward`."""
    x_hat, gamma, rms = cache
    dx_hat = dy * gamma
    dx = (dx_hat - x_hat * (dx_hat * x_hat).mean(axis=-1, keepdims=True)) / rms
    return dx, (dy * x_hat).sum(axis=tuple(range(dy.ndim - 1)))
