"""No hidden process state: importing needleprobe or calling its library functions changes no environment
variable and no process-wide torch setting; the command line sets its own, once per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from needleprobe import LinearProbe

SRC = Path(__file__).resolve().parents[1] / "src"


def test_importing_every_module_changes_no_environment_variable_nor_torch_threads():
    code = (
        "import json, os, pkgutil, importlib, torch\n"
        "env, threads = dict(os.environ), torch.get_num_threads()\n"
        "import needleprobe\n"
        "for m in pkgutil.walk_packages(needleprobe.__path__, 'needleprobe.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))\n"
        "print(json.dumps([changed, threads, torch.get_num_threads()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DYNAMIC", "TOKENIZERS_PARALLELISM")}
    env["PYTHONPATH"] = str(SRC)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    changed, before, after = json.loads(r.stdout.strip().splitlines()[-1])
    assert changed == []
    assert after == before


def test_the_command_line_fixes_mkl_dynamic_unless_the_user_set_it(monkeypatch, tmp_path):
    from needleprobe.cli import main

    monkeypatch.delenv("MKL_DYNAMIC", raising=False)
    assert main(["check", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert os.environ["MKL_DYNAMIC"] == "FALSE"
    monkeypatch.setenv("MKL_DYNAMIC", "TRUE")
    main(["check", "--config", str(tmp_path / "missing.yaml")])
    assert os.environ["MKL_DYNAMIC"] == "TRUE"


def test_linear_probe_fit_leaves_torch_threads_and_precision_alone(monkeypatch):
    """From a notebook, ``LinearProbe.fit`` must not touch the process's torch settings (other threads may be
    computing), not even for the duration of the call."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: calls.append(("precision", p)))
    rng = np.random.default_rng(0)
    X, X_val = rng.normal(size=(200, 8)).astype(np.float32), rng.normal(size=(80, 8)).astype(np.float32)
    y, y_val = (X[:, 0] > 0).astype(np.int8), (X_val[:, 0] > 0).astype(np.int8)
    probe = LinearProbe(l2_grid=[0.1, 1.0]).fit(X, y, X_val, y_val)
    assert probe.val_auroc_ > 0.9
    assert calls == []


def test_git_commit_is_needleprobes_own_not_the_current_directorys(tmp_path, monkeypatch):
    from needleprobe.run.record import git_commit

    def git(*args, cwd):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    other = tmp_path / "other"
    other.mkdir()
    git("init", "-q", cwd=other)
    (other / "f").write_text("x")
    git("add", "f", cwd=other)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "other", cwd=other)
    monkeypatch.chdir(other)
    pkg = SRC / "needleprobe"
    ours = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg, capture_output=True, text=True)
    expected = ours.stdout.strip() if ours.returncode == 0 else None
    assert git_commit() == expected
    assert git_commit() != git("rev-parse", "HEAD", cwd=other)
