"""Files around save/load: foreign formats named, paths in messages, symlinks, read-only
targets, stale temporary files of killed saves, no leaked handles.  One message per test."""

from __future__ import annotations

import gc
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import numpy as np
import pytest

import bnorm
from bnorm import _files

HOW_TORCH = r"torch\.load\(path, weights_only=True\)\), then port the layers with bnorm\.interop\.from_torch"
HOW_KERAS = r"keras\.models\.load_model\(path\)\), then port its BatchNormalization layers with bnorm\.interop\.from_keras"


class Payload:
    """Unpickling this creates a marker file: it must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- foreign files ------------------------------------------------------------------
def test_pytorch_zip_checkpoint_is_named_and_not_unpickled(tmp_path):
    path = tmp_path / "model.pt"
    marker = tmp_path / "ran"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(Payload(marker)))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(
        ValueError, match=rf"model\.pt is a PyTorch checkpoint \(a torch\.save zip archive\).*{HOW_TORCH}"
    ):
        bnorm.load(path)
    assert not marker.exists()


def test_real_torch_save_files_are_named(tmp_path):
    torch = pytest.importorskip("torch")
    state = torch.nn.BatchNorm2d(3).state_dict()
    torch.save(state, tmp_path / "new.pt")
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"new\.pt is a PyTorch checkpoint"):
        bnorm.load(tmp_path / "new.pt")
    with pytest.raises(
        ValueError,
        match=rf"old\.pt is a Python pickle, not an \.npz archive; bnorm never unpickles.*{HOW_TORCH}",
    ):
        bnorm.load(tmp_path / "old.pt")


def test_keras_archive_is_named(tmp_path):
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", "{}")
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    with pytest.raises(
        ValueError, match=rf"model\.keras is a Keras 3 model archive \(\.keras\).*{HOW_KERAS}"
    ):
        bnorm.load(path)


def test_hdf5_file_is_named(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(
        ValueError, match=rf"weights\.h5 is an HDF5 file \(Keras \.h5 / tf\.keras weights\).*{HOW_KERAS}"
    ):
        bnorm.load(path)


def test_safetensors_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(
        ValueError, match=r"looks like a safetensors file.*safetensors\.numpy\.load_file\(path\)"
    ):
        bnorm.load(path)


@pytest.mark.parametrize(
    ("data", "start"), [(b"", "it is empty"), (b'{"weights": [1]}', "it starts with b'{\"weight'")]
)
def test_other_files_say_how_they_start_and_what_load_reads(tmp_path, data, start):
    path = tmp_path / "notes.json"
    path.write_bytes(data)
    with pytest.raises(
        ValueError,
        match=rf"is not a readable \.npz file \(not a zip archive\): {re.escape(start)}.*bnorm\.save and numpy\.savez",
    ):
        bnorm.load(path)


# -- save: paths and objects in messages ------------------------------------------------
def test_saving_into_a_missing_directory_names_the_users_path(tmp_path):
    path = tmp_path / "no" / "such" / "m.npz"
    with pytest.raises(
        FileNotFoundError, match=rf"cannot save to {re.escape(str(path))}: the directory .* does not exist"
    ) as info:
        bnorm.save(path, {"x": np.ones(1)})
    assert info.value.filename == str(path) and ".tmp" not in str(info.value)


def test_saving_a_torch_module_names_its_type_and_what_save_accepts(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(
        TypeError, match=r"got torch\.nn\.modules\.batchnorm\.BatchNorm2d; .*model\.state_dict\(\)"
    ):
        bnorm.save(tmp_path / "m.npz", torch.nn.BatchNorm2d(3))
    with pytest.raises(
        TypeError,
        match=r"cannot save bn: got torch\.nn\.modules\.batchnorm\.BatchNorm2d, not an array or tensor; save accepts",
    ):
        bnorm.save(tmp_path / "m.npz", {"bn": torch.nn.BatchNorm2d(3)})
    assert os.listdir(tmp_path) == []


def test_saving_an_arbitrary_object_names_its_type(tmp_path):
    class Thing:
        pass

    with pytest.raises(
        TypeError,
        match=r"cannot save a/b: got .*Thing, not an array or tensor; save accepts a bnorm layer, a state dict",
    ):
        bnorm.save(tmp_path / "m.npz", {"a": {"b": Thing()}})
    with pytest.raises(TypeError, match=r"obj must be a bnorm layer, a state dict .*got set"):
        bnorm.save(tmp_path / "m.npz", {1, 2})


# -- where the bytes go ---------------------------------------------------------------
def test_saving_to_a_symlink_writes_the_file_it_points_to(tmp_path):
    real = tmp_path / "real.npz"
    bnorm.save(real, {"x": np.zeros(2)})
    link = tmp_path / "link.npz"
    link.symlink_to(real)
    bnorm.save(link, {"x": np.ones(2)})
    assert link.is_symlink() and os.readlink(link) == str(real)
    np.testing.assert_array_equal(bnorm.load(real)["x"], np.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["link.npz", "real.npz"]


def test_saving_to_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.npz"
    link.symlink_to(tmp_path / "target.npz")
    bnorm.save(link, {"x": np.ones(2)})
    assert link.is_symlink() and (tmp_path / "target.npz").is_file()


def test_a_read_only_target_is_refused_even_as_root(tmp_path):
    path = tmp_path / "ro.npz"
    bnorm.save(path, {"x": np.zeros(2)})
    before = path.read_bytes()
    os.chmod(path, 0o444)
    try:
        with pytest.raises(
            PermissionError,
            match=rf"cannot save to {re.escape(str(path))}: the existing file is read-only \(mode 0o444\); make it writable",
        ):
            bnorm.save(path, {"x": np.ones(2)})
        assert path.read_bytes() == before and os.listdir(tmp_path) == ["ro.npz"]
    finally:
        os.chmod(path, 0o644)


def test_saving_over_a_directory_names_the_path(tmp_path):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot save to .*d\.npz: it is a directory"):
        bnorm.save(tmp_path / "d.npz", {"x": np.ones(1)})


def test_a_write_error_names_the_users_path_not_the_temporary_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")  # as a failed write or fsync: no file name

    path = tmp_path / "m.npz"
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        OSError, match=rf"cannot save to {re.escape(str(path))}: No space left on device"
    ) as info:
        bnorm.save(path, {"x": np.ones(1)})
    assert info.value.filename == str(path) and info.value.errno == 28
    assert os.listdir(tmp_path) == []


def test_an_unwritable_directory_names_the_users_path(tmp_path, monkeypatch):
    real_open = os.open

    def refuse(name, *a, **k):  # what os.open does in a 0o555 directory (root ignores the mode)
        if str(name).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", name)
        return real_open(name, *a, **k)

    monkeypatch.setattr(os, "open", refuse)
    path = tmp_path / "m.npz"
    with pytest.raises(
        PermissionError, match=rf"cannot save to {re.escape(str(path))}: the directory .* is not writable"
    ):
        bnorm.save(path, {"x": np.ones(1)})


# -- stale temporary files --------------------------------------------------------------
KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, bnorm
    real = np.lib.format.write_array
    def die(fp, arr, *a, **k):
        if arr.ndim == 0:  # the metadata goes first
            return real(fp, arr, *a, **k)
        real(fp, arr[: arr.size // 2], *a, **k)
        fp.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    np.lib.format.write_array = die
    bnorm.save(sys.argv[1], {"x": np.arange(1000.0)})
    """
)


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_killed_save_leaves_a_temporary_file_that_the_next_save_removes(tmp_path):
    path = tmp_path / "m.npz"
    bnorm.save(path, {"x": np.zeros(3)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], env=env, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".m.npz.")
    np.testing.assert_array_equal(bnorm.load(path)["x"], np.zeros(3))  # the old file is intact
    bnorm.save(path, {"x": np.ones(3)})
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".tmp")]) == 1  # too recent to judge
    _age(tmp_path / leftovers[0], _files.STALE_AFTER + 5)
    bnorm.save(path, {"x": np.ones(3)})
    assert os.listdir(tmp_path) == ["m.npz"]


def test_only_bnorms_own_old_unlocked_temporary_files_of_this_target_are_removed(tmp_path):
    path = tmp_path / "m.npz"
    keep = {
        ".m.npz.123.0123456789ab.tmp.bak": b"",  # not the pattern
        ".m.npz.backup.tmp": b"",  # not the pattern
        ".other.npz.123.0123456789ab.tmp": b"",  # another target's
        "m.npz.123.0123456789ab.tmp": b"",  # not hidden: not bnorm's
        ".m.npz.124.0123456789ab.tmp": b"recent",  # too recent
    }
    for n, data in keep.items():
        (tmp_path / n).write_bytes(data)
        if n != ".m.npz.124.0123456789ab.tmp":
            _age(tmp_path / n, 3600)
    orphan = tmp_path / ".m.npz.125.0123456789ab.tmp"
    orphan.write_bytes(b"half")
    _age(orphan, 3600)
    bnorm.save(path, {"x": np.ones(1)})
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "m.npz"])


@pytest.mark.skipif(_files.fcntl is None, reason="flock needs POSIX")
def test_a_temporary_file_locked_by_a_concurrent_save_is_left_alone(tmp_path):
    fcntl = _files.fcntl
    busy = tmp_path / ".m.npz.126.0123456789ab.tmp"
    busy.write_bytes(b"being written")
    _age(busy, 3600)  # old (a save paused for an hour), but its writer holds the lock
    with open(busy, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        bnorm.save(tmp_path / "m.npz", {"x": np.ones(1)})
        assert busy.exists()
    bnorm.save(tmp_path / "m.npz", {"x": np.ones(1)})  # the writer is gone: now it is an orphan
    assert not busy.exists()


def test_saves_hold_the_lock_while_writing(tmp_path, monkeypatch):
    if _files.fcntl is None:
        pytest.skip("flock needs POSIX")
    fcntl = _files.fcntl
    seen = []
    real = np.lib.format.write_array

    def probe(fp, arr, *a, **k):
        tmp = next(n for n in os.listdir(tmp_path) if n.endswith(".tmp"))
        fd = os.open(tmp_path / tmp, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            seen.append("locked")
        finally:
            os.close(fd)
        return real(fp, arr, *a, **k)

    monkeypatch.setattr(np.lib.format, "write_array", probe)
    bnorm.save(tmp_path / "m.npz", {"x": np.ones(1)})
    assert seen and set(seen) == {"locked"}


# -- handles ----------------------------------------------------------------------------
def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


@pytest.mark.parametrize("cut", [30, 200, -10])
def test_a_truncated_file_leaks_no_file_handle(tmp_path, cut):
    path = tmp_path / "t.npz"
    bnorm.save(path, {"bn": bnorm.BatchNorm2d(3)})
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    before = _open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with pytest.raises(ValueError, match="truncated or corrupt"):
                bnorm.load(path)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    if before is not None:
        assert _open_fds() == before


def test_reading_does_not_keep_the_file_open(tmp_path):
    path = tmp_path / "ok.npz"
    bnorm.save(path, {"x": np.ones(3)})
    before = _open_fds()
    bnorm.load(path)
    assert before is None or _open_fds() == before
    assert stat.S_ISREG(os.stat(path).st_mode)
