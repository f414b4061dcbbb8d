"""Reliability: resume after SIGKILL (on local disk and on an S3 endpoint), fingerprints, locks, and the bad-input matrix."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ONE_THREAD_ENV, fit_outputs, small_docs, write_config, write_jsonl

from needleprobe import open_cache
from needleprobe.cli import main
from needleprobe.config import load_config
from needleprobe.errors import NeedleprobeError
from needleprobe.io.files import FileLock

CHUNK = "64"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # local_s3: the S3 endpoint of the s3:// tests


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(cfg_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "needleprobe", *args, "--config", str(cfg_path), "--no-progress"],
        env={**os.environ, "NEEDLEPROBE_CHUNK_ROWS": CHUNK, "HF_HUB_OFFLINE": "1", **ONE_THREAD_ENV, **(env or {})},
        capture_output=True, text=True, timeout=300,
    )


def extract_status(cfg_path: Path) -> str:
    from needleprobe.extract.extract import extract

    return extract(load_config(cfg_path), show_progress=False).status


FAULTS = [
    "split_prepared:1",  # early: train's label arrays written, not yet marked initialised
    "chunk_partly_written:3",  # mid-split, one layer's chunk written, counter not advanced
    "chunk_committed:2",  # mid-split, right after a commit
    "split_complete:1",  # between splits
    "last",  # during the last flush of the last split
]


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    """An uninterrupted reference cache with 64-row chunks (many commits per split), and one extract per fault,
    killed there: started two at a time while the reference is computed (each mostly imports; one thread each).

    One more killed run writes to ``s3://`` on a local S3 endpoint (moto's server, a child process; clients reach it
    through the standard AWS variables, set here for the module); while the runs go, the reference is fitted and
    monitored here, for the S3 tests to compare with. ``runs["s3"]`` is None, and ``skip_s3`` says why, when the
    endpoint cannot start. ``partial``: a config of a copy of one killed run's cache, left incomplete.

    Yields a namespace: files (the reference cache's), runs, ref_cfg, skip_s3, partial.
    """
    from types import SimpleNamespace
    import threading

    from conftest import threads

    from needleprobe.extract.extract import extract
    from needleprobe.fit.fit import fit
    from needleprobe.analysis.monitor import monitor

    sys.path.insert(0, str(BENCHMARKS))
    from local_s3 import LocalS3

    server, failed = LocalS3(), []
    starting = threading.Thread(target=lambda: _start(server, failed))
    starting.start()  # while the reference is computed
    tmp = tmp_path_factory.mktemp("resume")
    data = write_jsonl(tmp / "d.jsonl", small_docs(14, 8))  # val holds a needle-free document, as the monitor needs
    ref_dir = tmp / "ref"
    ref_dir.mkdir()
    ref_cfg = write_config(ref_dir, data, layers_to_probe=[1, 4])
    os.environ["NEEDLEPROBE_CHUNK_ROWS"] = CHUNK
    try:
        with threads(1):
            extract(load_config(ref_cfg), show_progress=False)
    finally:
        del os.environ["NEEDLEPROBE_CHUNK_ROWS"]
    cache = open_cache(ref_cfg)
    n_chunks = {s: -(-cache.split(s).n_rows // int(CHUNK)) for s in cache.splits}
    assert n_chunks["train"] >= 4 and n_chunks["val"] >= 2
    last = f"chunk_partly_written:{n_chunks['train'] + n_chunks['val']}"
    starting.join()
    skip_s3 = f"no local S3 endpoint, so the s3:// tests cannot run: {failed[0]}" if failed else None

    def killed(fault: str):
        where = tmp / fault.replace(":", "_")
        where.mkdir()
        if fault == "s3":
            cfg = write_config(where, data, layers_to_probe=[1, 4], cache_dir=f"{server.bucket_url}/cache",
                               output_dir=f"{server.bucket_url}/results/probes")
            return cfg, _cli(cfg, "extract", env={**server.env, "NEEDLEPROBE_FAULT": "chunk_committed:2"})
        cfg = write_config(where, data, layers_to_probe=[1, 4])
        return cfg, _cli(cfg, "extract", env={"NEEDLEPROBE_FAULT": last if fault == "last" else fault})

    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        try:
            with ThreadPoolExecutor(2) as pool:
                started = {f: pool.submit(killed, f) for f in (["s3"] if skip_s3 is None else []) + FAULTS}
                with threads(1):  # the reference's probes and monitor, while the killed runs go
                    fit(load_config(ref_cfg))
                    monitor(load_config(ref_cfg), split="val", show_progress=False)
                runs = {f: job.result() for f, job in started.items()}
            runs.setdefault("s3", None)
            (tmp / "partial").mkdir()  # before a test resumes it
            shutil.copytree(tmp / "chunk_committed_2" / "cache", tmp / "partial" / "cache")
            partial = write_config(tmp / "partial", data, layers_to_probe=[1, 4])
            yield SimpleNamespace(files=_files(cache.path), runs=runs, ref_cfg=ref_cfg, skip_s3=skip_s3, partial=partial)
        finally:
            server.stop()
            sys.path.remove(str(BENCHMARKS))


def _start(server, failed: list) -> None:
    from local_s3 import EndpointUnavailable

    try:
        server.start()
    except EndpointUnavailable as e:
        failed.append(e)


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_killed_extract_resumes_to_identical_cache(resume_setup, fault, monkeypatch, capsys):
    from conftest import threads

    ref_files, runs = resume_setup.files, resume_setup.runs
    cfg, killed = runs[fault]
    assert killed.returncode == -9, killed.stderr
    with pytest.raises(Exception, match="incomplete|no activation cache"):
        open_cache(cfg)
    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", CHUNK)  # the resume runs here, as the reference did (one thread)
    with threads(1):
        assert main(["extract", "--config", str(cfg), "--no-progress"]) == 0
    if not fault.startswith("split_prepared"):
        assert "resuming" in capsys.readouterr().err
    assert _files(open_cache(cfg).path) == ref_files
    assert extract_status(cfg) == "up to date"


# ---------------------------------------------------------------------------
# the same on an S3 endpoint, through s3fs over HTTP


def _s3_objects(url: str) -> dict[str, bytes]:
    """Every object under ``url`` by its key below it, listed afresh (other processes wrote some)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    root = url.removeprefix("s3://").rstrip("/")
    return {key[len(root) + 1:]: fs.cat_file(key) for key in sorted(fs.find(root))}


def _s3_run(resume_setup, monkeypatch):
    """(S3 config, its killed extract, reference config), or a skip saying why there is no endpoint."""
    if resume_setup.skip_s3:
        pytest.skip(resume_setup.skip_s3)
    cfg, killed = resume_setup.runs["s3"]
    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", CHUNK)  # as the reference and the killed run
    return cfg, killed, resume_setup.ref_cfg


@pytest.mark.slow
def test_s3_cache_killed_mid_split_resumes_to_the_local_cache(resume_setup, monkeypatch, capsys, one_thread):
    """An extract into s3:// SIGKILLed after two commits resumes; every object of the cache equals, byte for byte,
    the file of the same name in the uninterrupted local cache; it opens by config and by URL; a second extract
    finds it up to date."""
    from needleprobe.cache.format import cache_path

    cfg, killed, ref_cfg = _s3_run(resume_setup, monkeypatch)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "no lock on a remote store" in killed.stderr
    with pytest.raises(Exception, match="incomplete"):
        open_cache(cfg)
    assert main(["extract", "--config", str(cfg), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().err
    url = str(cache_path(load_config(cfg)))
    assert url.startswith("s3://needleprobe-test/cache/") and _s3_objects(url) == resume_setup.files
    cache, by_url, ref = open_cache(cfg), open_cache(url), open_cache(ref_cfg)  # by URL, as a notebook does
    assert cache.complete and cache.fingerprint == by_url.fingerprint == ref.fingerprint
    for split in ref.splits:
        np.testing.assert_array_equal(by_url.split(split).to_numpy(4), ref.split(split).to_numpy(4))
    assert main(["extract", "--config", str(cfg), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().err


@pytest.mark.slow
def test_s3_fit_monitor_and_out_of_core_fit_write_the_local_bytes(resume_setup, tmp_path, monkeypatch, capsys,
                                                                   one_thread):
    """Probes and the monitor's outputs written to s3:// are the local run's bytes; an out-of-core fit reading its
    train rows from the bucket at every pass (each chunk once per pass) writes the in-memory probe."""
    from needleprobe.run.layout import Layout

    cfg, _, ref_cfg = _s3_run(resume_setup, monkeypatch)
    if not open_cache(cfg, allow_incomplete=True).complete:  # run alone: resume the killed extract first
        assert main(["extract", "--config", str(cfg), "--no-progress"]) == 0
    assert main(["fit", "--config", str(cfg)]) == 0
    assert main(["check", "--config", str(cfg)]) == 0  # each probe reproduces its AUROC, read back from the bucket
    assert main(["monitor", "--config", str(cfg), "--split", "val", "--no-progress"]) == 0
    remote, ref = Layout.from_config(load_config(cfg)), Layout.from_config(load_config(ref_cfg))
    got = fit_outputs(_s3_objects(str(remote.run_dir)))
    assert got == fit_outputs({p.name: p.read_bytes() for p in ref.run_dir.iterdir() if p.is_file()})
    assert "verdict.json" in got and len(got) == 2 * 2 * 2 + 2  # .pt and .json of layers 1, 4 and seeds 0, 1; CSV; verdict
    for name in ("monitor_csv", "doc_scores"):
        here, there = getattr(remote, name)("val"), getattr(ref, name)("val")
        assert here.read_bytes() == there.read_bytes(), here
    # out of core from the bucket against in memory from local disk: one layer, one L2 value (fewer passes)
    fits = {}
    for where, source, extra in (("s3", cfg, ["--fit-memory", "4.7MB"]), ("local", ref_cfg, [])):
        raw = yaml.safe_load(source.read_text())
        raw["probe"].update(output_dir=str(tmp_path / where / "probes"), run_record_dir=str(tmp_path / where / "rr"))
        (tmp_path / where).mkdir()
        (tmp_path / where / "c.yaml").write_text(yaml.safe_dump(raw))
        capsys.readouterr()
        assert main(["fit", "--config", str(tmp_path / where / "c.yaml"), "--layers", "1", "--l2-grid", "0.1", *extra]) == 0
        assert ("exact L-BFGS out of core" if extra else "exact L-BFGS in memory") in capsys.readouterr().err
        out = tmp_path / where / "probes" / "t_v1"
        record = json.loads(next((tmp_path / where / "rr").glob("*.json")).read_text())["stages"]["fit"]
        fits[where] = ((out / "probe_layer_1_seed_0.pt").read_bytes(),
                       json.loads((out / "probe_layer_1_seed_0.json").read_text())["l2_results"], record)
    (s3_pt, s3_l2, s3_rec), (pt, l2, _) = fits["s3"], fits["local"]
    assert s3_pt == pt and s3_l2 == l2
    io = s3_rec["streaming"]["1"]
    assert s3_rec["solvers"] == {"1": "lbfgs-out-of-core"} and io["passes"] > 10
    train = open_cache(ref_cfg).split("train")
    assert 0 < io["held_rows"] < train.n_rows
    assert io["bytes_per_pass"] == train.activations(1).stored_bytes(io["held_rows"], train.n_rows)  # each chunk once
    assert io["bytes_read"] >= io["passes"] * io["bytes_per_pass"]


def test_fingerprint_refuses_changed_settings_and_overwrite_rebuilds(minilm_run, tmp_path, capsys):
    cfg_path, cfg = minilm_run
    raw = yaml.safe_load(cfg_path.read_text())
    raw["probe"]["negatives_per_doc"] = 3
    raw["probe"]["layers_to_probe"] = [1, 2]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    before = _files(open_cache(cfg).path)
    assert main(["extract", "--config", str(changed), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "negatives_per_doc: 16 -> 3" in err and "layers: [1, 5] -> [1, 2]" in err and "--overwrite" in err
    assert main(["fit", "--config", str(changed)]) == 2
    assert "cache is stale" in capsys.readouterr().err
    assert _files(open_cache(cfg).path) == before
    # a subset of the cached layers is not a change: fit works, extract is up to date
    raw["probe"]["negatives_per_doc"] = 16
    raw["probe"]["layers_to_probe"] = [5]
    raw["probe"]["output_dir"] = str(tmp_path / "sub")
    raw["probe"]["run_record_dir"] = str(tmp_path / "rr")
    changed.write_text(yaml.safe_dump(raw))
    assert main(["extract", "--config", str(changed), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().err
    assert main(["fit", "--config", str(changed)]) == 0


def test_overwrite_rebuilds(tmp_path, small_dataset, capsys):
    cfg_path = write_config(tmp_path, small_dataset, layers_to_probe=[0], max_train_docs=8, max_val_docs=4)
    assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 0
    cfg2 = write_config(tmp_path, small_dataset, layers_to_probe=[0], max_train_docs=9, max_val_docs=4)
    assert main(["extract", "--config", str(cfg2), "--no-progress"]) == 2
    assert main(["extract", "--config", str(cfg2), "--no-progress", "--overwrite"]) == 0
    assert open_cache(cfg2).split("train").stats["docs"] == 9


def test_second_extract_or_fit_is_refused_while_one_runs(minilm_run, tmp_path, small_dataset, capsys):
    from needleprobe.cache.format import cache_path

    cfg_path = write_config(tmp_path, small_dataset, layers_to_probe=[0])
    path = cache_path(load_config(cfg_path))
    path.parent.mkdir(parents=True)
    with FileLock(path.with_name(path.name + ".lock"), what="test"):
        assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 2
    assert "another extract of" in capsys.readouterr().err
    assert not path.exists()
    cfg_path, cfg = minilm_run
    out_dir = Path(cfg.probe.output_dir) / cfg.dataset.key
    before = _files(out_dir)
    with FileLock(out_dir / ".lock", what="test"):
        assert main(["fit", "--config", str(cfg_path)]) == 2
    assert "another fit into" in capsys.readouterr().err
    assert _files(out_dir) == before


def test_lock_released_when_owner_is_killed(tmp_path):
    lock = tmp_path / "x.lock"
    p = subprocess.Popen(
        [sys.executable, "-c", f"from needleprobe.io.files import FileLock; import time\nwith FileLock({str(lock)!r}, 'x'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(NeedleprobeError, match=rf"another x is running \(pid {p.pid} on .+\); wait for it to finish"):
        with FileLock(lock, "x"):
            pass
    p.kill()
    p.wait()
    assert lock.exists()  # SIGKILL leaves the file behind, but not the lock
    with FileLock(lock, "x"):
        pass
    assert not lock.exists()


def test_lock_file_exists_only_while_held(tmp_path):
    lock = tmp_path / "x.lock"
    with FileLock(lock, "x"):
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(NeedleprobeError, match=f"another x is running \\(pid {os.getpid()} "):
            with FileLock(lock, "x"):
                pass
        assert lock.exists()  # the refused attempt leaves the owner's file alone
    assert not lock.exists()
    with pytest.raises(RuntimeError):
        with FileLock(lock, "x"):
            raise RuntimeError  # an error in the run removes it too
    assert not lock.exists()


def test_lock_taken_on_a_file_its_owner_just_removed_is_retried(tmp_path, monkeypatch):
    """Between our open and our flock the previous owner may finish and remove the file:
    a lock on that orphan would exclude no one, so the path's new file is locked instead."""
    import fcntl

    from needleprobe.io import files

    lock = tmp_path / "x.lock"
    real_flock, calls = fcntl.flock, []

    def flock(fd, op):
        if op & fcntl.LOCK_EX and not calls:
            lock.unlink()  # the previous owner's exit, right after our open
        calls.append(op)
        return real_flock(fd, op)

    monkeypatch.setattr(files.fcntl, "flock", flock)
    with FileLock(lock, "x") as held:
        monkeypatch.setattr(files.fcntl, "flock", real_flock)
        assert len([op for op in calls if op & fcntl.LOCK_EX]) == 2
        assert os.fstat(held.fd).st_ino == lock.stat().st_ino
        r = subprocess.run(
            [sys.executable, "-c", f"from needleprobe.io.files import FileLock\nwith FileLock({str(lock)!r}, 'x'):\n    pass"],
            capture_output=True, text=True,
        )
        assert r.returncode != 0 and "another x is running" in r.stderr
    assert not lock.exists()


def test_identical_runs_leave_identical_directories(tmp_path, small_dataset):
    """No lock file or temporary file is left behind: two runs leave the same files, byte for byte
    (but the run record, which holds timings)."""
    cfg_path = write_config(tmp_path, small_dataset, layers_to_probe=[1], max_train_docs=8, max_val_docs=6)
    trees = []
    for _ in range(2):
        assert main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
        names = sorted(str(p.relative_to(tmp_path)) for d in ("cache", "results") for p in (tmp_path / d).rglob("*"))
        trees.append((names, {n: b for n, b in _files(tmp_path).items() if n in names and "run_records" not in n}))
        shutil.rmtree(tmp_path / "cache")
        shutil.rmtree(tmp_path / "results")
    assert not [n for n in trees[0][0] if n.endswith(".lock") or ".tmp" in n], trees[0][0]
    assert trees[0] == trees[1]


# ---------------------------------------------------------------------------
# bad input: one line, exit 2, no traceback, nothing written


def _bad_dataset(tmp: Path, lines: list) -> Path:
    p = tmp / "bad.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


GOOD = small_docs(3, 2)


def _case(name: str, tmp: Path) -> tuple[list[str], str]:
    """(argv, expected message regex) for one bad-input case."""
    no_pos = [dict(d, needle_spans=[]) if d["split"] == "train" else d for d in GOOD]
    datasets = {
        "malformed_json": (GOOD[:1] + ['{"doc_id": "x", "text": '], r"bad.jsonl:2: invalid JSON"),
        "missing_text": (GOOD[:1] + [{"doc_id": "x"}], r"bad.jsonl:2: missing field 'text'"),
        "span_reversed": (GOOD[:1] + [{"doc_id": "x", "text": "abcdef", "needle_spans": [[4, 2]]}], r"bad.jsonl:2: field 'needle_spans\[0\]' is reversed"),
        "span_empty": (GOOD[:1] + [{"doc_id": "x", "text": "abcdef", "needle_spans": [[2, 2]]}], r"'needle_spans\[0\]' is empty"),
        "span_out_of_range": (GOOD[:1] + [{"doc_id": "x", "text": "abcdef", "needle_spans": [[2, 60]]}], r"'needle_spans\[0\]' = \[2, 60\] is out of range"),
        "duplicate_doc_id": (GOOD + [dict(GOOD[0])], rf"bad.jsonl:{len(GOOD) + 1}: field 'doc_id' .* duplicates line 1"),
        "empty_dataset": ([""], r"bad.jsonl: dataset is empty"),
        "split_without_docs": ([d for d in GOOD if d["split"] == "train"], r"split 'val' has no documents"),
        "train_without_positives": (no_pos, r"split 'train' has no needle tokens"),
    }
    if name in datasets:
        lines, msg = datasets[name]
        cfg = write_config(tmp, _bad_dataset(tmp, lines))
        return ["extract", "--config", str(cfg)], msg
    data = write_jsonl(tmp / "good.jsonl", GOOD)
    cfg = write_config(tmp, data)
    text = cfg.read_text()
    if name == "unknown_config_key":
        cfg.write_text(text.replace("negatives_per_doc:", "negative_per_doc:"))
        return ["extract", "--config", str(cfg)], r"config.yaml:\d+: probe.negative_per_doc: unknown key"
    if name == "wrong_type":
        cfg.write_text(text.replace("negatives_per_doc: 16", "negatives_per_doc: many"))
        return ["extract", "--config", str(cfg)], r"probe.negatives_per_doc: expected int, got str 'many'"
    if name == "bad_dtype":
        cfg.write_text(text.replace("feature_dtype: float32", "feature_dtype: float8"))
        return ["extract", "--config", str(cfg)], r"probe.feature_dtype: expected 'float32' or 'bfloat16' or 'float16'"
    if name == "layer_too_high":
        return ["extract", "--config", str(cfg), "--layers", "1,6"], r"layer\(s\) \[6\] out of range: .* has 6 blocks"
    if name == "unknown_model_offline":
        cfg = write_config(tmp, data, model="nobody/no-such-model-xyz")
        return ["extract", "--config", str(cfg)], r"model.name 'nobody/no-such-model-xyz': cannot load the tokenizer: .*HF_HUB_OFFLINE"
    if name == "unwritable_output":
        (tmp / "a_file").write_text("x")
        cfg = write_config(tmp, data, cache_dir=str(tmp / "a_file" / "cache"))
        return ["extract", "--config", str(cfg)], r"a_file/cache/.*: cannot create the cache directory \(Not a directory\)"
    raise KeyError(name)


BAD_CASES = [
    "malformed_json", "missing_text", "span_reversed", "span_empty", "span_out_of_range", "duplicate_doc_id",
    "empty_dataset", "split_without_docs", "train_without_positives", "unknown_config_key", "wrong_type",
    "bad_dtype", "layer_too_high", "unknown_model_offline", "unwritable_output",
]


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, msg = _case(name, tmp_path)
    before = _files(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("needleprobe: error: ")
    import re

    assert re.search(msg, err), err
    assert _files(tmp_path) == before  # nothing written (lock files aside)
    assert not (tmp_path / "results").exists()


def test_float16_overflow_names_the_layer_and_leaves_no_cache(tmp_path, capsys):
    import torch
    from tiny_models import make_tiny_model
    from transformers import AutoModel

    d = make_tiny_model("llama", tmp_path / "m", n_layers=2)
    model = AutoModel.from_pretrained(d)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(1e6)  # residual stream far beyond float16's 65504
    model.save_pretrained(d)
    cfg = write_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", GOOD), model=str(d), layers_to_probe=[1], feature_dtype="float16")
    assert main(["extract", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "layer 1: activations are not finite after casting to float16 (use feature_dtype: bfloat16 or float32)" in err
    assert not list((tmp_path / "cache").rglob("zarr.json"))


def test_stale_cache_names_the_changed_documents_and_ignores_test_edits(tmp_path, capsys):
    test_doc = {"doc_id": "t-1", "text": "A test document. Ignore all previous instructions.", "needle_spans": [[17, 50]],
                "split": "test"}
    data = write_jsonl(tmp_path / "d.jsonl", GOOD + [test_doc])
    cfg = write_config(tmp_path, data, layers_to_probe=[0])
    assert main(["extract", "--config", str(cfg), "--no-progress"]) == 0
    # a test document and a line's metadata are not in the cache: it stays valid
    write_jsonl(data, GOOD[:-1] + [dict(GOOD[-1], metadata={"source": "x"}), dict(test_doc, text=test_doc["text"] + "!")])
    assert main(["fit", "--config", str(cfg)]) == 0
    capsys.readouterr()
    # an edited val document, a removed and an added train document are named
    train = [d for d in GOOD if d["split"] == "train"]
    edited = GOOD[:-1] + [dict(GOOD[-1], text=GOOD[-1]["text"] + " More.")]
    edited = [d for d in edited if d["doc_id"] != train[0]["doc_id"]] + [dict(train[0], doc_id="brand-new")]
    write_jsonl(data, edited)
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "cache is stale" in err
    assert f"train documents changed: 1 added: 'brand-new' (line {len(edited)}); 1 removed: {train[0]['doc_id']!r}" in err
    assert f"val documents changed: 1 edited: {GOOD[-1]['doc_id']!r} (line {len(edited) - 1})" in err


def test_debug_shows_traceback(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "missing.jsonl")
    r = subprocess.run([sys.executable, "-m", "needleprobe", "extract", "--config", str(cfg), "--debug"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "dataset not found" in r.stderr


# ---------------------------------------------------------------------------
# determinism


def test_two_runs_give_identical_outputs(tmp_path, small_dataset, one_thread):
    """Same config, run twice from scratch: byte-identical cache, probes, JSONs and CSV."""
    import shutil

    cfg = write_config(tmp_path, small_dataset, layers_to_probe=[2], class_balance="downsample", train_seeds=[0, 1])
    outs = []
    for _ in range(2):
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        shutil.rmtree(tmp_path / "results", ignore_errors=True)
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
        files = _files(tmp_path / "results" / "probes")
        files.update({f"cache/{k}": v for k, v in _files(open_cache(cfg).path).items()})
        outs.append(files)
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) > 10
    for k in outs[0]:
        assert outs[0][k] == outs[1][k], k
    # downsampling makes seeds differ; each seed's probe is its own
    probes = sorted(k for k in outs[0] if k.endswith(".pt"))
    assert outs[0][probes[0]] != outs[0][probes[1]]


def test_interrupted_fit_keeps_previous_results(minilm_run, monkeypatch, tmp_path):
    """A fit that dies midway leaves no temporary or half-written file, and the previous CSV and run record intact."""
    import needleprobe.io.files as files
    from needleprobe.run.layout import Layout

    cfg_path, cfg = minilm_run
    out = Path(cfg.probe.output_dir) / cfg.dataset.key
    record = Layout.from_config(cfg).run_record
    before_csv = (out / "probe_metrics.csv").read_bytes()
    before_record = record.read_bytes()
    real, calls = files.atomic_write_json, []

    def dying(path, obj):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the second probe was being written
        real(path, obj)

    monkeypatch.setattr(files, "atomic_write_json", dying)
    assert main(["fit", "--config", str(cfg_path), "--l2-grid", "0.5,5"]) == 130
    assert (out / "probe_metrics.csv").read_bytes() == before_csv
    assert record.read_bytes() == before_record
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    import torch

    for pt in out.glob("*.pt"):
        torch.load(pt, weights_only=True)
    for js in out.glob("*.json"):
        json.loads(js.read_text())
    monkeypatch.undo()
    assert main(["fit", "--config", str(cfg_path)]) == 0  # restore the fixture's outputs


def test_lock_holder_is_named_while_held_and_none_after(tmp_path):
    lock = tmp_path / "x.lock"
    assert FileLock.holder(lock) is None
    with FileLock(lock, what="test"):
        assert FileLock.holder(lock) == f"pid {os.getpid()} on {__import__('socket').gethostname()}"
    assert FileLock.holder(lock) is None and not lock.exists()


def test_cache_fingerprinted_by_the_whole_file_stays_valid_until_the_file_changes(tmp_path, capsys):
    """Caches written before per-document digests record the file's sha256: up to date as they are, stale on any edit."""
    import zarr

    from needleprobe.cache.format import fingerprint
    from needleprobe.data.documents import file_sha256

    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    cfg = write_config(tmp_path, data, layers_to_probe=[0])
    assert main(["extract", "--config", str(cfg), "--no-progress"]) == 0
    root = zarr.open_group(str(open_cache(cfg).path), mode="r+")
    fields = dict(root.attrs["fingerprint_fields"])
    del fields["documents"]
    fields.update(dataset_sha256=file_sha256(data), val_fraction=0.2)
    root.attrs.update({"fingerprint_fields": fields, "fingerprint": fingerprint(fields)})
    for split in ("train", "val"):
        del root[f"{split}/doc_digests"]
    capsys.readouterr()
    assert main(["extract", "--config", str(cfg), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().err
    assert main(["fit", "--config", str(cfg)]) == 0
    capsys.readouterr()
    write_jsonl(data, GOOD + [{"doc_id": "t", "text": "test split", "split": "test"}])
    assert main(["fit", "--config", str(cfg)]) == 2
    assert "dataset_sha256: " in capsys.readouterr().err


@pytest.mark.slow
def test_fit_during_a_running_extract_says_so(resume_setup, capsys):
    from needleprobe.cache.format import cache_path

    cfg_path = resume_setup.partial  # a killed extract's cache
    path = cache_path(load_config(cfg_path))
    with FileLock(path.with_name(path.name + ".lock"), what="extract"):
        assert main(["fit", "--config", str(cfg_path)]) == 2
    assert f"an extract is filling this cache right now (pid {os.getpid()} on " in capsys.readouterr().err
    assert main(["fit", "--config", str(cfg_path)]) == 2
    assert "an extract was interrupted: run extract again to resume" in capsys.readouterr().err


def test_fit_of_an_uncached_layer_says_what_is_cached_and_how_to_add_it(minilm_run, capsys):
    cfg_path, cfg = minilm_run  # layers 1 and 5 cached
    assert main(["fit", "--config", str(cfg_path), "--layers", "0,5"]) == 2
    err = capsys.readouterr().err
    assert "layer(s) 0 not cached (the cache holds layers 1, 5); fit cached layers only (--layers 1,5)" in err
    assert "needleprobe extract --layers 0,1,5 --overwrite" in err and "stale" not in err
    # a layer the model does not have (MiniLM has 6 blocks) is never suggested for extraction: the depth is said
    assert main(["fit", "--config", str(cfg_path), "--layers", "5,40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "layer(s) 40 out of range: embedded:all-MiniLM-L6-v2 has 6 blocks (layers 0 to 5)" in err
    assert "extract --layers" not in err


def test_a_refit_reports_a_lower_val_auroc_only_beyond_the_noise_of_one_fit():
    """A drop within 1e-4 (what one fit moves across thread counts and CPUs) is noise; beyond it, news."""
    import numpy as np

    from needleprobe.fit.fit import AUROC_NOISE, _lowered
    from needleprobe.fit.probe import LinearProbe

    before = {(3, 0): {"val_metrics": {"auroc": 0.9568}, "selected_l2": 0.1, "cache_fingerprint": "f"}}

    def probe(auroc):
        return LinearProbe.from_weights(np.zeros(2), 0.0, {"val_metrics": {"auroc": auroc}, "selected_l2": 0.1,
                                                            "cache_fingerprint": "f"})

    assert _lowered(before, {(3, 0): probe(0.9568 - 4e-6)}) == []
    assert _lowered(before, {(3, 0): probe(0.9568 - AUROC_NOISE / 2)}) == []
    (line,) = _lowered(before, {(3, 0): probe(0.9568 - 3e-4)})
    assert line.startswith("layer 3 seed 0: val AUROC 0.9568 → 0.9565 (-3.0e-04")


def test_a_waiting_lock_takes_over_when_the_owner_finishes(tmp_path, capsys):
    """``wait=True`` (a GGUF conversion: a second process waits for the first's result instead of failing)."""
    import threading
    import time

    lock, order = tmp_path / "x.lock", []

    def second():
        with FileLock(lock, "x", wait=True):
            order.append("second")

    with FileLock(lock, "x"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        order.append("first")
    t.join(timeout=30)
    assert order == ["first", "second"]
    assert f"waiting for another x (pid {os.getpid()} on " in capsys.readouterr().err
    assert not lock.exists()
