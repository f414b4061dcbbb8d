"""The command line as a user sees it: help in the user's words, --version, --no-progress, one line per message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import small_docs, write_config, write_jsonl

import needleprobe
from needleprobe.cli import build_parser, main
from needleprobe.io.console import console, model_loading_bar

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["extract", "fit", "train", "check", "monitor", "errors", "inspect", "report", "evaluate", "scan", "export",
            "demo-data"]
JARGON = re.compile(r"seed's|\bthe seed\b|\bTask \d|\(#\d+\)|\bissue \d|thin layer", re.IGNORECASE)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_commands_are_the_documented_ones():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == COMMANDS


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_describes_the_command_without_jargon(capsys, command):
    text = _help(capsys, *([command] if command else []))
    assert not JARGON.search(text), JARGON.search(text)
    assert "--no-progress" in text or command is None
    if command is None:
        for c in COMMANDS:
            assert re.search(rf"^\s+{re.escape(c)}\b", text, re.M), c
        assert "--version" in text
    else:
        description = text.split("\n\n")[1]  # usage, then the command's description
        assert len(description.split()) >= 15, description


def test_check_help_says_what_it_checks(capsys):
    text = " ".join(_help(capsys).split())
    assert "check that every probe beats chance, its metadata is complete, and the run record matches the files on disk" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"needleprobe {needleprobe.__version__}\n"
    declared = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)  # no tomllib on 3.10
    assert declared and declared.group(1) == needleprobe.__version__


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_accepts_no_progress(command):
    assert build_parser().parse_args([command, "--no-progress"]).no_progress is True


def test_model_loading_bar_is_silenced_only_when_asked():
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    with model_loading_bar(shown=True):
        assert hf_logging.is_progress_bar_enabled() == before
    with model_loading_bar(shown=False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled() == before


def test_console_never_breaks_a_message():
    assert console().soft_wrap


def _run(*argv: str) -> subprocess.CompletedProcess:
    """The CLI with stderr to a pipe (as in a log or CI) and an 80-column default width."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    env.update(COLUMNS="80", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "needleprobe", *argv], env=env, capture_output=True, text=True, timeout=300)


def test_tqdm_bars_are_hidden_when_asked_or_when_stderr_is_not_a_terminal(monkeypatch):
    """transformers' bars redraw with carriage returns even into a file: shown only on a terminal, without
    --no-progress; a command that loads no model leaves them (and transformers) alone."""
    from needleprobe.cli import tqdm_bars_shown

    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert tqdm_bars_shown(build_parser().parse_args(["extract"])) is tty
        assert tqdm_bars_shown(build_parser().parse_args(["monitor", "--no-progress"])) is False
        assert tqdm_bars_shown(build_parser().parse_args(["errors", "--no-progress"])) is True


def test_answers_go_to_stdout_and_messages_stay_one_line_on_stderr_without_a_bar_frame(tmp_path):
    deep = tmp_path / ("a_directory_name_long_enough_that_every_path_below_it_passes_eighty_columns" * 2)
    data = write_jsonl(deep / "d.jsonl", small_docs(6, 4))
    (deep / "shown").mkdir()
    (deep / "quiet").mkdir()

    # without --no-progress, stderr a pipe: our bars print their final state once; transformers' tqdm bar, which
    # would write every frame joined by carriage returns, is hidden
    shown = write_config(deep / "shown", data, layers_to_probe=[1])
    cfg = write_config(deep / "quiet", data, layers_to_probe=[1])
    with ThreadPoolExecutor(2) as pool:  # two runs of their own, side by side
        shown_run = pool.submit(_run, "extract", "--config", str(shown))
        r = _run("train", "--config", str(cfg), "--no-progress")
        s = shown_run.result()
    assert s.returncode == 0, s.stderr
    assert "tok/s" in s.stderr and "\r" not in s.stderr and "Loading weights" not in s.stderr
    assert s.stdout == ""  # an extract's lines are all messages
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    cache = str(deep / "quiet" / "cache" / "t_v1" / "embedded--all-MiniLM-L6-v2" / "resid_post")
    out = str(deep / "quiet" / "results" / "probes" / "t_v1")
    assert f"extracting into {cache}" in lines
    assert any(re.fullmatch(r"  [\d,]+ rows \([\d,]+ in whole chunks\) × 1 layers × d_model 384 × 4 B, \+ 21 B of labels "
                            r"and indices per row = .* on disk.*; device cpu, model dtype float32", x)
               for x in lines), lines
    assert any(re.fullmatch(rf"extract: [\d,]+ tokens in [\d.]+ s → {re.escape(cache)}", x) for x in lines), lines
    assert any(x.startswith("layer 1: exact L-BFGS in memory") for x in lines), lines
    assert f"probes, metadata, probe_metrics.csv and verdict.json in {out}" in lines
    # the answer (the fit's table and verdict) on stdout, nothing else there
    assert "probes on t_v1: validation metrics of the selected L2" in r.stdout and "verdict:" not in r.stderr
    assert [x for x in r.stdout.splitlines() if x.startswith("verdict: best layer: 1 ")]
    assert "extract" not in r.stdout and "L-BFGS" not in r.stdout
    logs, answers = {"train": r.stderr}, {"train": r.stdout}
    commands = ("check", "inspect", "report", "errors")  # fit's lines are in train's; these only read, side by side
    with ThreadPoolExecutor(len(commands)) as pool:
        for command, r in zip(commands, pool.map(lambda c: _run(c, "--config", str(cfg), "--no-progress"), commands)):
            assert r.returncode == 0, (command, r.stderr)
            logs[command], answers[command] = r.stderr, r.stdout
    assert answers["check"] == "all checks passed\n"
    assert answers["inspect"].startswith("activation cache t_v1") and "matches config │ yes" in answers["inspect"]
    assert answers["report"] == "" and logs["report"] == f"wrote {out}/report.html\n"
    assert "highest-scoring negatives (false positives)" in answers["errors"] and answers["errors"].count("⟦") == 20 + 20
    assert logs["errors"] == logs["check"] == logs["inspect"] == ""  # nothing to say but the answer
    for command, log in logs.items():
        assert "Loading weights" not in log and "tok/s" not in log, (command, log)
        for x in (log + answers[command]).splitlines():  # a path is never cut: a line with part of the name has it all
            if "a_directory_name" in x and not x.startswith("│"):  # table cells may fold to the width
                assert str(deep) in x, (command, x)
        table = [x for x in answers[command].splitlines() if x[:1] in "┏┃┡│└"]
        cut = "…" in answers[command] and command != "errors"  # errors' contexts end in … by design
        assert all(len(x) <= 80 for x in table) and not cut, (command, answers[command])


def test_help_lists_only_the_flags_a_command_uses_and_promises_only_what_it_shows(capsys):
    """No --device where no model runs and nothing is fitted; no row caps for the report; inspect shows no monitor."""
    for command in ("check", "errors", "inspect", "report"):
        assert "--device" not in _help(capsys, command), command
    for command in ("extract", "fit", "train", "monitor", "evaluate"):
        assert "--device" in _help(capsys, command), command
    report = _help(capsys, "report")
    assert "--max-train-docs" not in report and "--max-val-tokens" not in report and "--run" in report
    inspect = " ".join(_help(capsys, "inspect").split())
    assert "monitor" not in inspect and "--max-train-docs" in inspect  # the caps decide whether the cache matches
