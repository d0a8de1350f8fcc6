"""The benchmark suite: every normalization, every size, against PyTorch and the textbook NumPy.

Run from the repository root (PyTorch is optional; without it the torch columns
are left out)::

    python benchmarks/bench_suite.py --quick                  # ~1-2 minutes
    python benchmarks/bench_suite.py                          # the full run, under ~10 minutes
    python benchmarks/bench_suite.py --quick --ops layer_norm,group_norm --sizes large
    python benchmarks/bench_suite.py --json out.json --markdown out.md
    python benchmarks/bench_suite.py --from-json out.json     # the tables again, no timing

``PYTHONPATH=/other/checkout/src python benchmarks/bench_suite.py`` times that
checkout's bnorm (the JSON records its path and git commit).

What it times, float32 (sections are the ``--ops`` names; sizes the ``--sizes``):

* ``batch_norm`` -- ``batch_norm_forward`` (training with the running-stat
  update, and evaluation) and ``batch_norm_backward`` on a (4, 8) call
  (``tiny``), six small shapes (the demo's (60, 100) first) and the five large
  shapes of bench_batchnorm.py, against ``torch.ops.aten.native_batch_norm`` /
  ``native_batch_norm_backward`` and the textbook five lines (benchmarks/naive.py);
  on large shapes also into ``out=`` (the fresh-output cost) and a plain copy
  (the bandwidth floor); and the backward on data offset by +10;
* ``modules`` -- ``bnorm.BatchNorm1d/2d`` forward + backward against
  ``torch.nn.BatchNorm1d/2d`` forward + backward with autograd;
* ``layer_norm``, ``group_norm``, ``instance_norm``, ``rms_norm`` -- forward, and
  forward + backward (a training step: bnorm's backward from its context,
  PyTorch's autograd, the textbook backward from the x_hat its forward kept),
  on transformer and CNN shapes and small ones; ``rms_norm`` when
  ``bnorm.functional.rms_norm_forward`` exists;
* ``demo`` -- one SGD step of the demo's MLP and CNN (``bnorm.demo``), with and
  without batch norm, batch 60, BLAS on one thread as the demo trains;
* ``busy`` -- bnorm with its default thread count and with
  ``set_num_threads(1)`` (and PyTorch), first on the machine as it is, then
  with competing CPU-bound processes that the suite starts and stops.

Timing: benchmarks/timing.py (calibrated back-to-back calls, settling, rounds
that interleave every contender of a row in a rotating order; median and
min-max over rounds).  Ratios are of medians; the Targets table
(benchmarks/suite_report.py, which also writes the tables) takes geometric
means over its rows, with the spread of the per-round geometric means.  Peak
extra memory (tracemalloc, output included) is one call per shape.
"""

from __future__ import annotations

# ruff: noqa: E402  (the imports below need the sys.path entries above them)
import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing

timing.use_source()

import bench_batchnorm
import naive
from suite_report import evaluate_targets, markdown

import bnorm
from bnorm import functional as F
from bnorm.functional._kernels.pool import reset_contention

SCHEMA = "bnorm-bench-suite/1"
EPS = 1e-5
DTYPE = np.float32
OFFSET = 10.0

#: section -> size -> shapes; group norm's entries are (shape, groups).
SHAPES: dict[str, dict[str, list[Any]]] = {
    "batch_norm": {
        "tiny": [(4, 8)],
        "small": [(60, 100), (32, 256), (256, 512), (32, 64, 8, 8), (16, 32, 16, 16), (128, 10)],
        "large": list(bench_batchnorm.SHAPES),
    },
    "batch_norm_offset": {"large": [(8, 32, 16, 32, 32), (32, 64, 56, 56)]},
    "layer_norm": {
        "small": [(60, 100), (32, 256), (8, 16, 64)],
        "large": [(8, 128, 768), (16, 197, 384), (4, 512, 1024), (32, 50, 512), (2048, 128)],
    },
    "group_norm": {
        "small": [((16, 32, 8, 8), 8)],
        "large": [((8, 64, 32, 32), 32), ((16, 128, 16, 16), 8), ((4, 256, 28, 28), 32)],
    },
    "instance_norm": {"small": [(16, 32, 8, 8)], "large": [(8, 3, 128, 128), (4, 64, 64, 64)]},
    "busy": {"large": [(32, 64, 56, 56), (8, 128, 768), ((16, 128, 16, 16), 8)]},
}
SHAPES["modules"] = {"small": SHAPES["batch_norm"]["small"]}
SHAPES["rms_norm"] = SHAPES["layer_norm"]

#: One tiny shape per section and size: ``--smoke`` (and tests/test_benchmarks.py) run these.
SMOKE_SHAPES: dict[str, dict[str, list[Any]]] = {
    "batch_norm": {"tiny": [(4, 8)], "small": [(6, 4)], "large": [(8, 4, 3, 3)]},
    "batch_norm_offset": {"large": [(8, 4, 3, 3)]},
    "modules": {"small": [(6, 4), (4, 3, 2, 2)]},
    "layer_norm": {"small": [(4, 16)], "large": [(2, 3, 16)]},
    "group_norm": {"small": [((2, 8, 2, 2), 4)], "large": [((2, 4, 3, 3), 2)]},
    "instance_norm": {"small": [(2, 3, 4, 4)], "large": [(2, 4, 3, 3)]},
    "busy": {"large": [(8, 4, 3, 3), (2, 3, 16), ((2, 4, 3, 3), 2)]},
}
SMOKE_SHAPES["rms_norm"] = SMOKE_SHAPES["layer_norm"]

SECTIONS = [
    "batch_norm",
    "modules",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "rms_norm",
    "demo",
    "busy",
]
SIZES = ["tiny", "small", "large"]
ROWWISE = ["layer_norm", "group_norm", "instance_norm", "rms_norm"]


@dataclass
class Row:
    """One line of a table: the contenders timed against each other on one problem."""

    section: str
    op: str
    size: str
    shape: tuple[int, ...]
    fns: dict[str, Callable[[], Any]]
    params: dict[str, Any] = field(default_factory=dict)
    setups: dict[str, Callable[[], Any]] = field(default_factory=dict)
    condition: str = "quiet"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _data(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, 1) and an upstream gradient g ~ N(0, 1), float32."""
    rng = _rng(seed)
    return (
        rng.standard_normal(shape, dtype=np.float64).astype(DTYPE),
        rng.standard_normal(shape, dtype=np.float64).astype(DTYPE),
    )


def _params(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A non-trivial gamma and beta of length n."""
    rng = _rng(seed)
    return rng.uniform(0.5, 1.5, n).astype(DTYPE), rng.uniform(-0.5, 0.5, n).astype(DTYPE)


# ---- batch norm (functional): bench_batchnorm.Case supplies every contender
_BN_IMPLS = {
    "bnorm": "bnorm",
    "bnorm(out)": "bnorm(out)",
    "torch": "torch",
    "textbook": "naive",
    "copy": "copy",
}


def _bn_case_rows(
    case: bench_batchnorm.Case,
    ops: list[str],
    size: str,
    contenders: list[str],
    section: str,
    label: str = "",
) -> Iterator[Row]:
    for op in ops:
        fns = {c: case.fn(op, _BN_IMPLS[c]) for c in contenders}
        yield Row(section, op + label, size, case.shape, {c: f for c, f in fns.items() if f is not None})


def batch_norm_rows(shapes: dict[str, list[Any]], offset_shapes: list[Any], torch: Any) -> Iterator[Row]:
    """Training and evaluation forward and backward; the backward on offset data."""
    for size in SIZES:
        for shape in shapes.get(size, []):
            case = bench_batchnorm.Case(shape, "float32", "first", torch)
            contenders = ["bnorm", "torch", "textbook"]
            if size == "large":
                contenders = ["bnorm", "bnorm(out)", "torch", "textbook", "copy"]
            yield from _bn_case_rows(case, ["train", "eval", "backward"], size, contenders, "batch_norm")
    for shape in offset_shapes:
        case = bench_batchnorm.Case(shape, "float32", "first", torch, offset=OFFSET)
        yield from _bn_case_rows(
            case,
            ["backward"],
            "large",
            ["bnorm", "bnorm(out)", "torch", "textbook"],
            "batch_norm",
            f", x{OFFSET:+g}",
        )


def batch_norm_memory(shapes: list[Any]) -> Iterator[dict[str, Any]]:
    """Peak extra memory of one training forward and one backward, / input bytes."""
    for shape in shapes:
        case = bench_batchnorm.Case(shape, "float32", "first", None)
        for op in ("train", "backward"):
            yield _memory_entry("batch_norm", op, shape, bench_batchnorm.peak_memory(case, op))


def _memory_entry(section: str, op: str, shape: tuple[int, ...], peak: float) -> dict[str, Any]:
    return {"section": section, "op": op, "shape": list(shape), "dtype": "float32", "peak_over_input": peak}


# ---- modules
def module_rows(shapes: list[Any], torch: Any) -> Iterator[Row]:
    """``bnorm.BatchNorm1d/2d`` forward + backward vs ``torch.nn.BatchNorm1d/2d`` with autograd."""
    for shape in shapes:
        x, g = _data(shape)
        c = shape[1]
        cls = bnorm.BatchNorm1d if len(shape) in (2, 3) else bnorm.BatchNorm2d
        layer = cls(c)

        def bnorm_step(layer: Any = layer, x: np.ndarray = x, g: np.ndarray = g) -> Any:
            layer.forward(x)
            return layer.backward(g)

        fns: dict[str, Callable[[], Any]] = {"bnorm": bnorm_step}
        if torch is not None:
            tcls = torch.nn.BatchNorm1d if len(shape) in (2, 3) else torch.nn.BatchNorm2d
            tlayer = tcls(c)
            tx = torch.from_numpy(x.copy()).requires_grad_()
            tg = torch.from_numpy(g)

            def torch_step(tlayer: Any = tlayer, tx: Any = tx, tg: Any = tg) -> None:
                tx.grad = tlayer.weight.grad = tlayer.bias.grad = None  # as optimizer.zero_grad() does
                tlayer(tx).backward(tg)

            fns["torch"] = torch_step
        yield Row("modules", "forward+backward", "small", shape, fns, {"module": cls.__name__})


# ---- the row-wise norms
@dataclass
class RowwiseOp:
    """How to call one row-wise norm in bnorm, PyTorch and the textbook."""

    name: str
    forward: Callable[..., Any]
    backward: Callable[..., Any]
    textbook_forward: Callable[..., Any]
    textbook_backward: Callable[..., Any]
    torch_forward: Callable[..., Any] | None  # (torch, tx, tw, tb, spec) -> output


def _eps_kwargs(f: Callable[..., Any]) -> dict[str, float]:
    try:
        return {"eps": EPS} if "eps" in inspect.signature(f).parameters else {}
    except (TypeError, ValueError):
        return {}


def _rowwise_ops() -> tuple[dict[str, RowwiseOp], dict[str, str]]:
    """The row-wise norms this bnorm has, and why any of them is skipped."""
    skipped: dict[str, str] = {}
    ops = {
        "layer_norm": RowwiseOp(
            "layer_norm",
            lambda x, w, b, spec: F.layer_norm_forward(x, x.shape[-1:], w, b, EPS),
            F.layer_norm_backward,
            lambda x, w, b, spec: naive.layer_norm_forward(x, w, b, EPS),
            naive.layer_norm_backward,
            lambda torch, tx, tw, tb, spec: torch.nn.functional.layer_norm(tx, tx.shape[-1:], tw, tb, EPS),
        ),
        "group_norm": RowwiseOp(
            "group_norm",
            lambda x, w, b, spec: F.group_norm_forward(x, spec, w, b, EPS),
            F.group_norm_backward,
            lambda x, w, b, spec: naive.group_norm_forward(x, spec, w, b, EPS),
            naive.group_norm_backward,
            lambda torch, tx, tw, tb, spec: torch.nn.functional.group_norm(tx, spec, tw, tb, EPS),
        ),
        "instance_norm": RowwiseOp(
            "instance_norm",
            lambda x, w, b, spec: F.instance_norm_forward(x, None, None, w, b, eps=EPS),
            F.instance_norm_backward,
            lambda x, w, b, spec: naive.instance_norm_forward(x, w, b, EPS),
            naive.instance_norm_backward,
            lambda torch, tx, tw, tb, spec: torch.nn.functional.instance_norm(
                tx, weight=tw, bias=tb, eps=EPS
            ),
        ),
    }
    rms_forward = getattr(F, "rms_norm_forward", None)
    rms_backward = getattr(F, "rms_norm_backward", None)
    if rms_forward is None or rms_backward is None:
        skipped["rms_norm"] = (
            "rms_norm: skipped, bnorm.functional.rms_norm_forward does not exist in this bnorm"
        )
        return ops, skipped
    kw = _eps_kwargs(rms_forward)
    try:  # called as torch.nn.functional.rms_norm is: (input, normalized_shape, weight, eps)
        probe = np.ones((2, 4), DTYPE)
        rms_backward(probe, rms_forward(probe, (4,), np.ones(4, DTYPE), **kw)[1])
    except TypeError as exc:
        skipped["rms_norm"] = f"rms_norm: skipped, rms_norm_forward(x, (M,), weight) failed: {exc}"
        return ops, skipped
    ops["rms_norm"] = RowwiseOp(
        "rms_norm",
        lambda x, w, b, spec: rms_forward(x, x.shape[-1:], w, **kw),
        rms_backward,
        lambda x, w, b, spec: naive.rms_norm_forward(x, w, EPS),
        naive.rms_norm_backward,
        lambda torch, tx, tw, tb, spec: torch.nn.functional.rms_norm(tx, tx.shape[-1:], tw, EPS),
    )
    return ops, skipped


def _rowwise_problem(section: str, entry: Any) -> tuple[tuple[int, ...], Any, int, dict[str, Any]]:
    """(shape, spec passed to the op, length of gamma, row params) of a SHAPES entry."""
    if section == "group_norm":
        shape, groups = entry
        return tuple(shape), groups, shape[1], {"groups": groups}
    shape = tuple(entry)
    if section == "instance_norm":
        return shape, None, shape[1], {}
    return shape, None, shape[-1], {}


def rowwise_rows(section: str, shapes: dict[str, list[Any]], torch: Any, op: RowwiseOp) -> Iterator[Row]:
    """Forward, and forward + backward, of one row-wise norm."""
    for size in SIZES:
        for entry in shapes.get(size, []):
            shape, spec, n, params = _rowwise_problem(section, entry)
            yield from _rowwise_case(section, size, shape, spec, n, params, torch, op)


def _rowwise_case(
    section: str,
    size: str,
    shape: tuple[int, ...],
    spec: Any,
    n: int,
    params: dict[str, Any],
    torch: Any,
    op: RowwiseOp,
    contenders: tuple[str, ...] = ("bnorm", "torch", "textbook"),
) -> Iterator[Row]:
    x, g = _data(shape)
    w, b = _params(n)
    forward = partial(op.forward, x, w, b, spec)
    textbook_forward = partial(op.textbook_forward, x, w, b, spec)
    fwd: dict[str, Callable[[], Any]] = {"bnorm": forward, "textbook": textbook_forward}
    step: dict[str, Callable[[], Any]] = {
        "bnorm": lambda: op.backward(g, forward()[1]),
        "textbook": lambda: op.textbook_backward(g, textbook_forward()[1]),
    }
    if torch is not None and op.torch_forward is not None:
        t = torch.from_numpy
        tx, tw, tb = t(x), t(w), t(b)
        fwd["torch"] = partial(op.torch_forward, torch, tx, tw, tb, spec)
        gx = t(x.copy()).requires_grad_()
        gw, gb = t(w.copy()).requires_grad_(), t(b.copy()).requires_grad_()
        tg = t(g)

        def torch_step() -> None:
            gx.grad = gw.grad = gb.grad = None  # as optimizer.zero_grad() does
            op.torch_forward(torch, gx, gw, gb, spec).backward(tg)

        step["torch"] = torch_step
    for name, fns in (("forward", fwd), ("forward+backward", step)):
        yield Row(section, name, size, shape, {c: fns[c] for c in contenders if c in fns}, params)


def rowwise_memory(section: str, shapes: list[Any], op: RowwiseOp) -> Iterator[dict[str, Any]]:
    """Peak extra memory of one forward and one backward, / input bytes."""
    for entry in shapes:
        shape, spec, n, _ = _rowwise_problem(section, entry)
        x, g = _data(shape)
        w, b = _params(n)
        forward = partial(op.forward, x, w, b, spec)
        backward = partial(op.backward, g, forward()[1])
        yield _memory_entry(section, "forward", shape, timing.peak_bytes(forward) / x.nbytes)
        yield _memory_entry(section, "backward", shape, timing.peak_bytes(backward) / x.nbytes)


# ---- the demo's training step
def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """BLAS on one thread, as the demo trains (when threadpoolctl is there)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    limiter: contextlib.AbstractContextManager[Any] = threadpool_limits(limits=1, user_api="blas")
    return limiter


def demo_rows(batch_size: int = 60) -> Iterator[Row]:
    """One SGD step (forward, loss, backward, update) of the demo's MLP and CNN, with and without BN."""
    from bnorm.demo import build_cnn, build_mlp
    from bnorm.demo.nn import SGD, softmax_cross_entropy

    rng = _rng(0)
    labels = rng.integers(0, 10, batch_size)
    for model, shape in (("mlp", (batch_size, 64)), ("cnn", (batch_size, 1, 8, 8))):
        x = rng.uniform(-1, 1, shape).astype(DTYPE)
        fns = {}
        for variant, with_bn in (("with BN", True), ("without BN", False)):
            if model == "mlp":
                net, _ = build_mlp(64, batch_norm=with_bn)
            else:
                net, _ = build_cnn((8, 8), batch_norm=with_bn)
            # A small learning rate: the step costs the same, and thousands of steps on one batch stay finite.
            opt = SGD(net, lr=1e-3)

            def step(net: Any = net, opt: Any = opt, x: np.ndarray = x) -> None:
                _, dlogits = softmax_cross_entropy(net.forward(x), labels)
                net.backward(dlogits)
                opt.step()

            fns[variant] = step
        yield Row("demo", "SGD step", "small", shape, fns, {"model": model})


# ---- a busy machine
class Spinners:
    """Competing CPU-bound processes (``while True: pass``), started and stopped by the suite."""

    def __init__(self, count: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
        time.sleep(0.2)  # let them start spinning

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def busy_rows(entries: list[Any], torch: Any, condition: str, default_threads: int) -> Iterator[Row]:
    """The same problems with bnorm on its default threads and on one (and PyTorch)."""
    setups = {
        "bnorm": partial(bnorm.set_num_threads, default_threads),
        "bnorm 1 thread": partial(bnorm.set_num_threads, 1),
    }
    ops, _ = _rowwise_ops()
    for entry in entries:
        if isinstance(entry[0], tuple):  # (shape, groups): group norm
            shape, spec, n, params = _rowwise_problem("group_norm", entry)
            rows = list(
                _rowwise_case("group_norm", "large", shape, spec, n, params, torch, ops["group_norm"])
            )
            found = [(f"group_norm {r.op}", r.fns) for r in rows]
        elif len(entry) == 3:  # a transformer shape: layer norm
            shape, spec, n, params = _rowwise_problem("layer_norm", entry)
            rows = list(
                _rowwise_case("layer_norm", "large", shape, spec, n, params, torch, ops["layer_norm"])
            )
            found = [(f"layer_norm {r.op}", r.fns) for r in rows]
        else:
            shape, params = tuple(entry), {}
            case = bench_batchnorm.Case(shape, "float32", "first", torch)
            found = [
                (f"batch_norm {op}", {"bnorm": case.fn(op, "bnorm"), "torch": case.fn(op, "torch")})
                for op in ("train", "backward")
            ]
        for op, fns in found:
            contenders: dict[str, Callable[[], Any]] = {"bnorm": fns["bnorm"], "bnorm 1 thread": fns["bnorm"]}
            if fns.get("torch") is not None:
                contenders["torch"] = fns["torch"]
            yield Row("busy", op, "large", shape, contenders, dict(params), setups, condition)


# ---- running
def ratio_pairs(row: dict[str, Any]) -> list[tuple[str, str]]:
    """The (numerator, denominator) contenders whose time ratio a row reports."""
    res = row["results"]
    pairs = []
    if row["section"] == "busy":
        pairs.append(("bnorm", "bnorm 1 thread"))
    if row["section"] == "demo":
        pairs.append(("with BN", "without BN"))
    for other in ("torch", "textbook", "bnorm(out)", "copy"):
        pairs.append(("bnorm", other))
    return [(a, b) for a, b in pairs if a in res and b in res]


def _ratios(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for a, b in ratio_pairs(row):
        ra, rb = row["results"][a], row["results"][b]
        per_round = [x / y for x, y in zip(ra["times_ms"], rb["times_ms"], strict=False) if y > 0]
        out[f"{a}/{b}"] = {
            "median": ra["median_ms"] / rb["median_ms"],
            "min": min(per_round, default=float("nan")),
            "max": max(per_round, default=float("nan")),
            "per_round": [float(f"{v:.5g}") for v in per_round],
        }
    return out


_last_condition: str | None = None


def run_row(row: Row, rounds: int, target: float, settle: float, reps: int | None = None) -> dict[str, Any]:
    """Time one row; its JSON record."""
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    # When the condition changes (quiet <-> competing processes) the pool's contention
    # state is cleared, so a quiet row never runs in the one-thread backoff a busy row
    # left behind, and the first busy row starts as a loop that just met the load.
    global _last_condition
    if row.condition != _last_condition:
        reset_contention()
        _last_condition = row.condition
    results = timing.interleave(row.fns, rounds, target, setups=row.setups, settle_seconds=settle, reps=reps)
    record = {
        "section": row.section,
        "op": row.op,
        "size": row.size,
        "shape": list(row.shape),
        "dtype": "float32",
        "params": row.params,
        "condition": row.condition,
        "loadavg_1min": load,
        "results": results,
    }
    record["ratios"] = _ratios(record)
    return record


def _progress(record: dict[str, Any]) -> None:
    cells = [f"{c} {timing.fmt_stats(r)}" for c, r in record["results"].items()]
    ratios = [f"{k} {v['median']:.2f}" for k, v in record["ratios"].items()]
    label = f"{record['section']} {record['op']} {tuple(record['shape'])}"
    if record["condition"] != "quiet":
        label += f" [{record['condition']}]"
    print(f"  {label}: " + "; ".join(cells) + ("  | " + ", ".join(ratios) if ratios else ""), flush=True)


def run(
    sections: list[str],
    sizes: list[str],
    *,
    rounds: int,
    target: float,
    settle: float = timing.SETTLE,
    shapes: dict[str, dict[str, list[Any]]] | None = None,
    memory: bool = True,
    busy_procs: int = 1,
    quiet: bool = False,
    reps: int | None = None,
) -> dict[str, Any]:
    """Run the chosen sections and sizes; the whole JSON document (targets included).

    `reps` fixes the calls per measurement (``--smoke``: 1) instead of calibrating them.
    """
    shapes = SHAPES if shapes is None else shapes
    torch = timing.torch_or_none()
    info = timing.machine(torch)
    records: list[dict[str, Any]] = []
    mem: list[dict[str, Any]] = []
    notes: list[str] = []
    busy_info: dict[str, Any] = {}
    emit = (lambda r: None) if quiet else _progress

    def pick(section: str) -> dict[str, list[Any]]:
        return {s: v for s, v in shapes.get(section, {}).items() if s in sizes}

    errors: list[str] = []

    def failed(where: str, exc: Exception) -> None:
        # A bnorm under development may raise: record it, say so, and go on with the next rows.
        errors.append(f"{where}: {type(exc).__name__}: {exc}")
        if not quiet:
            print(f"  ERROR {errors[-1]}", flush=True)

    def go(rows: Iterator[Row]) -> None:
        try:
            for row in rows:
                try:
                    rec = run_row(row, rounds, target, settle, reps)
                except Exception as exc:
                    failed(f"{row.section} {row.op} {row.shape}", exc)
                    continue
                emit(rec)
                records.append(rec)
        except Exception as exc:  # while building a row: the rest of its section is skipped
            failed("building the rows", exc)

    def measure_memory(entries: Iterator[dict[str, Any]]) -> None:
        try:
            mem.extend(entries)
        except Exception as exc:
            failed("peak memory", exc)

    if "batch_norm" in sections:
        go(batch_norm_rows(pick("batch_norm"), pick("batch_norm_offset").get("large", []), torch))
        if memory and "large" in sizes:
            measure_memory(batch_norm_memory(shapes["batch_norm"]["large"]))
    if "modules" in sections and "small" in sizes:
        go(module_rows(shapes["modules"]["small"], torch))
    ops, skipped = _rowwise_ops()
    for section in ROWWISE:
        if section not in sections:
            continue
        if section not in ops:
            notes.append(skipped[section])
            continue
        go(rowwise_rows(section, pick(section), torch, ops[section]))
        if memory and "large" in sizes:
            measure_memory(rowwise_memory(section, shapes[section]["large"], ops[section]))
    if "demo" in sections:
        with _one_blas_thread():
            go(demo_rows())
    if "busy" in sections:
        default = bnorm.num_threads()
        try:
            go(busy_rows(shapes["busy"]["large"], torch, "quiet", default))
            load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
            spinners = Spinners(busy_procs)
            busy_info = {"competing_processes": busy_procs, "pids": spinners.pids, "loadavg_before": load}
            try:
                go(busy_rows(shapes["busy"]["large"], torch, "busy", default))
            finally:
                spinners.stop()
        finally:
            bnorm.set_num_threads(default)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    data = {
        "schema": SCHEMA,
        "machine": info,
        "settings": {
            "rounds": rounds,
            "target_ms": target * 1e3,
            "settle_ms": settle * 1e3,
            "sections": sections,
            "sizes": sizes,
            "dtype": "float32",
        },
        "rows": records,
        "memory": mem,
        "busy": busy_info,
        "notes": notes,
        "errors": errors,
    }
    data["noise"] = noise(records)
    data["targets"] = evaluate_targets(data)
    return data


def noise(records: list[dict[str, Any]]) -> dict[str, float]:
    """How noisy the run was: the median and 90th percentile of (max - min) / median over measurements."""
    spreads = [
        (r["max_ms"] - r["min_ms"]) / r["median_ms"]
        for rec in records
        if rec["condition"] == "quiet"
        for r in rec["results"].values()
        if r["rounds"] > 1 and r["median_ms"] > 0
    ]
    if not spreads:
        return {"median_spread": float("nan"), "p90_spread": float("nan")}
    return {"median_spread": float(np.median(spreads)), "p90_spread": float(np.percentile(spreads, 90))}


def _csv(value: str | None, allowed: list[str], what: str) -> list[str]:
    if not value:
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}: choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    """The command line; see the module docstring."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="5 rounds of ~5 ms measurements (default 15 of ~20 ms)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="one tiny shape per op, 1 round, no settling: checks the suite runs",
    )
    p.add_argument("--rounds", type=int, help="rounds per row")
    p.add_argument("--target-ms", type=float, help="length of one measurement (ms)")
    p.add_argument("--ops", help=f"comma-separated sections (default all): {','.join(SECTIONS)}")
    p.add_argument(
        "--sizes",
        help=f"comma-separated sizes (default all): {','.join(SIZES)}; demo and busy have no sizes",
    )
    p.add_argument("--threads", type=int, help="threads for bnorm and torch (default: their defaults)")
    p.add_argument(
        "--torch-threads",
        type=int,
        help="threads for torch only, e.g. 1 for steadier torch columns on a loaded machine",
    )
    p.add_argument(
        "--busy-procs", type=int, default=1, help="competing CPU-bound processes in 'busy' (default 1)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the tracemalloc peak-memory measurements")
    p.add_argument("--json", metavar="PATH", help="write every row, the machine and the targets as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown to PATH (for the docs)")
    p.add_argument("--from-json", metavar="PATH", help="no timing: the tables of a --json file")
    args = p.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        data["targets"] = evaluate_targets(data)
        text = markdown(data)
        if args.markdown:
            Path(args.markdown).write_text(text, encoding="utf-8")
        print(text, end="")
        return 0
    sections = _csv(args.ops, SECTIONS, "section")
    sizes = _csv(args.sizes, SIZES, "size")
    if args.threads:
        bnorm.set_num_threads(args.threads)
    torch_threads = args.torch_threads or args.threads
    if torch_threads:
        torch = timing.torch_or_none()
        if torch is not None:
            torch.set_num_threads(torch_threads)
    if args.smoke:
        rounds, target, settle, shapes = 1, 1e-4, 0.0, SMOKE_SHAPES
    else:
        rounds, target, settle, shapes = (
            (5, 0.005, timing.SETTLE, SHAPES) if args.quick else (15, 0.02, timing.SETTLE, SHAPES)
        )
    rounds = args.rounds or rounds
    target = args.target_ms / 1e3 if args.target_ms else target
    t0 = time.perf_counter()
    print(
        f"bnorm suite: {rounds} rounds of ~{target * 1e3:g} ms; sections {','.join(sections)}; sizes {','.join(sizes)}",
        flush=True,
    )
    data = run(
        sections,
        sizes,
        rounds=rounds,
        target=target,
        settle=settle,
        shapes=shapes,
        memory=not args.no_memory,
        busy_procs=args.busy_procs,
        reps=1 if args.smoke else None,
    )
    data["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
    text = markdown(data)
    print("\n" + text, end="")
    print(f"\n{data['settings']['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1), encoding="utf-8")
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
