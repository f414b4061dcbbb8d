"""A run's record: what each stage ran with, and the sha256 of each output it wrote.

The run record lists each output with its sha256 so ``check`` can prove the
files on disk are the ones the run wrote.
"""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from ..errors import NeedleprobeError
from ..io.files import atomic_write_json
from ..io.stores import as_path

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
    """The commit of needleprobe's own checkout (the repository holding this package's files), not the current
    directory's; None for an installed copy outside any repository."""
    here = Path(__file__).resolve().parents[1]
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=here,
                                 capture_output=True, text=True, timeout=5)
        if tracked.returncode != 0:  # not a checkout of needleprobe (e.g. site-packages inside another repository)
            return None
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
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
