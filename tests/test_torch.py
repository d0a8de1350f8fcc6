"""Cross-checks against PyTorch's own batch norm (skipped when torch is not installed)."""

from __future__ import annotations

import numpy as np
import pytest

import bnorm
from bnorm.functional import batch_norm_backward, batch_norm_forward

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH_LAYERS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
BNORM_LAYERS = {1: bnorm.BatchNorm1d, 2: bnorm.BatchNorm2d, 3: bnorm.BatchNorm3d}
SHAPES = {1: [(6, 4), (5, 4, 7)], 2: [(3, 4, 5, 6)], 3: [(2, 4, 3, 4, 5)]}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_layer_several_steps_against_torch(dim, dtype, momentum, affine, track):
    rng = np.random.default_rng(hash((dim, momentum, affine, track)) % 2**32)
    c = 4
    tb = TORCH_LAYERS[dim](c, momentum=momentum, affine=affine, track_running_stats=track).to(
        TORCH_DTYPE[dtype]
    )
    bb = BNORM_LAYERS[dim](c, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    if affine:
        w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
        with torch.no_grad():
            tb.weight.copy_(t(w))
            tb.bias.copy_(t(b))
        bb.weight[:], bb.bias[:] = w, b
    for step, shape in enumerate(SHAPES[dim] * 2):
        training = step != 2
        tb.train(training)
        bb.train(training)
        x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        xt = t(x).requires_grad_(True)
        yt = tb(xt)
        yt.backward(t(g))
        y = bb(x)
        dx = bb.backward(g)
        np.testing.assert_allclose(y, yt.detach().numpy(), **TOL[dtype])
        np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL[dtype])
        if affine:
            np.testing.assert_allclose(bb.grad_weight, tb.weight.grad.numpy(), **TOL[dtype])
            np.testing.assert_allclose(bb.grad_bias, tb.bias.grad.numpy(), **TOL[dtype])
            tb.weight.grad = None
            tb.bias.grad = None
        if track:
            np.testing.assert_allclose(bb.running_mean, tb.running_mean.numpy(), **TOL[dtype])
            np.testing.assert_allclose(bb.running_var, tb.running_var.numpy(), **TOL[dtype])
            assert int(bb.num_batches_tracked) == int(tb.num_batches_tracked)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.filterwarnings("ignore::bnorm.MomentumConventionWarning")  # any PyTorch momentum in [0, 1]
def test_functional_random_configurations(seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(2, 6))
    shape = tuple(int(s) for s in rng.integers(1, 6, size=ndim))
    shape = (shape[0] + 1, *shape[1:])
    c = shape[1]
    x = rng.standard_normal(shape) * rng.uniform(0.1, 10) + rng.uniform(-50, 50)
    training = bool(rng.integers(2))
    eps = float(10 ** rng.uniform(-6, -2))
    momentum = float(rng.uniform(0, 1))
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5
    trm, trv = t(rm.copy()), t(rv.copy())
    xt = t(x).requires_grad_(True)
    wt, bt = t(w).requires_grad_(True), t(b).requires_grad_(True)
    yt = F.batch_norm(xt, trm, trv, wt, bt, training=training, momentum=momentum, eps=eps)
    g = rng.standard_normal(shape)
    yt.backward(t(g))
    y, ctx = batch_norm_forward(x, rm, rv, w, b, training, momentum, eps)
    dx, dw, db = batch_norm_backward(g, ctx)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_float32_within_torch_error_of_float64_truth():
    """Offset 1e4: bnorm's float32 error vs the float64 truth is no worse than PyTorch's."""
    rng = np.random.default_rng(7)
    x32 = (rng.standard_normal((16, 8, 32, 32)) + 1e4).astype(np.float32)
    truth = F.batch_norm(t(x32.astype(np.float64)), None, None, training=True).numpy()
    ours = bnorm.functional.batch_norm(x32, None, None, training=True)
    theirs = F.batch_norm(t(x32), None, None, training=True).numpy()
    err_ours = np.abs(ours - truth).max()
    err_theirs = np.abs(theirs - truth).max()
    assert err_ours <= max(err_theirs, 1e-6) * 1.01
    assert err_ours < 1e-2


def test_float16_input_float32_params_as_torch():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 4, 6)) * 2 + 1).astype(np.float16)
    tb = torch.nn.BatchNorm1d(4)
    bb = bnorm.BatchNorm1d(4)
    y = bb(x)
    with torch.no_grad():
        yt = tb(t(x))
    assert y.dtype == np.float16 and yt.dtype == torch.float16
    np.testing.assert_allclose(y.astype(np.float32), yt.numpy().astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(bb.running_mean, tb.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bb.running_var, tb.running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_empty_batch_as_torch():
    tb = torch.nn.BatchNorm2d(3)
    bb = bnorm.BatchNorm2d(3)
    yt = tb(torch.empty(0, 3, 2, 2))
    y = bb(np.empty((0, 3, 2, 2), np.float32))
    assert y.shape == tuple(yt.shape)
    assert int(bb.num_batches_tracked) == int(tb.num_batches_tracked) == 1
    np.testing.assert_array_equal(bb.running_mean, tb.running_mean.numpy())
    np.testing.assert_array_equal(bb.running_var, tb.running_var.numpy())


def test_error_messages_as_torch():
    for tcls, bcls, shape in [
        (torch.nn.BatchNorm1d, bnorm.BatchNorm1d, (2, 3, 4, 5)),
        (torch.nn.BatchNorm2d, bnorm.BatchNorm2d, (2, 3, 4)),
        (torch.nn.BatchNorm3d, bnorm.BatchNorm3d, (2, 3, 4, 5)),
    ]:
        with pytest.raises(ValueError) as te:
            tcls(3)(torch.ones(shape))
        with pytest.raises(ValueError) as be:
            bcls(3)(np.ones(shape))
        assert str(be.value) == str(te.value)
    with pytest.raises(ValueError) as te:
        torch.nn.BatchNorm1d(3)(torch.ones(1, 3))
    with pytest.raises(ValueError) as be:
        bnorm.BatchNorm1d(3)(np.ones((1, 3)))
    assert str(te.value).replace("torch.Size([1, 3])", "(1, 3)") == str(be.value)


def test_eval_backward_against_torch():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 3, 4))
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    g = rng.standard_normal(x.shape)
    xt, wt, bt = t(x).requires_grad_(True), t(w).requires_grad_(True), t(b).requires_grad_(True)
    F.batch_norm(xt, t(rm), t(rv), wt, bt, training=False).backward(t(g))
    _, ctx = batch_norm_forward(x, rm, rv, w, b, training=False)
    dx, dw, db = batch_norm_backward(g, ctx)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-11)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-12)
