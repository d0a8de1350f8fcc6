"""The suite's report: its targets, evaluated on a result document, and its Markdown tables.

A result document is what ``bench_suite.run`` returns and ``--json`` writes:
``rows`` (one per problem: section, op, size, shape, params, condition, and per
contender the median, min, max and per-round times; ``ratios`` of medians with
their per-round values), ``memory`` (peak extra bytes / input bytes),
``machine``, ``settings``, ``noise``, ``busy`` and ``notes``.

:func:`evaluate_targets` turns it into one entry per target of :data:`TARGETS`
(the measured geometric mean or time, its spread over rounds, met or missed);
:func:`markdown` into the tables the suite prints and ``--markdown`` writes.
Both work on a document read back from JSON (``--from-json``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bench_batchnorm
import timing


# ---- targets
@dataclass
class Target:
    """A target of the suite: a ratio (or a time) over a selection of rows, and its bound."""

    name: str
    select: Callable[[dict[str, Any]], bool]
    key: str  # a ratio name, "time:<contender>", or "memory"
    bound: float
    kind: str  # "geomean<=", "speedup>=" (1 / geomean of the ratio), "every<=", "time<=", "max<="


def _is(
    section: str, ops: tuple[str, ...] | None = None, size: str | None = None
) -> Callable[[dict[str, Any]], bool]:
    def f(r: dict[str, Any]) -> bool:
        return (
            r["section"] == section
            and r["condition"] == "quiet"
            and (ops is None or r["op"] in ops)
            and (size is None or r["size"] == size)
        )

    return f


def _offset_backward(r: dict[str, Any]) -> bool:
    """The batch-norm backward rows on offset data (op ``backward, x+10``)."""
    return r["section"] == "batch_norm" and r["condition"] == "quiet" and r["op"].startswith("backward, x")


def _rowwise_large(op: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: (
        r["section"] in ("layer_norm", "group_norm", "instance_norm")
        and r["op"] == op
        and r["size"] == "large"
    )


_BN_TORCH = bench_batchnorm.TARGETS
_BN_SPEEDUP = bench_batchnorm.NAIVE_SPEEDUP

TARGETS = [
    Target(
        "every row <= 1.0x the textbook",
        lambda r: r["condition"] == "quiet",
        "bnorm/textbook",
        1.0,
        "every<=",
    ),
    Target(
        "small batch norm, training forward <= 1.0x textbook",
        _is("batch_norm", ("train",), "small"),
        "bnorm/textbook",
        1.0,
        "geomean<=",
    ),
    Target(
        "small batch norm, backward <= 1.0x textbook",
        _is("batch_norm", ("backward",), "small"),
        "bnorm/textbook",
        1.0,
        "geomean<=",
    ),
    Target(
        "BatchNorm1d/2d forward+backward <= 1.0x torch modules",
        _is("modules"),
        "bnorm/torch",
        1.0,
        "geomean<=",
    ),
    Target(
        "(4, 8) training forward <= 25 µs",
        _is("batch_norm", ("train",), "tiny"),
        "time:bnorm",
        0.025,
        "time<=",
    ),
    Target("LN/GN/IN forward <= 4x torch", _rowwise_large("forward"), "bnorm/torch", 4.0, "geomean<="),
    Target(
        "LN/GN/IN forward >= 2x faster than textbook",
        _rowwise_large("forward"),
        "bnorm/textbook",
        2.0,
        "speedup>=",
    ),
    Target(
        "LN/GN/IN forward+backward <= 5x torch",
        _rowwise_large("forward+backward"),
        "bnorm/torch",
        5.0,
        "geomean<=",
    ),
    Target(
        "LN/GN/IN forward+backward >= 1.5x faster than textbook",
        _rowwise_large("forward+backward"),
        "bnorm/textbook",
        1.5,
        "speedup>=",
    ),
    Target(
        "batch norm backward on offset data <= 1.6x torch",
        _offset_backward,
        "bnorm/torch",
        1.6,
        "geomean<=",
    ),
    *(
        Target(
            f"large batch norm {op} <= {bound}x torch",
            _is("batch_norm", (op,), "large"),
            "bnorm/torch",
            bound,
            "geomean<=",
        )
        for (op, _), bound in _BN_TORCH.items()
    ),
    *(
        Target(
            f"large batch norm {op} >= {bound:g}x faster than textbook",
            _is("batch_norm", (op,), "large"),
            "bnorm/textbook",
            bound,
            "speedup>=",
        )
        for op, bound in _BN_SPEEDUP.items()
    ),
    Target(
        f"large batch norm peak extra memory <= {bench_batchnorm.MEMORY_TARGET}x input",
        lambda m: m["section"] == "batch_norm",
        "memory",
        bench_batchnorm.MEMORY_TARGET,
        "max<=",
    ),
    Target(
        "busy machine: default threads <= 1.0x one thread, every row",
        lambda r: r["section"] == "busy" and r["condition"] == "busy",
        "bnorm/bnorm 1 thread",
        1.0,
        "every<=",
    ),
]


def _label(r: dict[str, Any]) -> str:
    extra = "".join(f", {k}={v}" for k, v in r.get("params", {}).items())
    return f"{r['section']} {r['op']} {tuple(r['shape'])}{extra}"


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: the measured value, its spread over rounds, met / missed (or not run)."""
    out = []
    for t in TARGETS:
        entry: dict[str, Any] = {"target": t.name, "bound": t.bound, "kind": t.kind}
        if t.key == "memory":
            sel = [m for m in data["memory"] if t.select(m)]
            if sel:
                worst = max(sel, key=lambda m: m["peak_over_input"])
                entry.update(
                    measured=worst["peak_over_input"],
                    spread=None,
                    met=worst["peak_over_input"] <= t.bound,
                    rows=len(sel),
                    note=f"largest: {worst['op']} {tuple(worst['shape'])}",
                )
            out.append(entry)
            continue
        rows = [r for r in data["rows"] if t.select(r)]
        if t.key.startswith("time:"):
            c = t.key.split(":", 1)[1]
            rows = [r for r in rows if c in r["results"]]
            if rows:
                res = rows[0]["results"][c]
                entry.update(
                    measured=res["median_ms"],
                    spread=[res["min_ms"], res["max_ms"]],
                    met=res["median_ms"] <= t.bound,
                    rows=1,
                )
                others = [
                    f"{r['op']} {timing.fmt_time(r['results'][c]['median_ms'])}"
                    for r in data["rows"]
                    if r["section"] == rows[0]["section"]
                    and r["size"] == rows[0]["size"]
                    and r is not rows[0]
                    and tuple(r["shape"]) == tuple(rows[0]["shape"])
                    and c in r["results"]
                ]
                if others:
                    entry["note"] = "; ".join(others)
            out.append(entry)
            continue
        rows = [r for r in rows if t.key in r["ratios"]]
        if not rows:
            out.append(entry)
            continue
        meds = [r["ratios"][t.key]["median"] for r in rows]
        if t.kind == "every<=":
            worst = max(rows, key=lambda r: r["ratios"][t.key]["median"])
            w = worst["ratios"][t.key]
            over = [r for r in rows if r["ratios"][t.key]["median"] > t.bound]
            # "Noise allowing": a row is beyond the noise when its ratio was above the
            # bound in every round, not only in the median.
            beyond = [r for r in over if r["ratios"][t.key]["min"] > t.bound]
            entry.update(
                measured=w["median"],
                spread=[w["min"], w["max"]],
                met=not beyond,
                rows=len(rows),
                geomean=timing.geomean(meds),
                note=f"worst: {_label(worst)}; {len(over)} of {len(rows)} rows above {t.bound} "
                f"({len(beyond)} in every round)"
                + ("" if not over else ": " + ", ".join(_label(r) for r in over[:8]))
                + (", ..." if len(over) > 8 else ""),
            )
            out.append(entry)
            continue
        g = timing.geomean(meds)
        n_rounds = min(len(r["ratios"][t.key]["per_round"]) for r in rows)
        per_round = [
            timing.geomean([r["ratios"][t.key]["per_round"][i] for r in rows]) for i in range(n_rounds)
        ]
        spread = [min(per_round), max(per_round)] if per_round else None
        if t.kind == "speedup>=":
            g = 1.0 / g
            spread = None if spread is None else [1.0 / spread[1], 1.0 / spread[0]]
            met = g >= t.bound
        else:
            met = g <= t.bound
        entry.update(measured=g, spread=spread, met=met, rows=len(rows))
        out.append(entry)
    return out


# ---- tables
_SECTION_TITLES = {
    "batch_norm": "Batch norm (functional)",
    "modules": "BatchNorm1d / BatchNorm2d modules, forward + backward",
    "layer_norm": "Layer norm",
    "group_norm": "Group norm",
    "instance_norm": "Instance norm",
    "rms_norm": "RMSNorm",
    "demo": "The demo's training step",
    "busy": "A busy machine: default threads vs one thread",
}


def _x(v: float) -> str:
    """A ratio: two decimals, or two significant digits below 0.1 (a slowed PyTorch gives 0.003)."""
    return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.2g}"


def _ratio_cell(v: dict[str, float] | None) -> str:
    if v is None:
        return "-"
    return f"{_x(v['median'])} [{_x(v['min'])}-{_x(v['max'])}]"


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    out = ["| target | measured [spread over rounds] | rows | result |", "|---|---|---|---|"]
    for t in targets:
        if "measured" not in t:
            out.append(f"| {t['target']} | - | 0 | not run |")
            continue
        m, s = t["measured"], t.get("spread")
        if t["kind"] == "time<=":
            cell = timing.fmt_stats({"median_ms": m, "min_ms": s[0], "max_ms": s[1]})
        elif s is None:
            cell = f"{m:.3f}x"
        else:
            cell = f"{_x(m)}x [{_x(s[0])}-{_x(s[1])}]"
        if t["kind"] == "every<=":
            cell = f"worst {cell}, geomean {t['geomean']:.2f}x"
        if t.get("note"):
            cell += f"; {t['note']}"
        out.append(f"| {t['target']} | {cell} | {t['rows']} | {'met' if t['met'] else 'MISSED'} |")
    return out


def _n(count: Any, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def markdown(data: dict[str, Any]) -> str:
    """The run's tables as Markdown: one per section and condition, then the memory and the targets."""
    m, st = data["machine"], data["settings"]
    bn = m.get("bnorm_git_branch"), m.get("bnorm_git_commit")
    which = f"bnorm {m.get('bnorm')}" + (
        f" (branch {bn[0]}, commit {bn[1]}{', modified' if m.get('bnorm_git_dirty') else ''})"
        if bn[1]
        else ""
    )
    nz = data.get("noise", {})
    out = [
        f"{which}; {m.get('cpu', m.get('processor'))}, {m.get('cpu_count')} CPUs; Python {m.get('python')}, "
        f"NumPy {m.get('numpy')}, PyTorch {m.get('torch')} ({_n(m.get('torch_threads'), 'thread')}), "
        f"bnorm threads {m.get('bnorm_threads')}; load average {m.get('loadavg_start')} at the start, "
        f"{m.get('loadavg_end')} at the end; {_n(st['rounds'], 'round')} of ~{st['target_ms']:g} ms measurements, "
        f"float32. Spread of a measurement over rounds ((max - min) / median): median "
        f"{nz.get('median_spread', float('nan')):.0%}, 90th percentile {nz.get('p90_spread', float('nan')):.0%}.",
    ]
    load, cpus = m.get("loadavg_start"), m.get("cpu_count") or 1
    if load and load[0] >= 0.75 * cpus:
        out += [
            "",
            f"*The machine was busy (load average {load[0]} on {cpus} CPUs at the start): multi-threaded "
            "kernels -- PyTorch's OpenMP pool most -- wait for threads that other processes hold, so the "
            "torch columns (and bnorm's threaded rows) are slower than on a quiet machine.*",
        ]
    for error in data.get("errors", []):
        out += ["", f"**Error** (the row is missing from the tables): `{error}`"]
    for note in data.get("notes", []):
        out += ["", f"*{note}*"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data["rows"]:
        groups.setdefault((r["section"], r["condition"]), []).append(r)
    for (section, condition), rows in groups.items():
        contenders = list(dict.fromkeys(c for r in rows for c in r["results"]))
        ratios = list(dict.fromkeys(k for r in rows for k in r["ratios"]))
        title = _SECTION_TITLES.get(section, section)
        if section == "busy":
            b = data.get("busy", {})
            title += (
                f", with {b.get('competing_processes')} competing CPU-bound process(es)"
                if condition == "busy"
                else ", the machine as it is"
            )
        out += [
            "",
            f"**{title}** -- time per call, median [min-max]; ratios of medians [per-round min-max]",
            "",
        ]
        out.append("| op | shape | " + " | ".join(contenders + ratios) + " |")
        out.append("|---" * (2 + len(contenders) + len(ratios)) + "|")
        for r in rows:
            shape = str(tuple(r["shape"])) + "".join(f", {k} {v}" for k, v in r["params"].items())
            cells = [timing.fmt_stats(r["results"].get(c)) for c in contenders]
            cells += [_ratio_cell(r["ratios"].get(k)) for k in ratios]
            out.append(f"| {r['op']} | {shape} | " + " | ".join(cells) + " |")
    if data.get("memory"):
        out += ["", "**Peak extra memory of one call / input bytes** (tracemalloc, output included)", ""]
        out += ["| section | op | shape | peak / input |", "|---|---|---|---|"]
        for mm in data["memory"]:
            out.append(
                f"| {mm['section']} | {mm['op']} | {tuple(mm['shape'])} | {mm['peak_over_input']:.3f} |"
            )
    out += [
        "",
        "**Targets** -- geometric means over the rows of each target; spread: per-round geometric means",
        "",
    ]
    out += _targets_table(data["targets"])
    return "\n".join(out) + "\n"
