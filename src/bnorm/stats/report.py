"""What ``bnorm stats`` prints and writes: the summary, the paste-ready lines, the JSON.

Two scales: **[0, 1]** (what ``torchvision.transforms.ToTensor`` gives and what
torchvision's ``Normalize`` constants are in) and **[0, 255]** (8-bit pixel
values: Caffe-style mean subtraction, Keras pipelines such as
``keras.utils.image_dataset_from_directory``).  The [0, 255] numbers are the
[0, 1] ones times 255 (the variance times 255**2).

The paste-ready lines give each constant as the shortest decimal that reads
back as the same float32 -- the very value PyTorch and Keras hold in their
float32 parameters -- so pasting loses nothing they would keep.  The JSON has
the float64 values in full (Python's shortest round-trip ``repr``).

JSON schema ``bnorm-stats/1`` (:func:`to_json`): ``schema``, ``bnorm_version``,
``paths``, ``options`` (the options that change the numbers), ``images``,
``pixels_per_channel``, ``image_size`` (``[H, W]`` or null), ``channels``
(names), ``files`` (``read``, ``skipped``, ``ignored``), ``skipped`` (list of
``{"path", "reason"}``), ``modes``, ``scale_1`` and ``scale_255`` (each
``mean``, ``std``, ``var``, ``min``, ``max``: one number per channel),
``paste`` (``bnorm``, ``torchvision``, ``keras``: the lines), ``outputs``
(paths written: ``mean_npy``, ``std_npy``, ``mean_png``, ``std_png``,
``figure``) and ``warnings``.  Nothing in it depends on ``--workers`` or on the
number of MPI ranks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np

from .._files import write_atomic as atomic_write
from .._version import __version__
from .dataset import DatasetStats

__all__ = ["SCHEMA", "float32_text", "paste_lines", "warnings_of", "summary", "to_json", "write_json"]

#: The ``schema`` field of the JSON.
SCHEMA = "bnorm-stats/1"

#: Skipped files listed in the printed summary (all of them are in the JSON).
_LIST_SKIPPED = 10


def float32_text(v: float) -> str:
    """The shortest decimal that reads back as ``np.float32(v)``.

    Examples
    --------
    >>> float32_text(0.49139968031590507)
    '0.49139968'
    >>> float32_text(0.2)
    '0.2'
    """
    return np.format_float_positional(np.float32(v), unique=True, trim="-")


def _vector(values: np.ndarray) -> str:
    return "[" + ", ".join(float32_text(v) for v in values) + "]"


def paste_lines(stats: DatasetStats) -> dict[str, str]:
    """The lines to paste into bnorm, torchvision and Keras code, by name.

    bnorm and torchvision take the [0, 1] mean and std, channels first (bnorm's
    ``axis=1``; torchvision's tensors are ``(C, H, W)``); Keras takes the
    [0, 255] mean and variance, channels last (``axis=-1``).
    """
    m1, s1 = stats.mean, stats.std
    m255, v255 = stats.mean * 255.0, stats.var * 255.0**2
    return {
        "bnorm": f"Normalize(mean={_vector(m1)}, std={_vector(s1)}, axis=1)",
        "torchvision": f"transforms.Normalize(mean={_vector(m1)}, std={_vector(s1)})",
        "keras": f"keras.layers.Normalization(axis=-1, mean={_vector(m255)}, variance={_vector(v255)})",
    }


_PASTE_NOTES = {
    "bnorm": "bnorm (from bnorm.preprocessing import Normalize): input (N, C, H, W) in [0, 1]",
    "torchvision": "torchvision, after transforms.ToTensor(): input (C, H, W) in [0, 1]",
    "keras": "Keras: input (N, H, W, C) in [0, 255]",
}


def warnings_of(stats: DatasetStats) -> list[str]:
    """What looks wrong: values outside [0, 1], constant channels, no per-pixel images, unread arrays."""
    out = []
    if (stats.max > 1.0).any() or (stats.min < 0.0).any():
        out.append(
            f"values outside [0, 1] on the [0, 1] scale (min {stats.min.min():g}, max {stats.max.max():g}): "
            "if the data is stored as 0..255 floats, pass --max-value 255"
        )
    if (stats.std == 0).any():
        flat = [n for n, s in zip(stats.channel_names, stats.std, strict=True) if s == 0]
        out.append(f"channel {', '.join(flat)} is constant (std 0): Normalize would divide by zero")
    if stats.pixel_note is not None:
        out.append(f"no mean and std images: {stats.pixel_note}")
    if stats.unread_arrays:
        out.append(
            f"{stats.unread_arrays} .npy/.npz file{'s' if stats.unread_arrays > 1 else ''} in the folders "
            "not read: folders are read for images; name arrays to read them (e.g. data/*.npy)"
        )
    return out


def _table(stats: DatasetStats) -> list[str]:
    rows = [f"{'scale':<10}{'channel':>8}{'mean':>12}{'std':>12}{'min':>12}{'max':>12}"]
    for label, factor, fmt in (("[0, 1]", 1.0, "{:12.5f}"), ("[0, 255]", 255.0, "{:12.3f}")):
        for i, name in enumerate(stats.channel_names):
            cells = (stats.mean[i], stats.std[i], stats.min[i], stats.max[i])
            rows.append(
                f"{label if i == 0 else '':<10}{name:>8}" + "".join(fmt.format(v * factor) for v in cells)
            )
    return rows


def summary(stats: DatasetStats) -> str:
    """The printed summary: counts, the table in both scales, the paste-ready lines, what was skipped."""
    c = stats.num_channels
    size = f"{stats.image_size[0]}x{stats.image_size[1]}" if stats.image_size else "of several sizes"
    names = "".join(stats.channel_names) if c == 3 else ", ".join(stats.channel_names)
    n_files = len(stats.files)
    lines = [
        f"bnorm stats: {stats.images:,} images {size}, {c} channel{'s' if c != 1 else ''} ({names}), "
        f"from {n_files:,} file{'s' if n_files != 1 else ''}; {len(stats.skipped)} skipped",
        f"pixels per channel: {stats.pixels:,}; std with ddof={stats.ddof}",
        "",
        *_table(stats),
        "",
        "paste-ready:",
    ]
    paste = paste_lines(stats)
    for key in ("bnorm", "torchvision", "keras"):
        lines += [f"  # {_PASTE_NOTES[key]}", f"  {paste[key]}"]
    if stats.skipped:
        lines += ["", f"skipped {len(stats.skipped)} (could not be read):"]
        for name, why in stats.skipped[:_LIST_SKIPPED]:
            lines.append(f"  {why}" if name in why else f"  {name}: {why}")
        if len(stats.skipped) > _LIST_SKIPPED:
            lines.append(f"  ... and {len(stats.skipped) - _LIST_SKIPPED} more (all listed by --json)")
    warnings = warnings_of(stats)
    if warnings:
        lines += [""] + [f"warning: {w}" for w in warnings]
    return "\n".join(lines)


def _scale(stats: DatasetStats, factor: float) -> dict[str, list[float]]:
    return {
        "mean": (stats.mean * factor).tolist(),
        "std": (stats.std * factor).tolist(),
        "var": (stats.var * factor**2).tolist(),
        "min": (stats.min * factor).tolist(),
        "max": (stats.max * factor).tolist(),
    }


def to_json(
    stats: DatasetStats, paths: Sequence[str], options: Mapping[str, Any], outputs: Mapping[str, str]
) -> dict[str, Any]:
    """The JSON document (schema ``bnorm-stats/1``, see the module docstring)."""
    return {
        "schema": SCHEMA,
        "bnorm_version": __version__,
        "paths": list(paths),
        "options": dict(options),
        "images": stats.images,
        "pixels_per_channel": stats.pixels,
        "image_size": list(stats.image_size) if stats.image_size else None,
        "channels": list(stats.channel_names),
        "files": {"read": len(stats.files), "skipped": len(stats.skipped), "ignored": stats.ignored},
        "skipped": [{"path": name, "reason": why} for name, why in stats.skipped],
        "modes": list(stats.modes),
        "scale_1": _scale(stats, 1.0),
        "scale_255": _scale(stats, 255.0),
        "paste": paste_lines(stats),
        "outputs": dict(outputs),
        "warnings": warnings_of(stats),
    }


def write_json(data: Mapping[str, Any], path: str) -> str:
    """Write `data` to `path` atomically (a temporary file in the same folder, then a rename)."""
    text = (json.dumps(data, indent=2) + "\n").encode("utf-8")

    def write(f: IO[bytes]) -> None:
        f.write(text)

    return atomic_write(path, write)
