"""What pure NumPy can reach against PyTorch's CPU batch norm: the two limits, measured.

Run from the repository root::

    python benchmarks/bench_limits.py            # 15 interleaved rounds, ~30 seconds
    python benchmarks/bench_limits.py --quick    # 5 rounds, ~10 seconds

An evaluation forward is ``y = x * scale + shift`` per channel.  PyTorch runs
it as one fused multiply-add pass.  NumPy has no three-operand (fused)
elementwise operation, so any NumPy evaluation needs at least two operations
per value.  Programs of bnorm's own elementwise engine, into preallocated
outputs, with no bnorm overhead around them:

* ``eval, 1 op``  -- ``x * scale`` only: what an evaluation could cost if NumPy
  had a fused multiply-add;
* ``eval, 2 ops`` -- ``x * scale + shift``: the least any NumPy evaluation can do;
* ``backward``    -- the per-channel sums and the four-operation input gradient
  (``backward_sums`` and ``backward_pass``, as ``batch_norm_backward`` runs them);

each run three ways:

* ``1 thread``    -- the whole array on the calling thread;
* ``2 threads``   -- two Python threads in this process, a half of the array
  each (cut along the outer axis), as bnorm's thread pool does; every NumPy
  call a thread makes releases the GIL and takes it back;
* ``2 processes`` -- two worker processes, the same halves and calls, and no
  GIL shared between them.

``2 threads / 2 processes`` is the cost of the GIL; the ratios to PyTorch's
evaluation and backward (``torch.ops.aten``, its default threads) are the
floors with and without it.  Float32, channels-first, the shapes of
bench_batchnorm.py; every timing is preceded by 10 ms of untimed running of
the same implementation, and rounds interleave all of them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The shapes of the batch-norm benchmark (which also chooses the bnorm: timing.use_source) and
# the shared timing helpers.
from bench_batchnorm import SHAPES
from timing import geomean, settle, torch_or_none

import bnorm
from bnorm.functional._kernels.channel import _elementwise, _Step, backward_pass
from bnorm.functional._kernels.moments import backward_sums, channel_view


class Half:
    """One half (along the outer axis) of a float32 channels-first case, with its output."""

    def __init__(self, shape: tuple[int, ...], part: slice | None) -> None:
        rng = np.random.default_rng(0)
        x3, g3 = (channel_view(rng.standard_normal(shape, dtype=np.float32), 1) for _ in range(2))
        c = shape[1]
        self.coefs = {"scale": rng.uniform(0.5, 1.5, c), "shift": rng.uniform(-0.5, 0.5, c)}
        self.grad = {
            "a": rng.uniform(0.5, 1.5, c),
            "b": rng.uniform(-0.1, 0.1, c),
            "c": rng.uniform(-0.1, 0.1, c),
        }
        self.x3, self.g3 = (np.ascontiguousarray(v if part is None else v[part]) for v in (x3, g3))
        self.out3 = np.empty_like(self.x3)

    def run(self, program: str, n: int) -> None:
        for _ in range(n):
            PROGRAMS[program](self)


def _affine(steps: list[_Step]) -> Callable[[Half], None]:
    return lambda h: _elementwise(h.out3, "x", steps, {"x": h.x3}, h.coefs)


def _backward(h: Half) -> None:
    k = h.x3.shape[1]
    backward_sums(h.g3, h.x3, np.zeros(k), np.ones(k), accumulate="compute")
    backward_pass(h.g3, h.x3, h.grad["a"], h.grad["b"], h.grad["c"], h.out3)


#: name -> the work on a Half; "eval, ..." are compared with PyTorch's evaluation, "backward" with its backward
PROGRAMS: dict[str, Callable[[Half], None]] = {
    "eval, 1 op": _affine([_Step(np.multiply, "scale")]),
    "eval, 2 ops": _affine([_Step(np.multiply, "scale"), _Step(np.add, "shift")]),
    "backward": _backward,
}


def _halves(shape: tuple[int, ...]) -> list[slice]:
    a = shape[0]  # the outer axis of the channels-first (A, K, B) view
    return [slice(0, a // 2), slice(a // 2, a)]


def _worker(conn: Connection, which: int) -> None:
    """A worker process: builds its half of a shape on request and runs programs on it."""
    bnorm.set_num_threads(1)
    cases: dict[tuple[int, ...], Half] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        shape, program, n = msg
        if shape not in cases:
            cases.clear()
            cases[shape] = Half(shape, _halves(shape)[which])
        cases[shape].run(program, n)
        conn.send(True)


class Workers:
    """Two worker processes (spawned: each builds its own half of the data from the same seed)."""

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for which in range(2):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, which), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, shape: tuple[int, ...], program: str, n: int) -> None:
        for c in self.conns:
            c.send((shape, program, n))
        for c in self.conns:
            c.recv()

    def close(self) -> None:
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(timeout=5)


def _timed(f: Callable[[int], None], n: int) -> float:
    settle(partial(f, 1))
    t0 = time.perf_counter()
    f(n)
    return (time.perf_counter() - t0) / n * 1e3


def measure(
    shape: tuple[int, ...], rounds: int, target: float, workers: Workers, torch: Any
) -> dict[str, list[float]]:
    whole = Half(shape, None)
    halves = [Half(shape, s) for s in _halves(shape)]
    pool = ThreadPoolExecutor(1)

    def threads(program: str) -> Callable[[int], None]:
        def f(n: int) -> None:
            fut = pool.submit(halves[1].run, program, n)
            halves[0].run(program, n)
            fut.result()

        return f

    fns: dict[str, Callable[[int], None]] = {}
    if torch is not None:
        t = torch.from_numpy
        x, g = (t(np.ascontiguousarray(v).reshape(shape)) for v in (whole.x3, whole.g3))
        c = shape[1]
        w, b = t(np.ones(c, np.float32)), t(np.zeros(c, np.float32))
        rm, rv = t(np.zeros(c, np.float32)), t(np.ones(c, np.float32))
        aten = torch.ops.aten
        _, sm, si = aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)

        def torch_eval(n: int) -> None:
            for _ in range(n):
                aten.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5)

        def torch_backward(n: int) -> None:
            for _ in range(n):
                aten.native_batch_norm_backward(g, x, w, None, None, sm, si, True, 1e-5, [True, True, True])

        fns["torch eval"] = torch_eval
        fns["torch backward"] = torch_backward
    for program in PROGRAMS:
        fns[f"{program}, 1 thread"] = partial(whole.run, program)
        fns[f"{program}, 2 threads"] = threads(program)
        fns[f"{program}, 2 processes"] = partial(workers.run, shape, program)
    reps = {}
    for name, f in fns.items():
        f(1)
        t0 = time.perf_counter()
        f(1)
        reps[name] = max(1, math.ceil(target / max(time.perf_counter() - t0, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(fns[name], reps[name]))
    pool.shutdown()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="5 rounds of ~5 ms measurements (default 15 of ~20 ms)"
    )
    args = ap.parse_args(argv)
    rounds, target = (5, 0.005) if args.quick else (15, 0.02)
    bnorm.set_num_threads(1)  # the splits below are explicit
    workers = Workers()
    torch = torch_or_none()
    print(
        f"{os.cpu_count()} CPUs; numpy {np.__version__}"
        + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ", no torch")
    )
    print(f"{rounds} interleaved rounds; ms, median [min-max]; float32, channels-first\n")
    medians: dict[str, list[float]] = {}
    try:
        for shape in SHAPES:
            times = measure(shape, rounds, target, workers, torch)
            print(f"{shape!s:>20}")
            for name, ts in times.items():
                med = float(np.median(ts))
                medians.setdefault(name, []).append(med)
                print(f"{name:>26} {med:8.2f} [{min(ts):.2f}-{max(ts):.2f}]")
    finally:
        workers.close()
    print("\n== geometric means over the shapes ==")
    for p in PROGRAMS:
        threads, procs = geomean(medians[f"{p}, 2 threads"]), geomean(medians[f"{p}, 2 processes"])
        line = f"{p:>12}: 2 threads / 2 processes (the GIL's cost) {threads / procs:.2f}"
        ref = "torch " + p.split(",")[0]
        if ref in medians:
            torch_g = geomean(medians[ref])
            line += f"; / {ref}: 2 threads {threads / torch_g:.2f}, 2 processes {procs / torch_g:.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
