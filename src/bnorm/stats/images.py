"""Image files through Pillow: decode, convert to the asked channels, resize.

Pillow is the optional extra ``bnorm[images]``; it is imported on first use
and :data:`PILLOW_HINT` says what to install when it is missing.

How each Pillow mode becomes channels (``--channels``; default: the file's own):

* ``L`` and ``1`` (bilevel, 0 or 255): 1 channel; ``rgb``/``bgr`` replicate it
  3 times;
* ``LA``: 1 channel, alpha dropped;
* ``I;16`` (16-bit gray): 1 channel, value / 65535; ``rgb``/``bgr`` replicate
  it at 16 bits;
* ``I`` (32-bit) and ``F`` (float): 1 channel, the value as stored;
* every other mode (``RGB``, ``RGBA``, ``P``, ``PA``, ``CMYK``, ``YCbCr``, ...):
  3 channels by Pillow's ``convert("RGB")`` (``bgr``: reversed), or 1 by
  ``convert("L")`` with ``gray``.

``convert("RGB")`` drops alpha without compositing and looks palettes up;
``convert("L")`` is ITU-R BT.601 luma rounded to 8 bits -- what torchvision's
``ImageFolder`` loader and ``transforms.Grayscale`` give on PIL images.  Values
land on the [0, 1] scale by the bit depth: 8-bit / 255, 16-bit / 65535
(``--max-value`` overrides).  Pillow decodes 16-bit RGB PNGs as 8-bit RGB and
animated GIFs as their first frame.

``--resize N`` is torchvision's ``Resize(N)`` on PIL images: the shorter side
becomes N, the longer ``int(N * long / short)``, Pillow's bilinear filter
(antialiased); an image whose shorter side is already N is left as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PILLOW_HINT", "have_pillow", "read_image"]

#: What to run when Pillow is missing (from an installed package, and from a clone).
PILLOW_HINT = 'pip install "bnorm[images]"  (from a clone of bnorm: pip install -e ".[images]")'

_GRAY_8 = ("1", "L", "LA", "P;L")
_GRAY_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_MAX_16 = 65535.0


def have_pillow() -> bool:
    """Whether Pillow can be imported."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def _working_image(im: Any, channels: str | None) -> tuple[Any, float, bool]:
    """`im` converted for `channels`, the value that is 1.0, and whether to replicate to 3 channels."""
    mode = im.mode
    if mode in _GRAY_WIDE:
        top = _MAX_16 if mode.startswith("I;16") else 1.0
        return im, top, channels in ("rgb", "bgr")
    if mode in _GRAY_8:
        if channels in ("rgb", "bgr"):
            return im.convert("RGB"), 255.0, False
        return im.convert("L"), 255.0, False
    if channels == "gray":
        return im.convert("L"), 255.0, False
    return im.convert("RGB"), 255.0, False


def _resized(im: Any, size: int) -> Any:
    from PIL import Image

    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return im
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return im.resize((new_w, new_h), Image.Resampling.BILINEAR)


def read_image(
    path: str, channels: str | None, resize: int | None, max_value: float | None
) -> tuple[np.ndarray, str]:
    """The image at `path` as float64 ``(1, C, H, W)`` on the [0, 1] scale, and its Pillow mode.

    Parameters
    ----------
    path : str
        An image file.
    channels : {"rgb", "bgr", "gray"} or None
        The form to convert to (None: the file's own; see the module's table).
    resize : int or None
        torchvision's ``Resize(resize)``.
    max_value : float or None
        The stored value that is 1.0 (default: by bit depth).

    Raises
    ------
    Exception
        Whatever Pillow raises for a file it cannot decode (OSError, SyntaxError,
        ValueError, ``DecompressionBombError``, ...): the caller reports the file.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        work, top, replicate = _working_image(im, channels)
        if resize is not None:
            work = _resized(work, resize)
        stored = np.asarray(work)
    chw = stored[np.newaxis] if stored.ndim == 2 else stored.transpose(2, 0, 1)
    if replicate:
        chw = np.broadcast_to(chw, (3, *chw.shape[1:]))
    if channels == "bgr":
        chw = chw[::-1]
    scale = top if max_value is None else max_value
    # One pass: cast to float64, channels first (so each channel's moments are long
    # contiguous rows), divided by the scale -- k / 255 correctly rounded.
    x = np.empty((1, *chw.shape), dtype=np.float64)
    np.divide(chw, scale, out=x[0])
    return x, mode
