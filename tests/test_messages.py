"""The newcomer's mistakes, each answered with a message that says how to fix it.

One ``pytest.raises(match=...)`` or ``pytest.warns`` per message; every check
that raises also shows that nothing changed.
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import numpy as np
import pytest

import bnorm
from bnorm.functional import batch_norm, batch_norm_forward

X = np.arange(12.0).reshape(4, 3)
NHWC = np.random.default_rng(0).normal(size=(2, 5, 5, 3))


# -- flags are real booleans -------------------------------------------------------------------
def test_functional_training_string_is_refused_and_nothing_trains():
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(
        TypeError, match=re.escape("training must be a bool, got str 'False' (write False without quotes)")
    ):
        batch_norm(X, rm, rv, training="False")
    assert rm.tolist() == [0, 0, 0] and rv.tolist() == [1, 1, 1]


def test_functional_training_int_is_refused():
    with pytest.raises(TypeError, match=re.escape("training must be a bool, got int 1 (write True)")):
        batch_norm_forward(X, None, None, training=1)


def test_functional_training_numpy_bool_is_accepted():
    y = batch_norm(X, None, None, training=np.bool_(True))
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)


def test_layer_training_override_must_be_a_bool():
    bn = bnorm.BatchNorm1d(3)
    with pytest.raises(
        TypeError, match=re.escape("training must be a bool, got str 'True' (write True without quotes)")
    ):
        bn(X, training="True")
    assert int(bn.num_batches_tracked) == 0


def test_norm_layer_training_override_must_be_a_bool():
    with pytest.raises(TypeError, match=re.escape("training must be a bool, got float 1.0")):
        bnorm.InstanceNorm1d(3, track_running_stats=True)(np.ones((2, 3, 4)), training=1.0)


@pytest.mark.parametrize("flag", ["affine", "track_running_stats", "bias"])
def test_layer_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=re.escape(f"{flag} must be a bool, got str 'no'")):
        bnorm.BatchNorm2d(3, **{flag: "no"})


def test_train_mode_must_be_a_bool():
    bn = bnorm.BatchNorm2d(3)
    with pytest.raises(TypeError, match=re.escape("mode must be a bool, got NoneType None")):
        bn.train(None)  # type: ignore[arg-type]
    assert bn.training is True


# -- momentum that looks like a Keras/TF decay -------------------------------------------------
_DECAY_LOOK = (
    "momentum=0.99 looks like a Keras/TensorFlow momentum (the weight on the old value); bnorm's "
    "momentum is PyTorch's weight on the new batch, so the running statistics would follow each "
    "batch almost entirely. For Keras' momentum=0.99 write decay=0.99 (or momentum=0.01); if you "
    "mean PyTorch's momentum=0.99, silence this with "
    'warnings.filterwarnings("ignore", category=bnorm.MomentumConventionWarning)'
)


def test_momentum_that_looks_like_a_decay_warns_with_both_spellings():
    with pytest.warns(bnorm.MomentumConventionWarning, match=re.escape(_DECAY_LOOK)) as record:
        bn = bnorm.BatchNorm2d(3, momentum=0.99)
    assert record[0].filename == __file__  # points at the user's line, not into bnorm
    assert bn.momentum == 0.99  # it is a warning: PyTorch's meaning is kept


def test_momentum_warning_is_a_user_warning_shown_once_per_line():
    assert issubclass(bnorm.MomentumConventionWarning, UserWarning)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's own default for UserWarning
        for _ in range(5):
            bnorm.BatchNorm1d(3, momentum=0.9)
        bnorm.BatchNorm1d(3, momentum=0.9)  # another line: another warning
    assert [w.category for w in record] == [bnorm.MomentumConventionWarning] * 2


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0, None])
def test_momentum_outside_the_suspicious_range_is_silent(momentum):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnorm.BatchNorm2d(3, momentum=momentum)


def test_decay_spelling_is_silent_and_means_the_keras_value():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn = bnorm.BatchNorm1d(3, decay=0.99)
        bnorm.BatchNorm1d(3, convention="keras")
    bn(X)
    np.testing.assert_allclose(bn.running_mean, 0.01 * X.mean(axis=0), rtol=1e-6)


def test_momentum_warning_can_be_filtered():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=bnorm.MomentumConventionWarning)
        bnorm.BatchNorm2d(3, momentum=0.99)


def test_momentum_warning_in_setter_functional_and_instance_norm():
    bn = bnorm.BatchNorm1d(3)
    with pytest.warns(
        bnorm.MomentumConventionWarning, match=r"momentum=0\.9 .* write decay=0\.9 \(or momentum=0\.1\)"
    ):
        bn.momentum = 0.9
    with pytest.warns(bnorm.MomentumConventionWarning, match=r"write decay=0\.9 \(or momentum=0\.1\)"):
        batch_norm(X, np.zeros(3), np.ones(3), training=True, momentum=0.9)
    with pytest.warns(bnorm.MomentumConventionWarning, match=r"momentum=0\.75 looks like"):
        bnorm.InstanceNorm2d(3, momentum=0.75)


# -- channels-last input into a channels-first layer --------------------------------------------
def test_nhwc_into_batchnorm2d_suggests_axis_minus_1():
    bn = bnorm.BatchNorm2d(3)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "expected input with 3 channels on axis 1, got input of shape (2, 5, 5, 3); its last axis "
            "has 3 entries, so it looks channels-last: pass axis=-1 (channels-last) or transpose it to "
            "channels-first with x.transpose(0, 3, 1, 2)"
        ),
    ):
        bn(NHWC)
    assert int(bn.num_batches_tracked) == 0
    y = bnorm.BatchNorm2d(3, axis=-1)(NHWC)  # the suggestion works
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-6)


def test_nhwc_into_functional_batch_norm_suggests_axis_minus_1():
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "running_mean must have shape (5,) to match input.shape[1], got (3,); its last axis has 3 "
            "entries, so it looks channels-last: pass axis=-1"
        ),
    ):
        batch_norm(NHWC, rm, rv, training=True)
    assert rm.tolist() == [0, 0, 0]
    with pytest.raises(
        ValueError, match=re.escape("weight must have shape (5,) to match input.shape[1], got (3,); its last")
    ):
        batch_norm(NHWC, None, None, weight=np.ones(3), training=True)


def test_a_mismatch_that_does_not_fit_channels_last_has_no_hint():
    with pytest.raises(ValueError, match=r"got input of shape \(2, 5, 5, 4\)$"):
        bnorm.BatchNorm2d(3)(np.ones((2, 5, 5, 4)))


# -- constructor calls ----------------------------------------------------------------------
def test_mistyped_keyword_names_the_class_and_the_closest_keyword():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "BatchNorm2d() got an unexpected keyword argument 'momentun'; did you mean 'momentum'?"
        ),
    ) as info:
        bnorm.BatchNorm2d(3, momentun=0.1)
    assert "inspect.py" not in info.traceback[-1].path.name  # raised from bnorm's own check


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: bnorm.BatchNorm1d(3, epss=1e-3),
            "BatchNorm1d() got an unexpected keyword argument 'epss'; did you mean 'eps'?",
        ),
        (
            lambda: bnorm.SyncBatchNorm(3, commm=None),
            "SyncBatchNorm() got an unexpected keyword argument 'commm'; did you mean 'comm'?",
        ),
        (
            lambda: bnorm.LayerNorm(8, elementwise_afine=False),
            "LayerNorm() got an unexpected keyword argument 'elementwise_afine'; did you mean 'elementwise_affine'?",
        ),
        (
            lambda: bnorm.GroupNorm(2, 4, afine=False),
            "GroupNorm() got an unexpected keyword argument 'afine'; did you mean 'affine'?",
        ),
        (
            lambda: bnorm.BatchNorm(3, track_running_stat=False),
            "BatchNorm() got an unexpected keyword argument 'track_running_stat'; did you mean 'track_running_stats'?",
        ),
    ],
)
def test_mistyped_keywords_in_every_layer(make, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        make()


def test_unknown_keyword_without_a_close_match_lists_the_valid_ones():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "BatchNorm2d() got an unexpected keyword argument 'zzz' (valid: num_features, eps, momentum,"
        ),
    ):
        bnorm.BatchNorm2d(3, zzz=1)


def test_other_bad_calls_name_the_class():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "BatchNorm2d() takes 5 positional arguments (num_features, eps, momentum, affine, "
            "track_running_stats) but 6 were given; pass the others by keyword"
        ),
    ):
        bnorm.BatchNorm2d(3, 1e-5, 0.1, True, True, False)
    with pytest.raises(TypeError, match=re.escape("BatchNorm2d() missing required argument 'num_features'")):
        bnorm.BatchNorm2d()
    with pytest.raises(
        TypeError, match=re.escape("BatchNorm2d() got multiple values for argument 'num_features'")
    ):
        bnorm.BatchNorm2d(3, num_features=3)


def test_a_subclass_with_its_own_arguments_is_checked_against_them():
    class Scaled(bnorm.BatchNorm1d):
        def __init__(self, num_features, scale=2.0):
            super().__init__(num_features)
            self.scale = scale

    assert Scaled(3, scale=3.0).scale == 3.0
    with pytest.raises(
        TypeError,
        match=re.escape("Scaled() got an unexpected keyword argument 'scal'; did you mean 'scale'?"),
    ):
        Scaled(3, scal=3.0)


def test_copy_and_pickle_still_work():
    bn = bnorm.BatchNorm2d(3, bias=False, momentum=None)
    for clone in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert repr(clone) == repr(bn) and clone.bias is None


# -- one layer out of a whole model's state dict -------------------------------------------
def test_load_state_dict_prefix_with_no_matching_key_names_the_prefixes():
    bn = bnorm.BatchNorm1d(3)
    state = {"0.weight": np.ones((3, 3)), "1.weight": np.ones(3), "1.running_mean": np.ones(3)}
    with pytest.raises(
        bnorm.layers._base.StateDictKeyError,
        match=re.escape(
            "no key of state starts with '2.', so there is nothing to load into BatchNorm1d; "
            "the prefixes in state are '0.', '1.'"
        ),
    ):
        bn.load_state_dict(state, prefix="2")
    assert bn.running_mean.tolist() == [0, 0, 0]


def test_load_state_dict_prefix_must_be_a_str():
    with pytest.raises(
        TypeError, match=re.escape("prefix must be a str such as '1.' or 'features.3.', got int")
    ):
        bnorm.BatchNorm1d(3).load_state_dict({"1.weight": np.ones(3)}, prefix=1)  # type: ignore[arg-type]


def test_no_momentum_warning_where_the_value_is_pytorch_s_by_construction(tmp_path):
    with pytest.warns(bnorm.MomentumConventionWarning):
        bn = bnorm.BatchNorm1d(3, momentum=0.9)  # the one warning, where the user wrote it
    bnorm.save(tmp_path / "m.npz", bn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bnorm.load(tmp_path / "m.npz").momentum == 0.9
        sync = bnorm.SyncBatchNorm.from_batch_norm(bn)
        assert sync.to_batch_norm().momentum == 0.9
        state = {
            "weight": np.ones(3),
            "bias": np.zeros(3),
            "running_mean": np.zeros(3),
            "running_var": np.ones(3),
        }

        class BatchNorm1d:  # a duck-typed PyTorch module with momentum 0.9
            num_features, eps, momentum, affine, track_running_stats, training = (
                3,
                1e-5,
                0.9,
                True,
                True,
                True,
            )

            def state_dict(self):
                return state

        assert bnorm.interop.from_torch(BatchNorm1d()).momentum == 0.9
    with pytest.warns(bnorm.MomentumConventionWarning):  # and the check is back on afterwards
        bnorm.BatchNorm1d(3, momentum=0.9)
