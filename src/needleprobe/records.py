"""Run records, atomic file writes, locks and terminal output.

A run owns its outputs: every file is written under a temporary name and
renamed, so an interrupted run leaves the previous results intact; the run
record lists each output with its sha256 so ``check`` can prove the files on
disk are the ones the run wrote.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from .errors import NeedleprobeError
from .stores import as_path, is_url

_CONSOLE: Console | None = None
_RESULTS: Console | None = None


def _new_console(stderr: bool) -> Console:
    """``soft_wrap``: a line is never broken by rich (in a log or a pipe it would be cut at 80 columns, paths
    included); a terminal wraps it for display. Tables and progress bars are laid out to the width: a terminal's,
    or (in a log or a file, unless ``COLUMNS`` says otherwise) 160 columns, so tables are not squeezed into 80."""
    con = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con.width = 160
    return con


def console() -> Console:
    """Messages (what a command does, progress, warnings) go to stderr, so stdout holds only the answer."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = _new_console(stderr=True)
    return _CONSOLE


def results() -> Console:
    """A command's answer (its tables, verdict, lists) goes to stdout, so it can be piped, redirected and diffed."""
    global _RESULTS
    if _RESULTS is None:
        _RESULTS = _new_console(stderr=False)
    return _RESULTS


def print_json(doc: Any) -> None:
    """``--json``: the answer as exactly one strict JSON document on stdout (NaN and infinities as null, which
    every parser reads; ``jq`` refuses NaN)."""

    def strict(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    sys.stdout.write(json.dumps(strict(doc), indent=2, sort_keys=True, allow_nan=False) + "\n")
    sys.stdout.flush()


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "– tok/s", style="progress.data.speed")


def progress_bar(enabled: bool = True) -> Progress:
    """Per-split bar: documents done, tokens/s and ETA (the task's total counts tokens)."""
    return Progress(
        TextColumn("[bold]{task.description:>5}"),
        BarColumn(),
        TextColumn("{task.fields[docs]} docs"),
        _TokensPerSecond(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console(),
        disable=not enabled,
        transient=False,
    )


@contextlib.contextmanager
def model_loading_bar(shown: bool = True) -> Iterator[None]:
    """With ``shown=False``, silence transformers' progress bars ("Loading weights") for the block.

    They are tqdm bars of transformers' own (and huggingface_hub's), outside our
    console; tqdm redraws with carriage returns even into a file, so a log
    would get every frame on one line. The previous setting comes back
    afterwards, so only a command that asked is quiet.
    """
    if shown:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


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

    def __init__(self, path: str | Path, what: str):
        self.path = as_path(path)
        self.what = what
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
                os.close(fd)
                raise NeedleprobeError(f"{self.path}: another {self.what} is running ({owner}); wait for it to finish") from None
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


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("needleprobe", "torch", "transformers", "zarr", "numcodecs", "numpy", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def update_run_record(layout, cfg, stage: str, section: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """Merge one stage's section into the run record at ``layout.run_record`` (extract, fit, monitor each own theirs).

    ``drop``: sections that no longer describe this run's files (a new fit drops the monitor's, ``monitor:{split}``).
    """
    path = layout.run_record
    record: dict[str, Any] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
    record.update(
        {
            "dataset": cfg.dataset.key,
            **({"run": layout.run} if layout.run else {}),
            "config": cfg.to_dict(),
            "config_path": cfg.source,
            "git_commit": git_commit(),
            "versions": versions(),
            "host": platform.node(),
        }
    )
    stages = record.setdefault("stages", {})
    for name in list(stages):
        if any(name == d or name.startswith(d + ":") for d in drop):
            del stages[name]
    stages[stage] = {**section, "command": sys.argv}
    atomic_write_json(path, record)
    return path


@contextlib.contextmanager
def stage_timer(timings: dict[str, float], name: str) -> Iterator[None]:
    import time

    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t, 3)
