"""bnorm.preprocessing: streaming statistics, Normalize, center/standardize/minmax."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnorm
from bnorm.functional._kernels.moments import Moments
from bnorm.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    RunningStats,
    bgr_to_rgb,
    center,
    dataset_stats,
    minmax_scale,
    rgb_to_bgr,
    standardize,
    to_grayscale,
)


def _splits(rng, n, parts):
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(parts, n - 1), replace=False)) if n > 1 else []
    return np.split(np.arange(n), cuts)


# -- RunningStats: exact streaming ----------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    offset=st.sampled_from([0.0, 1.0, -1e4, 1e6, 1e8, -1e8]),
    n=st.integers(2, 200),
    parts=st.integers(1, 12),
)
def test_streaming_equals_whole_data(seed, offset, n, parts):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 2)) * rng.uniform(0.1, 10) + offset
    stats = RunningStats(axis=1)
    for idx in _splits(rng, n, parts):
        stats.update(x[idx])
    whole_mean = x.mean(axis=(0, 2))
    whole_var = ((x - whole_mean[None, :, None]) ** 2).mean(axis=(0, 2))
    assert stats.count == n * 2
    np.testing.assert_allclose(stats.mean, whole_mean, rtol=1e-12)
    np.testing.assert_allclose(stats.var(), whole_var, rtol=1e-6)
    np.testing.assert_allclose(stats.std(ddof=1), np.sqrt(whole_var * (2 * n) / (2 * n - 1)), rtol=1e-6)


def test_offset_1e8_relative_error_below_1e_6():
    """The textbook one-pass formula E[x^2] - E[x]^2 loses everything here; Chan's merge does not."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10_000, 4)) + 1e8
    stats = RunningStats(axis=-1)
    for part in np.array_split(x, 37):
        stats.update(part)
    d = x - x.mean(axis=0)
    exact = (d * d).mean(axis=0)
    assert np.max(np.abs(stats.var() / exact - 1)) < 1e-6
    naive = (x * x).mean(axis=0) - x.mean(axis=0) ** 2  # what "sum of squares" streaming gives
    assert np.max(np.abs(naive / exact - 1)) > 1e-2


def test_averaging_batch_stds_is_wrong_and_running_stats_is_right():
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=m, size=(100, 1)) for m in (0.0, 10.0)]
    whole = np.concatenate(batches).std()
    averaged = np.mean([b.std() for b in batches])
    assert abs(averaged - whole) > 1  # about 1 vs about 5.1
    _mean, std = dataset_stats(batches, axis=1)
    np.testing.assert_allclose(std, [whole], rtol=1e-12)


def test_float32_batches_accumulate_in_float64():
    rng = np.random.default_rng(2)
    x = (rng.random((4000, 3, 8)) * 255).astype(np.float32) + np.float32(1e4)
    stats = RunningStats()
    for part in np.array_split(x, 9):
        stats.update(part)
    x64 = x.astype(np.float64)
    assert stats.mean.dtype == np.float64
    np.testing.assert_allclose(stats.mean, x64.mean(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(stats.var(), x64.var(axis=(0, 2)), rtol=1e-10)


def test_uint8_batches():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(20, 3, 4, 4), dtype=np.uint8)
    mean, std = dataset_stats(np.array_split(x, 3))
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(std, x.astype(float).std(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize(
    "axis,reduce",
    [(1, (0, 2, 3)), (-1, (0, 1, 2)), (0, (1, 2, 3)), ((1, 2, 3), (0,)), ((1, 3), (0, 2)), ((0, 3), (1, 2))],
)
def test_axis_variants(axis, reduce):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3, 4, 5)) * 2 + 7
    stats = RunningStats(axis=axis).update(x)
    np.testing.assert_allclose(stats.mean, x.mean(axis=reduce), rtol=1e-13)
    np.testing.assert_allclose(stats.std(), x.std(axis=reduce), rtol=1e-12)
    np.testing.assert_allclose(standardize(x, axis=axis).mean(axis=reduce), 0, atol=1e-12)
    np.testing.assert_allclose(standardize(x, axis=axis).std(axis=reduce), 1, rtol=1e-12)
    np.testing.assert_allclose(center(x, axis=axis), x - x.mean(axis=reduce, keepdims=True), atol=1e-12)
    norm = Normalize.from_stats(stats)
    np.testing.assert_allclose(norm(x), standardize(x, axis=axis), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(norm.inverse(norm(x)), x, rtol=1e-13)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), parts=st.integers(2, 6))
def test_merge_in_any_order(seed, parts):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 2)) * 3 + 1e8
    pieces = [RunningStats(axis=1).update(x[idx]) for idx in _splits(rng, 60, parts)]
    order = rng.permutation(len(pieces))
    total = RunningStats(axis=1)
    for i in order:
        total.merge(pieces[i])
    d = x - x.mean(axis=0)
    np.testing.assert_allclose(total.mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(total.var(), (d * d).mean(axis=0), rtol=1e-6)
    assert total.count == 60


def test_state_is_moments_and_empty_batches_change_nothing():
    stats = RunningStats()
    assert isinstance(stats.moments, Moments) and stats.count == 0
    stats.update(np.zeros((0, 3)))
    assert stats.count == 0
    stats.update(np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    stats.update(np.zeros((0, 3)))
    assert isinstance(stats.moments, Moments) and stats.moments.m2.dtype == np.float64
    np.testing.assert_array_equal(stats.mean, [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(stats.var(), [1.0, 0.0, 1.0])
    stats.reset()
    assert stats.count == 0 and stats.feature_shape is None


def test_moments_set_from_outside():
    """What a cross-process merge does: replace `moments` on an instance that saw no data."""
    other = RunningStats().update(np.array([[1.0, 4.0], [3.0, 8.0]]))
    empty = RunningStats()
    empty.moments = other.moments
    np.testing.assert_array_equal(empty.mean, [2.0, 6.0])
    np.testing.assert_array_equal(empty.var(), [1.0, 4.0])


def test_constant_feature_has_zero_variance_exactly():
    x = np.full((1001, 2), 0.1)
    x[:, 1] = np.linspace(0, 1, 1001)
    stats = RunningStats()
    for part in np.array_split(x, 7):
        stats.update(part)
    assert stats.var()[0] == 0.0
    assert np.array_equal(Normalize.from_stats(stats)(x)[:, 0], np.zeros(1001))


# -- dataset_stats ----------------------------------------------------------------------


def test_dataset_stats_from_a_generator_of_loader_tuples():
    rng = np.random.default_rng(5)
    images = rng.random((30, 3, 5, 5))

    def loader():
        for idx in np.array_split(np.arange(30), 4):
            yield images[idx], np.zeros(len(idx))

    mean, std = dataset_stats(loader(), axis=1, ddof=1)
    np.testing.assert_allclose(mean, images.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(std, images.std(axis=(0, 2, 3), ddof=1), rtol=1e-12)


def test_dataset_stats_progress_bar(capsys):
    pytest.importorskip("tqdm")
    mean, _ = dataset_stats([np.ones((2, 3))] * 3, progress=True)
    np.testing.assert_array_equal(mean, np.ones(3))
    assert "dataset statistics" in capsys.readouterr().err


def test_dataset_stats_progress_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r"progress=True needs the optional package tqdm: pip install tqdm"):
        dataset_stats([np.ones((2, 3))], progress=True)


def test_importing_bnorm_does_not_import_tqdm():
    import os
    import subprocess

    code = "import sys, bnorm, bnorm.preprocessing; print('tqdm' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(bnorm.__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_dataset_stats_torch_loader():
    torch = pytest.importorskip("torch")
    data = torch.utils.data.TensorDataset(torch.rand(20, 3, 4, 4), torch.zeros(20))
    loader = torch.utils.data.DataLoader(data, batch_size=6)
    mean, std = dataset_stats(loader)
    x = data.tensors[0].double().numpy()
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-6)


# -- Normalize ----------------------------------------------------------------------------


def test_imagenet_constants_and_normalize():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)
    x = np.random.default_rng(6).random((2, 3, 4, 4)).astype(np.float32)
    y = Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    assert y.dtype == np.float32
    expected = (x - np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)) / np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(Normalize.imagenet(255)(x * 255), expected, rtol=1e-5, atol=1e-5)
    last = Normalize.imagenet(axis=-1)(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(last, y.transpose(0, 2, 3, 1), rtol=1e-6)


def test_normalize_matches_torchvision_formula():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(7).random((3, 8, 8))
    y = Normalize(IMAGENET_MEAN, IMAGENET_STD, axis=0)(x)
    t = torch.tensor(x)
    ref = (t - torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64
    )[:, None, None]
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-14, atol=1e-15)


def test_normalize_mnist_to_minus_one_one():
    x = np.array([[0.0], [127.5], [255.0]])
    np.testing.assert_allclose(Normalize(0.5, 0.5)(x / 255).ravel(), [-1, 0, 1])


def test_normalize_inverse_float16_and_int():
    norm = Normalize([1.0, 2.0], [2.0, 4.0], axis=-1)
    x16 = np.array([[3.0, 6.0]], dtype=np.float16)
    assert norm(x16).dtype == np.float16
    np.testing.assert_array_equal(norm(x16), np.array([[1.0, 1.0]], np.float16))
    assert norm(np.array([[3, 6]])).dtype == np.float64
    np.testing.assert_array_equal(norm.inverse(np.array([[1.0, 1.0]])), [[3.0, 6.0]])
    assert "Normalize(mean=[1.0, 2.0]" in repr(norm)
    with pytest.raises(ValueError):
        norm.mean[0] = 5  # read-only constants


def test_normalize_caffe_style_mean_only():
    bgr_mean = (103.939, 116.779, 123.68)
    norm = Normalize(bgr_mean, 1.0)
    assert norm.std.shape == (3,)
    x = np.random.default_rng(13).random((2, 3, 4, 4)) * 255
    np.testing.assert_allclose(norm(x), x - np.array(bgr_mean).reshape(1, 3, 1, 1), rtol=1e-14, atol=1e-12)


def test_normalize_from_dataset_stats_pair():
    x = np.random.default_rng(8).normal(size=(10, 2)) * 4 + 3
    norm = Normalize.from_stats(dataset_stats([x]), axis=1)
    np.testing.assert_allclose(norm(x).mean(axis=0), 0, atol=1e-12)


# -- center / standardize / minmax ---------------------------------------------------------


def test_standardize_matches_sklearn():
    skp = pytest.importorskip("sklearn.preprocessing")
    x = np.random.default_rng(9).normal(size=(50, 4)) * [1, 10, 100, 1e-3] + [0, 1e6, -5, 3]
    x[:, 3] = 3.0  # constant feature -> 0
    np.testing.assert_allclose(standardize(x), skp.StandardScaler().fit_transform(x), rtol=1e-9, atol=1e-9)
    assert np.array_equal(standardize(x)[:, 3], np.zeros(50))


def test_minmax_matches_sklearn_except_constant_features():
    skp = pytest.importorskip("sklearn.preprocessing")
    x = np.random.default_rng(10).normal(size=(30, 3))
    for rng_ in [(-1, 1), (0, 1), (2, 5)]:
        np.testing.assert_allclose(minmax_scale(x, rng_), skp.minmax_scale(x, rng_), rtol=1e-12, atol=1e-12)
    x[:, 1] = 4.0
    np.testing.assert_array_equal(minmax_scale(x)[:, 1], np.zeros(30))
    np.testing.assert_array_equal(minmax_scale(x, (0, 1))[:, 1], np.full(30, 0.5))


def test_minmax_extremes_hit_the_range():
    x = np.random.default_rng(11).random((5, 3, 4, 4)).astype(np.float32) * 255
    y = minmax_scale(x, axis=1)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.min(axis=(0, 2, 3)), -1, atol=1e-6)
    np.testing.assert_allclose(y.max(axis=(0, 2, 3)), 1, atol=1e-6)


def test_never_nan_on_constant_input():
    x = np.full((4, 3, 2), 5.0)
    for y in (center(x), standardize(x), minmax_scale(x), standardize(x, ddof=1)):
        assert np.array_equal(y, np.zeros_like(x))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 20), a=st.floats(0.01, 100), c=st.floats(-1e4, 1e4))
def test_standardize_and_minmax_are_affine_invariant(seed, n, a, c):
    x = np.random.default_rng(seed).normal(size=(n, 3))
    np.testing.assert_allclose(standardize(a * x + c), standardize(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(minmax_scale(a * x + c), minmax_scale(x), rtol=1e-6, atol=1e-6)


# -- colour helpers -------------------------------------------------------------------------


def test_rgb_bgr_round_trip():
    x = np.arange(24).reshape(2, 3, 4)
    y = rgb_to_bgr(x)
    np.testing.assert_array_equal(y[:, 0], x[:, 2])
    np.testing.assert_array_equal(bgr_to_rgb(y), x)


def test_grayscale_matches_pil():
    image_mod = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(12).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    pil = np.asarray(image_mod.fromarray(rgb).convert("L")).astype(float)
    mine = to_grayscale(rgb, axis=-1, keepdims=False)
    assert np.abs(mine - pil).max() <= 1.0
    assert to_grayscale(rgb.transpose(2, 0, 1)[None], axis=1).shape == (1, 1, 6, 7)


# -- errors: one per message; a raising call changes nothing ------------------------------


def test_error_feature_shape_changes():
    stats = RunningStats().update(np.zeros((2, 3)))
    with pytest.raises(
        ValueError,
        match=r"batch has feature shape \(4,\) on axis 1, expected \(3,\) as in the earlier batches",
    ):
        stats.update(np.zeros((2, 4)))
    assert stats.count == 2


def test_error_axis_out_of_range():
    with pytest.raises(ValueError, match=r"axis=2 is out of range for 2D input \(valid: -2 to 1\)"):
        RunningStats(axis=2).update(np.zeros((2, 3)))


def test_error_axis_type():
    with pytest.raises(TypeError, match="axis must be an int or a non-empty tuple of ints, got 'x'"):
        RunningStats(axis="x")


def test_error_axis_tuple_items():
    with pytest.raises(TypeError, match=r"axis must be an int or a tuple of ints, got \(1, 2.0\)"):
        center(np.zeros((2, 3, 4)), axis=(1, 2.0))


def test_error_axis_repeated():
    with pytest.raises(ValueError, match=r"axis must not repeat an axis, got \(1, -1\)"):
        center(np.zeros((2, 3)), axis=(1, -1))


def test_error_no_data():
    with pytest.raises(
        ValueError,
        match=r"no data: the statistics need at least one value per feature \(call update\(batch\) first\)",
    ):
        _ = RunningStats().mean


def test_error_ddof_too_large():
    stats = RunningStats().update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="ddof=1 needs more than 1 values per feature, got 1"):
        stats.std(ddof=1)


def test_error_ddof_negative():
    with pytest.raises(ValueError, match="ddof must be a non-negative int, got -1"):
        standardize(np.zeros((3, 2)), ddof=-1)


def test_error_batch_dtype():
    with pytest.raises(
        TypeError, match="batch must have a real floating, integer or bool dtype, got dtype <U1"
    ):
        RunningStats().update(np.array([["a"]]))


def test_error_batch_scalar():
    with pytest.raises(ValueError, match="batch must have at least 1 dimension, got a scalar"):
        RunningStats().update(3.0)


def test_error_merge_type():
    with pytest.raises(TypeError, match="other must be a RunningStats, got dict"):
        RunningStats().merge({})


def test_error_merge_axis():
    with pytest.raises(ValueError, match="other must keep the same axis, got axis=0 and axis=1"):
        RunningStats(axis=1).merge(RunningStats(axis=0))


def test_error_merge_features():
    a = RunningStats().update(np.zeros((2, 3)))
    b = RunningStats().update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"other must have the same feature shape, got \(4,\) and \(3,\)"):
        a.merge(b)
    assert a.count == 2


def test_error_dataset_empty():
    with pytest.raises(ValueError, match="batches is empty: no data to compute statistics from"):
        dataset_stats([])


def test_error_progress_type():
    with pytest.raises(TypeError, match="progress must be a bool, got str"):
        dataset_stats([np.ones((2, 2))], progress="yes")


def test_error_normalize_std_zero():
    with pytest.raises(
        ValueError,
        match=r"std must be > 0 for every feature, got \[1.0, 0.0\] \(not at flat index \[1\]\); a constant feature has std 0: build the transform with Normalize.from_stats",
    ):
        Normalize([0.0, 0.0], [1.0, 0.0])


def test_error_normalize_shapes():
    with pytest.raises(ValueError, match=r"mean and std must have the same shape, got \(3,\) and \(2,\)"):
        Normalize([0, 0, 0], [1, 1])


def test_error_normalize_not_finite():
    with pytest.raises(ValueError, match=r"mean must be finite, got \[nan\]"):
        Normalize(np.nan, 1.0)


def test_error_normalize_dtype():
    with pytest.raises(TypeError, match="std must be real numbers, got dtype <U1"):
        Normalize(0.0, "a")


def test_error_normalize_feature_mismatch():
    with pytest.raises(
        ValueError, match=r"x has feature shape \(4,\) on axis 1, but mean and std have shape \(3,\)"
    ):
        Normalize.imagenet()(np.zeros((2, 4, 5, 5)))


def test_error_normalize_scalar_input():
    with pytest.raises(ValueError, match="y must have at least 1 dimension, got a scalar"):
        Normalize(0.0, 1.0).inverse(1.0)


def test_error_from_stats_type():
    with pytest.raises(
        TypeError, match=r"stats must be a RunningStats or a \(mean, std\) pair, got array of shape \(3,\)"
    ):
        Normalize.from_stats(np.zeros(3))


def test_error_imagenet_max_value():
    with pytest.raises(ValueError, match="max_value must be a positive number, got 0"):
        Normalize.imagenet(0)


def test_error_feature_range_order():
    with pytest.raises(
        ValueError, match=r"feature_range must be \(min, max\) with finite min < max, got \(1, -1\)"
    ):
        minmax_scale(np.zeros((2, 2)), (1, -1))


def test_error_feature_range_type():
    with pytest.raises(ValueError, match=r"feature_range must be a pair \(min, max\) of numbers, got 5"):
        minmax_scale(np.zeros((2, 2)), 5)


def test_error_minmax_no_values():
    with pytest.raises(ValueError, match=r"x must have at least one value per feature, got shape \(0, 3\)"):
        minmax_scale(np.zeros((0, 3)))


def test_error_scalar_input():
    with pytest.raises(ValueError, match="x must have at least 1 dimension, got a scalar"):
        standardize(3.0)


def test_error_complex_input():
    with pytest.raises(
        TypeError, match="x must have a real floating, integer or bool dtype, got dtype complex128"
    ):
        center(np.zeros((2, 2), complex))


def test_error_three_channels():
    with pytest.raises(ValueError, match=r"x must have 3 channels \(RGB\) on axis 1, got shape \(2, 4, 5\)"):
        to_grayscale(np.zeros((2, 4, 5)))


def test_error_three_channels_bgr():
    with pytest.raises(
        ValueError, match=r"x must have 3 channels \(RGB or BGR\) on axis -1, got shape \(2, 4\)"
    ):
        rgb_to_bgr(np.zeros((2, 4)), axis=-1)


def test_public_names():
    assert bnorm.preprocessing.__all__
    for name in bnorm.preprocessing.__all__:
        assert getattr(bnorm.preprocessing, name).__doc__ or name.isupper()
