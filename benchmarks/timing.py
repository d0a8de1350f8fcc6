"""The timing machinery every benchmark here shares: settle, calibrate, interleave, summarize.

How a comparison is timed (``interleave``):

* each contender is first *calibrated*: the number of back-to-back calls that
  lasts about ``target`` seconds (at least one call);
* a *round* measures every contender once, in an order that rotates from
  round to round, so that load from elsewhere on the machine falls on all of
  them alike;
* before each timed measurement the contender runs untimed for ``SETTLE``
  seconds (at least once), so that none is timed while the previous one's
  threads still spin;
* a measurement is the mean time per call of its back-to-back calls; the
  statistics are the median, min and max over rounds, and the per-round times
  are kept so that ratios can be taken round by round.

Also here: PyTorch's optional import, the geometric mean, tracemalloc's peak of
one call, the description of the machine (with the git commit of the bnorm
being timed) and the choice of which bnorm is imported (``use_source``).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: Untimed running of an implementation before each of its timed measurements (seconds).
#: PyTorch's OpenMP workers keep spinning for about 5 ms of CPU after every call
#: (``time.process_time`` advances 5-6 ms while the main thread sleeps); without
#: this settling, whatever runs next in a round shares the two cores with them.
SETTLE = 0.01


def use_source() -> None:
    """Import bnorm from this checkout's ``src/`` unless PYTHONPATH names another bnorm.

    ``PYTHONPATH=/other/checkout/src python benchmarks/bench_suite.py`` then
    times that checkout's bnorm with this checkout's benchmarks.
    """
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and (Path(entry) / "bnorm" / "__init__.py").is_file():
            return
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def torch_or_none() -> Any:
    """``torch`` when it is importable, else None (every torch column is then left out)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def settle(f: Callable[[], Any], seconds: float = SETTLE) -> None:
    """Run `f` untimed for at least `seconds` (at least once)."""
    t0 = time.perf_counter()
    f()
    while time.perf_counter() - t0 < seconds:
        f()


def calibrate(f: Callable[[], Any], target: float, cap: int = 100_000) -> int:
    """Back-to-back calls of `f` that last about `target` seconds (1 to `cap`)."""
    f()  # warm up
    n, t0 = 0, time.perf_counter()
    while True:  # time at least 1 ms of calls: a single call of a few µs is mostly timer noise
        f()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min(1e-3, target) or n >= cap:
            break
    return max(1, min(cap, math.ceil(target / max(dt / n, 1e-9))))


def interleave(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    target: float,
    *,
    setups: Mapping[str, Callable[[], Any]] | None = None,
    settle_seconds: float = SETTLE,
    reps: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Time every contender of `fns` once per round, in a rotating order.

    `setups` maps a contender to a call made before its settling and timing
    (e.g. ``bnorm.set_num_threads(1)``); the caller restores the state after.
    `reps` fixes the calls per measurement instead of calibrating them.
    Returns, per contender, ``median_ms``, ``min_ms``, ``max_ms``, ``rounds``,
    ``reps`` (calls per measurement) and ``times_ms`` (one per round, in round
    order: ratios can be taken round by round).
    """
    setups = setups or {}
    names = list(fns)
    calls = {}
    for name in names:
        if name in setups:
            setups[name]()
        calls[name] = calibrate(fns[name], target) if reps is None else reps
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            f, n = fns[name], calls[name]
            if name in setups:
                setups[name]()
            settle(f, settle_seconds)
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[name].append((time.perf_counter() - t0) / n * 1e3)
    return {
        name: {
            "median_ms": float(np.median(ts)),
            "min_ms": float(np.min(ts)),
            "max_ms": float(np.max(ts)),
            "rounds": len(ts),
            "reps": calls[name],
            "times_ms": [float(f"{t:.6g}") for t in ts],
        }
        for name, ts in times.items()
    }


def geomean(values: list[float]) -> float:
    """Geometric mean of the positive finite `values` (nan when there are none)."""
    v = [x for x in values if x > 0 and math.isfinite(x)]
    return float(math.exp(sum(math.log(x) for x in v) / len(v))) if v else float("nan")


def peak_bytes(f: Callable[[], Any]) -> int:
    """Peak extra bytes (tracemalloc) allocated during one call of `f`, its result included.

    bnorm's output cache is emptied first, so a large output is a fresh
    allocation and counts: a recycled one (the memory of an output the previous
    call dropped) would not, and the figure would read near 0.
    """
    f()
    try:  # private, and absent from older bnorm versions being timed
        from bnorm.functional._kernels import buffers
    except ImportError:
        pass
    else:
        buffers.clear()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = f()
        peak = tracemalloc.get_traced_memory()[1] - base
        del result
    finally:
        tracemalloc.stop()
    return int(peak)


def _git(path: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine(torch: Any) -> dict[str, Any]:
    """The machine, the library versions and thread counts, and which bnorm (path, git commit)."""
    import bnorm

    where = Path(bnorm.__file__).resolve().parent
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "bnorm": getattr(bnorm, "__version__", "?"),
        "bnorm_path": str(where),
        "bnorm_git_branch": _git(where, "rev-parse", "--abbrev-ref", "HEAD"),
        "bnorm_git_commit": _git(where, "rev-parse", "--short", "HEAD"),
        "bnorm_git_dirty": bool(_git(where, "status", "--porcelain", "--untracked-files=no")),
        "bnorm_threads": bnorm.num_threads(),
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def fmt_time(ms: float) -> str:
    """A time with its unit: µs under 1 ms, else ms."""
    if not math.isfinite(ms):
        return "-"
    if ms < 1.0:
        return f"{ms * 1e3:.1f} µs"
    return f"{ms:.2f} ms"


def fmt_stats(r: Mapping[str, Any] | None) -> str:
    """``median [min-max]`` with units, or ``-``."""
    if r is None:
        return "-"
    lo, hi = fmt_time(r["min_ms"]).split()[0], fmt_time(r["max_ms"]).split()[0]
    if (r["min_ms"] < 1.0) != (r["median_ms"] < 1.0) or (r["max_ms"] < 1.0) != (r["median_ms"] < 1.0):
        lo, hi = fmt_time(r["min_ms"]), fmt_time(r["max_ms"])
    return f"{fmt_time(r['median_ms'])} [{lo}-{hi}]"
