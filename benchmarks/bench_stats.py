"""``bnorm stats`` against the loop it replaces, on a folder of JPEGs written for the run.

    python benchmarks/bench_stats.py [--files 200] [--size 256] [--repeats 5]

Times, interleaved and repeated (median, min-max):

* ``naive``: the few lines a tutorial writes -- decode each file with Pillow,
  ``/ 255`` in float64, accumulate ``sum`` and ``sum of squares`` per channel
  (one pass; not exact, shown for speed only);
* ``bnorm stats`` through :func:`bnorm.stats.compute` with ``--workers 1``
  and ``--workers 2``.

Decoding dominates both; the target is bnorm with one worker within a few
percent of the naive loop, and faster with more workers on more cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bnorm.stats import compute


def naive(files: list[Path]) -> np.ndarray:
    from PIL import Image

    s1 = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for f in files:
        with Image.open(f) as im:
            x = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
        s1 += x.sum(axis=(0, 1))
        s2 += (x * x).sum(axis=(0, 1))
        n += x.shape[0] * x.shape[1]
    mean = s1 / n
    return np.sqrt(s2 / n - mean**2)


def main() -> int:
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        files = []
        for i in range(args.files):
            base = rng.integers(0, 256, size=(1, 1, 3))
            px = np.clip(base + rng.normal(0, 40, size=(args.size, args.size, 3)), 0, 255).astype(np.uint8)
            f = Path(d) / f"{i:05d}.jpg"
            Image.fromarray(px).save(f, quality=90)
            files.append(f)
        cases: dict[str, Callable[[], object]] = {
            "naive loop": lambda: naive(files),
            "bnorm workers=1": lambda: compute(d, workers=1),
            "bnorm workers=2": lambda: compute(d, workers=2),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    print(f"{args.files} JPEGs of {args.size}x{args.size}, {args.repeats} interleaved repeats")
    base = statistics.median(times["naive loop"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  {name:<16} median {med * 1e3:8.1f} ms  (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})  "
            f"x{base / med:.2f} vs naive"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
