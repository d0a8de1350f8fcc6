"""``bnorm stats`` on the command line: summary, exit codes, JSON schema, outputs, paste-ready lines.

The printed lines for bnorm, torchvision and Keras are evaluated and run: the
Keras line builds a real ``keras.layers.Normalization`` (torch backend) whose
output is compared with bnorm's ``Normalize``; torchvision cannot be installed
beside this PyTorch, so without it the torchvision line is evaluated against a
stand-in ``transforms.Normalize`` with torchvision's formula (the real one is
used when torchvision is importable).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bnorm.cli import main
from bnorm.preprocessing import Normalize
from bnorm.stats import compute

Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]


def faces(root: Path, rng: np.random.Generator, n: int = 6, size: tuple[int, int] = (8, 6)) -> np.ndarray:
    """`n` random RGB PNGs of one size in `root`; returns their (n, H, W, 3) pixels."""
    root.mkdir(parents=True, exist_ok=True)
    px = rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(px[i]).save(root / f"{i:03d}.png")
    return px


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["stats", *args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def paste(out: str) -> dict[str, str]:
    lines = out.splitlines()
    i = lines.index("paste-ready:")
    found = {}
    for line in lines[i + 1 : i + 7]:
        line = line.strip()
        for key, start in (("bnorm", "Normalize("), ("torchvision", "transforms."), ("keras", "keras.")):
            if line.startswith(start):
                found[key] = line
    return found


def test_summary_and_exit_status(tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    px = faces(tmp_path / "d", rng)
    code, out, err = run(capsys, str(tmp_path / "d"))
    assert code == 0, err
    flat = px.reshape(-1, 3) / 255.0
    assert out.startswith("bnorm stats: 6 images 8x6, 3 channels (RGB), from 6 files; 0 skipped\n")
    assert f"pixels per channel: {6 * 8 * 6:,}; std with ddof=0" in out
    row = re.search(r"^\[0, 1\]\s+R\s+(\S+)\s+(\S+)", out, re.M)
    assert row is not None
    assert float(row.group(1)) == pytest.approx(flat[:, 0].mean(), abs=5e-6)
    assert float(row.group(2)) == pytest.approx(flat[:, 0].std(), abs=5e-6)
    row255 = re.search(r"^\[0, 255\]\s+R\s+(\S+)", out, re.M)
    assert row255 is not None and float(row255.group(1)) == pytest.approx(flat[:, 0].mean() * 255, abs=5e-4)
    assert set(paste(out)) == {"bnorm", "torchvision", "keras"}


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["{d}/nope"], 2, "nope does not exist"),
        (["{d}", "--workers", "0"], 2, "expected a positive integer, got '0'"),
        (["{d}", "--json", "{d}"], 2, "--json must be a file path, got the directory"),
        (["{d}", "--figure", "{d}/broken.png/f.png"], 2, "is a file, not a directory"),
        (["{d}/arr/x.npy"], 2, "the channel axis is not clear; pass --layout NHWC"),
        (["{d}/mixed"], 3, "mixed channel counts"),
        (["{d}/bad"], 3, "no images could be read"),
        (["{d}/strict", "--strict"], 3, "--strict stops at the first file that cannot be read"),
    ],
)
def test_errors_and_exit_codes(
    tmp_path: Path, rng: np.random.Generator, capsys, args, status, message
) -> None:
    faces(tmp_path, rng, n=2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "arr").mkdir()
    np.save(tmp_path / "arr" / "x.npy", np.zeros((2, 3, 5, 3), np.uint8))
    faces(tmp_path / "mixed", rng, n=1)
    Image.new("L", (6, 8), 3).save(tmp_path / "mixed" / "gray.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    faces(tmp_path / "strict", rng, n=1)
    (tmp_path / "strict" / "z.png").write_bytes(b"")
    code, out, err = run(capsys, *(a.format(d=tmp_path) for a in args))
    assert code == status, err
    assert message in err and out == ""
    assert "Traceback" not in err
    assert err.startswith("bnorm stats: ") or (err.startswith("usage: bnorm stats") and "error:" in err)


def test_skipped_files_are_listed_and_counted(tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    faces(tmp_path, rng, n=2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, out, _ = run(capsys, str(tmp_path))
    assert code == 0
    assert "from 2 files; 1 skipped" in out
    assert re.search(r"^skipped 1 \(could not be read\):\n  .*broken\.png", out, re.M)


def test_missing_pillow_says_what_to_install(
    tmp_path: Path, rng: np.random.Generator, capsys, monkeypatch
) -> None:
    import bnorm.stats.dataset as dataset

    faces(tmp_path, rng, n=1)
    monkeypatch.setattr(dataset, "have_pillow", lambda: False)
    code, _, err = run(capsys, str(tmp_path))
    assert code == 1
    assert 'pip install "bnorm[images]"' in err and 'pip install -e ".[images]"' in err
    np.save(tmp_path / "only.npy", np.zeros((1, 5, 6), np.uint8))  # arrays need no Pillow
    code, _, err = run(capsys, str(tmp_path / "only.npy"))
    assert code == 0, err


def test_missing_matplotlib_for_the_figure(
    tmp_path: Path, rng: np.random.Generator, capsys, monkeypatch
) -> None:
    faces(tmp_path, rng, n=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = run(capsys, str(tmp_path), "--figure", str(tmp_path / "f.png"))
    assert code == 1 and out == ""
    assert "--figure needs matplotlib: pip install matplotlib" in err
    assert not (tmp_path / "f.png").exists()


def test_json_schema(tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    faces(tmp_path / "d", rng)
    (tmp_path / "d" / "broken.png").write_bytes(b"")
    out_json = tmp_path / "s.json"
    code, out, err = run(capsys, str(tmp_path / "d"), "--json", str(out_json), "--ddof", "1")
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert set(data) == {
        "schema", "bnorm_version", "paths", "options", "images", "pixels_per_channel", "image_size",
        "channels", "files", "skipped", "modes", "scale_1", "scale_255", "paste", "outputs", "warnings",
    }  # fmt: skip
    assert data["schema"] == "bnorm-stats/1"
    assert data["options"] == {
        "channels": None, "layout": None, "keys": [], "resize": None, "center_crop": None,
        "max_value": None, "ddof": 1, "max_files": None, "per_pixel": False, "chunk_size": None,
    }  # fmt: skip
    assert data["images"] == 6 and data["pixels_per_channel"] == 6 * 8 * 6 and data["image_size"] == [8, 6]
    assert data["channels"] == ["R", "G", "B"] and data["modes"] == ["mode RGB"]
    assert data["files"] == {"read": 6, "skipped": 1, "ignored": 0}
    assert [Path(s["path"]).name for s in data["skipped"]] == ["broken.png"]
    s = compute(str(tmp_path / "d"), ddof=1)
    for key in ("mean", "std", "var", "min", "max"):
        assert data["scale_1"][key] == getattr(s, key).tolist()  # full float64, exactly
        np.testing.assert_allclose(
            data["scale_255"][key], getattr(s, key) * 255.0 ** (2 if key == "var" else 1)
        )
    assert data["paste"] == paste(out)


def test_per_pixel_outputs_and_figure(tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    pytest.importorskip("matplotlib")
    px = faces(tmp_path / "d", rng)
    out_dir, fig = tmp_path / "out", tmp_path / "fig.png"
    code, out, err = run(
        capsys,
        str(tmp_path / "d"),
        "--per-pixel",
        "--out",
        str(out_dir),
        "--figure",
        str(fig),
        "--json",
        str(tmp_path / "s.json"),
    )
    assert code == 0, err
    mean, std = np.load(out_dir / "mean.npy"), np.load(out_dir / "std.npy")
    np.testing.assert_allclose(mean, px.mean(axis=0) / 255, rtol=1e-13)
    np.testing.assert_allclose(std, (px / 255.0).std(axis=0), rtol=1e-12)
    with Image.open(out_dir / "mean.png") as im:
        np.testing.assert_array_equal(np.asarray(im), np.rint(mean * 255).astype(np.uint8))
    with Image.open(fig) as im:
        assert im.format == "PNG" and im.size[0] > 1500
    outputs = json.loads((tmp_path / "s.json").read_text())["outputs"]
    assert set(outputs) == {"mean_npy", "std_npy", "mean_png", "std_png", "figure"}
    assert f"figure: {fig}" in out
    assert not [p for p in os.listdir(out_dir) if p.startswith(".bnorm-")]  # no temporary left


def _stand_in_transforms() -> Any:
    """torchvision.transforms.Normalize's formula on (C, H, W) tensors, for when torchvision is missing."""
    import torch

    class Normalize:
        def __init__(self, mean: list[float], std: list[float]) -> None:
            self.mean, self.std = mean, std

        def __call__(self, t: torch.Tensor) -> torch.Tensor:
            m = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
            s = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
            return (t - m) / s

    return type("transforms", (), {"Normalize": Normalize})


def test_paste_lines_run_in_torchvision_keras_and_bnorm(
    tmp_path: Path, rng: np.random.Generator, capsys, monkeypatch
) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    px = faces(tmp_path / "d", rng)
    code, out, _ = run(capsys, str(tmp_path / "d"))
    assert code == 0
    lines = paste(out)
    s = compute(str(tmp_path / "d"))
    x01 = (px / 255.0).astype(np.float32)  # (N, H, W, C) in [0, 1]
    reference = Normalize(s.mean, s.std, axis=-1)(x01.astype(np.float64))

    bn = eval(lines["bnorm"], {"Normalize": Normalize})
    assert bn.axis == 1
    np.testing.assert_array_equal(bn.mean.astype(np.float32), s.mean.astype(np.float32))  # float32 exact
    np.testing.assert_array_equal(bn.std.astype(np.float32), s.std.astype(np.float32))
    np.testing.assert_allclose(
        bn(x01.transpose(0, 3, 1, 2)), reference.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5
    )

    try:
        from torchvision import transforms  # the real one where it can be installed
    except ImportError:
        transforms = _stand_in_transforms()
    tv = eval(lines["torchvision"], {"transforms": transforms})
    y = tv(torch.from_numpy(x01[0].transpose(2, 0, 1).copy())).numpy()
    np.testing.assert_allclose(y, reference[0].transpose(2, 0, 1), rtol=1e-5, atol=1e-5)

    layer = eval(lines["keras"], {"keras": keras})
    y = keras.ops.convert_to_numpy(layer(px.astype(np.float32)))  # [0, 255], channels last
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)


def test_python_m_bnorm_stats(tmp_path: Path, rng: np.random.Generator) -> None:
    faces(tmp_path / "d", rng, n=2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, "-m", "bnorm", "stats", str(tmp_path / "d")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("bnorm stats: 2 images 8x6")
    assert res.stderr == ""  # no progress bar when stderr is not a terminal


def test_every_option_is_in_the_cli_reference() -> None:
    import argparse

    from bnorm.stats.command import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    page = (ROOT / "docs" / "api" / "cli.md").read_text(encoding="utf-8")
    for action in p._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in page, f"{flag} is not in docs/api/cli.md"
