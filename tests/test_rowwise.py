"""The fused row-wise kernels (layer, group, instance and RMS norm) against float64 references.

Every path of :mod:`bnorm.functional._kernels.rowwise` -- the direct path for
small input, tiles in the element form (layer norm, short S, group norm with
G > 1) and in the channel form, long rows cut into chunks -- is forced on
small shapes by shrinking the tile constants; float16/32/64, centered and
offset data; results bit-identical for any thread count; constant rows
exact; no full-size temporaries.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
from test_memory import peak_extra

from bnorm.functional import (
    group_norm,
    group_norm_backward,
    group_norm_forward,
    instance_norm,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)
from bnorm.functional._kernels import pool as P
from bnorm.functional._kernels import rowwise as RW

# (R, Cg, S, G): layer norm (S = 1, G = 1), group norm in the element form (S < 64,
# G > 1) and in the channel form, instance norm (Cg = 1), an odd row length.
PROBLEMS = [
    (6, 5, 1, 1),
    (12, 3, 4, 3),
    (8, 2, 70, 4),
    (4, 1, 100, 2),
    (64, 16, 1, 4),
    (3, 7, 1, 1),
    (10, 3, 65, 5),
]

# (TILE_ELEMENTS (both directions), LONG_ROW_TILES, direct path allowed)
PATHS = {
    "direct": (None, None, True),
    "tiles": (None, None, False),
    "small-tiles": (64, None, False),
    "long-rows": (16, 4, False),
    "long-rows-one-tile": (16, 1, False),
    "long-rows-split-channels": (8, 2, False),
}

TOL = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 3e-2}
OFFSET_TOL = {np.float64: 1e-10, np.float32: 5e-3, np.float16: 3e-2}
OFFSET = {np.float64: 1e4, np.float32: 1e4, np.float16: 1e2}


@pytest.fixture
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    tile, long_row, direct = PATHS[request.param]
    if tile is not None:
        monkeypatch.setattr(RW, "TILE_ELEMENTS", tile)
        monkeypatch.setattr(RW, "BACKWARD_TILE_ELEMENTS", tile)
    if long_row is not None:
        monkeypatch.setattr(RW, "LONG_ROW_TILES", long_row)
    if not direct:
        monkeypatch.setattr(RW, "DIRECT_MAX_ELEMENTS", 0)
    RW.make_plan.cache_clear()
    yield request.param
    RW.make_plan.cache_clear()


def _reference(x2, g2, r, cg, s, groups, gamma, beta, eps, center):
    """float64 forward and backward of the row problem, straight from the formulas."""
    x = x2.astype(np.float64)
    g = g2.astype(np.float64)
    m = cg * s
    mean = x.mean(axis=1) if center else np.zeros(r)
    xc = x - mean[:, None]
    invstd = 1 / np.sqrt((xc**2).mean(axis=1) + eps)
    group = np.arange(r) % groups
    gam = np.repeat(gamma.reshape(groups, cg)[group], s, axis=1)
    bet = np.repeat(beta.reshape(groups, cg)[group], s, axis=1)
    x_hat = xc * invstd[:, None]
    y = x_hat * gam + bet
    g_hat = g * gam
    dx = g_hat - x_hat * (g_hat * x_hat).sum(axis=1, keepdims=True) / m
    if center:
        dx -= g_hat.sum(axis=1, keepdims=True) / m
    dx *= invstd[:, None]
    per = (r // groups, groups, cg, s)
    dgamma = (g * x_hat).reshape(per).sum(axis=(0, 3)).ravel()
    dbeta = g.reshape(per).sum(axis=(0, 3)).ravel()
    return y, dx, dgamma, dbeta, invstd


@pytest.mark.parametrize("path", list(PATHS), indirect=True)
@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_kernels_match_float64_on_every_path(path, problem, dtype):
    r, cg, s, groups = problem
    rng = np.random.default_rng(len(path) + r * cg * s)
    for center, offset, affine in itertools.product([True, False], [False, True], [True, False]):
        x2 = (rng.standard_normal((r, cg * s)) * 2 + (OFFSET[dtype] if offset else 0.0)).astype(dtype)
        g2 = rng.standard_normal((r, cg * s)).astype(dtype)
        gamma = rng.random(groups * cg) + 0.5 if affine else np.ones(groups * cg)
        beta = rng.standard_normal(groups * cg) if affine else np.zeros(groups * cg)
        plan = RW.make_plan(r, cg, s, groups, np.float32 if dtype == np.float16 else dtype, center=center)
        y2, dx2 = np.empty_like(x2), np.empty_like(x2)
        mean, var, invstd = RW.row_forward(
            x2, plan, gamma if affine else None, beta if affine else None, 1e-5, y2
        )
        dgamma, dbeta = RW.row_backward(g2, x2, plan, mean, invstd, gamma if affine else None, dx2)
        y, dx, dg, db, inv = _reference(x2, g2, r, cg, s, groups, gamma, beta, 1e-5, center)
        tol = (OFFSET_TOL if offset else TOL)[dtype]
        case = f"center={center} offset={offset} affine={affine}"
        assert np.abs(y2 - y).max() <= tol * max(1.0, np.abs(y).max()), case
        assert np.abs(dx2 - dx).max() <= tol * max(1.0, np.abs(dx).max()), case
        assert np.abs(dgamma - dg).max() <= tol * max(1.0, np.abs(dg).max()), case
        assert np.abs(dbeta - db).max() <= TOL[dtype] * max(1.0, np.abs(db).max()), case
        # The statistics are float64 and accurate whatever the path and dtype.
        assert invstd.dtype == np.float64
        np.testing.assert_allclose(invstd, inv, rtol=1e-6 if dtype != np.float64 else 1e-12)
        np.testing.assert_allclose(var, 1 / inv**2 - 1e-5, rtol=2e-6 if dtype != np.float64 else 1e-10)


# -- constant rows: the centered form ------------------------------------------------------


def test_constant_rows_are_exact_in_float32():
    """PyTorch gives exactly 0 here; folding -mean * invstd in float64 gave -0.00195 and -0.25."""
    assert layer_norm(np.full((2, 8), 100, np.float32), 8)[0, 0] == 0
    assert np.all(group_norm(np.full((1, 4, 4, 4), 1e4, np.float32), 2) == 0)
    assert np.all(instance_norm(np.full((2, 3, 5, 5), 1e4, np.float32)) == 0)


@pytest.mark.parametrize("path", ["direct", "tiles", "long-rows"], indirect=True)
@pytest.mark.parametrize("value", [100.0, 1e4, 0.1, -3.7e5, 7.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_rows_give_beta_and_zero_weight_gradient(path, value, dtype):
    rng = np.random.default_rng(1)
    x = np.full((6, 40), value, dtype)
    x[3] = rng.standard_normal(40)  # one ordinary row in the same tile
    w, b = rng.random(40).astype(dtype) + 0.5, rng.standard_normal(40).astype(dtype)
    y, ctx = layer_norm_forward(x, 40, w)
    assert np.all(y[[0, 1, 2, 4, 5]] == 0)
    y, ctx = layer_norm_forward(x, 40, w, b)
    assert np.all(y[0] == b)
    g = rng.standard_normal(x.shape).astype(dtype)
    g[3] = 0
    _dx, dw, _db = layer_norm_backward(g, ctx)
    assert np.all(dw == 0)  # x_hat of a constant row is exactly 0
    xg = np.full((2, 4, 3, 5), value, dtype)
    assert np.all(group_norm(xg, 2) == 0)
    assert np.all(instance_norm(xg) == 0)


def _within(ours, theirs, truth):
    """Max error within 1.5x PyTorch's (a max over 50k values is noisy at the rounding
    floor) and root-mean-square error within 1.25x.  Measured on centered data: RMS
    1.00x (layer norm) and 1.14x (group norm: three roundings, x - mean, * coef,
    + beta, against PyTorch's fused x * alpha + beta'); on data offset by 1e4 bnorm's
    errors are a third to a half of PyTorch's (the centered form)."""
    e_ours, e_theirs = np.abs(ours - truth), np.abs(theirs - truth)
    assert e_ours.max() <= 1.5 * e_theirs.max()
    assert np.sqrt((e_ours**2).mean()) <= 1.25 * np.sqrt((e_theirs**2).mean())


def test_float32_offset_data_within_pytorchs_own_error():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for offset in (0.0, 1e4):
        x = (rng.standard_normal((64, 768)) + offset).astype(np.float32)
        w = (rng.random(768) + 0.5).astype(np.float32)
        b = rng.standard_normal(768).astype(np.float32)
        tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
        truth = torch.nn.functional.layer_norm(tx.double(), (768,), tw.double(), tb.double()).numpy()
        theirs = torch.nn.functional.layer_norm(tx, (768,), tw, tb).numpy()
        _within(layer_norm(x, 768, w, b), theirs, truth)
        xg = (rng.standard_normal((8, 64, 16, 16)) + offset).astype(np.float32)
        wg = (rng.random(64) + 0.5).astype(np.float32)
        truth = torch.nn.functional.group_norm(
            torch.from_numpy(xg).double(), 8, torch.from_numpy(wg).double()
        )
        theirs = torch.nn.functional.group_norm(torch.from_numpy(xg), 8, torch.from_numpy(wg)).numpy()
        _within(group_norm(xg, 8, wg), theirs, truth.numpy())


def test_float32_overflowing_squares_fall_back_to_float64(monkeypatch):
    monkeypatch.setattr(RW, "DIRECT_MAX_ELEMENTS", 0)
    x = np.random.default_rng(3).standard_normal((4, 512)).astype(np.float32) * np.float32(1e20)
    y = layer_norm(x, 512)
    ref = layer_norm(x.astype(np.float64), 512)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_nonfinite_rows_stay_in_their_rows(monkeypatch):
    monkeypatch.setattr(RW, "DIRECT_MAX_ELEMENTS", 0)
    x = np.random.default_rng(4).standard_normal((8, 300))
    x[2, 5] = np.nan
    x[5, 7] = np.inf
    y = layer_norm(x, 300)
    assert np.isnan(y[2]).all() and np.isnan(y[5]).all()
    ok = [0, 1, 3, 4, 6, 7]
    np.testing.assert_allclose(y[ok], layer_norm(x[ok], 300), rtol=1e-12, atol=1e-12)


# -- threads ----------------------------------------------------------------------------


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore the thread count; tiles go to the pool at any size (else nothing is threaded)."""
    monkeypatch.setattr(RW, "PARALLEL_MIN_ELEMENTS", 0)
    old = P.num_threads()
    yield
    P.set_num_threads(old)


CASES = {
    "layer_norm": (
        (16, 100, 768),
        lambda x, g: layer_norm_backward(g, layer_norm_forward(x, 768, W[768], B[768])[1]),
        lambda x: layer_norm_forward(x, 768, W[768], B[768])[0],
    ),
    "layer_norm_long_rows": (
        (3, 300_000),
        lambda x, g: layer_norm_backward(g, layer_norm_forward(x, 300_000)[1]),
        lambda x: layer_norm_forward(x, 300_000)[0],
    ),
    "group_norm": (
        (8, 64, 32, 32),
        lambda x, g: group_norm_backward(g, group_norm_forward(x, 32, W[64], B[64])[1]),
        lambda x: group_norm_forward(x, 32, W[64], B[64])[0],
    ),
    "group_norm_short_spatial": (
        (256, 64, 4, 4),
        lambda x, g: group_norm_backward(g, group_norm_forward(x, 8, W[64], B[64])[1]),
        lambda x: group_norm_forward(x, 8, W[64], B[64])[0],
    ),
    "instance_norm": (
        (8, 3, 128, 128),
        lambda x, g: instance_norm_backward(g, instance_norm_forward(x, weight=W[3], bias=B[3])[1]),
        lambda x: instance_norm_forward(x, weight=W[3], bias=B[3])[0],
    ),
    "rms_norm": (
        (32, 50, 512),
        lambda x, g: rms_norm_backward(g, rms_norm_forward(x, 512, W[512])[1]),
        lambda x: rms_norm_forward(x, 512, W[512])[0],
    ),
}
_rng = np.random.default_rng(5)
W = {n: (_rng.random(n) + 0.5).astype(np.float32) for n in (3, 64, 512, 768)}
B = {n: _rng.standard_normal(n).astype(np.float32) for n in (3, 64, 512, 768)}


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centered", "offset"])
def test_results_bit_identical_for_1_2_3_threads(op, offset, restore_threads):
    shape, fwd_bwd, fwd = CASES[op]
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        P.set_num_threads(n)
        results.append((fwd(x), *fwd_bwd(x, g)))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)


# -- memory -----------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_no_full_size_temporaries(threads, restore_threads):
    """Forward and backward allocate the output and tile-sized scratch only."""
    P.set_num_threads(threads)
    rng = np.random.default_rng(7)
    scratch = 8 * 4 * max(RW.TILE_ELEMENTS, RW.BACKWARD_TILE_ELEMENTS) * threads  # a few tiles per thread
    for shape, fwd, bwd in [
        ((64, 128, 256), lambda x: layer_norm_forward(x, 256, W256, B256), layer_norm_backward),
        ((16, 64, 32, 32), lambda x: group_norm_forward(x, 8, W[64], B[64]), group_norm_backward),
        ((4, 512, 1024), lambda x: rms_norm_forward(x, 1024), rms_norm_backward),
    ]:
        x = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        assert peak_extra(lambda x=x, fwd=fwd: fwd(x)) <= x.nbytes + scratch
        ctx = fwd(x)[1]
        assert peak_extra(lambda g=g, ctx=ctx, bwd=bwd: bwd(g, ctx)) <= x.nbytes + scratch


W256 = (_rng.random(256) + 0.5).astype(np.float32)
B256 = _rng.standard_normal(256).astype(np.float32)


def test_plan_tiles_depend_on_the_shape_only():
    plan = RW.make_plan(1000, 3, 100, 5, np.float32)
    assert plan.channel_form and plan.tiles()[0] == (0, RW.TILE_ELEMENTS // 300)
    element = RW.make_plan(1000, 64, 4, 8, np.float32)
    assert not element.channel_form
    assert element.tile_rows % 8 == 0 and element.backward_tile_rows % 8 == 0
    assert sum(b - a for a, b in element.tiles(backward=True)) == 1000
