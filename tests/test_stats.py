"""bnorm.stats.compute: every reader against pixel values the tests wrote, exactly.

The expected statistics are the whole-data two-pass float64 computation
(``np.mean`` and ``np.var`` of every pixel value at once, divided by the bit
depth's maximum) of what was written -- or, for lossy JPEG, of what Pillow
decodes.  Streaming, chunking, worker counts and file order must reproduce it
to float64 rounding (and bit for bit where the task order is the same).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnorm.stats import DataError, UsageError, compute

Image = pytest.importorskip("PIL.Image")

RTOL = 1e-13  # float64 rounding of sums over at most ~1e5 values


def expected(pixels: list[np.ndarray], top: float = 255.0, ddof: int = 0) -> dict[str, np.ndarray]:
    """Two-pass float64 statistics per channel of the concatenated (H, W, C) images."""
    flat = np.concatenate([p.reshape(-1, p.shape[-1]).astype(np.float64) / top for p in pixels])
    return {
        "mean": flat.mean(axis=0),
        "std": flat.std(axis=0, ddof=ddof),
        "min": flat.min(axis=0),
        "max": flat.max(axis=0),
        "n": np.array(flat.shape[0]),
    }


def assert_stats(s, exp: dict[str, np.ndarray], rtol: float = RTOL) -> None:
    assert s.pixels == int(exp["n"])
    np.testing.assert_allclose(s.mean, exp["mean"], rtol=rtol, atol=0)
    np.testing.assert_allclose(s.std, exp["std"], rtol=rtol, atol=0)
    np.testing.assert_array_equal(s.min, exp["min"])
    np.testing.assert_array_equal(s.max, exp["max"])


def rgb_tree(root: Path, rng: np.random.Generator) -> list[np.ndarray]:
    """An ImageFolder tree (two class folders) of random RGB PNGs of two sizes."""
    pixels = []
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            h, w = (6, 5) if i % 2 else (4, 7)
            px = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            px[0, 0] = (0, 128, 255)
            Image.fromarray(px).save(root / cls / f"{i}.png")
            pixels.append(px)
    return pixels


def test_png_tree_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    pixels = rgb_tree(tmp_path / "train", rng)
    (tmp_path / "train" / "labels.csv").write_text("not an image")
    s = compute(str(tmp_path / "train"))
    assert_stats(s, expected(pixels))
    assert s.images == 8 and s.channel_names == ("R", "G", "B") and s.image_size is None
    assert len(s.files) == 8 and s.ignored == 1 and s.skipped == ()


def test_flat_colours_give_the_exact_constants(tmp_path: Path) -> None:
    # Two flat 4x4 images, (10, 20, 30) and (50, 60, 70): mean (30, 40, 50) / 255, std 20 / 255.
    for name, colour in (("a.png", (10, 20, 30)), ("b.png", (50, 60, 70))):
        Image.new("RGB", (4, 4), colour).save(tmp_path / name)
    s = compute(str(tmp_path))
    np.testing.assert_allclose(s.mean * 255, [30.0, 40.0, 50.0], rtol=1e-15)
    np.testing.assert_allclose(s.std * 255, [20.0, 20.0, 20.0], rtol=1e-15)
    # Not the average of per-image stds (0): the variation between images is in.
    assert (s.std > 0.07).all()


def test_jpeg_from_what_pillow_decodes(tmp_path: Path, rng: np.random.Generator) -> None:
    decoded = []
    for i in range(3):
        px = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(px).save(tmp_path / f"{i}.jpg", quality=85)
        with Image.open(tmp_path / f"{i}.jpg") as im:
            decoded.append(np.asarray(im.convert("RGB")))
    assert_stats(compute(str(tmp_path)), expected(decoded))


def test_16bit_png(tmp_path: Path, rng: np.random.Generator) -> None:
    pixels = []
    for i in range(3):
        px = rng.integers(0, 65536, size=(5, 6), dtype=np.uint16)
        im = Image.fromarray(px)
        assert im.mode == "I;16"
        im.save(tmp_path / f"{i}.png")
        pixels.append(px[..., None])
    s = compute(str(tmp_path))
    assert_stats(s, expected(pixels, top=65535.0))
    assert s.channel_names == ("gray",) and s.modes == ("mode I;16",)
    rgb = compute(str(tmp_path), channels="rgb")  # replicated at full 16-bit precision
    assert_stats(rgb, expected([np.repeat(p, 3, axis=2) for p in pixels], top=65535.0))


def test_palette_png(tmp_path: Path) -> None:
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 12)
    index = np.array([[0, 1, 2, 3], [3, 3, 1, 0]], dtype=np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"
    colours = np.array(palette[:12], dtype=np.uint8).reshape(4, 3)
    s = compute(str(tmp_path))
    assert_stats(s, expected([colours[index]]))


def test_channel_conversions(tmp_path: Path, rng: np.random.Generator) -> None:
    rgb = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((5, 5, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    gray = compute(str(tmp_path), channels="gray")
    with Image.open(tmp_path / "rgb.png") as im:
        luma = np.asarray(im.convert("L"))[..., None]  # Pillow's BT.601, rounded: torchvision's Grayscale
    assert_stats(gray, expected([luma, luma]))
    bgr = compute(str(tmp_path), channels="bgr")
    assert bgr.channel_names == ("B", "G", "R")
    assert_stats(bgr, expected([rgb[..., ::-1], rgb[..., ::-1]]))  # alpha dropped, not composited
    Image.fromarray(rgb[..., 0], mode="L").save(tmp_path / "l.png")
    with pytest.raises(DataError, match=r"mixed channel counts: .*l\.png has 1 \(mode L\), .*rgb\.png has 3"):
        compute(str(tmp_path))
    s = compute(str(tmp_path), channels="rgb")
    assert_stats(s, expected([np.repeat(rgb[..., :1], 3, axis=2), rgb, rgb]))


def test_la_and_bilevel(tmp_path: Path) -> None:
    la = np.zeros((2, 3, 2), np.uint8)
    la[..., 0] = [[0, 100, 200], [50, 50, 255]]
    la[..., 1] = 99
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as im:
        assert im.mode == "1"
    s = compute(str(tmp_path))
    assert_stats(s, expected([la[..., :1], np.array([[255, 0, 255]], np.uint8)[..., None]]))


def test_resize_and_center_crop_as_torchvision(tmp_path: Path, rng: np.random.Generator) -> None:
    px = rng.integers(0, 256, size=(10, 16, 3), dtype=np.uint8)
    Image.fromarray(px).save(tmp_path / "a.png")
    s = compute(str(tmp_path), resize=6, center_crop=5, per_pixel=True)
    # torchvision: Resize(6) -> 6 x int(6 * 16 / 10) = 6x9 bilinear; CenterCrop(5): top round(0.5) = 0,
    # left round(2.0) = 2.
    small = np.asarray(Image.fromarray(px).resize((9, 6), Image.Resampling.BILINEAR))
    crop = small[0:5, 2:7]
    assert_stats(s, expected([crop]))
    assert s.image_size == (5, 5)
    Image.fromarray(px[:4, :4]).save(tmp_path / "tiny.png")
    s = compute(str(tmp_path), center_crop=5)
    assert [Path(n).name for n, _ in s.skipped] == ["tiny.png"]
    assert "smaller than --center-crop 5" in s.skipped[0][1]


def test_per_pixel_images(tmp_path: Path, rng: np.random.Generator) -> None:
    pixels = [rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8) for _ in range(5)]
    for i, px in enumerate(pixels):
        Image.fromarray(px).save(tmp_path / f"{i}.png")
    s = compute(str(tmp_path), per_pixel=True, ddof=1)
    stack = np.stack(pixels).astype(np.float64) / 255
    np.testing.assert_allclose(s.pixel_mean, stack.mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(s.pixel_std, stack.std(axis=0, ddof=1), rtol=1e-12)
    assert_stats(s, expected(pixels, ddof=1))
    Image.fromarray(pixels[0][:2]).save(tmp_path / "z.png")
    with pytest.raises(
        DataError, match=r"--per-pixel needs images of one size: .*0\.png is 3x4, .*z\.png is 2x4"
    ):
        compute(str(tmp_path), per_pixel=True)
    tried = compute(str(tmp_path), per_pixel="try")
    assert tried.pixel_mean is None and "different sizes" in (tried.pixel_note or "")


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npy_layouts_and_chunks(tmp_path: Path, rng: np.random.Generator, layout: str) -> None:
    nhwc = rng.integers(0, 256, size=(11, 6, 5, 1 if layout == "NHW" else 3), dtype=np.uint8)
    stored = {"NHWC": nhwc, "NCHW": nhwc.transpose(0, 3, 1, 2), "NHW": nhwc[..., 0]}[layout]
    np.save(tmp_path / "x.npy", stored)
    whole = compute(str(tmp_path / "x.npy"), per_pixel=True)
    chunked = compute(str(tmp_path / "x.npy"), chunk_size=3, per_pixel=True)  # 4 tasks: 3 + 3 + 3 + 2
    for s in (whole, chunked):
        assert_stats(s, expected(list(nhwc)))
        assert s.images == 11
        np.testing.assert_allclose(s.pixel_mean, nhwc.mean(axis=0) / 255, rtol=RTOL)


def test_npy_float_offset_and_uint16(tmp_path: Path, rng: np.random.Generator) -> None:
    x = 1e4 + rng.normal(size=(40, 3, 3, 2))  # large offset, unit variance: no cancellation
    np.save(tmp_path / "f.npy", x)
    s = compute(str(tmp_path / "f.npy"), chunk_size=7, layout="NHWC")
    flat = x.reshape(-1, 2)
    np.testing.assert_allclose(s.mean, flat.mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(s.std, flat.std(axis=0), rtol=1e-12)
    assert any("outside [0, 1]" in w for w in __import__("bnorm.stats.report", fromlist=["x"]).warnings_of(s))
    u = rng.integers(0, 65536, size=(3, 2, 2, 1), dtype=np.uint16)
    np.save(tmp_path / "u.npy", u)
    assert_stats(compute(str(tmp_path / "u.npy")), expected(list(u), top=65535.0))
    np.save(tmp_path / "i.npy", u.astype(np.int32))
    with pytest.raises(UsageError, match=r"dtype int32, whose pixel scale is not known: pass --max-value"):
        compute(str(tmp_path / "i.npy"))
    assert_stats(compute(str(tmp_path / "i.npy"), max_value=65535.0), expected(list(u), top=65535.0))


def test_npz_members_streamed_in_chunks(tmp_path: Path, rng: np.random.Generator) -> None:
    x_train = rng.integers(0, 256, size=(9, 5, 6, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(5, 5, 6, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "d.npz", x_train=x_train, y_train=np.arange(9), x_test=x_test)
    with pytest.raises(UsageError, match=r"several image arrays .*pass --key NAME"):
        compute(str(tmp_path / "d.npz"))
    s = compute(str(tmp_path / "d.npz"), keys=["x_train"], chunk_size=2)
    assert_stats(s, expected(list(x_train)))
    with pytest.raises(UsageError, match=r"has no member 'x_val'"):
        compute(str(tmp_path / "d.npz"), keys=["x_val"])
    np.savez(tmp_path / "one.npz", images=x_test, labels=np.arange(5))  # stored, one image member
    assert_stats(compute(str(tmp_path / "one.npz"), chunk_size=2), expected(list(x_test)))


def test_layout_guess_and_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "amb.npy", np.zeros((2, 3, 5, 3), np.uint8))
    with pytest.raises(
        UsageError,
        match=r"amb\.npy has shape \(2, 3, 5, 3\): the channel axis is not clear; pass --layout NHWC",
    ):
        compute(str(tmp_path / "amb.npy"))
    assert compute(str(tmp_path / "amb.npy"), layout="NCHW").num_channels == 3
    np.save(tmp_path / "hwc.npy", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UsageError, match=r"or one 8x8 image with 3 channels\? Pass --layout NHW"):
        compute(str(tmp_path / "hwc.npy"))
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.uint8))
    with pytest.raises(UsageError, match=r"expected images: 3 dimensions \(NHW\) or 4"):
        compute(str(tmp_path / "flat.npy"))
    with pytest.raises(UsageError, match=r"\(2 dimensions\), which is not --layout NHW"):
        compute(str(tmp_path / "flat.npy"), layout="NHW")
    with pytest.raises(UsageError, match=r"nowhere does not exist"):
        compute(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"notes\.txt is neither an image"):
        compute(str(tmp_path / "notes.txt"))


def test_order_of_files_and_arguments(tmp_path: Path, rng: np.random.Generator) -> None:
    pixels = rgb_tree(tmp_path / "d", rng)
    files = sorted(str(p) for p in (tmp_path / "d").rglob("*.png"))
    ref = compute(files)
    order = rng.permutation(len(files))
    shuffled = compute([files[i] for i in order] + [files[0]])  # any order, duplicates once
    for name in ("mean", "std", "var", "min", "max"):
        np.testing.assert_array_equal(getattr(shuffled, name), getattr(ref, name))
    # The whole-data computation in the shuffled order agrees to rounding.
    assert_stats(ref, expected([pixels[i] for i in order]))


def test_workers_give_identical_bits(tmp_path: Path, rng: np.random.Generator) -> None:
    rgb_tree(tmp_path / "d", rng)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, size=(13, 6, 5, 3), dtype=np.uint8))
    paths = [str(tmp_path / "d"), str(tmp_path / "x.npy")]
    one = compute(paths, workers=1, chunk_size=4, per_pixel="try", histograms=True)
    four = compute(paths, workers=4, chunk_size=4, per_pixel="try", histograms=True)
    for name in ("mean", "std", "var", "min", "max", "hist"):
        np.testing.assert_array_equal(getattr(four, name), getattr(one, name))
    assert four.images == one.images == 8 + 13


def test_corrupt_and_empty_files(tmp_path: Path, rng: np.random.Generator) -> None:
    pixels = [rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8) for _ in range(2)]
    for i, px in enumerate(pixels):
        Image.fromarray(px).save(tmp_path / f"good{i}.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (tmp_path / "good0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    np.save(tmp_path / "short.npy", np.zeros((4, 5, 6, 3), np.uint8))
    with open(tmp_path / "short.npy", "r+b") as f:
        f.truncate(200)
    np.save(tmp_path / "none.npy", np.zeros((0, 5, 6, 3), np.uint8))
    folder_only = compute(str(tmp_path))  # the arrays are not read from a folder: counted as ignored
    assert folder_only.ignored == 2 and folder_only.unread_arrays == 2
    from bnorm.stats.report import warnings_of

    assert (
        "2 .npy/.npz files in the folders not read: folders are read for images"
        in warnings_of(folder_only)[-1]
    )
    s = compute([str(tmp_path), *(str(p) for p in sorted(tmp_path.glob("*.npy")))], workers=2)
    assert s.ignored == 0 and s.unread_arrays == 0
    assert_stats(s, expected(pixels))
    names = sorted(Path(n).name for n, _ in s.skipped)
    assert names == ["empty.png", "garbage.jpg", "none.npy", "short.npy", "truncated.png"]
    reasons = dict((Path(n).name, why) for n, why in s.skipped)
    assert "truncated" in reasons["short.npy"] and "no images" in reasons["none.npy"]
    with pytest.raises(DataError, match=r"--strict stops at the first file that cannot be read"):
        compute([str(tmp_path), str(tmp_path / "short.npy")], strict=True)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"12345")
    with pytest.raises(DataError, match=r"no images could be read: .*x\.png"):
        compute(str(only_bad))
    with pytest.raises(DataError, match=r"no images could be read \(no image or array files found\)"):
        compute(str(_empty(tmp_path)))


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "nothing"
    d.mkdir()
    (d / ".hidden.png").write_bytes(b"")  # hidden names are skipped
    return d


def test_no_pickle_and_no_unbounded_allocation(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([[[1]], [[2]]], dtype=object), allow_pickle=True)
    s_dir = tmp_path / "d"
    s_dir.mkdir()
    os.replace(tmp_path / "obj.npy", s_dir / "obj.npy")
    np.save(s_dir / "ok.npy", np.zeros((2, 2, 2), np.uint8))
    s = compute([str(p) for p in s_dir.iterdir()])
    assert [Path(n).name for n, _ in s.skipped] == ["obj.npy"]
    assert "expected real numbers" in s.skipped[0][1]
    # A header that claims 10**12 images fails on the file size, before any read.
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**12, 4, 4)}
    with open(s_dir / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    with zipfile.ZipFile(s_dir / "huge.npz", "w") as zf, zf.open("x.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
    s = compute([str(p) for p in s_dir.iterdir()])
    reasons = {Path(n).name.split("[")[0]: why for n, why in s.skipped}
    assert "truncated" in reasons["huge.npy"] and "truncated" in reasons["huge.npz"]


def test_max_files_spreads_over_the_sorted_list(tmp_path: Path) -> None:
    for cls in range(4):
        (tmp_path / f"c{cls}").mkdir()
        for i in range(5):
            Image.new("L", (2, 2), cls * 50 + i).save(tmp_path / f"c{cls}" / f"{i}.png")
    s = compute(str(tmp_path), max_files=4)
    assert [Path(f).parent.name for f in s.files] == ["c0", "c1", "c2", "c3"]


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="channels must be 'rgb', 'bgr', 'gray' or None, got 'RGB'"):
        compute(str(tmp_path), channels="RGB")
    with pytest.raises(UsageError, match="workers must be an integer >= 1, got 0"):
        compute(str(tmp_path), workers=0)
    with pytest.raises(UsageError, match="max_value must be a positive finite number"):
        compute(str(tmp_path), max_value=0.0)
    np.save(tmp_path / "x.npy", np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataError, match="--ddof 4 needs more than 4 values per channel, got 4"):
        compute(str(tmp_path / "x.npy"), ddof=4)


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_arrays_are_read_one_chunk_at_a_time(tmp_path: Path, rng: np.random.Generator, kind: str) -> None:
    import tracemalloc

    x = rng.integers(0, 256, size=(400, 64, 64, 3), dtype=np.uint8)  # 39 MB as float64
    path = tmp_path / f"x.{kind}"
    if kind == "npy":
        np.save(path, x)
    else:
        np.savez_compressed(path, x=x)
    chunk = 10 * 64 * 64 * 3 * 8  # bytes of one float64 chunk of 10 images
    compute(str(path), chunk_size=10)  # warm the imports
    tracemalloc.start()
    try:
        s = compute(str(path), chunk_size=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s.images == 400
    # Measured: 1.1 MB (npy, memory-mapped) and 2.3 MB (npz: the zip's read buffers), i.e. the chunk and
    # its float64 copy, not the 39 MB array.
    assert peak < 3 * chunk, f"peak {peak / 1e6:.1f} MB for chunks of {chunk / 1e6:.1f} MB"


def test_fortran_order_big_endian_and_resize_on_arrays(tmp_path: Path, rng: np.random.Generator) -> None:
    x = rng.integers(0, 65536, size=(7, 5, 6, 3), dtype=np.uint16)
    np.save(tmp_path / "f.npy", np.asfortranarray(x.astype(">u2")))
    s = compute(str(tmp_path / "f.npy"), chunk_size=3)
    assert_stats(s, expected(list(x), top=65535.0))
    with pytest.raises(UsageError, match=r"--resize applies to image files, and .*f\.npy is an array"):
        compute(str(tmp_path / "f.npy"), resize=4)
    cropped = compute(str(tmp_path / "f.npy"), center_crop=4)  # rows 0:4 (round(0.5) = 0), columns 1:5
    assert_stats(cropped, expected(list(x[:, 0:4, 1:5]), top=65535.0))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    chunk=st.integers(1, 13),
    channels=st.sampled_from([1, 3]),
    offset=st.sampled_from([0.0, 1e3]),
    seed=st.integers(0, 2**31),
)
def test_any_chunking_equals_the_whole_data_computation(
    n: int, chunk: int, channels: int, offset: float, seed: int
) -> None:
    import tempfile

    x = offset + np.random.default_rng(seed).random((n, 5, 6, channels))
    with tempfile.TemporaryDirectory() as d:
        np.save(os.path.join(d, "x.npy"), x)
        s = compute(os.path.join(d, "x.npy"), chunk_size=chunk, layout="NHWC", max_value=1.0)
    flat = x.reshape(-1, channels)
    np.testing.assert_allclose(s.mean, flat.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(s.std, flat.std(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(s.max, flat.max(axis=0))


def test_array_channels_and_progress_hook(tmp_path: Path, rng: np.random.Generator) -> None:
    x = rng.integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    luma = (x[..., :1] / 255.0) * 0.299 + (x[..., 1:2] / 255.0) * 0.587 + (x[..., 2:] / 255.0) * 0.114
    gray = compute(str(tmp_path / "x.npy"), channels="gray")
    assert gray.channel_names == ("gray",)
    np.testing.assert_allclose(gray.mean, [luma.mean()], rtol=1e-14)
    np.testing.assert_allclose(gray.std, [luma.std()], rtol=1e-12)
    bgr = compute(str(tmp_path / "x.npy"), channels="bgr")
    assert bgr.channel_names == ("B", "G", "R")
    assert_stats(bgr, expected(list(x[..., ::-1])))
    np.save(tmp_path / "four.npy", np.zeros((2, 5, 6, 4), np.uint8))
    with pytest.raises(
        DataError, match=r"four\.npy has 4 channels, which cannot become --channels rgb \(1 or 3 can\)"
    ):
        compute(str(tmp_path / "four.npy"), channels="rgb")
    seen = []

    def progress(parts, total):
        for p in parts:
            seen.append((p.index, total))
            yield p

    compute(str(tmp_path / "x.npy"), chunk_size=2, progress=progress)
    assert seen == [(0, 2), (1, 2)]
