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

from ..errors import NeedleprobeError
from ..io.stores import as_path, is_url

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


def read_run_record(path: str | Path) -> dict[str, Any]:
    """A run record's content ({} when there is none, or it cannot be read)."""
    path = as_path(path)
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


DEFINES_RUN = ("fit", "extract", "repair")
"""Stages whose config is the run's: ``fit``, and before any fit the extract that made its cache."""


def update_run_record(layout, cfg, stage: str, section: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """Merge one stage's section into the run record at ``layout.run_record`` (extract, fit, monitor each own theirs).

    The record's ``config`` is the run's memory: what ``fit`` was given, flags included (before any fit, what
    ``extract`` was given). Other stages (``monitor:{split}``) never rewrite it: their config, command and
    versions go into their own section.
    ``drop``: sections that no longer describe this run's files (a new fit drops the monitor's, ``monitor:{split}``).
    """
    path = layout.run_record
    record = read_run_record(path)
    stages = record.setdefault("stages", {})
    about = {
        "config": cfg.to_dict(),
        "config_path": cfg.source,
        "git_commit": git_commit(),
        "versions": versions(),
        "host": platform.node(),
    }
    owns = stage == "fit" or (stage in DEFINES_RUN and "fit" not in stages) or "config" not in record
    record.update({"dataset": cfg.dataset.key, **({"run": layout.run} if layout.run else {}), **(about if owns else {})})
    for name in list(stages):
        if any(name == d or name.startswith(d + ":") for d in drop):
            del stages[name]
    stages[stage] = {**section, **({} if owns else about), "command": sys.argv}
    atomic_write_json(path, record)
    return path


def run_config(cfg, run: str | None = None, given: dict[str, Any] | None = None):
    """``cfg`` as the run it names was fitted: its ``RUN_SETTINGS`` (layers, seeds, L2 grid, solver, class balance,
    caps) read from the run record, so a run fitted with flags is read without typing them again.

    ``given``: the settings the command line gave (probe key → value). Layers and seeds narrow the run to a part
    of it (naming one it lacks is an error); the others stand as given (``check`` then says where they differ from
    the record). Without a fit in the record, ``cfg`` is returned as it is; a config that already describes its
    run (``cfg.fitted``) too.
    """
    import dataclasses

    from ..config import RUN_SETTINGS, with_overrides
    from .layout import Layout

    if cfg.fitted is not None:
        return cfg
    layout = Layout.from_config(cfg, run)
    record = read_run_record(layout.run_record)
    probe = (record.get("config") or {}).get("probe") or {}
    if "fit" not in record.get("stages", {}) or not all(k in probe for k in RUN_SETTINGS):
        return cfg
    given = {k: v for k, v in (given or {}).items() if v is not None}
    fitted = {k: probe[k] for k in RUN_SETTINGS}
    which = f"the run {run!r}" if run else "the run"
    for key, what in (("layers_to_probe", "layer"), ("train_seeds", "seed")):
        lacking = sorted(set(given.get(key, [])) - set(fitted[key]))
        if lacking:
            has = ", ".join(map(str, fitted[key]))
            raise NeedleprobeError(f"{layout.run_record}: {which} has no probes of {what}(s) "
                                   f"{', '.join(map(str, lacking))} (its {what}s: {has})")
    values = {**fitted, **{k: v for k, v in given.items() if k in RUN_SETTINGS}}
    new = with_overrides(cfg, **values)  # typed and validated; a None (no cap) is set below
    unset = {k: None for k, v in values.items() if v is None}
    return dataclasses.replace(new, probe=dataclasses.replace(new.probe, **unset), fitted=fitted, source=cfg.source)


@contextlib.contextmanager
def stage_timer(timings: dict[str, float], name: str) -> Iterator[None]:
    import time

    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t, 3)
