"""Pictures of the statistics: the mean and std images (``--per-pixel``) and ``--figure``.

``write_pixel_images`` writes ``mean.npy`` and ``std.npy`` (float64 ``(H, W, C)``
on the [0, 1] scale, the exact per-pixel statistics) and ``mean.png``,
``std.png`` for the eye: the mean at its own brightness (``round(255 mean)``),
the std stretched so that its largest value is white (it is at most 0.5, so
unstretched it would be dark).  BGR images are shown in RGB order.  PNGs need
Pillow.

``write_figure`` (matplotlib) draws one PNG: the mean image, the std image,
and the per-channel histogram of the pixel values before and after
normalization.  Normalization is affine per channel, so the second histogram is
the first with each level ``k / 255`` moved to ``(k / 255 - mean) / std``:
both come from one pass over the data.
"""

from __future__ import annotations

import os
from typing import IO, Any

import numpy as np

from .._files import write_atomic as atomic_write
from .dataset import DatasetStats

__all__ = ["FIGURE_HINT", "write_pixel_images", "write_figure", "display_images"]

#: What to run when matplotlib is missing.
FIGURE_HINT = 'pip install matplotlib  (or the demo extras: pip install "bnorm[demo]")'

_COLOURS = {"R": "tab:red", "G": "tab:green", "B": "tab:blue", "gray": "black"}


def display_images(stats: DatasetStats) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std images as uint8 ``(H, W)`` or ``(H, W, 3)`` RGB, for display."""
    if stats.pixel_mean is None or stats.pixel_std is None:
        raise ValueError(f"no per-pixel statistics ({stats.pixel_note or 'per_pixel was not asked for'})")
    mean, std = stats.pixel_mean, stats.pixel_std
    if stats.channel_names == ("B", "G", "R"):
        mean, std = mean[..., ::-1], std[..., ::-1]
    if mean.shape[2] not in (1, 3):
        mean, std = mean.mean(axis=2, keepdims=True), std.mean(axis=2, keepdims=True)
    top = float(std.max())
    mean8 = np.clip(np.rint(mean * 255.0), 0, 255).astype(np.uint8)
    std8 = np.clip(np.rint(std / (top if top > 0 else 1.0) * 255.0), 0, 255).astype(np.uint8)
    if mean8.shape[2] == 1:
        return mean8[..., 0], std8[..., 0]
    return mean8, std8


def write_pixel_images(stats: DatasetStats, out: str) -> dict[str, str]:
    """Write mean.npy, std.npy, mean.png and std.png into the folder `out`; their paths by name."""
    from PIL import Image

    assert stats.pixel_mean is not None and stats.pixel_std is not None
    os.makedirs(out, exist_ok=True)
    written = {}
    mean8, std8 = display_images(stats)
    for name, arr, img in (("mean", stats.pixel_mean, mean8), ("std", stats.pixel_std, std8)):

        def save_npy(f: IO[bytes], a: np.ndarray = arr) -> None:
            np.save(f, a, allow_pickle=False)

        def save_png(f: IO[bytes], i: np.ndarray = img) -> None:
            Image.fromarray(i).save(f, format="PNG")

        written[f"{name}_npy"] = atomic_write(os.path.join(out, f"{name}.npy"), save_npy)
        written[f"{name}_png"] = atomic_write(os.path.join(out, f"{name}.png"), save_png)
    return written


def _image_panel(ax: Any, img: np.ndarray | None, title: str, note: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if img is None:
        ax.text(0.5, 0.5, note or "", ha="center", va="center", fontsize=9, transform=ax.transAxes)
        ax.set_title(title)
        return
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title)


def write_figure(stats: DatasetStats, path: str, title: str | None = None) -> str:
    """One PNG at `path`: mean image, std image, histograms before and after normalization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if stats.hist is None:
        raise ValueError("the figure needs the histograms: compute(..., histograms=True)")
    images = display_images(stats) if stats.pixel_mean is not None else (None, None)
    note = (
        "no mean image:\nimages of several sizes\n(--resize N --center-crop N)" if stats.pixel_note else None
    )
    fig, axes = plt.subplots(
        1, 4, figsize=(13.0, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.6, 1.6]}, layout="constrained"
    )
    _image_panel(axes[0], images[0], "mean image", note)
    _image_panel(axes[1], images[1], "std image (max = white)", note)
    levels = np.arange(256) / 255.0
    frac = stats.hist[:, 1:257] / stats.pixels
    for i, name in enumerate(stats.channel_names):
        colour = _COLOURS.get(name)
        axes[2].plot(levels, frac[i], color=colour, lw=1.0, label=name)
        z = (levels - stats.mean[i]) / (stats.std[i] if stats.std[i] > 0 else 1.0)
        axes[3].plot(z, frac[i], color=colour, lw=1.0, label=name)
    axes[2].set_title("pixel values")
    axes[2].set_xlabel("value on the [0, 1] scale")
    axes[3].set_title("after (x - mean) / std")
    axes[3].set_xlabel("normalized value")
    for ax in axes[2:]:
        ax.set_ylabel("fraction of pixels")
        ax.legend(fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
    axes[3].axvline(0.0, color="0.5", lw=0.8, ls="--")
    size = f"{stats.image_size[0]}x{stats.image_size[1]}" if stats.image_size else "several sizes"
    fig.suptitle(title or f"bnorm stats: {stats.images:,} images ({size})", fontsize=11)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=150, format="png"))
    finally:
        plt.close(fig)
    return path
