"""The fast kernels of bnorm.functional._kernels.moments against float64 references.

Every shared kernel (channel_moments, backward_sums, affine_pass, backward_pass)
on many ``(A, K, B)`` views -- batch-norm channels-first and channels-last,
layer-norm-like (A = 1, long rows), K = 1, odd and non-contiguous views -- in
float16/32/64, on data centered at 0 and offset by 1e4, single- and
multi-threaded; plus ``out=`` of the forward and backward kernels.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from bnorm.functional import batch_norm_backward, batch_norm_forward
from bnorm.functional._kernels import channel as C
from bnorm.functional._kernels import moments as Mo
from bnorm.functional._kernels import pool as P

# (A, K, B): channels-first, channels-last (B = 1), layer norm (A = 1), K = 1, odd,
# short rows (B = 49), long rows split for the dot products (B = 16384).
SHAPES3 = [
    (32, 16, 196),
    (4096, 24, 1),
    (1, 64, 3000),
    (40, 1, 500),
    (3, 5, 7),
    (64, 40, 49),
    (4, 6, 16384),
    (2, 3, 1),
    (1, 1, 2),
    (1, 2, 200003),  # rows longer than a tile, of prime length
    (9, 2, 70000),
]

# Relative accuracy the statistics must reach against float64 (compute dtype).
STAT_RTOL = {np.float16: 2e-6, np.float32: 2e-6, np.float64: 1e-13}
OFFSET = {np.float16: 1e2, np.float32: 1e4, np.float64: 1e4}


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    old = P.num_threads()
    min_size = P.PARALLEL_MIN_ELEMENTS
    P.set_num_threads(request.param)
    P.PARALLEL_MIN_ELEMENTS = 0  # thread even the small test arrays
    yield request.param
    P.PARALLEL_MIN_ELEMENTS = min_size
    P.set_num_threads(old)


def _data(shape3, dtype, offset, seed=0):
    rng = np.random.default_rng(seed)
    k = shape3[1]
    spread = rng.uniform(0.5, 2.0, size=(1, k, 1))
    x = rng.standard_normal(shape3) * spread + offset
    return x.astype(dtype)


def _ref_moments(x3):
    x = x3.astype(np.float64)
    mean0 = x.mean(axis=(0, 2))
    mean = mean0 + (x - mean0[None, :, None]).mean(axis=(0, 2))  # corrected: accurate to ~1 ulp
    m2 = ((x - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    return mean, m2


@pytest.mark.parametrize("shape3", SHAPES3, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["centered", "offset"])
@pytest.mark.parametrize("accumulate", ["float64", "compute"])
def test_channel_moments_match_float64(shape3, dtype, offset, accumulate, threads):
    x3 = _data(shape3, dtype, offset * OFFSET[dtype])
    got = Mo.channel_moments(x3, accumulate=accumulate)
    mean, m2 = _ref_moments(x3)
    assert got.count == shape3[0] * shape3[2]
    assert got.mean.dtype == np.float64 and got.m2.dtype == np.float64
    assert np.all(got.m2 >= 0)
    std = np.sqrt(m2 / got.count)
    # float64 accumulation: float64 rounding whatever the input dtype.
    rtol = STAT_RTOL[dtype] if accumulate == "compute" else 1e-13
    # The mean to within rtol of the spread (and a few float64 ulps of itself).
    np.testing.assert_array_less(np.abs(got.mean - mean), rtol * std + 4e-16 * np.abs(mean) + 1e-300)
    np.testing.assert_allclose(got.m2, m2, rtol=rtol * 4, atol=1e-300)


def test_moments_large_count_offset_float32(threads):
    """4M values per channel at 1e4 (BLAS accumulation over large counts)."""
    x3 = (np.random.default_rng(1).standard_normal((64, 2, 1 << 15)) + 1e4).astype(np.float32)
    got = Mo.channel_moments(x3, accumulate="compute")
    mean, m2 = _ref_moments(x3)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(got.m2, m2, rtol=2e-6)


def test_moments_channels_last_large_count_offset(threads):
    x3 = (np.random.default_rng(2).standard_normal((1 << 18, 8, 1)) * 0.1 - 1e4).astype(np.float32)
    got = Mo.channel_moments(x3, accumulate="compute")
    mean, m2 = _ref_moments(x3)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(got.m2, m2, rtol=2e-6)


def test_moments_one_sided_large_mean_uses_shift():
    """mean**2 >> var (a nearly constant, offset channel): one-pass sums would cancel."""
    x3 = np.full((8, 3, 500), 12345.678, dtype=np.float32)
    x3[:, :, ::2] += np.float32(0.001)
    got = Mo.channel_moments(x3)
    mean, m2 = _ref_moments(x3)
    np.testing.assert_allclose(got.m2, m2, rtol=1e-5)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-12)


def test_moments_constant_channel_is_exactly_zero_variance():
    x3 = np.full((16, 2, 300), 1e4, dtype=np.float32)
    got = Mo.channel_moments(x3)
    np.testing.assert_array_equal(got.m2, 0.0)
    np.testing.assert_array_equal(got.mean, 1e4)


def test_moments_float32_overflow_of_squares_falls_back_to_float64():
    rng = np.random.default_rng(3)
    x3 = (rng.standard_normal((10, 2, 200)) * 1e25).astype(np.float32)  # x**2 overflows float32
    got = Mo.channel_moments(x3)
    mean, m2 = _ref_moments(x3)
    assert np.isfinite(got.m2).all()
    np.testing.assert_allclose(got.m2, m2, rtol=1e-12)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-10, atol=1e12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_moments_nonfinite_as_float64_two_pass(bad):
    x3 = _data((4, 3, 50), np.float32, 0.0)
    x3[1, 1, 7] = bad
    got = Mo.channel_moments(x3)
    ref = Mo._exact_moments(x3)
    np.testing.assert_array_equal(got.mean, ref.mean)
    np.testing.assert_array_equal(got.m2, ref.m2)
    assert np.isfinite(got.mean[[0, 2]]).all() and np.isfinite(got.m2[[0, 2]]).all()
    assert not np.isfinite(got.m2[1])


def test_moments_of_non_contiguous_view():
    base = _data((6, 4, 40), np.float32, 5.0)
    x3 = base[::2, ::-1, 3:30]
    got = Mo.channel_moments(x3)
    mean, m2 = _ref_moments(x3)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got.m2, m2, rtol=1e-5)


def test_moments_do_not_depend_on_thread_count():
    x3 = _data((64, 8, 700), np.float32, 3.0)
    old = P.num_threads()
    try:
        P.set_num_threads(1)
        one = Mo.channel_moments(x3)
        P.set_num_threads(2)
        two = Mo.channel_moments(x3)
    finally:
        P.set_num_threads(old)
    np.testing.assert_array_equal(one.mean, two.mean)
    np.testing.assert_array_equal(one.m2, two.m2)


# One shape per path of _whole_sums (the unshifted sums of contiguous input).
WHOLE_SUM_SHAPES = {
    "rows": (6, 5, 3000),  # B >= ROW_DOT_MIN: row dot products
    "split-rows": (3, 2, 4 * 4096),  # rows longer than ROW_DOT_MAX, cut
    "groups": (1000, 9, 30),  # short rows, more groups of SUM_GROUP rows than threads
    "group-columns": (300, 40, 20),  # short rows, fewer groups than threads: split by columns
    "narrow": (5000, 3, 7),  # K * B < NARROW_ROW: column sums
}


@pytest.mark.parametrize("path", WHOLE_SUM_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_whole_sums_match_float64_and_ignore_thread_count(path, dtype):
    """Every path of the whole-array sums: accurate, and bit-identical for 1, 2 and 3 threads."""
    shape3 = WHOLE_SUM_SHAPES[path]
    x3 = _data(shape3, dtype, 0.5)
    g3 = _data(shape3, dtype, 0.0, seed=1)
    old, old_min = P.num_threads(), P.PARALLEL_MIN_ELEMENTS
    P.PARALLEL_MIN_ELEMENTS = 0  # thread even the small test arrays
    try:
        results = []
        for n in (1, 2, 3):
            P.set_num_threads(n)
            got = C._whole_sums(x3, None, x3.dtype), C._whole_sums(x3, g3, x3.dtype)
            assert got[0] is not None and got[1] is not None
            results.append(got)
    finally:
        P.set_num_threads(old)
        P.PARALLEL_MIN_ELEMENTS = old_min
    for other in results[1:]:
        for (a1, a2), (b1, b2) in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a1, b1)
            np.testing.assert_array_equal(a2, b2)
    xf, gf = x3.astype(np.float64), g3.astype(np.float64)
    (s1, s2), (t1, t2) = results[0]
    # Partial sums in the compute dtype (at most SUM_GROUP rows or ROW_DOT_MAX values deep).
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(s1, xf.sum(axis=(0, 2)), rtol=rtol)
    np.testing.assert_allclose(s2, (xf * xf).sum(axis=(0, 2)), rtol=rtol)
    # Sums of signed terms: relative to the sum of magnitudes.
    for got, terms in ((t1, gf), (t2, gf * xf)):
        err = np.abs(got - terms.sum(axis=(0, 2))) / np.abs(terms).sum(axis=(0, 2))
        assert err.max() <= rtol, err


@pytest.mark.parametrize("shape3", SHAPES3, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["centered", "offset"])
@pytest.mark.parametrize("with_invstd", [True, False])
@pytest.mark.parametrize("accumulate", ["float64", "compute"])
def test_backward_sums_match_float64(shape3, dtype, offset, with_invstd, accumulate, threads):
    x3 = _data(shape3, dtype, offset * OFFSET[dtype])
    g3 = _data(shape3, dtype, 0.5, seed=9)
    mean, m2 = _ref_moments(x3)
    invstd = 1 / np.sqrt(m2 / (shape3[0] * shape3[2]) + 1e-5)
    sum_g, sum_gx = Mo.backward_sums(g3, x3, mean, invstd if with_invstd else None, accumulate=accumulate)
    g, d = g3.astype(np.float64), x3.astype(np.float64) - mean[None, :, None]
    ref_g, ref_gx = g.sum(axis=(0, 2)), (g * d).sum(axis=(0, 2))
    # Errors relative to the scale of the terms: sqrt(sum g^2 * sum d^2).
    scale_g = np.sqrt((g * g).sum(axis=(0, 2)) * g.shape[0] * g.shape[2])
    scale_gx = np.sqrt((g * g).sum(axis=(0, 2)) * (d * d).sum(axis=(0, 2)))
    tol = 1e-6 if dtype != np.float64 and accumulate == "compute" else 1e-13
    np.testing.assert_array_less(np.abs(sum_g - ref_g), tol * scale_g + 1e-300)
    np.testing.assert_array_less(np.abs(sum_gx - ref_gx), tol * scale_gx + 1e-300)


def test_backward_sums_mixed_dtypes_compute_in_wider():
    x3 = _data((8, 3, 300), np.float32, 10.0)
    g3 = _data((8, 3, 300), np.float64, 0.0, seed=4)
    mean, _ = _ref_moments(x3)
    sum_g, sum_gx = Mo.backward_sums(g3, x3, mean, np.ones(3))
    d = x3.astype(np.float64) - mean[None, :, None]
    np.testing.assert_allclose(sum_g, g3.sum(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(sum_gx, (g3 * d).sum(axis=(0, 2)), rtol=1e-11)


AFFINE_ATOL = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-13}


@pytest.mark.parametrize("shape3", SHAPES3, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("mode", ["plain", "center", "center+spread"])
def test_affine_pass_matches_float64(shape3, dtype, mode, threads):
    rng = np.random.default_rng(5)
    k = shape3[1]
    offset = OFFSET[dtype] if mode != "plain" else 0.0
    x3 = _data(shape3, dtype, offset)
    mean, m2 = _ref_moments(x3)
    std = np.sqrt(m2 / (shape3[0] * shape3[2]) + 1e-5)
    scale = rng.uniform(0.5, 2.0, k) / std
    shift = rng.uniform(-1, 1, k)
    out3 = np.empty_like(x3)
    center = None if mode == "plain" else mean
    spread = std if mode == "center+spread" else None
    C.affine_pass(x3, scale, shift, out3, center, spread=spread)
    c = 0.0 if center is None else center[None, :, None]
    ref = (x3.astype(np.float64) - c) * scale[None, :, None] + shift[None, :, None]
    assert out3.dtype == dtype
    # Output rounding: relative to the output's magnitude.
    np.testing.assert_allclose(
        out3.astype(np.float64), ref, rtol=AFFINE_ATOL[dtype], atol=AFFINE_ATOL[dtype] * 4
    )


def test_affine_pass_centering_beats_folding_on_constant_offset_channel():
    x3 = np.full((8, 2, 400), 1e4, dtype=np.float32)
    out3 = np.empty_like(x3)
    invstd = np.full(2, 1 / np.sqrt(1e-5))
    C.affine_pass(x3, invstd, np.zeros(2), out3, np.full(2, 1e4), spread=1 / invstd)
    np.testing.assert_array_equal(out3, 0.0)


def test_affine_pass_in_place():
    x3 = _data((40, 6, 300), np.float32, 2.0)
    expect = np.empty_like(x3)
    C.affine_pass(x3, np.full(6, 3.0), np.ones(6), expect, np.full(6, 2.0))
    C.affine_pass(x3, np.full(6, 3.0), np.ones(6), x3, np.full(6, 2.0))
    np.testing.assert_array_equal(x3, expect)


@pytest.mark.parametrize("shape3", SHAPES3, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("mode", ["abc", "zero-a", "a-only", "center"])
def test_backward_pass_matches_float64(shape3, dtype, mode, threads):
    rng = np.random.default_rng(6)
    k = shape3[1]
    x3 = _data(shape3, dtype, OFFSET[dtype] if mode == "center" else 1.0)
    g3 = _data(shape3, dtype, 0.0, seed=11)
    a = rng.uniform(0.5, 2, k)
    if mode == "zero-a":
        a[0] = 0.0
    b = None if mode == "a-only" else rng.uniform(-1, 1, k)
    mean, _ = _ref_moments(x3)
    c = None if mode == "a-only" else -b * mean + rng.uniform(-0.1, 0.1, k)
    out3 = np.empty_like(x3)
    C.backward_pass(g3, x3, a, b, c, out3, center=mean if mode == "center" else None)
    g, x = g3.astype(np.float64), x3.astype(np.float64)
    ref = g * a[None, :, None]
    if b is not None:
        ref = ref + (x - mean[None, :, None]) * b[None, :, None] + (c + b * mean)[None, :, None]
    tol = AFFINE_ATOL[dtype] * 4
    np.testing.assert_allclose(out3.astype(np.float64), ref, rtol=tol, atol=tol)


def test_backward_pass_over_its_gradient_input():
    x3 = _data((40, 6, 300), np.float32, 1.0)
    g3 = _data((40, 6, 300), np.float32, 0.0, seed=2)
    args = (np.full(6, 2.0), np.full(6, -0.5), np.full(6, 0.25))
    expect = np.empty_like(g3)
    C.backward_pass(g3, x3, *args, expect)
    C.backward_pass(g3, x3, *args, g3)
    np.testing.assert_array_equal(g3, expect)


# ----------------------------------------------------------------------------- out=


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
def test_forward_out_is_filled_and_returned(dtype, axis, training):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 5, 9, 7)) * 2 + 3).astype(dtype)
    c = x.shape[axis]
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    y_new, _ = batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, axis=axis)
    out = np.full_like(x, np.nan)
    y_out, ctx = batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, axis=axis, out=out)
    assert y_out is out
    np.testing.assert_array_equal(out, y_new)
    assert not ctx.input_overwritten


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
def test_backward_out_is_filled_and_returned(dtype, axis, training):
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((6, 5, 9, 7)) + 2).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    c = x.shape[axis]
    _, ctx = batch_norm_forward(x, np.zeros(c), np.ones(c), rng.standard_normal(c), None, training, axis=axis)
    dx_new, dw_new, _ = batch_norm_backward(g, ctx)
    out = np.full_like(x, np.nan)
    dx_out, dw_out, _ = batch_norm_backward(g, ctx, out=out)
    assert dx_out is out
    np.testing.assert_array_equal(out, dx_new)
    np.testing.assert_array_equal(dw_out, dw_new)
    # Into the upstream gradient itself.
    g_copy = g.copy()
    dx_inplace, _, _ = batch_norm_backward(g_copy, ctx, out=g_copy)
    assert dx_inplace is g_copy
    np.testing.assert_array_equal(g_copy, dx_new)


def test_forward_in_place_output_then_backward_refuses():
    x = np.random.default_rng(9).standard_normal((8, 3, 5)).astype(np.float32)
    expect = batch_norm_forward(x.copy(), None, None, training=True)[0]
    y, ctx = batch_norm_forward(x, None, None, training=True, out=x)
    assert y is x and ctx.input_overwritten
    np.testing.assert_array_equal(x, expect)
    with pytest.raises(ValueError, match="wrote its output over its input"):
        batch_norm_backward(np.ones_like(x), ctx)


def test_out_in_training_loop_reuses_buffers():
    """A training loop with out=: same results as fresh arrays, no new full-size arrays."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((16, 4, 64)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y_buf, dx_buf = np.empty_like(x), np.empty_like(x)
    for step in range(3):
        xs = x + np.float32(step)
        y, ctx = batch_norm_forward(xs, None, None, training=True, out=y_buf)
        dx, _, _ = batch_norm_backward(g, ctx, out=dx_buf)
        y_ref, ctx_ref = batch_norm_forward(xs, None, None, training=True)
        np.testing.assert_array_equal(y_buf, y_ref)
        np.testing.assert_array_equal(dx_buf, batch_norm_backward(g, ctx_ref)[0])
        assert y is y_buf and dx is dx_buf


def test_set_num_threads_rejects_bad_values():
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        P.set_num_threads(0)


# Forking while the pool's threads exist is the point of this test; Python 3.12+ warns about it.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_kernels_work_in_a_forked_child():
    """The thread pool is recreated after fork (a child has no pool threads)."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    old_min, old_n = P.PARALLEL_MIN_ELEMENTS, P.num_threads()
    P.PARALLEL_MIN_ELEMENTS = 0
    P.set_num_threads(2)
    try:
        x3 = _data((64, 4, 300), np.float32, 1.0)
        Mo.channel_moments(x3)  # starts the pool in the parent
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            m2 = pool.apply_async(_child_m2, (x3,)).get(timeout=60)
        np.testing.assert_array_equal(m2, Mo.channel_moments(x3).m2)
    finally:
        P.PARALLEL_MIN_ELEMENTS = old_min
        P.set_num_threads(old_n)


def _child_m2(x3):
    return Mo.channel_moments(x3).m2  # threaded: the parent's settings are inherited


def test_eval_with_zero_variance_and_zero_eps_as_the_formula():
    """(x - mean) / sqrt(0): +-inf, and NaN where x == mean (no NaN from folding 0 * inf)."""
    x = np.array([[-1.0, 0.0, 2.0], [3.0, 0.0, -2.0]])
    y, _ = batch_norm_forward(x, np.zeros(3), np.zeros(3), training=False, eps=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        expect = x / np.sqrt(np.zeros(3))
    np.testing.assert_array_equal(y, expect)


def test_float32_moments_to_float64_rounding_by_default():
    """The default accumulation keeps the moments of float32 data to float64 rounding."""
    x = (np.random.default_rng(2).random((4000, 3, 8)) * 255).astype(np.float32) + np.float32(1e4)
    got = Mo.channel_moments(x)
    mean, m2 = _ref_moments(x)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(got.m2, m2, rtol=1e-12)
    fast = Mo.channel_moments(x, accumulate="compute")
    assert not np.allclose(fast.m2, m2, rtol=1e-12, atol=0)  # the fast path is float32-accurate only


def test_accumulate_rejects_unknown_values():
    x3 = np.ones((2, 2, 2))
    with pytest.raises(ValueError, match="accumulate must be 'float64' or 'compute', got 'float32'"):
        Mo.channel_moments(x3, accumulate="float32")
    with pytest.raises(ValueError, match="accumulate must be 'float64' or 'compute', got 'x'"):
        Mo.backward_sums(x3, x3, np.zeros(2), accumulate="x")


# One shape per tiling form of the elementwise passes (see _kernels.channel._elementwise).
FORM_SHAPES = {
    "scalar": (12, 5, 3 * 1024),  # rows >= SCALAR_ROW_MIN: one channel at a time
    "scalar-split-rows": (2, 3, (1 << 17) + 5),  # a row longer than a tile
    "rows": (300, 7, 33),  # planes over whole rows of A, with a remainder
    "runs": (8, 300, 500),  # rows of K * B > PASS_TILE: planes per channel run
    "columns": (400, 9, 50),  # non-contiguous arrays (made so below)
    "columns-small": (4, 9, 50),  # small arrays
    "columns-one-row": (1, 50, 700),  # A = 1 (layer norm's view): planes would serve one tile
    "columns-short-channels": (3, 20, 2500),  # long rows but few values per channel (instance norm)
}


@pytest.mark.parametrize("form", FORM_SHAPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_elementwise_passes_every_tiling_form(form, dtype, n_threads):
    """affine_pass and backward_pass agree with the float64 formulas in every tiling form.

    Random coefficients, a zero in ``a`` (the unfactored backward), a center
    (offset data), and the in-place contracts (out over x, out over g).
    """
    old = P.num_threads()
    P.set_num_threads(n_threads)
    try:
        rng = np.random.default_rng(hash(form) % 2**32)
        shape3 = FORM_SHAPES[form]
        k = shape3[1]
        x3 = (rng.standard_normal(shape3) + 3.0).astype(dtype)
        g3 = rng.standard_normal(shape3).astype(dtype)
        if form == "columns":
            x3 = np.asfortranarray(x3)
            g3 = np.asfortranarray(g3)
        layout = C._pass_layout(shape3, x3.flags.c_contiguous, 3, C.PASS_TILE)[0]
        assert layout == form.split("-")[0]
        xf, gf = x3.astype(np.float64), g3.astype(np.float64)
        s, t, ctr = rng.uniform(0.5, 2, k), rng.uniform(-1, 1, k), rng.uniform(2, 4, k)
        a, b, c = rng.uniform(0.5, 2, k), rng.uniform(-1, 1, k), rng.uniform(-1, 1, k)
        col = (None, slice(None), None)
        tol = {np.float16: 4e-3, np.float32: 3e-6, np.float64: 1e-13}[dtype]

        def check(got, want, scale_):
            np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol * scale_)

        out3 = np.empty_like(x3)
        C.affine_pass(x3, s, t, out3)
        check(out3, xf * s[col] + t[col], 10)
        C.affine_pass(x3, s, t, out3, center=ctr)
        check(out3, (xf - ctr[col]) * s[col] + t[col], 10)
        inplace = x3.copy(order="K")
        C.affine_pass(inplace, s, t, inplace, center=ctr)
        np.testing.assert_array_equal(inplace, out3)

        ref = gf * a[col] + xf * b[col] + c[col]
        C.backward_pass(g3, x3, a, b, c, out3)
        check(out3, ref, 10)
        C.backward_pass(g3, x3, a, b, c, out3, center=ctr)
        check(out3, ref, 10)
        over_g = g3.copy(order="K")
        C.backward_pass(over_g, x3, a, b, c, over_g, center=ctr)
        np.testing.assert_array_equal(over_g, out3)
        a0 = a.copy()
        a0[0] = 0.0  # not factorable: g * a is added from a temporary
        C.backward_pass(g3, x3, a0, b, c, out3)
        check(out3, gf * a0[col] + xf * b[col] + c[col], 10)
        C.backward_pass(g3, x3, a, None, None, out3)
        check(out3, gf * a[col], 1)
    finally:
        P.set_num_threads(old)
