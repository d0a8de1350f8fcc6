"""Time per SyncBatchNorm training step (forward + backward) against the number of MPI ranks.

Usage::

    python benchmarks/bench_sync.py                 # launches mpiexec -n 1..4, prints a table
    python benchmarks/bench_sync.py --ranks 1 2 --steps 50 --shape 16 64 16 16
    mpiexec -n 4 python benchmarks/bench_sync.py --worker   # one measurement, JSON on rank 0

Two regimes, both float32, channels-first:

* ``weak``: every rank holds a shard of the given shape (the global batch grows with P);
* ``strong``: the global batch has the given shape and is split over the ranks
  (shard sizes differ by at most one).

A step's time is the slowest rank's forward + backward (a collective step is
as slow as its slowest rank); the table gives the median and the interquartile
range over steps.  ``BatchNorm ms, no comm`` is the median over steps of the
slowest rank's plain (unsynchronized) BatchNorm step on the same shard, all
ranks running at once: the compute share of the step.  ``collective`` is the median time of one
operation like the forward's alone (``allreduce_moments``: the 64-byte header
exchange, its check, and the moments' exchange and merge).  ``sent`` /
``received`` are the bytes per rank per step (forward + backward): each rank
sends ``8 (8 + 1 + 2C) + 8 (8 + 2C)`` bytes and receives P times that; the
activations never travel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _shard(n: int, size: int, rank: int) -> int:
    return n // size + (1 if rank < n % size else 0)


def worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    import bnorm
    from bnorm.distributed import MPIStatsReducer, allgather_rows, allreduce_moments
    from bnorm.functional._moments import Moments

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    n, c, *spatial = args.shape
    local_n = n if args.mode == "weak" else _shard(n, size, rank)
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((local_n, c, *spatial), dtype=np.float32)
    g = rng.standard_normal(x.shape, dtype=np.float32)
    bn = bnorm.SyncBatchNorm(c, comm=comm)
    times = []
    for step in range(args.warmup + args.steps):
        comm.Barrier()
        t0 = time.perf_counter()
        bn(x)
        bn.backward(g)
        t1 = time.perf_counter()
        if step >= args.warmup:
            times.append(t1 - t0)
    # The same step without communication (plain BatchNorm), all ranks at once:
    # what the cores deliver to P concurrent processes.
    plain = bnorm.BatchNorm(c)
    local = []
    comm.Barrier()
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        plain(x)
        plain.backward(g)
        local.append(time.perf_counter() - t0)
    moments = Moments(local_n, np.zeros(c), np.ones(c))
    coll = []
    for _ in range(args.warmup + args.steps):
        comm.Barrier()
        t0 = time.perf_counter()
        allreduce_moments(moments, comm)
        coll.append(time.perf_counter() - t0)
    all_times = allgather_rows(comm, np.array(times)).max(axis=0)  # slowest rank per step
    all_local = allgather_rows(comm, np.array(local[args.warmup :])).max(axis=0)  # slowest rank per step
    all_coll = allgather_rows(comm, np.array(coll[args.warmup :])).max(axis=0)
    if rank == 0:
        fwd, bwd = MPIStatsReducer(comm, c).row_bytes()
        q1, med, q3 = np.percentile(all_times, [25, 50, 75]) * 1e3
        print(
            json.dumps(
                {
                    "ranks": size,
                    "mode": args.mode,
                    "global_n": n * size if args.mode == "weak" else n,
                    "median_ms": med,
                    "q1_ms": q1,
                    "q3_ms": q3,
                    "local_ms": float(np.median(all_local) * 1e3),
                    "collective_us": float(np.median(all_coll) * 1e6),
                    "sent_bytes": (fwd + bwd) if size > 1 else 0,
                    "received_bytes": size * (fwd + bwd) if size > 1 else 0,
                }
            ),
            flush=True,
        )


def launch(args: argparse.Namespace) -> None:
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit('mpiexec not found: pip install "bnorm[mpi]"')
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    shape = " ".join(map(str, args.shape))
    print(
        f"SyncBatchNorm float32, shape {shape} ({args.mode}), {args.steps} steps after {args.warmup} warm-up, "
        f"{os.cpu_count()} cores\n"
    )
    print(
        "| ranks | global N | step ms (median) | IQR ms | BatchNorm ms, no comm | collective us | sent B/rank | received B/rank |"
    )
    print(
        "|------:|---------:|-----------------:|-------:|----------------------:|--------------:|------------:|----------------:|"
    )
    for p in args.ranks:
        cmd = [
            mpiexec,
            "-n",
            str(p),
            sys.executable,
            __file__,
            "--worker",
            "--mode",
            args.mode,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--shape",
            *map(str, args.shape),
        ]
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=args.timeout)
        if res.returncode != 0:
            print(f"| {p} | failed: {res.stderr.strip()[-200:]} |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"| {p} | {r['global_n']} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} | {r['local_ms']:.2f} | "
            f"{r['collective_us']:.0f} | {r['sent_bytes']} | {r['received_bytes']} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help="measure (run under mpiexec)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--mode", choices=["weak", "strong"], default="weak")
    ap.add_argument(
        "--shape", type=int, nargs="+", default=[16, 64, 16, 16], help="N C *S (per rank if weak)"
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
