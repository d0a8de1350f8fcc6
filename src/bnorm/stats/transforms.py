"""Shape and channel steps shared by images and arrays: center crop, channel conversion.

Inputs and outputs are float64 ``(k, C, H, W)`` batches on the [0, 1] scale.
``center_crop`` is torchvision's ``CenterCrop(N)`` (the same offsets:
``int(round((H - N) / 2))``); an image smaller than N is an error for that
file (torchvision would pad it with zeros, which would enter the statistics).
Arrays change channels in NumPy (:func:`to_channels`): gray from RGB is the
BT.601 luma of :func:`bnorm.preprocessing.to_grayscale`, without rounding.
"""

from __future__ import annotations

import numpy as np

from ..preprocessing import to_grayscale

__all__ = ["center_crop", "to_channels"]


def center_crop(x: np.ndarray, size: int, name: str) -> np.ndarray:
    """The central ``size x size`` window of each image of `x` ``(k, C, H, W)`` (a copy)."""
    h, w = x.shape[2], x.shape[3]
    if h < size or w < size:
        raise ValueError(
            f"{name} is {h}x{w}, smaller than --center-crop {size} (resize it first: --resize {size})"
        )
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return np.ascontiguousarray(x[:, :, top : top + size, left : left + size])


def to_channels(x: np.ndarray, channels: str | None, name: str) -> np.ndarray:
    """`x` ``(k, C, H, W)`` as `channels`: 'gray' (1), 'rgb' or 'bgr' (3), None (as stored)."""
    c = x.shape[1]
    if channels is None:
        return x
    if channels == "gray":
        if c == 1:
            return x
        if c == 3:
            return to_grayscale(x, axis=1)
    elif c in (1, 3):
        rgb = np.repeat(x, 3, axis=1) if c == 1 else x
        return np.ascontiguousarray(rgb[:, ::-1]) if channels == "bgr" else rgb
    raise ValueError(f"{name} has {c} channels, which cannot become --channels {channels} (1 or 3 can)")
