"""Batch renormalization and ghost batch norm, forward + backward: bnorm vs the NumPy they replace.

Run: ``python benchmarks/bench_family.py [--rounds 15]``.  float32, training
step (forward then backward with a random upstream gradient).  "naive" is the
textbook NumPy a hand-written network uses (mean/var, x_hat, the corrections,
the four-statement backward); "bnorm BatchNorm" is plain batch norm on the same
input, the floor both ops are built on.  Timed with the shared machinery of
``timing.py`` (calibrated, settled, interleaved rounds); the median and the
min-max spread over rounds are printed.  Not a test: speed targets live here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from timing import fmt_stats, interleave, use_source

use_source()
import bnorm  # noqa: E402  (after use_source: this checkout's bnorm unless PYTHONPATH names one)


def naive_renorm_step(
    x: np.ndarray, g: np.ndarray, mu: np.ndarray, sigma: np.ndarray, gamma: np.ndarray
) -> Any:
    """Textbook batch renorm over axis 0 of (N, C), r and d clipped to [1/3, 3] and [-5, 5]."""
    m = x.shape[0]
    mean, var = x.mean(0), x.var(0)
    std = np.sqrt(var + 1e-5)
    r = np.clip(std / sigma, 1 / 3, 3)
    d = np.clip((mean - mu) / sigma, -5, 5)
    x_hat = (x - mean) / std
    y = gamma * (r * x_hat + d)
    dgamma = (g * (r * x_hat + d)).sum(0)
    k = gamma * r / std
    dx = k / m * (m * g - g.sum(0) - x_hat * (g * x_hat).sum(0))
    return y, dx, dgamma


def naive_ghost_step(x: np.ndarray, g: np.ndarray, gamma: np.ndarray, v: int) -> Any:
    """Textbook batch norm looped over virtual batches of v rows of (N, C)."""
    y, dx = np.empty_like(x), np.empty_like(x)
    for j in range(0, x.shape[0], v):
        xs, gs = x[j : j + v], g[j : j + v]
        mean, var = xs.mean(0), xs.var(0)
        invstd = 1 / np.sqrt(var + 1e-5)
        x_hat = (xs - mean) * invstd
        y[j : j + v] = gamma * x_hat
        dx[j : j + v] = gamma * invstd / v * (v * gs - gs.sum(0) - x_hat * (gs * x_hat).sum(0))
    return y, dx


def layer_step(layer: Any, x: np.ndarray, g: np.ndarray) -> Any:
    return layer(x), layer.backward(g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--target", type=float, default=0.05, help="seconds of calls per measurement")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for shape, v in [((256, 512), 32), ((4096, 256), 128), ((16384, 64), 128)]:
        c = shape[1]
        x = rng.normal(size=shape).astype(np.float32)
        g = rng.normal(size=shape).astype(np.float32)
        gamma = rng.uniform(0.5, 2, c).astype(np.float32)
        mu, sigma = np.zeros(c, np.float32), np.ones(c, np.float32)
        brn = bnorm.BatchRenorm1d(c, r_max=3, r_min=1 / 3, d_max=5)
        ghost = bnorm.BatchNorm1d(c, virtual_batch_size=v)
        plain = bnorm.BatchNorm1d(c)
        impls: dict[str, Callable[[], Any]] = {
            "renorm naive": partial(naive_renorm_step, x, g, mu, sigma, gamma),
            "renorm bnorm": partial(layer_step, brn, x, g),
            f"ghost(v={v}) naive": partial(naive_ghost_step, x, g, gamma, v),
            f"ghost(v={v}) bnorm": partial(layer_step, ghost, x, g),
            "BatchNorm bnorm": partial(layer_step, plain, x, g),
        }
        results = interleave(impls, args.rounds, args.target)
        print(f"{shape} float32, training step (forward + backward), median [min-max]:")
        for k, r in results.items():
            print(f"  {k:22s} {fmt_stats(r)}")


if __name__ == "__main__":
    main()
