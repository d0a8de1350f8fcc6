"""One test per error message: argument, expectation and what came are all named."""

from __future__ import annotations

import re

import numpy as np
import pytest

import bnorm
from bnorm.functional import batch_norm, batch_norm_backward, batch_norm_forward

X = np.ones((4, 3)) * np.arange(4.0)[:, None]


@pytest.mark.parametrize(
    ("cls", "shape", "message"),
    [
        (bnorm.BatchNorm1d, (2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
        (bnorm.BatchNorm1d, (3,), "expected 2D or 3D input (got 1D input)"),
        (bnorm.BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
        (bnorm.BatchNorm3d, (2, 3, 4, 5), "expected 5D input (got 4D input)"),
        (bnorm.BatchNorm, (3,), "expected at least 2D input (got 1D input)"),
    ],
)
def test_rank_messages_as_pytorch(cls, shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(3)(np.ones(shape))


def test_channel_mismatch():
    with pytest.raises(
        ValueError, match=re.escape("expected input with 3 channels on axis 1, got input of shape (4, 5)")
    ):
        bnorm.BatchNorm1d(3)(np.ones((4, 5)))


def test_one_value_per_channel_training():
    with pytest.raises(
        ValueError,
        match=re.escape("Expected more than 1 value per channel when training, got input size (1, 3)"),
    ):
        batch_norm(np.ones((1, 3)), None, None, training=True)


def test_one_value_per_channel_eval_without_running_stats():
    bn = bnorm.BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=re.escape("got input size (1, 3, 1, 1)")):
        bn(np.ones((1, 3, 1, 1)))


def test_one_value_per_channel_is_fine_in_eval_with_running_stats():
    y = bnorm.BatchNorm2d(3).eval()(np.ones((1, 3, 1, 1), np.float32))
    assert y.shape == (1, 3, 1, 1)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_parameter_shape(name):
    kwargs = {name: np.ones(4)}
    with pytest.raises(
        ValueError, match=re.escape(f"{name} must have shape (3,) to match input.shape[1], got (4,)")
    ):
        batch_norm(X, None, None, training=True, **kwargs)


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_buffer_shape(name):
    bufs = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    bufs[name] = np.zeros(2)
    with pytest.raises(
        ValueError, match=re.escape(f"{name} must have shape (3,) to match input.shape[1], got (2,)")
    ):
        batch_norm(X, bufs["running_mean"], bufs["running_var"], training=True)


def test_buffer_must_be_ndarray_in_training():
    with pytest.raises(
        TypeError,
        match="running_mean must be a NumPy array of shape \\(3,\\) so it can be updated in place, got list",
    ):
        batch_norm(X, [0.0, 0.0, 0.0], np.ones(3), training=True)


def test_buffer_must_be_floating():
    with pytest.raises(
        TypeError, match="running_var must have a floating dtype to be updated in place, got int64"
    ):
        batch_norm(X, np.zeros(3), np.ones(3, dtype=np.int64), training=True)


def test_buffer_must_be_writeable():
    rv = np.ones(3)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var must be writeable"):
        batch_norm(X, np.zeros(3), rv, training=True)


def test_failed_call_leaves_other_buffer_unchanged():
    rm = np.zeros(3)
    with pytest.raises(ValueError):
        batch_norm(X, rm, np.zeros(2), training=True)
    np.testing.assert_array_equal(rm, 0)


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_eval_needs_running_stats(name):
    bufs = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    bufs[name] = None
    with pytest.raises(ValueError, match=f"{name} must be defined in evaluation mode"):
        batch_norm(X, bufs["running_mean"], bufs["running_var"], training=False)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_in_training(eps):
    with pytest.raises(ValueError, match="eps must be"):
        batch_norm(X, None, None, training=True, eps=eps)


def test_eps_zero_allowed_in_eval_negative_not():
    y = batch_norm(X, np.zeros(3), np.ones(3), training=False, eps=0.0)
    np.testing.assert_array_equal(y, X)
    with pytest.raises(ValueError, match=re.escape("eps must be a finite number >= 0, got -1.0")):
        batch_norm(X, np.zeros(3), np.ones(3), training=False, eps=-1.0)


def test_eps_type():
    with pytest.raises(TypeError, match="eps must be a positive number, got str"):
        batch_norm(X, None, None, training=True, eps="1e-5")


@pytest.mark.parametrize(
    ("kw", "value"), [("momentum", 1.5), ("momentum", -0.1), ("decay", 2.0), ("momentum", float("nan"))]
)
def test_fraction_range(kw, value):
    with pytest.raises(ValueError, match=f"{kw} must be in \\[0, 1\\], got"):
        batch_norm(X, np.zeros(3), np.ones(3), training=True, **{kw: value})


def test_fraction_range_layer():
    with pytest.raises(ValueError, match=re.escape("momentum must be in [0, 1], got 3")):
        bnorm.BatchNorm1d(3, momentum=3)
    with pytest.raises(ValueError, match=re.escape("decay must be in [0, 1], got -0.5")):
        bnorm.BatchNorm1d(3, decay=-0.5)
    bn = bnorm.BatchNorm1d(3)
    with pytest.raises(ValueError, match="decay must be in"):
        bn.decay = 1.5
    assert bn.momentum == 0.1


def test_momentum_and_decay_both_given():
    with pytest.raises(ValueError, match=r"give either momentum .* or decay .*, not both"):
        batch_norm(X, np.zeros(3), np.ones(3), training=True, momentum=0.1, decay=0.9)
    with pytest.raises(ValueError, match="not both"):
        bnorm.BatchNorm1d(3, momentum=0.1, decay=0.9)
    with pytest.raises(ValueError, match="not both"):
        bnorm.BatchNorm1d(3, convention="keras", momentum=0.2, decay=0.9)


def test_functional_momentum_none():
    with pytest.raises(ValueError, match=r"momentum=None .* needs a batch counter"):
        batch_norm(X, np.zeros(3), np.ones(3), training=True, momentum=None)


def test_unknown_convention_lists_valid():
    with pytest.raises(ValueError, match="convention must be one of 'torch', 'keras', 'onnx', 'flax', 'd2l'"):
        bnorm.BatchNorm(3, convention="tensorflow")


@pytest.mark.parametrize(
    ("dtype", "name"), [(np.complex128, "complex128"), (object, "object"), (np.str_, "<U")]
)
def test_input_dtype(dtype, name):
    x = np.ones((4, 3)).astype(dtype)
    with pytest.raises(
        TypeError, match=f"input must have a real floating, integer or bool dtype, got dtype {name}"
    ):
        batch_norm(x, None, None, training=True)


def test_functional_rank():
    with pytest.raises(
        ValueError,
        match=re.escape("input must have at least 2 dimensions (N, C, ...), got 1D input of shape (3,)"),
    ):
        batch_norm(np.ones(3), None, None, training=True)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match=re.escape("axis=3 is out of range for 2D input (valid: -2 to 1)")):
        batch_norm(X, None, None, training=True, axis=3)
    with pytest.raises(TypeError, match="axis must be an int, got float"):
        batch_norm(X, None, None, training=True, axis=1.0)


def test_on_nonfinite_value():
    with pytest.raises(
        ValueError, match="on_nonfinite must be one of 'skip', 'raise', 'propagate', got 'ignore'"
    ):
        batch_norm(X, None, None, training=True, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        bnorm.BatchNorm1d(3, on_nonfinite="ignore")


def test_out_mismatch():
    with pytest.raises(
        ValueError,
        match=re.escape("out must have shape (4, 3) and dtype float64, got shape (4, 3) and dtype float32"),
    ):
        batch_norm(X, None, None, training=True, out=np.empty((4, 3), np.float32))
    with pytest.raises(ValueError, match="out must be a writeable C-contiguous array"):
        batch_norm(X, None, None, training=True, out=np.empty((3, 4)).T)
    with pytest.raises(TypeError, match="out must be a NumPy array, got list"):
        batch_norm(X, None, None, training=True, out=[0.0])


def test_backward_grad_shape_and_ctx():
    _, ctx = batch_norm_forward(X, None, None, training=True)
    with pytest.raises(
        ValueError, match=re.escape("grad_output must have the input's shape (4, 3), got (3, 4)")
    ):
        batch_norm_backward(np.ones((3, 4)), ctx)
    with pytest.raises(
        TypeError, match="ctx must be the BatchNormContext returned by batch_norm_forward, got dict"
    ):
        batch_norm_backward(np.ones((4, 3)), {})


def test_layer_backward_before_forward():
    with pytest.raises(RuntimeError, match="backward called before forward"):
        bnorm.BatchNorm1d(3).backward(np.ones((4, 3)))


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (0, ValueError, "positive int, got 0"),
        (2.5, TypeError, "positive int, got float"),
        (True, TypeError, "got bool"),
    ],
)
def test_num_features(value, exc, match):
    with pytest.raises(exc, match=f"num_features must be a {match}" if exc is ValueError else match):
        bnorm.BatchNorm1d(value)


def test_layer_dtype_and_types():
    with pytest.raises(TypeError, match="dtype must be a floating dtype, got int32"):
        bnorm.BatchNorm1d(3, dtype=np.int32)
    with pytest.raises(TypeError, match="unbiased_running_var must be a bool, got int"):
        bnorm.BatchNorm1d(3, unbiased_running_var=1)
    with pytest.raises(TypeError, match="momentum must be a number in \\[0, 1\\], got str"):
        bnorm.BatchNorm1d(3, momentum="0.1")
    with pytest.raises(ValueError, match="eps must be > 0"):
        bnorm.BatchNorm1d(3, eps=0)


# -- inputs NumPy would take silently or with a message that names nothing ---------
MASKED = np.ma.masked_array(X, mask=X > 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda: bnorm.BatchNorm1d(3)(MASKED),
        lambda: bnorm.SyncBatchNorm(3)(MASKED),
        lambda: batch_norm(MASKED, None, None, training=True),
        lambda: bnorm.LayerNorm(3)(MASKED),
        lambda: bnorm.GroupNorm(1, 3)(MASKED[:, :, None]),
        lambda: bnorm.InstanceNorm1d(3)(MASKED[:, :, None] * np.ones(2)),
        lambda: bnorm.BatchNorm1d(3).recompute_running_stats([MASKED]),
    ],
    ids=[
        "BatchNorm1d",
        "SyncBatchNorm",
        "batch_norm",
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm1d",
        "recompute",
    ],
)
def test_masked_arrays_are_refused_with_how_to_pass_them(call):
    with pytest.raises(TypeError, match=r"is a masked array; bnorm does not honour masks.*\.filled\(value\)"):
        call()


def test_masked_grad_output_is_refused():
    _, ctx = batch_norm_forward(X, None, None, training=True)
    with pytest.raises(TypeError, match=r"grad_output is a masked array.*\.compressed\(\)"):
        batch_norm_backward(MASKED, ctx)


def test_ragged_input_names_the_argument():
    with pytest.raises(ValueError, match="input must be a rectangular array, got a ragged nested sequence"):
        bnorm.BatchNorm1d(2)([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="x must be a rectangular array, got a ragged"):
        bnorm.LayerNorm(2)([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize(
    "make",
    [bnorm.BatchNorm1d, bnorm.LayerNorm, bnorm.InstanceNorm1d, lambda c, **kw: bnorm.GroupNorm(1, c, **kw)],
)
def test_unknown_dtype_names_the_argument(make):
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype such as np\.float32 .*got 'banana'"):
        make(3, dtype="banana")


def test_convention_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"convention must be a str, one of 'torch'.*got list \['keras'\]"):
        bnorm.BatchNorm1d(3, convention=["keras"])


@pytest.mark.parametrize(
    "call",
    [
        lambda: bnorm.BatchNorm1d(3, eps=float("nan")),
        lambda: bnorm.LayerNorm(3, eps=float("nan")),
        lambda: batch_norm(X, None, None, training=True, eps=float("nan")),
        lambda: bnorm.functional.group_norm(X[:, :, None], 1, eps=float("nan")),
    ],
)
def test_nan_eps_names_the_argument(call):
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got nan"):
        call()


# -- backward's out= -------------------------------------------------------------
def _forward_backward(seed=0, shape=(16, 3, 5)):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, size=shape)
    _, ctx = batch_norm_forward(x, None, None, rng.normal(size=3), None, training=True)
    return x, ctx, rng.normal(size=shape)


def test_backward_refuses_out_over_the_saved_input_and_changes_nothing():
    x, ctx, g = _forward_backward()
    expected, _, _ = batch_norm_backward(g, ctx)
    kept = x.copy()
    for out in (x, x[...], x.reshape(x.shape)):
        with pytest.raises(ValueError, match="out overlaps the forward input saved in ctx"):
            batch_norm_backward(g, ctx, out=out)
    np.testing.assert_array_equal(x, kept)
    np.testing.assert_array_equal(batch_norm_backward(g, ctx)[0], expected)  # a second backward is right


def test_backward_refuses_out_partially_over_the_input():
    buf = np.random.default_rng(1).normal(size=2 * 48)
    x = buf[:48].reshape(16, 3)
    _, ctx = batch_norm_forward(x, None, None, training=True)
    with pytest.raises(ValueError, match="out overlaps the forward input"):
        batch_norm_backward(np.ones((16, 3)), ctx, out=buf[24:72].reshape(16, 3))


def test_backward_into_grad_output_itself_is_exact_but_a_shifted_view_is_refused():
    _, ctx, g = _forward_backward()
    expected, _, _ = batch_norm_backward(g, ctx)
    g2 = g.copy()
    dx, _, _ = batch_norm_backward(g2, ctx, out=g2)
    assert dx is g2
    np.testing.assert_array_equal(dx, expected)
    buf = np.concatenate([g.ravel(), g.ravel()])
    with pytest.raises(ValueError, match="out partially overlaps grad_output"):
        batch_norm_backward(buf[: g.size].reshape(g.shape), ctx, out=buf[5 : 5 + g.size].reshape(g.shape))
