"""bnorm.load is bounded and every malformed or foreign archive is a ValueError naming file and member.

Memory bounds are measured with tracemalloc (NumPy reports its allocations
to it): a refused file must be refused before its declared sizes are allocated.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import time
import tracemalloc
import warnings
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnorm
from bnorm import io as bio

MiB = 2**20


def npy_bytes(header: dict, payload: bytes = b"") -> bytes:
    """A .npy stream with an arbitrary header (it may lie about the shape)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def write_members(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def meta_member(root) -> bytes:
    buf = io.BytesIO()
    meta = json.dumps({"format": "bnorm", "version": 1, "root": root})
    np.lib.format.write_array(buf, np.array(meta), allow_pickle=False)
    return buf.getvalue()


def peak_while(fn):
    """(exception raised by fn, peak traced bytes, seconds)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as err:
        caught = err
    else:
        caught = None
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return caught, peak, seconds


# -- sizes ------------------------------------------------------------------------
def deflate_bomb(
    path, header: bytes, zero_bytes: int, chunk: int = 16 * MiB, declared_extra: int = 0
) -> None:
    """A valid .npz whose one deflated member inflates to `header` + `zero_bytes` zeros.

    Built in a fraction of a second: after a full flush the deflate state is
    reset, so every further chunk of zeros compresses to the same bytes, which
    are repeated; the CRC is computed over the inflated data, so the archive is
    valid (an unbounded reader would inflate all of it).
    """
    assert zero_bytes % chunk == 0
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(chunk)
    first = comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush()
    data = first + block * (zero_bytes // chunk) + tail
    crc = zlib.crc32(header)
    for _ in range(zero_bytes // chunk):
        crc = zlib.crc32(zeros, crc)
    name, size = b"x.npy", len(header) + zero_bytes + declared_extra
    fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x21, crc, len(data), size)
    local = b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name
    central = (
        b"PK\x01\x02"
        + struct.pack("<H", 20)
        + fields
        + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, 0)
        + name
    )
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A ~1 MB deflated member that inflates to 1 GiB of float32 zeros."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    count = 2**28  # 1 GiB of float32
    deflate_bomb(path, npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (count,)}), 4 * count)
    return path


def test_the_bomb_is_a_valid_archive(bomb):
    with zipfile.ZipFile(bomb) as zf:
        info = zf.getinfo("x.npy")
        assert info.file_size == 2**30 + 128 and info.compress_size < 1.1 * MiB
        with zf.open(info) as f:  # the first 64 MiB inflate as declared
            assert f.read(6) == b"\x93NUMPY"
            f.read(122)
            assert f.read(64 * MiB) == bytes(64 * MiB)


def test_a_deflate_bomb_fails_fast_with_little_memory(bomb):
    assert bomb.stat().st_size < 1.1 * MiB
    err, peak, seconds = peak_while(lambda: bnorm.load(bomb))
    assert isinstance(err, ValueError), err
    assert re.search(r"would need \d+ bytes of memory, more than max_bytes=268435456", str(err))
    assert str(bomb) in str(err)
    assert peak < 4 * MiB, peak
    assert seconds < 2.0, seconds


def test_the_limit_is_documented_and_overridable(tmp_path):
    assert bio.DEFAULT_MAX_BYTES == 256 * MiB and bnorm.io.DEFAULT_MAX_BYTES == bio.DEFAULT_MAX_BYTES
    path = tmp_path / "a.npz"
    bnorm.save(path, {"x": np.zeros(1000)})
    with pytest.raises(ValueError, match=r"more than max_bytes=4000; if you trust the file, pass a larger"):
        bnorm.load(path, max_bytes=4000)
    assert bnorm.load(path, max_bytes=None)["x"].shape == (1000,)
    assert bnorm.load(path, max_bytes=10_000)["x"].shape == (1000,)
    with pytest.raises(TypeError, match="max_bytes must be a non-negative int or None, got -1"):
        bnorm.load(path, max_bytes=-1)


def _patch_sizes(data: bytes, name: bytes, size: int) -> bytes:
    """Rewrite the uncompressed size of member `name` in both its local and central headers."""
    out = bytearray(data)
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (i := out.find(sig, start)) >= 0:
            name_at = i + (30 if sig == b"PK\x03\x04" else 46)
            if out[name_at : name_at + len(name)] == name:
                out[i + offset : i + offset + 4] = struct.pack("<I", size)
            start = i + 4
    return bytes(out)


def test_a_declared_size_beyond_what_the_bytes_can_hold(tmp_path):
    path = tmp_path / "lie.npz"
    write_members(
        path, {"x.npy": npy_bytes({"descr": "<f8", "fortran_order": False, "shape": (4,)}, bytes(32))}
    )
    path.write_bytes(_patch_sizes(path.read_bytes(), b"x.npy", 0x7FFFFFF0))
    err, peak, _ = peak_while(lambda: bnorm.load(path, max_bytes=None))
    assert isinstance(err, ValueError)
    assert re.search(
        r"member 'x\.npy' declares 2147483632 bytes, more than its \d+ compressed bytes", str(err)
    )
    assert peak < 4 * MiB


@pytest.mark.parametrize("shape", [(10**13,), (2**31, 2**31), (200_000_000,)])
def test_a_npy_header_shape_beyond_the_member_is_refused_before_allocating(tmp_path, shape):
    path = tmp_path / "shape.npz"
    write_members(
        path, {"x.npy": npy_bytes({"descr": "<f8", "fortran_order": False, "shape": shape}, bytes(64))}
    )
    err, peak, _ = peak_while(lambda: bnorm.load(path, max_bytes=None))
    assert isinstance(err, ValueError)
    assert re.search(rf"member 'x\.npy' declares shape \({shape[0]}, ?", str(err))
    assert peak < 4 * MiB


def _layer_file(tmp_path, config_edit, layer=None, absent=None):
    """A small bnorm file whose layer config was edited (as an attacker would)."""
    path = tmp_path / "layer.npz"
    bnorm.save(path, {"bn": layer if layer is not None else bnorm.BatchNorm1d(3)})
    with np.load(path, allow_pickle=False) as f:
        members = {k: f[k] for k in f.files}
    meta = json.loads(str(members.pop("__bnorm__")))
    node = meta["root"]["items"][0][1]
    config_edit(node["config"])
    if absent is not None:
        for n in absent:
            members.pop(f"bn/{n}", None)
            node["state"].pop(n, None)
        node["absent"] = absent
    out = {}
    for k, v in members.items():
        buf = io.BytesIO()
        np.lib.format.write_array(buf, v, allow_pickle=False)
        out[k + ".npy"] = buf.getvalue()
    out["__bnorm__.npy"] = meta_member(meta["root"])
    write_members(path, out)
    return path


@pytest.mark.parametrize("num_features", [200_000_000, 10**13])
def test_a_huge_num_features_next_to_small_arrays_is_refused_before_building(tmp_path, num_features):
    path = _layer_file(tmp_path, lambda c: c.update(num_features=num_features))
    assert path.stat().st_size < 4000
    err, peak, _ = peak_while(lambda: bnorm.load(path, max_bytes=None))
    assert isinstance(err, ValueError), err
    assert re.search(
        rf"BatchNorm1d at root/bn does not fit it: its arguments give 'weight' the shape \({num_features},\)",
        str(err),
    )
    assert peak < 4 * MiB


def test_a_huge_num_features_with_its_arrays_declared_absent_is_refused_by_the_budget(tmp_path):
    path = _layer_file(
        tmp_path,
        lambda c: c.update(num_features=10**13),
        absent=["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
    )
    err, peak, _ = peak_while(lambda: bnorm.load(path))
    assert isinstance(err, ValueError), err
    assert re.search(
        r"cannot rebuild the BatchNorm1d at root/bn .*describe \d+ bytes .* max_bytes=268435456", str(err)
    )
    assert peak < 4 * MiB


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(evil=1), r"BatchNorm1d takes no argument\(s\) 'evil'"),
        (lambda c: c.update(num_features="3"), r"num_features must be a positive int, got str"),
        (lambda c: c.update(num_features=-3), r"num_features must be a positive int, got -3"),
        (
            lambda c: c.update(eps={"a": 1}),
            r"saved arguments must be numbers, strings, bools, None or short lists",
        ),
        (lambda c: c.update(dtype="banana"), r"dtype must be a floating dtype"),
    ],
    ids=["unknown-argument", "str-size", "negative-size", "dict-value", "bad-dtype"],
)
def test_saved_arguments_of_the_wrong_kind(tmp_path, edit, message):
    path = _layer_file(tmp_path, edit)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: cannot rebuild the BatchNorm1d at root/bn .*{message}"
    ):
        bnorm.load(path)


# -- malformed archives -------------------------------------------------------------
def test_a_member_that_is_not_npy_names_the_file_and_member(tmp_path):
    path = tmp_path / "m.npz"
    write_members(
        path,
        {
            "x.npy": npy_bytes({"descr": "<f8", "fortran_order": False, "shape": ()}, bytes(8)),
            "notes.txt": b"hi",
        },
    )
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: member 'notes\.txt' is not a \.npy array"
    ):
        bnorm.load(path)


def test_deeply_nested_metadata_is_a_value_error(tmp_path):
    path = tmp_path / "deep.npz"
    buf = io.BytesIO()
    np.lib.format.write_array(
        buf, np.array('{"format": "bnorm", "version": 1, "root": ' + "[" * 100_000 + "]" * 100_000 + "}")
    )
    write_members(path, {"__bnorm__.npy": buf.getvalue()})
    with pytest.raises(ValueError, match=r"member __bnorm__\.npy\): the metadata is nested too deeply"):
        bnorm.load(path)


def test_deeply_nested_mappings_are_refused_not_recursed(tmp_path):
    root = {"kind": "dict", "items": []}
    node = root
    for _ in range(bio.MAX_DEPTH + 5):
        child = {"kind": "dict", "items": []}
        node["items"].append(["a", child])
        node = child
    path = tmp_path / "deep.npz"
    write_members(path, {"__bnorm__.npy": meta_member(root)})
    with pytest.raises(
        ValueError, match=rf"mappings nested more than {bio.MAX_DEPTH} deep .*member __bnorm__\.npy"
    ):
        bnorm.load(path)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {
                "kind": "layer",
                "class": "BatchNorm1d",
                "config": {"num_features": 3},
                "state": {},
                "training": "yes",
            },
            "malformed layer at root",
        ),
        (
            {"kind": "layer", "class": 5, "config": {}, "state": {}},
            "is a 5, which this version of bnorm does not define",
        ),
        ({"kind": "layer", "class": "BatchNorm1d", "config": [], "state": {}}, "malformed layer at root"),
        ({"kind": "array", "key": ["x"]}, r"array \['x'\] is described but missing"),
        ({"kind": "tuple"}, "unknown entry kind 'tuple' at root"),
        ([1, 2], "malformed entry at root"),
    ],
    ids=["training-str", "class-int", "config-list", "key-list", "unknown-kind", "root-list"],
)
def test_metadata_of_the_wrong_types(tmp_path, node, message):
    path = tmp_path / "t.npz"
    write_members(path, {"__bnorm__.npy": meta_member(node)})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{message}"):
        bnorm.load(path)


def test_unsupported_compression_and_duplicate_members(tmp_path):
    path = tmp_path / "bz.npz"
    write_members(
        path,
        {"x.npy": npy_bytes({"descr": "<f8", "fortran_order": False, "shape": ()}, bytes(8))},
        zipfile.ZIP_BZIP2,
    )
    with pytest.raises(ValueError, match=r"member 'x\.npy' uses zip compression method 12"):
        bnorm.load(path)


def test_an_object_dtype_header_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "o.npz"
    write_members(
        path, {"x.npy": npy_bytes({"descr": "|O", "fortran_order": False, "shape": (1,)}, pickle.dumps([1]))}
    )
    with pytest.raises(
        ValueError, match=r"member 'x\.npy' contains pickled data \(Python objects\); bnorm never unpickles"
    ):
        bnorm.load(path)


def test_savez_compressed_files_still_load(tmp_path):
    path = tmp_path / "c.npz"
    np.savez_compressed(
        path, a=np.arange(1000.0), b=np.zeros((3, 4), np.float16), f=np.asfortranarray(np.ones((3, 2)))
    )
    back = bnorm.load(path)
    np.testing.assert_array_equal(back["a"], np.arange(1000.0))
    assert back["b"].dtype == np.float16 and back["f"].shape == (3, 2)
    back["a"][0] = 5  # writable, as numpy.load returns them


def _patch_central(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Rewrite one field of the (single) central directory header."""
    out = bytearray(data)
    i = out.find(b"PK\x01\x02")
    struct.pack_into(fmt, out, i + offset, value)
    return bytes(out)


def _one_member(path) -> bytes:
    write_members(
        path, {"x.npy": npy_bytes({"descr": "<f8", "fortran_order": False, "shape": (4,)}, bytes(32))}
    )
    return path.read_bytes()


def test_an_encrypted_member_is_refused(tmp_path):
    path = tmp_path / "enc.npz"
    path.write_bytes(_patch_central(_one_member(path), 8, "<H", 0x1))
    with pytest.raises(ValueError, match=r"member 'x\.npy' is encrypted"):
        bnorm.load(path)


def test_a_compressed_size_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "big.npz"
    path.write_bytes(_patch_central(_one_member(path), 20, "<I", 0x7FFFFFF0))
    with pytest.raises(
        ValueError, match=r"member 'x\.npy' declares 2147483632 compressed bytes in a file of \d+"
    ):
        bnorm.load(path, max_bytes=None)


def test_a_duplicate_member_is_refused(tmp_path):
    path = tmp_path / "dup.npz"
    data = npy_bytes({"descr": "<f8", "fortran_order": False, "shape": ()}, bytes(8))
    with zipfile.ZipFile(path, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("x.npy", data)
        zf.writestr("x.npy", data)
    with pytest.raises(ValueError, match=r"member 'x\.npy' appears twice in the archive"):
        bnorm.load(path)


def test_a_member_that_is_not_a_npy_stream(tmp_path):
    path = tmp_path / "bad.npz"
    write_members(path, {"x.npy": b"definitely not numpy"})
    with pytest.raises(ValueError, match=r"member 'x\.npy' is not a valid \.npy array"):
        bnorm.load(path)


def test_a_deflated_member_that_ends_before_its_declared_size(tmp_path):
    path = tmp_path / "short.npz"
    header = npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (2**20 + 4,)})
    deflate_bomb(path, header, 4 * 2**20, chunk=2**20, declared_extra=16)
    with pytest.raises(ValueError, match=r"member 'x\.npy' is truncated \(4194304 of 4194320 bytes\)"):
        bnorm.load(path)


def test_a_layer_class_without_state_shapes_is_bounded_by_its_integer_arguments(tmp_path, monkeypatch):
    path = _layer_file(
        tmp_path,
        lambda c: c.update(num_features=10**13),
        absent=["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
    )
    monkeypatch.setattr(bnorm.BatchNorm1d, "_state_shapes", classmethod(lambda cls, config: None))
    err, peak, _ = peak_while(lambda: bnorm.load(path))
    assert isinstance(err, ValueError) and re.search(r"describe 80000000000000 bytes", str(err)), err
    assert peak < 4 * MiB


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (np.array(["a", "b"]), r"member __bnorm__\.npy\): the metadata must be a 0-d string"),
        (np.array("{not json"), r"member __bnorm__\.npy\): unreadable metadata"),
        (np.array('{"format": "other"}'), r"member __bnorm__\.npy\): unknown metadata"),
    ],
    ids=["not-0d", "not-json", "not-bnorm"],
)
def test_unreadable_metadata_names_the_member(tmp_path, meta, message):
    path = tmp_path / "meta.npz"
    buf = io.BytesIO()
    np.lib.format.write_array(buf, meta, allow_pickle=False)
    write_members(path, {"__bnorm__.npy": buf.getvalue()})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a valid bnorm file \({message}"):
        bnorm.load(path)


def test_the_number_of_members_is_bounded_before_the_directory_is_parsed(tmp_path):
    path = tmp_path / "many.npz"
    bnorm.save(path, {f"a{i}": np.zeros(1) for i in range(100)})
    with pytest.raises(
        ValueError, match=r"declares 101 members in a \d+-byte zip directory, more than max_bytes=100000"
    ):
        bnorm.load(path, max_bytes=100_000)
    assert len(bnorm.load(path)) == 100


def test_metadata_is_bounded_before_it_is_parsed(tmp_path):
    path = tmp_path / "meta.npz"
    bnorm.save(path, {"bn": bnorm.BatchNorm1d(3)})
    with pytest.raises(
        ValueError, match=r"characters of metadata would take more than max_bytes=10000 to parse"
    ):
        bnorm.load(path, max_bytes=10_000)


def _small_file(tmp_path):
    path = tmp_path / "small.npz"
    bn = bnorm.BatchNorm1d(2, dtype=np.float64)
    bn(np.arange(8.0).reshape(4, 2))
    bnorm.save(path, {"bn": bn, "step": np.int64(3)})
    return path


def _load_outcome(path):
    try:
        back = bnorm.load(path)
    except ValueError as err:
        assert str(path) in str(err), err  # every message names the file
        return "ValueError"
    return back


def test_every_truncation_is_a_value_error_naming_the_file(tmp_path):
    path = _small_file(tmp_path)
    data = path.read_bytes()
    directory = data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x01\x02"))  # near the end
    # every offset in the directory, every third one in the members (a few seconds)
    for n in sorted({*range(0, len(data), 3), *range(directory - 64, len(data))}):
        path.write_bytes(data[:n])
        assert _load_outcome(path) == "ValueError", n


def test_single_bit_flips_give_a_value_error_or_the_same_data(tmp_path):
    path = _small_file(tmp_path)
    data = path.read_bytes()
    reference = bnorm.load(path)
    rng = np.random.default_rng(0)
    for i in range(0, len(data), 4):  # every byte and bit: run once, 20,000 loads (see the report)
        flipped = bytearray(data)
        flipped[i] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(flipped))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns on some flipped names
            outcome = _load_outcome(path)
        if outcome == "ValueError":
            continue
        # the flip hit bytes nothing reads (zip timestamps, a comment field, padding)
        assert int(outcome["step"]) == int(reference["step"]), i
        for k, v in reference["bn"].state_dict().items():
            np.testing.assert_array_equal(outcome["bn"].state_dict()[k], v, err_msg=f"byte {i}")


def test_a_subarray_dtype_header_is_refused(tmp_path):
    path = tmp_path / "sub.npz"
    header = {"descr": ("<f8", (4,)), "fortran_order": False, "shape": (2,)}
    write_members(path, {"x.npy": npy_bytes(header, bytes(64))})
    with pytest.raises(ValueError, match=r"member 'x\.npy' has a subarray dtype .* which numpy never writes"):
        bnorm.load(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_random_damage_is_a_value_error_or_the_same_data(tmp_path, edits, cut):
    path = tmp_path / "fuzz.npz"
    if not path.exists():
        _small_file(tmp_path).rename(path)
    data = bytearray(path.read_bytes())
    reference = bnorm.load(path)
    damaged = bytearray(data)
    for pos, byte in edits:
        damaged[pos % len(damaged)] = byte
    if cut is not None:
        damaged = damaged[: cut % (len(damaged) + 1)]
    bad = tmp_path / "damaged.npz"
    bad.write_bytes(bytes(damaged))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = _load_outcome(bad)
    if outcome != "ValueError":
        assert int(outcome["step"]) == int(reference["step"])
        for k, v in reference["bn"].state_dict().items():
            np.testing.assert_array_equal(outcome["bn"].state_dict()[k], v)
