"""bnorm.testing.check_grad: it passes right gradients, catches wrong ones, and says which."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import bnorm.functional as F
from bnorm.testing import GradientCheckError, check_grad


@pytest.fixture
def bn_point(rng):
    return rng.normal(size=(12, 4)) * 2 + 1, rng.uniform(0.5, 2, 4), rng.normal(size=4)


def _bn(x, gamma, beta):
    return F.batch_norm_forward(x, None, None, gamma, beta, training=True)


def _every_pair(rng):
    """Every functional forward/backward pair of bnorm, at a random point with random gamma."""
    x4 = rng.normal(size=(3, 4, 2, 3))
    w4, b4 = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    rm, rv = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    cases = {
        "batch_norm train": (
            lambda x, w, b: F.batch_norm_forward(x, None, None, w, b, True),
            F.batch_norm_backward,
        ),
        "batch_norm eval": (
            lambda x, w, b: F.batch_norm_forward(x, rm, rv, w, b, False),
            F.batch_norm_backward,
        ),
        "batch_renorm eval": (
            lambda x, w, b: F.batch_renorm_forward(x, rm, rv, w, b, False),
            F.batch_renorm_backward,
        ),
        "batch_renorm pinned": (
            lambda x, w, b: F.batch_renorm_forward(
                x, rm.copy(), rv.copy(), w, b, True, r_max=2, r_min=2, d_max=0
            ),
            F.batch_renorm_backward,
        ),
        "group_norm": (lambda x, w, b: F.group_norm_forward(x, 2, w, b), F.group_norm_backward),
        "instance_norm": (
            lambda x, w, b: F.instance_norm_forward(x, None, None, w, b),
            F.instance_norm_backward,
        ),
    }
    args = {k: (x4, w4, b4) for k in cases}
    wl, bl = rng.uniform(0.5, 2, (2, 3)), rng.normal(size=(2, 3))
    cases["layer_norm"] = (lambda x, w, b: F.layer_norm_forward(x, (2, 3), w, b), F.layer_norm_backward)
    args["layer_norm"] = (x4, wl, bl)
    if hasattr(F, "rms_norm_forward"):  # RMSNorm, where this version has it
        cases["rms_norm"] = (lambda x, w: F.rms_norm_forward(x, (2, 3), w), F.rms_norm_backward)
        args["rms_norm"] = (x4, wl)
    return cases, args


def test_every_bnorm_pair_passes(rng):
    cases, args = _every_pair(rng)
    for name, (fwd, bwd) in cases.items():
        if name == "rms_norm":
            err = check_grad(fwd, lambda g, c, bwd=bwd: bwd(g, c)[:2], *args[name])
        else:
            err = check_grad(fwd, bwd, *args[name])
        assert err < 1e-9, name


def test_returns_the_measured_error_and_is_reproducible(bn_point):
    e1 = check_grad(_bn, F.batch_norm_backward, *bn_point, seed=3)
    e2 = check_grad(_bn, F.batch_norm_backward, *bn_point, seed=3)
    assert e1 == e2 and 0 < e1 < 1e-10


def test_catches_the_wrong_dx_an_all_ones_gradient_hides(bn_point):
    x, gamma, _ = bn_point

    def wrong(g, ctx):  # misses the variance term: right for g = 1, wrong otherwise
        _, dgamma, dbeta = F.batch_norm_backward(g, ctx)
        return gamma * ctx.invstd * (g - g.mean(0)), dgamma, dbeta

    _, ctx = _bn(*bn_point)
    ones = np.ones_like(x)
    np.testing.assert_allclose(wrong(ones, ctx)[0], F.batch_norm_backward(ones, ctx)[0], atol=1e-12)
    with pytest.raises(GradientCheckError, match=r"gradient of input 'x' \(shape \(12, 4\)\) is wrong"):
        check_grad(_bn, wrong, *bn_point)


def test_catches_a_backward_that_ignores_gamma(bn_point):
    x, gamma, beta = bn_point

    def no_gamma(g, ctx):
        dx, dgamma, dbeta = F.batch_norm_backward(g, ctx)
        return dx / ctx.weight, dgamma, dbeta

    with pytest.warns(UserWarning, match=r"input 'gamma' is constant \(all 1.0\)"):
        check_grad(_bn, no_gamma, x, np.ones(4), beta)  # passes, with the warning
    with pytest.raises(GradientCheckError, match="gradient of input 'x'"):
        check_grad(_bn, no_gamma, x, gamma, beta)


def test_names_the_wrong_parameter_gradient(bn_point):
    def bad_dbeta(g, ctx):
        dx, dgamma, dbeta = F.batch_norm_backward(g, ctx)
        return dx, dgamma, 2 * dbeta

    with pytest.raises(GradientCheckError, match=r"gradient of input 'beta' \(shape \(4,\)\) is wrong"):
        check_grad(_bn, bad_dbeta, *bn_point)
    with pytest.raises(GradientCheckError, match="gradient of input 'bias'"):
        check_grad(_bn, bad_dbeta, *bn_point, names=("x", "weight", "bias"))
    # a forward taking *args has no parameter names: positions are used

    class Fwd:
        def __call__(self, *args):
            return _bn(*args)

    with pytest.raises(GradientCheckError, match="gradient of input 'input 2'"):
        check_grad(Fwd(), bad_dbeta, *bn_point)


def test_none_gradient_is_a_zero_gradient(bn_point):
    x, gamma, _ = bn_point

    def drops_dgamma(g, ctx):
        dx, _, dbeta = F.batch_norm_backward(g, ctx)
        return dx, None, dbeta

    with pytest.raises(
        GradientCheckError, match=r"gradient of input 'gamma' .* backward returned None for it"
    ):
        check_grad(_bn, drops_dgamma, *bn_point)
    # None inputs pass through and need None gradients
    fwd = lambda x, gamma, beta: _bn(x, gamma, beta)  # noqa: E731
    assert check_grad(fwd, lambda g, c: F.batch_norm_backward(g, c), x, gamma, None) < 1e-9
    with pytest.raises(
        GradientCheckError, match=r"input 2 \('beta'\) is None but backward returned a gradient"
    ):
        check_grad(fwd, lambda g, c: (*F.batch_norm_backward(g, c)[:2], np.zeros(4)), x, gamma, None)


def test_single_input_may_return_an_array(rng):
    x = rng.normal(size=(5, 3))
    assert check_grad(lambda x: (np.sin(x), x), lambda g, x: g * np.cos(x), x) < 1e-10


@pytest.mark.parametrize(
    "backward,match",
    [
        (
            lambda g, c: F.batch_norm_backward(g, c)[:2],
            r"backward must return one gradient per input \(3\), got 2",
        ),
        (
            lambda g, c: (F.batch_norm_backward(g, c)[0][:2], None, None),
            r"gradient of input 'x' must have the input's shape \(12, 4\), got \(2, 4\)",
        ),
    ],
)
def test_structural_errors(bn_point, backward, match):
    with pytest.raises(GradientCheckError, match=match):
        check_grad(_bn, backward, *bn_point)


def test_in_place_mistakes(bn_point):
    def scribbles_on_g(g, ctx):
        out = F.batch_norm_backward(g, ctx)
        g *= 2
        return out

    with pytest.raises(GradientCheckError, match="backward modified its grad_output in place"):
        check_grad(_bn, scribbles_on_g, *bn_point)

    def scribbles_on_x(x, gamma, beta):
        y = _bn(x, gamma, beta)
        x += 1
        return y

    with pytest.raises(GradientCheckError, match=r"forward modified input 0 \('x'\) in place"):
        check_grad(scribbles_on_x, F.batch_norm_backward, *bn_point)


def test_argument_errors(bn_point):
    x, gamma, beta = bn_point
    with pytest.raises(
        TypeError, match=r"input 0 \('x'\) must be a float64 ndarray .* got an array of dtype float32"
    ):
        check_grad(_bn, F.batch_norm_backward, x.astype(np.float32), gamma, beta)
    with pytest.raises(TypeError, match=r"input 1 \('gamma'\) must be a float64 ndarray .* got list"):
        check_grad(_bn, F.batch_norm_backward, x, [1.0] * 4, beta)
    with pytest.raises(TypeError, match=r"forward must return \(output, ctx\), got ndarray"):
        check_grad(lambda x: np.sin(x), lambda g, c: g, x)
    with pytest.raises(
        TypeError, match="forward must return a float64 ndarray output for float64 inputs, got dtype float32"
    ):
        check_grad(lambda x: (x.astype(np.float32), None), lambda g, c: g, x)
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got 0"):
        check_grad(_bn, F.batch_norm_backward, *bn_point, eps=0)
    with pytest.raises(ValueError, match="rtol must be a finite number > 0, got -1"):
        check_grad(_bn, F.batch_norm_backward, *bn_point, rtol=-1)
    with pytest.raises(TypeError, match="atol must be a number, got str"):
        check_grad(_bn, F.batch_norm_backward, *bn_point, atol="0")
    with pytest.raises(ValueError, match="n_directions must be a positive int, got 0"):
        check_grad(_bn, F.batch_norm_backward, *bn_point, n_directions=0)
    with pytest.raises(ValueError, match=r"names must give one name per input \(3\), got 2"):
        check_grad(_bn, F.batch_norm_backward, *bn_point, names=("a", "b"))


def test_is_an_assertion_error():
    assert issubclass(GradientCheckError, AssertionError)


def test_no_warning_for_random_inputs(bn_point):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_grad(_bn, F.batch_norm_backward, *bn_point)
