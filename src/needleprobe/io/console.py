"""Terminal output: status on stderr, results on stdout, progress bars.

Status and progress go to stderr so that a command's results (stdout) can be
piped; one console of each kind per process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

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
