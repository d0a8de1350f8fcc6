"""Benchmark bnorm's batch norm against PyTorch's CPU kernels, the textbook NumPy and a copy.

Run from the repository root::

    python benchmarks/bench_batchnorm.py            # full suite, ~5 minutes
    python benchmarks/bench_batchnorm.py --quick    # fewer rounds, ~1 minute
    python benchmarks/bench_batchnorm.py --quick --dtype float32 --layout first --json out.json

Implementations, each timed on the same arrays, interleaved round by round:

* ``bnorm``      -- bnorm.functional (``batch_norm_forward`` / ``batch_norm_backward``),
  a new output array per call, as a user calls it;
* ``bnorm(out)`` -- the same writing into a preallocated ``out=`` array;
* ``torch``      -- ``torch.ops.aten.native_batch_norm`` and ``native_batch_norm_backward``
  (PyTorch's native CPU kernels, its default thread count), when torch is importable;
* ``naive``      -- the textbook NumPy formulas (benchmarks/naive.py);
* ``copy``       -- ``np.copyto`` into a preallocated array: the memory-bandwidth floor.

Each measurement runs an implementation enough times back to back to last a few
milliseconds, after running it untimed for 10 ms (so that no implementation is
timed while the previous one's threads still spin); a round measures every
implementation once, in a rotating order; medians and the min-max spread are
over rounds.  Ratios are of medians; the
summary takes geometric means over the shapes.  Peak extra memory (tracemalloc,
the returned arrays included) is reported relative to the input's bytes.
"""

from __future__ import annotations

# ruff: noqa: E402  (the imports below need the sys.path entries above them)
import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing

timing.use_source()

import naive

import bnorm
from bnorm.functional import batch_norm_backward, batch_norm_forward

SHAPES = [(4096, 1024), (64, 128, 1024), (32, 64, 56, 56), (128, 512, 7, 7), (8, 32, 16, 32, 32)]
OPS = ["train", "eval", "backward"]
IMPLS = ["copy", "torch", "bnorm", "bnorm(out)", "naive"]
# Targets: geometric mean over the shapes, float32, channels-first (bnorm time / PyTorch's, and the
# textbook's time / bnorm's); bench_suite.py evaluates the same ones in its Targets table.
TARGETS = {
    ("train", "torch"): 0.9,
    ("eval", "torch"): 2.0,
    ("backward", "torch"): 1.5,
}
NAIVE_SPEEDUP = {"train": 4.0, "eval": 4.0, "backward": 4.0}
MEMORY_SHAPE = (32, 64, 56, 56)
MEMORY_TARGET = 1.1
EPS = 1e-5


class Case:
    """Arrays and callables for one (shape, dtype, layout); the input is N(offset, 1)."""

    def __init__(
        self, shape: tuple[int, ...], dtype: str, layout: str, torch: Any, seed: int = 0, offset: float = 0.0
    ) -> None:
        rng = np.random.default_rng(seed)
        self.shape, self.dtype, self.layout = shape, np.dtype(dtype), layout
        c = shape[1]
        self.axis = 1 if layout == "first" else -1
        logical = shape
        phys = shape if layout == "first" else (shape[0], *shape[2:], c)
        self.x = (rng.standard_normal(phys, dtype=np.float64) + offset).astype(self.dtype)
        self.g = rng.standard_normal(phys, dtype=np.float64).astype(self.dtype)
        self.w = rng.uniform(0.5, 1.5, c).astype(self.dtype)
        self.b = rng.uniform(-0.5, 0.5, c).astype(self.dtype)
        self.rm = rng.uniform(-0.1, 0.1, c).astype(self.dtype)
        self.rv = rng.uniform(0.9, 1.1, c).astype(self.dtype)
        self.buf = np.empty_like(self.x)
        self.buf2 = np.empty_like(self.x)
        _, self.ctx = batch_norm_forward(self.x, None, None, self.w, self.b, training=True, axis=self.axis)
        _, self.naive_cache = naive.forward_train(self.x, self.w, self.b, EPS, self.axis)
        self.torch = torch
        if torch is not None:
            t = torch.from_numpy
            perm = None if layout == "first" else (0, len(shape) - 1, *range(1, len(shape) - 1))
            self.tx = t(self.x) if perm is None else t(self.x).permute(*perm)
            self.tg = t(self.g) if perm is None else t(self.g).permute(*perm)
            assert tuple(self.tx.shape) == logical
            self.tw, self.tb = t(self.w), t(self.b)
            self.trm, self.trv = t(self.rm.copy()), t(self.rv.copy())
            _, self.tsm, self.tsi = torch.ops.aten.native_batch_norm(
                self.tx, self.tw, self.tb, self.trm, self.trv, True, 0.1, EPS
            )

    def fn(self, op: str, impl: str) -> Callable[[], Any] | None:
        x, g, w, b, ax = self.x, self.g, self.w, self.b, self.axis
        rm, rv = self.rm.copy(), self.rv.copy()
        if impl == "copy":
            return lambda: np.copyto(self.buf, x)
        if impl == "bnorm":
            if op == "train":
                return lambda: batch_norm_forward(x, rm, rv, w, b, training=True, axis=ax)
            if op == "eval":
                return lambda: batch_norm_forward(x, self.rm, self.rv, w, b, training=False, axis=ax)
            return lambda: batch_norm_backward(g, self.ctx)
        if impl == "bnorm(out)":
            if op == "train":
                return lambda: batch_norm_forward(x, rm, rv, w, b, training=True, axis=ax, out=self.buf2)
            if op == "eval":
                return lambda: batch_norm_forward(
                    x, self.rm, self.rv, w, b, training=False, axis=ax, out=self.buf2
                )
            return lambda: batch_norm_backward(g, self.ctx, out=self.buf2)
        if impl == "naive":
            if op == "train":
                return lambda: naive.forward_train(x, w, b, EPS, ax)
            if op == "eval":
                return lambda: naive.forward_eval(x, w, b, self.rm, self.rv, EPS, ax)
            return lambda: naive.backward(g, self.naive_cache)
        if impl == "torch":
            torch = self.torch
            if torch is None:
                return None
            aten = torch.ops.aten
            tx, tg, tw, tb = self.tx, self.tg, self.tw, self.tb
            trm, trv = self.trm, self.trv
            if op == "train":
                return lambda: aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, EPS)
            if op == "eval":
                return lambda: aten.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, EPS)
            sm, si = self.tsm, self.tsi
            return lambda: aten.native_batch_norm_backward(
                tg, tx, tw, trm, trv, sm, si, True, EPS, [True, True, True]
            )
        raise ValueError(impl)


def time_op(case: Case, op: str, impls: list[str], rounds: int, target: float) -> dict[str, dict[str, Any]]:
    """Interleaved timing of `impls` on one case and operation (:func:`timing.interleave`)."""
    fns = {i: case.fn(op, i) for i in impls}
    return timing.interleave({i: f for i, f in fns.items() if f is not None}, rounds, target)


def peak_memory(case: Case, op: str) -> float:
    """Peak extra bytes (tracemalloc) of one bnorm call, returned arrays included, / input bytes."""
    f = case.fn(op, "bnorm")
    assert f is not None
    return timing.peak_bytes(f) / case.x.nbytes


def _fmt(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    return f"{r['median_ms']:8.2f} [{r['min_ms']:.2f}-{r['max_ms']:.2f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="7 rounds of ~5 ms measurements (default 21 of ~20 ms)"
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds per operation")
    p.add_argument("--json", metavar="PATH", help="write all measurements as JSON to PATH")
    p.add_argument("--shape", action="append", help="only these shapes, e.g. 32,64,56,56 (repeatable)")
    p.add_argument("--dtype", action="append", choices=["float32", "float64"], help="default: both")
    p.add_argument(
        "--layout", action="append", choices=["first", "last"], help="channels-first/last; default both"
    )
    p.add_argument("--op", action="append", choices=OPS, help="default: all")
    p.add_argument("--impl", action="append", choices=IMPLS, help="default: all available")
    p.add_argument(
        "--threads", type=int, default=None, help="threads for bnorm and torch (default: their defaults)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the tracemalloc peak-memory measurements")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown to PATH (for the docs)")
    p.add_argument(
        "--from-json", metavar="PATH", help="no timing: only print/convert the results of a --json file"
    )
    args = p.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        text = markdown(data)
        if args.markdown:
            Path(args.markdown).write_text(text)
        else:
            print(text)
        return 0

    torch = timing.torch_or_none()
    if args.threads:
        bnorm.set_num_threads(args.threads)
        if torch is not None:
            torch.set_num_threads(args.threads)
    shapes = [tuple(int(s) for s in sh.split(",")) for sh in args.shape] if args.shape else SHAPES
    dtypes = args.dtype or ["float32", "float64"]
    layouts = args.layout or ["first", "last"]
    ops = args.op or OPS
    impls = args.impl or IMPLS
    if torch is None:
        impls = [i for i in impls if i != "torch"]
    rounds = args.rounds or (7 if args.quick else 21)
    target = 0.005 if args.quick else 0.02

    machine = timing.machine(torch)
    print(
        f"bnorm benchmark -- {machine.get('cpu', machine['processor'])}, {machine['cpu_count']} CPUs; "
        f"numpy {machine['numpy']}, torch {machine['torch']} ({machine['torch_threads']} threads), "
        f"bnorm threads {machine['bnorm_threads']}; load average {machine.get('loadavg_start')}"
    )
    print(f"{rounds} interleaved rounds; times in ms: median [min-max]\n")

    results: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    for dtype in dtypes:
        for layout in layouts:
            cases = {}
            for op in ops:
                print(f"== {op}  {dtype}  channels-{layout} ==")
                head = f"{'shape':>20} " + " ".join(f"{i:>26}" for i in impls)
                ratio_cols = []
                if "torch" in impls and "bnorm" in impls:
                    ratio_cols.append("bnorm/torch")
                if "naive" in impls and "bnorm" in impls:
                    ratio_cols.append("naive/bnorm")
                if "copy" in impls and "bnorm" in impls:
                    ratio_cols.append("bnorm/copy")
                print(head + "".join(f"{c:>13}" for c in ratio_cols))
                for shape in shapes:
                    key = shape
                    if key not in cases:
                        cases[key] = Case(shape, dtype, layout, torch)
                    res = time_op(cases[key], op, impls, rounds, target)
                    ratios = {}
                    if "bnorm/torch" in ratio_cols and "torch" in res:
                        ratios["bnorm/torch"] = res["bnorm"]["median_ms"] / res["torch"]["median_ms"]
                    if "naive/bnorm" in ratio_cols:
                        ratios["naive/bnorm"] = res["naive"]["median_ms"] / res["bnorm"]["median_ms"]
                    if "bnorm/copy" in ratio_cols:
                        ratios["bnorm/copy"] = res["bnorm"]["median_ms"] / res["copy"]["median_ms"]
                    results.append(
                        {
                            "shape": list(shape),
                            "dtype": dtype,
                            "layout": layout,
                            "op": op,
                            "results": res,
                            "ratios": ratios,
                        }
                    )
                    print(
                        f"{shape!s:>20} "
                        + " ".join(f"{_fmt(res.get(i)):>26}" for i in impls)
                        + "".join(f"{ratios.get(c, float('nan')):13.2f}" for c in ratio_cols),
                        flush=True,
                    )
                print()
            if not args.no_memory and "bnorm" in impls:
                for shape, case in cases.items():
                    for op in ("train", "backward"):
                        if op in ops:
                            memory.append(
                                {
                                    "shape": list(shape),
                                    "dtype": dtype,
                                    "layout": layout,
                                    "op": op,
                                    "peak_over_input": peak_memory(case, op),
                                }
                            )
            del cases

    # ---- summary
    print("== summary: geometric means over the shapes (ratio of medians) ==")
    summary: list[dict[str, Any]] = []
    print(
        f"{'dtype':>8} {'layout':>7} {'op':>9} {'bnorm/torch':>12} {'naive/bnorm':>12} "
        f"{'bnorm/copy':>11}  targets"
    )
    for dtype in dtypes:
        for layout in layouts:
            for op in ops:
                rows = [r for r in results if r["dtype"] == dtype and r["layout"] == layout and r["op"] == op]
                gm = {
                    k: timing.geomean([r["ratios"][k] for r in rows if k in r["ratios"]])
                    for k in ("bnorm/torch", "naive/bnorm", "bnorm/copy")
                }
                notes = []
                if dtype == "float32" and layout == "first" and len(rows) == len(SHAPES):
                    t = TARGETS.get((op, "torch"))
                    if t is not None and "torch" in impls:
                        ok = gm["bnorm/torch"] <= t
                        notes.append(f"bnorm/torch <= {t}: {'met' if ok else 'MISSED'}")
                    s = NAIVE_SPEEDUP.get(op)
                    if s is not None and "naive" in impls:
                        ok = gm["naive/bnorm"] >= s
                        notes.append(f"naive/bnorm >= {s}: {'met' if ok else 'MISSED'}")
                summary.append({"dtype": dtype, "layout": layout, "op": op, "geomean": gm, "targets": notes})
                print(
                    f"{dtype:>8} {layout:>7} {op:>9} {gm['bnorm/torch']:12.2f} {gm['naive/bnorm']:12.2f} "
                    f"{gm['bnorm/copy']:11.2f}  {'; '.join(notes)}"
                )
    if memory:
        print("\n== peak extra memory of one bnorm call (tracemalloc, output included) / input bytes ==")
        for m in memory:
            note = ""
            if tuple(m["shape"]) == MEMORY_SHAPE and m["dtype"] == "float32" and m["layout"] == "first":
                ok = m["peak_over_input"] <= MEMORY_TARGET
                note = f"  target <= {MEMORY_TARGET}: {'met' if ok else 'MISSED'}"
            print(
                f"{tuple(m['shape'])!s:>20} {m['dtype']:>8} {m['layout']:>6} {m['op']:>9} "
                f"{m['peak_over_input']:6.3f}{note}"
            )
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = os.getloadavg()
        print(f"\nload average at the end: {machine['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "rounds": rounds,
                    "results": results,
                    "summary": summary,
                    "memory": memory,
                },
                indent=1,
            )
        )
        print(f"wrote {args.json}")
    if args.markdown:
        data = {
            "machine": machine,
            "rounds": rounds,
            "results": results,
            "summary": summary,
            "memory": memory,
        }
        Path(args.markdown).write_text(markdown(data))
        print(f"wrote {args.markdown}")
    return 0


def markdown(data: dict[str, Any]) -> str:
    """The summary, the per-shape tables and the memory peaks as Markdown."""
    m = data["machine"]
    out = [
        f"Machine: {m.get('cpu', m.get('processor'))}, {m.get('cpu_count')} CPUs; Python {m.get('python')}, "
        f"NumPy {m.get('numpy')}, PyTorch {m.get('torch')} ({m.get('torch_threads')} threads), "
        f"bnorm threads {m.get('bnorm_threads')}; load average {m.get('loadavg_start')} at the start, "
        f"{m.get('loadavg_end')} at the end; {data['rounds']} rounds.",
        "",
        "Geometric means over the five shapes (ratios of medians):",
        "",
        "| dtype | layout | op | bnorm/torch | naive/bnorm | bnorm/copy | targets |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["summary"]:
        g = r["geomean"]
        out.append(
            f"| {r['dtype']} | {r['layout']} | {r['op']} | {g['bnorm/torch']:.2f} | {g['naive/bnorm']:.2f} | "
            f"{g['bnorm/copy']:.2f} | {'; '.join(r['targets'])} |"
        )
    impls = [i for i in IMPLS if any(i in r["results"] for r in data["results"])]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in data["results"]:
        groups.setdefault((r["dtype"], r["layout"], r["op"]), []).append(r)
    for (dtype, layout, op), rows in groups.items():
        out += ["", f"**{op}, {dtype}, channels-{layout}** -- ms, median [min-max]", ""]
        out.append("| shape | " + " | ".join(impls) + " | bnorm/torch | naive/bnorm |")
        out.append("|---" * (len(impls) + 3) + "|")
        for r in rows:
            cells = []
            for i in impls:
                t = r["results"].get(i)
                cells.append(
                    "-" if t is None else f"{t['median_ms']:.2f} [{t['min_ms']:.2f}-{t['max_ms']:.2f}]"
                )
            bt = r["ratios"].get("bnorm/torch", float("nan"))
            nb = r["ratios"].get("naive/bnorm", float("nan"))
            out.append(f"| {tuple(r['shape'])} | " + " | ".join(cells) + f" | {bt:.2f} | {nb:.2f} |")
    if data.get("memory"):
        out += ["", "Peak extra memory of one bnorm call / input bytes (tracemalloc, output included):", ""]
        out += ["| shape | dtype | layout | op | peak / input |", "|---|---|---|---|---|"]
        for mm in data["memory"]:
            shape, peak = tuple(mm["shape"]), mm["peak_over_input"]
            out.append(f"| {shape} | {mm['dtype']} | {mm['layout']} | {mm['op']} | {peak:.3f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
