"""Regenerate the figures of docs/stats-cli.md from 100 real faces, with ``bnorm stats``.

    pip install -e ".[images,docs]"          # Pillow, matplotlib, scikit-image
    python docs/make_lfw_figure.py           # writes docs/_static/lfw-stats.png, lfw-faces.png

scikit-image ships 100 faces from Labeled Faces in the Wild
(``skimage.data.lfw_subset()``: 200 grayscale 25x25 images in [0, 1], the
first 100 faces, the other 100 background crops).  The faces are saved as one
``(100, 25, 25)`` float64 ``.npy`` (their values are not multiples of 1/255,
so 8-bit PNGs would round them) and ``bnorm stats`` computes everything:

    bnorm stats faces.npy --per-pixel --out DIR --figure docs/_static/lfw-stats.png

``lfw-stats.png`` is that command's own figure (mean image, std image,
histograms before and after normalization); ``lfw-faces.png`` shows eight
faces and the same faces normalized per pixel with the mean and std images
the command wrote (``(x - mean_image) / std_image``).  The summary the command
prints is the one quoted on the docs page (tests/test_stats_docs.py checks it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bnorm.cli import main as bnorm_main  # noqa: E402

FACES = 100
SHOWN = 8


def lfw_faces() -> np.ndarray:
    """The 100 LFW faces of scikit-image, float64 (100, 25, 25) in [0, 1]."""
    from skimage import data

    return np.asarray(data.lfw_subset()[:FACES], dtype=np.float64)


def run_stats(faces: np.ndarray, work: str, figure: str) -> str:
    """``bnorm stats`` on the faces; returns what it printed (the summary)."""
    path = os.path.join(work, "faces.npy")
    np.save(path, faces)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bnorm_main(["stats", path, "--per-pixel", "--out", work, "--figure", figure, "--no-progress"])
    if code != 0:
        raise SystemExit(f"bnorm stats failed with status {code}")
    return out.getvalue().split("\n\nmean_npy:")[0] + "\n"


def faces_figure(faces: np.ndarray, mean: np.ndarray, std: np.ndarray, path: str) -> None:
    """Eight faces, and the same faces normalized per pixel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    normalized = (faces[:SHOWN] - mean[..., 0]) / std[..., 0]
    fig, axes = plt.subplots(2, SHOWN, figsize=(11.0, 3.3), layout="constrained")
    for j in range(SHOWN):
        axes[0, j].imshow(faces[j], cmap="gray", vmin=0, vmax=1)
        im = axes[1, j].imshow(normalized[j], cmap="RdBu_r", vmin=-3, vmax=3)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("faces\n[0, 1]")
    axes[1, 0].set_ylabel("(x - mean) / std\nper pixel")
    fig.colorbar(im, ax=axes[1, :], shrink=0.9, label="std units")
    fig.suptitle("LFW faces (scikit-image) before and after per-pixel normalization with bnorm stats")
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Write the two PNGs into ``--out`` (default docs/_static) and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "_static"), help="folder for the two PNGs")
    args = parser.parse_args(argv)
    faces = lfw_faces()
    with tempfile.TemporaryDirectory() as work:
        summary = run_stats(faces, work, os.path.join(args.out, "lfw-stats.png"))
        mean, std = np.load(os.path.join(work, "mean.npy")), np.load(os.path.join(work, "std.npy"))
    faces_figure(faces, mean, std, os.path.join(args.out, "lfw-faces.png"))
    print(summary, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
