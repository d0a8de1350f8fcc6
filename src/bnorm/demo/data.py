r"""Datasets for the demo: scikit-learn's bundled 8x8 digits, or a local ``mnist.npz``.

Images are returned as float32 arrays of shape (N, H, W) scaled to [-1, 1]
(``x / max * 2 - 1``, max = 16 for the digits and 255 for MNIST, as the
from-scratch tutorials' ``(x/255 - 0.5)/0.5``), labels as int64 arrays of shape (N,).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

# The example loads scikit-learn's bundled digits (see the repository's src/conftest.py).
__doctest_requires__ = {"load_digits": ("sklearn",)}

__all__ = ["Dataset", "load_digits", "load_mnist_npz", "scale_images"]


@dataclass(frozen=True)
class Dataset:
    """A train/test split of grey images.

    Attributes
    ----------
    name : str
        Shown in the report, e.g. ``"digits 8x8 (1438 train / 359 test)"``.
    x_train, x_test : ndarray of shape (N, H, W), float32 in [-1, 1]
    y_train, y_test : ndarray of shape (N,), int64 in [0, 10)
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of one image."""
        h, w = self.x_train.shape[1:]
        return int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``max label + 1``."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def scale_images(x: Any, max_value: float) -> np.ndarray:
    r"""Map pixel values in ``[0, max_value]`` to float32 in [-1, 1]: :math:`2x/\max - 1`.

    Examples
    --------
    >>> scale_images(np.array([0, 8, 16]), 16).tolist()
    [-1.0, 0.0, 1.0]
    """
    return (np.asarray(x, np.float64) * (2.0 / max_value) - 1.0).astype(np.float32)


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, nothing is downloaded), split by `seed`.

    Parameters
    ----------
    seed : int, default 0
        Seeds the permutation that splits the images; the same seed gives the
        same split.
    test_fraction : float, default 0.2
        Share of the images held out for testing (359 of 1,797 for 0.2).

    Returns
    -------
    Dataset
        Pixels 0..16 scaled to [-1, 1].

    Examples
    --------
    >>> d = load_digits(seed=0)
    >>> d.x_train.shape, d.x_test.shape, d.num_classes
    ((1438, 8, 8), (359, 8, 8), 10)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as _sk_load_digits  # type: ignore[import-untyped, unused-ignore]

    bunch = _sk_load_digits()
    images = scale_images(bunch.images, 16.0)  # (1797, 8, 8)
    labels = np.asarray(bunch.target, np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return Dataset(
        f"digits 8x8 ({len(train)} train / {len(test)} test)",
        images[train],
        labels[train],
        images[test],
        labels[test],
    )


_MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_mnist_npz(path: str | os.PathLike[str]) -> Dataset:
    """Load the standard ``mnist.npz`` (keys x_train, y_train, x_test, y_test; uint8 images).

    The file is read with ``numpy.load(allow_pickle=False)``: nothing is unpickled.

    Parameters
    ----------
    path : str or path-like
        The ``.npz`` file, e.g. Keras' ``mnist.npz``: x_train (60000, 28, 28),
        y_train (60000,), x_test (10000, 28, 28), y_test (10000,).

    Returns
    -------
    Dataset
        Pixels 0..255 scaled to [-1, 1].

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    ValueError
        If the file is not an ``.npz`` archive, lacks a key, or the arrays do
        not have the shapes above (any N, H, W) or labels outside 0..9.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data: no such file: {path!r}")
    keys = ", ".join(_MNIST_KEYS)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"--data must be an .npz archive with keys {keys}; could not read {path!r}: {exc}"
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"--data must be an .npz archive with keys {keys}, got a single array in {path!r}")
    with loaded as npz:
        missing = [k for k in _MNIST_KEYS if k not in npz.files]
        if missing:
            raise ValueError(
                f"--data {path!r} lacks {', '.join(missing)}: expected keys {keys}, "
                f"got {', '.join(npz.files) or 'none'}"
            )
        try:
            arrays = {k: npz[k] for k in _MNIST_KEYS}
        except ValueError as exc:  # an object array needs pickle: refused
            raise ValueError(
                f"--data {path!r} holds an array numpy cannot read without pickle: {exc}"
            ) from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.shape != (x.shape[0],):
            raise ValueError(
                f"--data: x_{split} must have shape (N, H, W) and y_{split} shape (N,), "
                f"got {x.shape} and {y.shape}"
            )
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9):
            raise ValueError(f"--data: y_{split} must hold integer labels 0..9, got dtype {y.dtype}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            "--data: train and test images differ in size: "
            f"{arrays['x_train'].shape[1:]} vs {arrays['x_test'].shape[1:]}"
        )
    n_train, n_test = len(arrays["y_train"]), len(arrays["y_test"])
    h, w = arrays["x_train"].shape[1:]
    return Dataset(
        f"{os.path.basename(path)} {h}x{w} ({n_train} train / {n_test} test)",
        scale_images(arrays["x_train"], 255.0),
        arrays["y_train"].astype(np.int64),
        scale_images(arrays["x_test"], 255.0),
        arrays["y_test"].astype(np.int64),
    )
