r"""Per-sample normalization over groups of channels.

The kernels group norm and instance norm share (instance norm is group norm
with one channel per group).

Layout.  The input ``x`` has shape ``(N, C, *S)``; ``G`` groups of ``Cg = C / G``
channels; ``M = Cg * prod(S)`` values per (sample, group) row.

* Statistics are taken over the ``(1, N * G, M)`` view with
  :func:`~bnorm.functional._moments.channel_moments` (one "channel" per row).
* The output and the input gradient are written over the ``(1, N * C, prod(S))``
  view with :func:`~bnorm.functional._moments.affine_pass` and
  :func:`~bnorm.functional._moments.backward_pass`: every (sample, channel) row
  has its own coefficients, so the per-channel affine ``gamma, beta`` folds into
  the normalization and each elementwise pass runs once (as PyTorch's CPU
  kernel does) instead of normalizing first and scaling in place afterwards.

Backward, per row with :math:`\hat g = g \gamma_c` and
:math:`\hat x = (x - \mu)\,\mathrm{invstd}`:

.. math::
    dx = \mathrm{invstd}\,\bigl(\hat g - \overline{\hat g}
         - \hat x\,\overline{\hat g \hat x}\bigr)

where the bars are means over the row's ``M`` values.  Expanded, that is
``dx = g * a + x * b + c`` per (sample, channel) with

.. math::
    a = \gamma_c\,\mathrm{invstd},\quad
    b = -\mathrm{invstd}^2\, \overline{\hat g \hat x},\quad
    c = -\mathrm{invstd}\,\overline{\hat g} - \mu b

and both means come from the one reduction
:func:`~bnorm.functional._moments.backward_sums` per (sample, channel):
``sum(g)`` and ``sum(g * (x - mean))``, weighted by gamma and added over the
channels of each group.  When the statistics are constants (instance norm with
running statistics) ``b = c = 0``.

Nothing here allocates a full-size array besides the output.
"""

from __future__ import annotations

import numpy as np

from ._kernels.channel import affine_pass, backward_pass
from ._kernels.moments import Moments, backward_sums, channel_moments, channel_view

__all__ = [
    "row_view",
    "group_moments",
    "grouped_affine",
    "grouped_backward",
]


def row_view(x: np.ndarray, rows: int) -> np.ndarray:
    """The ``(1, rows, size // rows)`` view of `x` (a copy only for non-contiguous input)."""
    per_row = x.size // rows if rows else 0
    return channel_view(x.reshape(rows, per_row), 0)


def group_moments(x: np.ndarray, num_groups: int) -> Moments:
    """Moments per (sample, group) row of ``(N, C, *S)`` input: vectors of length ``N * G``."""
    return channel_moments(row_view(x, x.shape[0] * num_groups))


def _per_channel(v: np.ndarray, n: int, num_groups: int, cg: int) -> np.ndarray:
    """Repeat a per-(sample, group) vector to one value per (sample, channel)."""
    return np.repeat(v.reshape(n, num_groups), cg, axis=1).ravel()


def grouped_affine(
    x: np.ndarray,
    num_groups: int,
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    y: np.ndarray,
) -> None:
    r"""``y = gamma_c * (x - mean) * invstd + beta_c``, one pass, into `y`.

    `mean` and `invstd` are float64 vectors of length ``N * G``; `gamma` and
    `beta` float64 vectors of length C or None (1 and 0).
    """
    n, c = x.shape[0], x.shape[1]
    if x.size == 0:
        return
    cg = c // num_groups
    scale = _per_channel(invstd, n, num_groups, cg).reshape(n, c)  # (N, C)
    if gamma is not None:
        scale = scale * gamma[None, :]
    shift = -_per_channel(mean, n, num_groups, cg).reshape(n, c) * scale  # (N, C)
    if beta is not None:
        shift = shift + beta[None, :]
    with np.errstate(invalid="ignore", over="ignore"):
        affine_pass(row_view(x, n * c), scale.ravel(), shift.ravel(), row_view(y, n * c))


def grouped_backward(
    g: np.ndarray,
    x: np.ndarray,
    num_groups: int,
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray | None,
    batch_stats: bool,
    dx: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Write the input gradient into `dx`; return float64 ``(dgamma, dbeta)`` of length C.

    ``dgamma_c = sum_{n, s} g * x_hat`` and ``dbeta_c = sum_{n, s} g``.  With
    `batch_stats` the statistics depend on `x` (the formula in the module
    docstring); otherwise they are constants and ``dx = g * gamma * invstd``.
    """
    n, c = x.shape[0], x.shape[1]
    if x.size == 0:
        return np.zeros(c), np.zeros(c)
    cg = c // num_groups
    m = cg * (x.size // (n * c))  # values per (sample, group) row
    mean_c = _per_channel(mean, n, num_groups, cg)  # (N*C,)
    invstd_c = _per_channel(invstd, n, num_groups, cg)  # (N*C,)
    g3 = row_view(g, n * c)
    x3 = row_view(x, n * c)
    sum_g, sum_gx = backward_sums(g3, x3, mean_c)  # per (sample, channel)
    sum_g2 = sum_g.reshape(n, c)
    sum_gxhat = (sum_gx * invstd_c).reshape(n, c)  # sum(g * x_hat)
    dgamma = sum_gxhat.sum(axis=0)
    dbeta = sum_g2.sum(axis=0)
    gam = np.ones(c) if gamma is None else gamma
    a = (invstd_c.reshape(n, c) * gam[None, :]).ravel()
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if batch_stats:
            mean_ghat = (sum_g2 * gam).reshape(n, num_groups, cg).sum(axis=2).ravel() / m  # (N*G,)
            mean_ghat_xhat = (sum_gxhat * gam).reshape(n, num_groups, cg).sum(axis=2).ravel() / m
            b = -invstd * invstd * mean_ghat_xhat  # (N*G,)
            cc = -invstd * mean_ghat - mean * b
            backward_pass(
                g3,
                x3,
                a,
                _per_channel(b, n, num_groups, cg),
                _per_channel(cc, n, num_groups, cg),
                row_view(dx, n * c),
            )
        else:
            backward_pass(g3, x3, a, None, None, row_view(dx, n * c))
    return dgamma, dbeta
