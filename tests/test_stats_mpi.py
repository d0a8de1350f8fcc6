"""``mpiexec -n 3 bnorm stats`` equals one process: the same JSON, byte for byte, and the same summary.

The dataset mixes PNGs of two sizes, a corrupt file and an ``.npy`` cut into
chunks, so the three ranks get uneven shards of both kinds of task; the run
with ``--figure`` also streams per-pixel partials and histograms.  A data
error (``--strict``) must end every rank with status 3, without a hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py")
Image = pytest.importorskip("PIL.Image")

from test_sync_mpi import _mpiexec, run_with_limit  # noqa: E402  (same launcher and time limit)

ROOT = Path(__file__).resolve().parents[1]


def bnorm_stats(args: list[str], ranks: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``[mpiexec -n ranks] python -m bnorm stats args``, killed whole on timeout."""
    launcher = [_mpiexec(), "-n", str(ranks)] if ranks > 1 else []
    return run_with_limit([*launcher, sys.executable, "-m", "bnorm", "stats", *args, "--no-progress"], cwd)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            px = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / cls / f"{i}.png")
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    np.save(root / "x.npy", rng.integers(0, 256, size=(10, 6, 7, 3), dtype=np.uint8))
    return tmp_path


def _without_output_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith(("json:", "figure:")))


@pytest.mark.parametrize("extra", [[], ["--figure", "fig.png", "--ddof", "1"]], ids=["plain", "figure"])
def test_three_ranks_equal_one(dataset: Path, extra: list[str]) -> None:
    results = {}
    for ranks in (1, 3):
        out = dataset / f"r{ranks}"
        workers = ["--workers", "2"] if ranks == 3 and extra else []  # threads on every rank too
        args = ["data", "data/x.npy", "--chunk-size", "3", "--json", f"{out}.json", *extra, *workers]
        res = bnorm_stats(args, ranks, dataset)
        assert res.returncode == 0, f"{ranks} ranks:\n{res.stdout}\n{res.stderr}"
        results[ranks] = (res.stdout, (dataset / f"r{ranks}.json").read_bytes())
    (out1, json1), (out3, json3) = results[1], results[3]
    assert json3 == json1  # the same numbers, bit for bit
    data = json.loads(json1)
    assert data["images"] == 10 + 10 and data["files"] == {"read": 11, "skipped": 1, "ignored": 0}
    assert _without_output_lines(out3) == _without_output_lines(out1)  # printed once, by rank 0
    assert out3.count("bnorm stats:") == 1


def test_data_error_ends_every_rank(dataset: Path) -> None:
    res = bnorm_stats(["data", "data/x.npy", "--strict"], 3, dataset)
    assert res.returncode == 3, res.stderr
    assert res.stderr.count("--strict stops at the first file that cannot be read") == 1
    assert res.stdout == ""
