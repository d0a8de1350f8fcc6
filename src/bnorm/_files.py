r"""Writing a file atomically: a temporary file, fsync, rename -- and the cases around it.

Contract of :func:`write_atomic(path, write)`: afterwards `path` holds exactly
what ``write(file)`` wrote, or -- after an error or a crash at any instant --
whatever was there before.  Around that:

* a symlink at `path` is followed: the file it points to is replaced, the
  link stays (as ``open(path, "w")`` would do);
* an existing target that is not writable is refused with PermissionError
  before anything is written -- judged by its mode bits as well as by
  :func:`os.access`, because root's access check ignores the mode and would
  silently overwrite a file its owner made read-only;
* errors name the user's path, never the temporary file;
* temporary files are named ``.<name>.<pid>.<12 hex>.tmp`` next to the target.
  A process killed mid-save (``kill -9``) leaves one behind; the next save to
  the same path removes those that are orphans: bnorm's pattern for this
  target, a regular file, untouched for :data:`STALE_AFTER` seconds, and --
  where ``fcntl`` exists -- not locked.  A save holds an exclusive ``flock``
  on its temporary file while writing it, and the kernel drops the lock when
  the writer dies, so a concurrent save (in this process or another, on this
  host or, with NFS's lock emulation, another) is never disturbed; the age
  covers the instants before the lock is taken and after it is released.
  Without ``fcntl`` (Windows) the age alone decides, and a file still open
  for writing cannot be deleted there anyway.  The scan is one
  :func:`os.listdir` of the target's directory per save.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from typing import IO

try:  # POSIX only; elsewhere stale files are judged by age alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["write_atomic", "STALE_AFTER"]

#: Seconds a bnorm temporary file must be untouched before a later save may remove it.
STALE_AFTER = 60.0

PathLike = str | os.PathLike[str]


def _tmp_pattern(stem: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(stem)}\.\d+\.[0-9a-f]{{12}}\.tmp")


def _remove_stale(directory: str, stem: str) -> None:
    """Remove orphaned temporary files of earlier saves to this target (see the module doc)."""
    pattern = _tmp_pattern(stem)
    try:
        names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
    except OSError:
        return
    now = time.time()
    for n in names:
        full = os.path.join(directory, n)
        with contextlib.suppress(OSError):
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < STALE_AFTER:
                continue
            if fcntl is None:
                os.unlink(full)
                continue
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live save: OSError, skip
                if os.fstat(fd).st_ino == os.lstat(full).st_ino:  # still the file we judged
                    os.unlink(full)
            finally:
                os.close(fd)


def _check_target(user_path: str, target: str) -> None:
    """Refuse a target that exists but must not be overwritten, naming the user's path."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot save to {user_path}: it is a directory", user_path)
    writable_bits = st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    if not writable_bits or not os.access(target, os.W_OK):
        raise PermissionError(
            errno.EACCES,
            f"cannot save to {user_path}: the existing file is read-only (mode "
            f"{stat.S_IMODE(st.st_mode):#o}); make it writable (chmod u+w) or save to another path",
            user_path,
        )


def write_atomic(path: PathLike, write: Callable[[IO[bytes]], None]) -> str:
    """Write `path` atomically with ``write(file)`` and return it; see the module docstring."""
    user_path = os.fspath(path)
    target = os.path.realpath(user_path)  # follow a symlink to the file it names
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            errno.ENOENT,
            f"cannot save to {user_path}: the directory {os.path.dirname(os.path.abspath(user_path))} "
            "does not exist (create it first, e.g. os.makedirs(directory, exist_ok=True))",
            user_path,
        )
    _check_target(user_path, target)
    stem = os.path.basename(target)[:200]  # file names are limited to 255 bytes
    _remove_stale(directory, stem)
    tmp = os.path.join(directory, f".{stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except PermissionError as err:
        raise PermissionError(
            errno.EACCES, f"cannot save to {user_path}: the directory {directory} is not writable", user_path
        ) from err
    try:
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # a new file: granted at once
            write(f)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            # keep the permissions of a file being replaced
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename in (None, tmp):
            # name the user's path, not the temporary file (or nothing, as a failed write does)
            if err.errno is None:
                raise type(err)(f"cannot save to {user_path}: {err}") from err
            raise type(err)(err.errno, f"cannot save to {user_path}: {err.strerror}", user_path) from err
        raise
    # make the rename itself durable (POSIX; not possible on every platform)
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return user_path
