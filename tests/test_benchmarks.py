"""The benchmark suite runs and writes what it promises; its textbook baselines compute the right thing.

No timing assertions here (speed targets live in benchmarks/): the suite runs
on one tiny shape per op and size with one round (``--smoke``), and the tests
check the JSON document, the Markdown and the target evaluation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_suite  # noqa: E402
import naive  # noqa: E402
import suite_report  # noqa: E402

from bnorm import functional as F  # noqa: E402

STATS = {"median_ms", "min_ms", "max_ms", "rounds", "reps", "times_ms"}

HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("bench")
    js, md = out / "suite.json", out / "suite.md"
    torch = bench_suite.timing.torch_or_none()
    threads = None if torch is None else torch.get_num_threads()
    try:
        if torch is not None:
            # One thread: on a loaded machine PyTorch's pool waits for workers others hold
            # (tens of ms per tiny call); the smoke run checks the suite, not PyTorch's speed.
            torch.set_num_threads(1)
        assert bench_suite.main(["--smoke", "--json", str(js), "--markdown", str(md)]) == 0
    finally:
        if torch is not None:
            torch.set_num_threads(threads)
    return json.loads(js.read_text(encoding="utf-8")), md.read_text(encoding="utf-8"), js


def test_json_has_every_section_and_the_machine(smoke):
    data, _, _ = smoke
    assert data["schema"] == bench_suite.SCHEMA
    m = data["machine"]
    for key in ("numpy", "torch", "bnorm", "bnorm_threads", "torch_threads", "cpu_count", "bnorm_path"):
        assert key in m, key
    assert data["settings"]["rounds"] == 1 and data["settings"]["dtype"] == "float32"
    sections = {r["section"] for r in data["rows"]}
    expected = set(bench_suite.SECTIONS) - ({"rms_norm"} if not hasattr(F, "rms_norm_forward") else set())
    assert sections == expected
    assert {r["condition"] for r in data["rows"] if r["section"] == "busy"} == {"quiet", "busy"}
    ops = {(r["section"], r["op"]) for r in data["rows"]}
    for op in ("train", "eval", "backward", "backward, x+10"):
        assert ("batch_norm", op) in ops
    for section in ("layer_norm", "group_norm", "instance_norm"):
        assert (section, "forward") in ops and (section, "forward+backward") in ops


def test_every_row_has_shape_dtype_op_and_contender_stats(smoke):
    data, _, _ = smoke
    for r in data["rows"]:
        assert {"section", "op", "size", "shape", "dtype", "params", "condition", "results", "ratios"} <= set(
            r
        )
        assert r["dtype"] == "float32" and all(isinstance(n, int) for n in r["shape"])
        # The modules' only other contender is PyTorch's; without it bnorm stands alone.
        assert len(r["results"]) >= (2 if HAVE_TORCH or r["section"] != "modules" else 1), r
        for name, stats in r["results"].items():
            assert STATS <= set(stats), (r["op"], name)
            assert stats["rounds"] == len(stats["times_ms"]) == 1
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
        for key, ratio in r["ratios"].items():
            a, b = key.split("/", 1)
            assert ratio["median"] == pytest.approx(
                r["results"][a]["median_ms"] / r["results"][b]["median_ms"]
            )


def test_contenders_per_section(smoke):
    data, _, _ = smoke
    torch = pytest.importorskip("torch")
    assert torch is not None
    by_section = {}
    for r in data["rows"]:
        by_section.setdefault((r["section"], r["size"]), set()).update(r["results"])
    assert by_section[("batch_norm", "large")] == {"bnorm", "bnorm(out)", "torch", "textbook", "copy"}
    assert by_section[("batch_norm", "small")] == {"bnorm", "torch", "textbook"}
    assert by_section[("modules", "small")] == {"bnorm", "torch"}
    assert by_section[("layer_norm", "large")] == {"bnorm", "torch", "textbook"}
    assert by_section[("demo", "small")] == {"with BN", "without BN"}
    assert by_section[("busy", "large")] == {"bnorm", "bnorm 1 thread", "torch"}


def test_memory_and_targets_are_reported(smoke):
    data, text, _ = smoke
    assert {m["section"] for m in data["memory"]} >= {
        "batch_norm",
        "layer_norm",
        "group_norm",
        "instance_norm",
    }
    assert all(m["peak_over_input"] > 0 for m in data["memory"])
    names = [t["target"] for t in data["targets"]]
    assert names == [t.name for t in suite_report.TARGETS]
    for t in data["targets"]:
        if HAVE_TORCH or "torch" not in t["target"]:  # a target against PyTorch has no rows without it
            assert {"measured", "met", "rows"} <= set(t), t[
                "target"
            ]  # every target has rows in the smoke run
    assert "**Targets**" in text and "| target |" in text
    for title in ("Batch norm (functional)", "Layer norm", "The demo's training step", "A busy machine"):
        assert title in text


def test_busy_run_stops_its_competing_processes(smoke):
    data, _, _ = smoke
    pids = data["busy"]["pids"]
    assert len(pids) == data["busy"]["competing_processes"] >= 1
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_from_json_reprints_the_tables(smoke, tmp_path, capsys):
    _, text, js = smoke
    capsys.readouterr()
    md = tmp_path / "again.md"
    assert bench_suite.main(["--from-json", str(js), "--markdown", str(md)]) == 0
    assert md.read_text(encoding="utf-8") == text


def test_filters_choose_sections_and_sizes():
    data = _smoke_run(["layer_norm"])
    assert {(r["section"], r["size"]) for r in data["rows"]} == {("layer_norm", "small")}
    assert data["memory"] == []  # memory is measured on the large shapes
    with pytest.raises(SystemExit, match="unknown section"):
        bench_suite.main(["--ops", "layernorm"])


def _row(section, op, size, ratios):
    """A row as the suite records it, with the given per-round ratios."""
    return {
        "section": section,
        "op": op,
        "size": size,
        "shape": [4, 8],
        "params": {},
        "condition": "quiet",
        "results": {},
        "ratios": {
            k: {"median": float(np.median(v)), "min": min(v), "max": max(v), "per_round": v}
            for k, v in ratios.items()
        },
    }


def test_target_evaluation_geomeans_speedups_and_every_row():
    rows = [
        _row("layer_norm", "forward", "large", {"bnorm/torch": [2.0, 2.0], "bnorm/textbook": [0.25, 0.25]}),
        _row("group_norm", "forward", "large", {"bnorm/torch": [8.0, 8.0], "bnorm/textbook": [1.0, 1.0]}),
        _row(
            "layer_norm", "forward", "small", {"bnorm/textbook": [1.2, 0.9]}
        ),  # not a target row of LN/GN/IN
    ]
    targets = {t["target"]: t for t in suite_report.evaluate_targets({"rows": rows, "memory": []})}
    fwd_torch = targets["LN/GN/IN forward <= 4x torch"]
    assert fwd_torch["measured"] == pytest.approx(4.0) and fwd_torch["met"] and fwd_torch["rows"] == 2
    speed = targets["LN/GN/IN forward >= 2x faster than textbook"]
    assert speed["measured"] == pytest.approx(2.0) and speed["met"]
    every = targets["every row <= 1.0x the textbook"]
    # Above 1.0 in the median but not in every round: within the noise, so met -- and named.
    assert every["measured"] == pytest.approx(1.05) and every["met"] and every["rows"] == 3
    assert "1 of 3 rows above 1.0 (0 in every round)" in every["note"]
    assert "layer_norm forward (4, 8)" in every["note"]
    rows[2] = _row("layer_norm", "forward", "small", {"bnorm/textbook": [1.2, 1.1]})
    targets = {t["target"]: t for t in suite_report.evaluate_targets({"rows": rows, "memory": []})}
    every = targets["every row <= 1.0x the textbook"]
    assert every["measured"] == pytest.approx(1.15) and not every["met"]
    assert "1 of 3 rows above 1.0 (1 in every round)" in every["note"]
    assert "measured" not in targets["large batch norm train <= 0.9x torch"]  # no rows: not run


# ---- the textbook baselines agree with bnorm (float64), so that the comparison is like for like
def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.fixture
def problem():
    rng = np.random.default_rng(3)
    x = rng.normal(1.5, 2.0, (4, 6, 3, 5))
    g = rng.normal(size=x.shape)
    return x, g, rng


def test_textbook_layer_norm_matches_bnorm(problem):
    x, g, rng = problem
    w, b = rng.uniform(0.5, 1.5, 5), rng.normal(size=5)
    y, cache = naive.layer_norm_forward(x, w, b, 1e-5)
    y_ref, ctx = F.layer_norm_forward(x, 5, w, b, 1e-5)
    _close(y, y_ref)
    for mine, ref in zip(naive.layer_norm_backward(g, cache), F.layer_norm_backward(g, ctx), strict=True):
        _close(mine, ref)


def test_textbook_group_and_instance_norm_match_bnorm(problem):
    x, g, rng = problem
    w, b = rng.uniform(0.5, 1.5, 6), rng.normal(size=6)
    y, cache = naive.group_norm_forward(x, 3, w, b, 1e-5)
    y_ref, ctx = F.group_norm_forward(x, 3, w, b, 1e-5)
    _close(y, y_ref)
    for mine, ref in zip(naive.group_norm_backward(g, cache), F.group_norm_backward(g, ctx), strict=True):
        _close(mine, ref)
    y, cache = naive.instance_norm_forward(x, w, b, 1e-5)
    y_ref, ctx = F.instance_norm_forward(x, None, None, w, b, eps=1e-5)
    _close(y, y_ref)
    for mine, ref in zip(
        naive.instance_norm_backward(g, cache), F.instance_norm_backward(g, ctx), strict=True
    ):
        _close(mine, ref)


def test_textbook_batch_norm_matches_bnorm(problem):
    x, g, rng = problem
    w, b = rng.uniform(0.5, 1.5, 6), rng.normal(size=6)
    y, cache = naive.forward_train(x, w, b, 1e-5, 1)
    y_ref, ctx = F.batch_norm_forward(x, None, None, w, b, training=True, eps=1e-5)
    _close(y, y_ref)
    for mine, ref in zip(naive.backward(g, cache), F.batch_norm_backward(g, ctx), strict=True):
        _close(mine, ref)


def test_textbook_rms_norm_matches_its_definition_and_gradient(problem):
    x, g, rng = problem
    w = rng.uniform(0.5, 1.5, 5)
    y, cache = naive.rms_norm_forward(x, w, 1e-6)
    _close(y, x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + 1e-6) * w)
    dx, dw = naive.rms_norm_backward(g, cache)
    # the gradient along a random direction, against central differences of <g, y(x + t v)>
    v = rng.normal(size=x.shape)
    h = 1e-6
    fd = (
        np.vdot(g, naive.rms_norm_forward(x + h * v, w, 1e-6)[0])
        - np.vdot(g, naive.rms_norm_forward(x - h * v, w, 1e-6)[0])
    ) / (2 * h)
    assert np.vdot(dx, v) == pytest.approx(fd, rel=1e-6)
    u = rng.normal(size=5)
    fd_w = (
        np.vdot(g, naive.rms_norm_forward(x, w + h * u, 1e-6)[0])
        - np.vdot(g, naive.rms_norm_forward(x, w - h * u, 1e-6)[0])
    ) / (2 * h)
    assert np.vdot(dw, u) == pytest.approx(fd_w, rel=1e-6)


# ---- the shared timing machinery
def test_interleave_runs_each_contender_under_its_own_setup():
    import timing

    state = {"threads": None}
    seen: dict[str, set] = {"a": set(), "b": set()}
    fns = {name: (lambda name=name: seen[name].add(state["threads"])) for name in seen}
    setups = {"a": lambda: state.update(threads=2), "b": lambda: state.update(threads=1)}
    res = timing.interleave(fns, rounds=3, target=1e-4, setups=setups, settle_seconds=0.0)
    assert seen == {"a": {2}, "b": {1}}
    assert all(r["rounds"] == 3 and len(r["times_ms"]) == 3 for r in res.values())


def test_interleave_rotates_the_order_of_the_contenders():
    import timing

    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timing.interleave(fns, rounds=3, target=1e-4, settle_seconds=0.0, reps=1)
    # reps=1, no settling time: a measurement is one settling call and one timed call (no calibration)
    firsts = [order[i] for i in range(0, len(order), 6)]
    assert firsts == ["a", "b", "c"]


def test_use_source_leaves_a_bnorm_named_by_pythonpath_first(tmp_path, monkeypatch):
    import timing

    other = tmp_path / "src"
    (other / "bnorm").mkdir(parents=True)
    (other / "bnorm" / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(timing.ROOT / "src")])
    monkeypatch.setenv("PYTHONPATH", str(other))
    timing.use_source()
    assert str(timing.ROOT / "src") not in sys.path
    monkeypatch.setenv("PYTHONPATH", "")
    timing.use_source()
    assert sys.path[0] == str(timing.ROOT / "src")


def _smoke_run(sections, sizes=("small",)):
    return bench_suite.run(
        list(sections),
        list(sizes),
        rounds=1,
        target=1e-4,
        settle=0.0,
        shapes=bench_suite.SMOKE_SHAPES,
        quiet=True,
        reps=1,
    )


def test_rms_norm_rows_run_when_bnorm_has_rms_norm(monkeypatch):
    def rms_norm_forward(x, normalized_shape, weight=None, eps=1e-6):
        return naive.rms_norm_forward(x, weight, eps)

    monkeypatch.setattr(F, "rms_norm_forward", rms_norm_forward, raising=False)
    monkeypatch.setattr(F, "rms_norm_backward", naive.rms_norm_backward, raising=False)
    data = _smoke_run(["rms_norm"])
    assert {(r["section"], r["op"]) for r in data["rows"]} == {
        ("rms_norm", "forward"),
        ("rms_norm", "forward+backward"),
    }
    assert data["notes"] == []


def test_rms_norm_rows_are_skipped_with_a_reason(monkeypatch):
    monkeypatch.delattr(F, "rms_norm_forward", raising=False)
    data = _smoke_run(["rms_norm"])
    assert data["rows"] == [] and "does not exist" in data["notes"][0]

    def rms_norm_forward(x, *, normalized_shape, weight=None):  # a signature the suite cannot call
        raise AssertionError("not reached")

    monkeypatch.setattr(F, "rms_norm_forward", rms_norm_forward, raising=False)
    monkeypatch.setattr(F, "rms_norm_backward", naive.rms_norm_backward, raising=False)
    data = _smoke_run(["rms_norm"])
    assert data["rows"] == [] and "failed" in data["notes"][0]


def test_a_failing_op_is_recorded_and_the_run_goes_on(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel under construction")

    monkeypatch.setattr(F, "group_norm_forward", broken)
    data = _smoke_run(["group_norm", "instance_norm"], ("small", "large"))
    assert {r["section"] for r in data["rows"]} == {"instance_norm"}
    assert data["errors"] and all("kernel under construction" in e for e in data["errors"])
    assert any(e.startswith("peak memory") for e in data["errors"])
    assert "**Error**" in suite_report.markdown(data)
