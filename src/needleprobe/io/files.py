"""Atomic file writes and advisory locks.

Every output is written under a temporary name and renamed, so an interrupted
run leaves the previous file intact; a lock file names the process holding it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import NeedleprobeError
from .console import console
from .stores import as_path, is_url

def _writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NeedleprobeError(f"{path}: cannot create output directory ({e.strerror})") from None
    if is_url(path):
        return
    if not os.access(path, os.W_OK | os.X_OK):
        raise NeedleprobeError(f"{path}: output directory is not writable")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old file or the new one."""
    path = as_path(path)
    _writable_dir(path.parent)
    if is_url(path):  # one put: object stores apply it atomically
        try:
            path.write_bytes(data)
        except OSError as e:
            raise NeedleprobeError(f"{path}: cannot write ({e})") from None
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise NeedleprobeError(f"{path}: cannot write ({e.strerror})") from None


def dumps_json(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys), so identical runs give identical bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n").encode()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, dumps_json(obj))


class FileLock:
    """An exclusive ``flock`` on a lock file that exists only while it is held.

    The kernel drops the lock when its owner dies (even by SIGKILL), so a crash
    never blocks the next run; a live owner makes the second run fail at once,
    naming the owner's pid and host.  The owner removes the file before it
    unlocks, so finished runs leave identical directories behind; a process
    that locked a file someone removed meanwhile sees that the path no longer
    names it and tries again on the path's new file.
    """

    def __init__(self, path: str | Path, what: str, wait: bool = False):
        self.path = as_path(path)
        self.what = what
        self.wait = wait
        """Wait for a live owner to finish (saying so once) instead of failing."""
        self.fd: int | None = None

    def __enter__(self) -> "FileLock":
        if is_url(self.path):
            console().print(
                f"[yellow]{self.path}: no lock on a remote store; make sure no other {self.what} runs at the same time"
            )
            return self
        _writable_dir(self.path.parent)
        for _ in range(100):  # each retry means another owner finished in between: rare, never endless
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                if not self.wait:
                    os.close(fd)
                    raise NeedleprobeError(f"{self.path}: another {self.what} is running ({owner}); wait for it to finish") from None
                console().print(f"waiting for another {self.what} ({owner})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            if self._names(fd):
                break
            os.close(fd)  # a previous owner removed this file after we opened it: lock the path's current one
        else:
            raise NeedleprobeError(f"{self.path}: the lock file keeps being replaced; is another {self.what} starting?")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def holder(path: str | Path) -> str | None:
        """Who holds the lock at ``path`` ("pid N on host"), or None when nobody does (never waits, never creates)."""
        path = as_path(path)
        if is_url(path):
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)  # closing drops a shared lock we may have taken
        return None

    def _names(self, fd: int) -> bool:
        """Whether the path still names the file ``fd`` has open."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            # Remove it before unlocking: whoever locks this file after us finds the path gone and
            # retries. Not if the path names another file (ours removed by hand, a new run's made since).
            if self._names(self.fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
