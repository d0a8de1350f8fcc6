"""The LFW experiment on docs/stats-cli.md is what ``bnorm stats`` prints on the 100 faces.

Runs docs/make_lfw_figure.py (the script that regenerates the page's figures)
into a temporary folder and compares its printed summary with the block quoted
on the page and in the CLI reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quoted(page: Path, after: str) -> str:
    text = page.read_text(encoding="utf-8")
    m = re.search(re.escape(after) + r".*?```text\n(.*?)```", text, re.S)
    assert m is not None, f"no text block after {after!r} in {page}"
    return m.group(1)


def test_lfw_summary_and_figures(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    spec = importlib.util.spec_from_file_location("make_lfw_figure", ROOT / "docs" / "make_lfw_figure.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert script.main(["--out", str(tmp_path)]) == 0
    printed = out.getvalue()
    assert printed.startswith("bnorm stats: 100 images 25x25, 1 channel (gray)")
    assert printed == _quoted(ROOT / "docs" / "stats-cli.md", "<!-- lfw-summary")
    assert printed == _quoted(ROOT / "docs" / "api" / "cli.md", "### What it prints")
    for name in ("lfw-stats.png", "lfw-faces.png"):
        assert (tmp_path / name).stat().st_size > 10_000
        assert (ROOT / "docs" / "_static" / name).exists()
