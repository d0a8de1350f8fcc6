"""bnorm.save / bnorm.load: exact round trips, nesting, no pickle, corrupt files, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest

import bnorm
from bnorm import io as bio


def trained(cls=bnorm.BatchNorm2d, c=3, seed=0, **kw):
    rng = np.random.default_rng(seed)
    bn = cls(c, **kw)
    if bn.weight is not None:
        bn.weight[...] = rng.normal(size=c)
    if bn.bias is not None:
        bn.bias[...] = rng.normal(size=c)
    spatial = (3,) if isinstance(bn, bnorm.BatchNorm1d) else (3, 3)
    shape = (6, c, *spatial) if bn.axis == 1 else (6, *spatial, c)
    for _ in range(2):
        bn(rng.normal(1.0, 2.0, size=shape))
    return bn


def assert_same_layer(a, b):
    assert type(a) is type(b)
    assert repr(a) == repr(b)
    assert a.training == b.training
    assert a._config() == b._config()
    for n in (*a._parameters, *a._buffers):
        x, y = getattr(a, n), getattr(b, n)
        assert (x is None) == (y is None), n
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, n
            np.testing.assert_array_equal(x, y)


def write_zip(path, members):
    """An .npz written by hand: members maps names to arrays (pickled if object arrays)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in members.items():
            with zf.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, arr, allow_pickle=True)


# -- round trips -----------------------------------------------------------------
LAYERS = [
    lambda: trained(),
    lambda: trained().eval(),
    lambda: _bn1d_cumulative(),
    lambda: trained(bnorm.BatchNorm, convention="keras"),
    lambda: trained(bnorm.BatchNorm, convention="onnx", unbiased_running_var=True, eps=1e-4),
    lambda: trained(bnorm.BatchNorm2d, affine=False, dtype=np.float16),
    lambda: bnorm.BatchNorm3d(2, track_running_stats=False, on_nonfinite="raise"),
    lambda: bnorm.BatchNorm2d(4, decay=0.5, axis=-1, dtype=np.float64).eval(),
]


def _bn1d_cumulative():
    bn = bnorm.BatchNorm1d(2, momentum=None, dtype=np.float64)
    bn(np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]]))
    return bn


@pytest.mark.parametrize("make", LAYERS)
def test_layer_round_trip_rebuilds_the_same_layer(tmp_path, make):
    bn = make()
    path = tmp_path / "bn.npz"
    bnorm.save(path, bn)
    back = bnorm.load(path)
    assert_same_layer(bn, back)
    assert back.convention == bn.convention
    assert back._running == bn._running


def test_rebuilt_layer_continues_training_identically(tmp_path):
    bn = trained(bnorm.BatchNorm2d, momentum=None)
    bnorm.save(tmp_path / "a.npz", bn)
    back = bnorm.load(tmp_path / "a.npz")
    x = np.random.default_rng(4).normal(size=(5, 3, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(bn(x), back(x))
    np.testing.assert_array_equal(bn.running_var, back.running_var)
    assert int(back.num_batches_tracked) == 3
    np.testing.assert_array_equal(bn.eval()(x), back.eval()(x))


def test_state_dict_round_trip_exact_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "f16": rng.normal(size=5).astype(np.float16),
        "f32": rng.normal(size=(2, 3)).astype(np.float32),
        "f64": np.array([np.pi, -0.0, np.inf, np.nan, 5e-324]),
        "i64_0d": np.array(7, dtype=np.int64),
        "u8": np.arange(4, dtype=np.uint8),
        "b": np.array([True, False]),
        "c128": np.array([1 + 2j]),
        "big_endian": np.arange(3, dtype=">f8"),
        "fortran": np.asfortranarray(rng.normal(size=(3, 4))),
        "empty": np.zeros((0, 3), np.float32),
        "s": np.array(["ab", "c"]),
    }
    bnorm.save(tmp_path / "s.npz", state)
    back = bnorm.load(tmp_path / "s.npz")
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v)
        assert back[k].tobytes() == v.tobytes() or k == "fortran"


def test_nesting_preserved_and_readable_by_plain_numpy(tmp_path):
    enc, dec = trained(), trained(bnorm.BatchNorm1d, c=2).eval()
    obj = {
        "encoder": {"bn1": enc, "extra": {"step": np.int64(3)}},
        "decoder": {"bn": dec, "state": dec.state_dict()},
        "empty": {},
    }
    path = tmp_path / "model.npz"
    bnorm.save(path, obj)
    with np.load(path, allow_pickle=False) as f:
        names = set(f.files)
        meta = json.loads(str(f["__bnorm__"]))
    assert {
        "encoder/bn1/weight",
        "encoder/bn1/num_batches_tracked",
        "encoder/extra/step",
        "decoder/state/running_var",
        "__bnorm__",
    } <= names
    assert meta["format"] == "bnorm" and meta["version"] == bio.FORMAT_VERSION
    back = bnorm.load(path)
    assert list(back) == ["encoder", "decoder", "empty"] and back["empty"] == {}
    assert_same_layer(back["encoder"]["bn1"], enc)
    assert_same_layer(back["decoder"]["bn"], dec)
    assert int(back["encoder"]["extra"]["step"]) == 3
    for k, v in dec.state_dict().items():
        np.testing.assert_array_equal(back["decoder"]["state"][k], v)
    flat = bnorm.load(path, rebuild=False)
    assert isinstance(flat["encoder"]["bn1"], dict)
    assert bnorm.BatchNorm2d(3).load_state_dict(flat["encoder"]["bn1"]).missing_keys == []


def test_names_that_collide_as_paths_stay_apart(tmp_path):
    obj = {
        "a/b": {"w": np.array([1.0])},
        "a": {"b": {"w": np.array([2.0])}},
        "__bnorm__": np.array(3),
        "nul\x00": np.array(4),
        "nul_": np.array(5),
    }
    bnorm.save(tmp_path / "c.npz", obj)
    back = bnorm.load(tmp_path / "c.npz")
    assert back["a/b"]["w"][0] == 1 and back["a"]["b"]["w"][0] == 2 and int(back["__bnorm__"]) == 3
    assert int(back["nul\x00"]) == 4 and int(back["nul_"]) == 5


def test_layer_without_gamma_round_trips(tmp_path):
    bn = bnorm.interop.from_keras(
        [np.zeros(3, np.float32), np.zeros(3, np.float32), np.ones(3, np.float32)], scale=False
    )
    bnorm.save(tmp_path / "k.npz", bn)
    back = bnorm.load(tmp_path / "k.npz")
    assert back.weight is None and back.bias is not None
    assert_same_layer(bn, back)


def test_plain_npz_loads_as_flat_dict(tmp_path):
    np.savez(tmp_path / "p.npz", weight=np.ones(2), running_mean=np.zeros(2, np.float32))
    back = bnorm.load(tmp_path / "p.npz")
    assert set(back) == {"weight", "running_mean"} and back["running_mean"].dtype == np.float32


def test_torch_state_dict_saves_as_arrays(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.nn.BatchNorm1d(3)
    t(torch.randn(4, 3))
    bnorm.save(tmp_path / "t.npz", t.state_dict())
    back = bnorm.load(tmp_path / "t.npz")
    for k, v in t.state_dict().items():
        assert back[k].dtype == v.numpy().dtype
        np.testing.assert_array_equal(back[k], v.numpy())


def test_save_does_not_add_a_suffix(tmp_path):
    bnorm.save(tmp_path / "weights.bin", {"x": np.ones(1)})
    assert os.listdir(tmp_path) == ["weights.bin"]


# -- no pickle -------------------------------------------------------------------
class Payload:
    """Unpickling this runs code that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_object_arrays_refused_on_save_and_nothing_written(tmp_path):
    path = tmp_path / "x.npz"
    bnorm.save(path, {"ok": np.ones(2)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="cannot save bad/w: it is an array of Python objects"):
        bnorm.save(path, {"ok": np.ones(2), "bad": {"w": np.array([{"a": 1}], dtype=object)}})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.npz"]


def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker)
    # sanity check: this payload does run when unpickled
    pickle.loads(pickle.dumps(evil))
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.npz"
    meta = json.dumps(
        {
            "format": "bnorm",
            "version": 1,
            "root": {"kind": "dict", "items": [["w", {"kind": "array", "key": "w"}]]},
        }
    )
    write_zip(path, {"__bnorm__": np.array(meta), "w": evil})
    with pytest.raises(ValueError, match=r"contains pickled data .* never unpickles"):
        bnorm.load(path)
    raw = tmp_path / "evil.pkl"  # a bare pickle file, not a zip at all
    raw.write_bytes(pickle.dumps(evil))
    with pytest.raises(ValueError, match=r"is a Python pickle, not an \.npz archive; bnorm never unpickles"):
        bnorm.load(raw)
    assert not marker.exists()


# -- corrupt files ---------------------------------------------------------------
@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.npz"
    bnorm.save(path, {"bn": trained()})
    return path


def test_truncated_file_is_a_clear_error(good_file):
    data = good_file.read_bytes()
    for n in (len(data) // 2, len(data) - 10, 30):
        good_file.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"is not a readable \.npz file: it is truncated or corrupt"):
            bnorm.load(good_file)


def test_flipped_byte_in_array_data_is_detected(good_file):
    data = bytearray(good_file.read_bytes())
    i = data.index(b"NUMPY", 200) + 130  # inside the first array after the metadata
    data[i] ^= 0xFF
    good_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        bnorm.load(good_file)


def test_garbage_and_npy_files(tmp_path):
    (tmp_path / "g.npz").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"is not a readable .npz file \(not a zip archive\)"):
        bnorm.load(tmp_path / "g.npz")
    np.save(tmp_path / "a.npy", np.ones(3))
    with pytest.raises(ValueError, match=r"is not an \.npz archive: it is a single \.npy array"):
        bnorm.load(tmp_path / "a.npy")
    with pytest.raises(FileNotFoundError):
        bnorm.load(tmp_path / "missing.npz")


def _rewrite_meta(path, edit):
    with np.load(path, allow_pickle=False) as f:
        members = {k: f[k] for k in f.files}
    meta = json.loads(str(members["__bnorm__"]))
    edit(meta, members)
    members["__bnorm__"] = np.array(json.dumps(meta))
    write_zip(path, members)


def test_bad_metadata(good_file):
    def newer(meta, members):
        meta["version"] = 99

    _rewrite_meta(good_file, newer)
    with pytest.raises(ValueError, match=r"written in bnorm file format 99; .* upgrade bnorm"):
        bnorm.load(good_file)


def test_metadata_naming_a_missing_array(good_file):
    def drop(meta, members):
        del members["bn/weight"]

    _rewrite_meta(good_file, drop)
    with pytest.raises(
        ValueError, match="not a valid bnorm file: array 'bn/weight' is described but missing"
    ):
        bnorm.load(good_file)


def test_arrays_not_in_metadata(good_file):
    def add(meta, members):
        members["sneaky"] = np.ones(1)

    _rewrite_meta(good_file, add)
    with pytest.raises(ValueError, match=r"arrays \['sneaky'\] are not described by its metadata"):
        bnorm.load(good_file)


def test_unknown_layer_class_and_rebuild_false(good_file):
    def rename(meta, members):
        meta["root"]["items"][0][1]["class"] = "os.system"

    _rewrite_meta(good_file, rename)
    with pytest.raises(
        ValueError,
        match=r"is a 'os.system', which this version of bnorm does not define; load\(path, rebuild=False\)",
    ):
        bnorm.load(good_file)
    assert set(bnorm.load(good_file, rebuild=False)["bn"]) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }


def test_state_that_does_not_fit_its_layer(good_file):
    def wrong(meta, members):
        members["bn/running_var"] = np.ones(5, np.float32)

    _rewrite_meta(good_file, wrong)
    with pytest.raises(
        ValueError, match=r"state of the BatchNorm2d at root/bn does not fit it: .*running_var"
    ):
        bnorm.load(good_file)


def test_bad_arguments(tmp_path):
    with pytest.raises(
        TypeError, match=r"obj must be a bnorm layer, a state dict .* got numpy\.ndarray; to save one array"
    ):
        bnorm.save(tmp_path / "a.npz", np.ones(3))
    with pytest.raises(TypeError, match="keys must be str, got int 1"):
        bnorm.save(tmp_path / "a.npz", {"a": {1: np.ones(3)}})
    assert os.listdir(tmp_path) == []


# -- atomic writes ---------------------------------------------------------------
def test_failure_while_writing_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    bnorm.save(path, {"v": np.arange(3.0)})
    before = path.read_bytes()
    calls = []
    real = np.lib.format.write_array

    def crash(fp, arr, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            real(fp, arr[: arr.size // 2] if arr.ndim else arr, *a, **k)  # half a member
            raise OSError("No space left on device")
        return real(fp, arr, *a, **k)

    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(OSError, match="No space left"):
        bnorm.save(path, {"v": np.arange(5.0), "w": np.ones(4)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]  # the temporary file is gone


def test_failure_at_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    bnorm.save(path, {"v": np.arange(3.0)})
    before = path.read_bytes()

    def boom(src, dst):
        assert os.path.dirname(src) == str(tmp_path)  # temp file in the target's directory
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        bnorm.save(path, {"v": np.arange(5.0)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.npz"]


def test_data_is_fsynced_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    bnorm.save(tmp_path / "f.npz", {"v": np.ones(2)})
    assert events[:2] == ["fsync", "replace"]


def test_overwrite_keeps_permissions(tmp_path):
    path = tmp_path / "p.npz"
    bnorm.save(path, {"v": np.ones(2)})
    os.chmod(path, 0o640)
    bnorm.save(path, {"v": np.zeros(2)})
    assert (os.stat(path).st_mode & 0o777) == 0o640
    assert bnorm.load(path)["v"][0] == 0


class WithComm(bnorm.BatchNorm1d):
    def __init__(self, num_features, comm=None):
        super().__init__(num_features)
        self.comm = comm


def test_arguments_that_are_not_plain_values_are_left_out(tmp_path):
    bnorm.save(tmp_path / "c.npz", WithComm(2, comm=object()))
    with np.load(tmp_path / "c.npz", allow_pickle=False) as f:
        config = json.loads(str(f["__bnorm__"]))["root"]["config"]
    assert config == {"num_features": 2}
    with pytest.raises(ValueError, match="is a 'WithComm', which this version of bnorm does not define"):
        bnorm.load(tmp_path / "c.npz")  # only bnorm's own classes are ever rebuilt
    assert list(bnorm.load(tmp_path / "c.npz", rebuild=False)) == [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    DTYPES = st.sampled_from(["f2", "f4", "f8", "<f8", ">f4", "i1", "i8", "u4", "?", "c8"])

    @settings(max_examples=30, deadline=None)
    @given(
        st.dictionaries(
            st.text(min_size=1, max_size=8),
            hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
            max_size=4,
        )
    )
    def test_round_trip_is_bit_exact(state):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "h.npz")
            bnorm.save(path, {"outer": state})
            back = bnorm.load(path)["outer"]
        assert list(back) == list(state)
        for k, v in state.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape
            assert back[k].tobytes() == v.tobytes()  # NaN payloads and -0.0 included
