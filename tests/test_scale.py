"""Scale-out: torchrun-sharded extraction (gloo, 2 CPU processes), data-parallel and multi-process fits.

Remote stores (s3:// on a local S3 endpoint) are tested in ``test_reliability.py``, beside the killed extracts.

Every sharded cache is compared with one single-process reference
cache: the same rows bit for bit, and the same probe bytes after ``fit``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import ONE_THREAD_ENV, fit_outputs, small_docs, threads, write_config, write_jsonl

from needleprobe import open_cache
from needleprobe.cache.reader import ShardedArray
from needleprobe.cli import main
from needleprobe.config import load_config
from needleprobe.extract.sharding import shard_ranges
from needleprobe.extract.extract import extract
from needleprobe.fit.fit import fit

CHUNK = "64"
LAYERS = [1, 4]
ROW_FIELDS = ("labels", "doc_index", "token_index", "token_id", "doc_n_tokens", "doc_n_needles")


def _torchrun(cfg_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "needleprobe", "extract", "--config", str(cfg_path), "--no-progress", *args],
        env={**os.environ, "NEEDLEPROBE_CHUNK_ROWS": CHUNK, "HF_HUB_OFFLINE": "1", **ONE_THREAD_ENV, **(env or {})},
        capture_output=True, text=True, timeout=300,
    )


def assert_same_cache(got, want) -> None:
    """Same fingerprint, splits and every array, bit for bit."""
    assert got.fingerprint == want.fingerprint and got.splits == want.splits and got.complete
    for s in want.splits:
        g, w = got.split(s), want.split(s)
        assert g.n_rows == w.n_rows and g.doc_ids == w.doc_ids and g.stats == w.stats
        for name in ROW_FIELDS:
            np.testing.assert_array_equal(getattr(g, name), getattr(w, name), err_msg=f"{s}/{name}")
        for layer in want.layers:
            a, b = g.activations(layer), w.activations(layer)
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_array_equal(a[:], b[:], err_msg=f"{s}/layer_{layer}")
            np.testing.assert_array_equal(g.to_numpy(layer), w.to_numpy(layer))


def _probe_files(out: Path) -> dict[str, bytes]:
    return fit_outputs({p.name: p.read_bytes() for p in out.iterdir() if p.is_file()})


@pytest.fixture(scope="module")
def scale_setup(tmp_path_factory):
    """(tmp dir, dataset, reference config path, its probe files): one single-process extract + fit.

    Built with one thread, as each torchrun process computes (``ONE_THREAD_ENV``): bit-identity across
    process counts is promised for one thread configuration.
    """
    tmp = tmp_path_factory.mktemp("scale")
    data = write_jsonl(tmp / "d.jsonl", small_docs(14, 6))
    ref = tmp / "ref"
    ref.mkdir()
    cfg_path = write_config(ref, data, layers_to_probe=LAYERS)
    cfg = load_config(cfg_path)
    with threads(1):
        assert extract(cfg, show_progress=False).status == "extracted"
        fit(cfg)
    return tmp, data, cfg_path, _probe_files(ref / "results" / "probes" / "t_v1")


# ---------------------------------------------------------------------------
# pieces


def test_shard_ranges_are_contiguous_and_balanced():
    costs = [90, 80, 80, 40, 40, 40, 10, 10, 5, 5]
    for world in (1, 2, 3, 4, 12):
        ranges = shard_ranges(costs, world)
        assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == len(costs)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
    sums = [sum(costs[a:b]) for a, b in shard_ranges(costs, 2)]
    assert max(sums) - min(sums) <= max(costs)
    assert shard_ranges([], 3) == [(0, 0)] * 3


def test_sharded_array_reads_across_shard_boundaries():
    root = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    full = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    cuts = [0, 7, 7, 20, 23]  # an empty shard in the middle
    parts = []
    for i in range(4):
        a = root.create_array(f"p{i}", shape=(cuts[i + 1] - cuts[i], 3), chunks=(4, 3), dtype="float32")
        if cuts[i + 1] > cuts[i]:
            a[:] = full[cuts[i]: cuts[i + 1]]
        parts.append(a)
    arr = ShardedArray(parts)
    assert arr.shape == (23, 3) and arr.chunks == (4, 3) and arr.dtype == np.float32
    for s in (slice(None), slice(0, 7), slice(5, 9), slice(6, 21), slice(20, 100), slice(9, 9), slice(-5, None)):
        np.testing.assert_array_equal(arr[s], full[s])
    np.testing.assert_array_equal(arr[3:15, 1:], full[3:15, 1:])
    np.testing.assert_array_equal(arr[7], full[7])
    np.testing.assert_array_equal(arr[-1], full[-1])


def test_makefile_runs_torchrun_when_nproc_is_above_one():
    root = Path(__file__).resolve().parents[1]

    def dry(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}  # not the outer make's ARGS
        r = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(root), "extract", "VENV=/nonexistent", "ARGS=", *args],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]

    assert "torch.distributed.run --standalone --nproc-per-node 4 -m needleprobe extract --config c.yaml" in dry("NPROC=4", "CONFIG=c.yaml")
    assert dry("CONFIG=c.yaml").endswith("needleprobe extract --config c.yaml")


# ---------------------------------------------------------------------------
# torchrun


@pytest.fixture(scope="module")
def sharded_run(scale_setup):
    """(run dir, config path, stderr) of a 2-process torchrun extract through an fsspec store (file://), and in
    ``killed`` how it got there: rank 1 was SIGKILLed after two commits, one process refused to resume it, and a
    second torchrun resumed it. Every torchrun test reads this one cache: each torchrun start costs seconds."""
    import contextlib
    import io

    tmp, data, _, _ = scale_setup
    run = tmp / "sharded"
    run.mkdir()
    cfg_path = write_config(run, data, layers_to_probe=LAYERS, cache_dir=f"file://{run / 'cache'}")
    killed = _torchrun(cfg_path, env={"NEEDLEPROBE_FAULT": "chunk_committed:2", "NEEDLEPROBE_FAULT_RANK": "1"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    cache = open_cache(cfg_path, allow_incomplete=True)
    partial = {"complete": cache.complete, "world_size": cache.world_size,
               "train1": dict(cache.root["shard-1-of-2/train"].attrs)}
    err = io.StringIO()
    with contextlib.redirect_stderr(err), threads(1):  # one process may not resume what two started
        refused = main(["extract", "--config", str(cfg_path), "--no-progress"])
    r = _torchrun(cfg_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, cfg_path, r.stderr, {"partial": partial, "refused": (refused, err.getvalue())}


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(scale_setup, sharded_run, one_thread):
    """2 gloo processes write shard groups through an fsspec store (file://); the cache reads as the reference."""
    tmp, data, ref_cfg, ref_probes = scale_setup
    run, cfg_path, stderr, _ = sharded_run
    assert "rank 1/2 train: batches" in stderr
    cfg = load_config(cfg_path)
    cache = open_cache(cfg)
    assert cache.world_size == 2 and str(cache.path).startswith("file://")
    assert sorted(cache.root.group_keys()) == ["shard-0-of-2", "shard-1-of-2"]
    want = open_cache(ref_cfg)
    assert_same_cache(cache, want)
    for s in cache.splits:  # each process wrote a non-empty, contiguous part of every split
        shards = cache.split(s).attrs["shards"]
        assert [x["rank"] for x in shards] == [0, 1]
        assert shards[0]["row_start"] == 0 and shards[0]["row_stop"] == shards[1]["row_start"] > 0
        assert shards[1]["row_stop"] == want.split(s).n_rows
    fit(cfg)
    assert _probe_files(run / "results" / "probes" / "t_v1") == ref_probes
    assert extract(cfg, show_progress=False).status == "up to date"  # one process accepts a finished sharded cache


@pytest.mark.slow
def test_one_process_repairs_a_sharded_cache(scale_setup, sharded_run, tmp_path, monkeypatch, capsys, one_thread):
    """Damaged chunks in two shards: ``extract --repair`` (no torchrun, another batch size) rewrites them from the
    split's rows; the cache is again the torchrun cache byte for byte."""
    import shutil

    from needleprobe.cache.format import cache_path

    tmp, data, ref_cfg, _ = scale_setup
    run, _, _, _ = sharded_run
    shutil.copytree(run / "cache", tmp_path / "cache")
    cfg_path = write_config(tmp_path, data, layers_to_probe=LAYERS, cache_dir=f"file://{tmp_path / 'cache'}")
    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", CHUNK)
    root = Path(str(cache_path(load_config(cfg_path))).removeprefix("file://"))
    before = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    (root / "shard-1-of-2/train/layer_1/c/1/0").write_bytes(b"\0" * 100)
    (root / "shard-0-of-2/val/labels/c/0").unlink()
    assert main(["fit", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "shard-0-of-2/val/labels chunk 0" in err or "shard-1-of-2/train/layer_1 chunk 1 (rows 64–127)" in err, err
    assert main(["extract", "--config", str(cfg_path), "--repair", "--doc-batch-size", "3", "--no-progress"]) == 0
    assert "repaired 2 chunk(s)" in capsys.readouterr().err
    assert {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before
    assert_same_cache(open_cache(cfg_path), open_cache(ref_cfg))


@pytest.mark.slow
def test_killed_rank_resumes_its_shard(scale_setup, sharded_run):
    """The sharded cache was written by a torchrun whose rank 1 was killed, then by a torchrun that resumed it: the
    killed run left an incomplete cache with rank 1's committed rows, the resume kept them (the reference equality is
    the test above)."""
    _, _, ref_cfg, _ = scale_setup
    _, _, stderr, how = sharded_run
    partial = how["partial"]
    assert not partial["complete"] and partial["world_size"] == 2
    assert partial["train1"]["committed_rows"] == 2 * int(CHUNK) < partial["train1"]["n_rows"]
    refused, err = how["refused"]
    assert refused == 2 and "started by 2 process(es), this run has 1" in err
    assert "resuming" in stderr
    want = open_cache(ref_cfg)
    resumed_tokens = int(re.search(r"extract: ([\d,]+) tokens", stderr).group(1).replace(",", ""))
    assert 0 < resumed_tokens < sum(want.split(s).stats["tokens"] for s in want.splits)  # committed rows kept


# ---------------------------------------------------------------------------
# data-parallel fit


@pytest.mark.parametrize("class_balance,layers", [("weighted", LAYERS), ("downsample", [4])])
def test_parallel_fit_writes_the_same_bytes(scale_setup, tmp_path, class_balance, layers, one_thread):
    """Two CPU 'devices': layers (downsample, one layer: its seeds) fitted on two threads give the one-device files."""
    tmp, data, _, _ = scale_setup
    raw = yaml.safe_load((tmp / "ref" / "config.yaml").read_text())
    raw["probe"].update(class_balance=class_balance, layers_to_probe=layers, output_dir=str(tmp_path / "probes"),
                        run_record_dir=str(tmp_path / "rr"))
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    out = tmp_path / "probes" / "t_v1"
    one = fit(cfg)
    files_one = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".lock"}
    two = fit(cfg, devices=[torch.device("cpu"), torch.device("cpu")])
    files_two = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".lock"}
    assert len(files_one) == 2 * len(layers) * len(cfg.probe.train_seeds) + 2  # and the CSV, the verdict
    assert files_one == files_two
    assert list(one.probes) == list(two.probes)
    record = json.loads((tmp_path / "rr" / "t_v1_probe_run_record.json").read_text())
    assert record["stages"]["fit"]["devices"] == ["cpu", "cpu"]


def test_layers_side_by_side_read_their_rows_one_at_a_time(scale_setup, tmp_path, monkeypatch, one_thread):
    """Two workers never read two layers' rows at once (read together, both waited on the GIL and neither started
    fitting); one fits while the other reads."""
    import threading
    import time

    import needleprobe.fit.fit as fit_module

    tmp, _, _, _ = scale_setup
    raw = yaml.safe_load((tmp / "ref" / "config.yaml").read_text())
    raw["probe"].update(layers_to_probe=LAYERS, output_dir=str(tmp_path / "probes"), run_record_dir=str(tmp_path / "rr"))
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    spans: dict[str, list[tuple[float, float]]] = {"read": [], "fit": []}
    lock = threading.Lock()

    def timed(kind, f, pause):
        def run(*a, **k):
            t0 = time.perf_counter()
            time.sleep(pause)  # long enough for the other worker to overlap, were it allowed to
            out = f(*a, **k)
            with lock:
                spans[kind].append((t0, time.perf_counter()))
            return out
        return run

    monkeypatch.setattr(fit_module, "lbfgs_layer", timed("read", fit_module.lbfgs_layer, 0.1))
    monkeypatch.setattr(fit_module, "fit_grid", timed("fit", fit_module.fit_grid, 0.3))
    fit(load_config(cfg_path), devices=[torch.device("cpu"), torch.device("cpu")])
    reads = sorted(spans["read"])
    assert len(reads) == len(LAYERS) >= 2
    assert all(a[1] <= b[0] for a, b in zip(reads, reads[1:])), reads  # one at a time
    overlap = max(min(r1, f1) - max(r0, f0) for r0, r1 in reads for f0, f1 in spans["fit"])
    assert overlap > 0.05, spans  # a layer is read while another fits


# ---------------------------------------------------------------------------
# exact fits beyond memory and across processes


@pytest.mark.slow
def test_torchrun_fit_equals_one_process(scale_setup, sharded_run, tmp_path):
    """2 gloo processes fit one optimisation whose sums over rows are the one-process in-memory sums bit for bit, so
    rank 0 writes the one-process probe files, CSV included; the run record says how each layer was fitted and what
    it read. On the sharded cache each process takes its own shard's rows, out of core (--fit-memory below a share's
    rows); on the single-process cache each takes a contiguous share, in memory. Both run side by side."""
    tmp, data, ref_cfg, ref_probes = scale_setup
    run, _, _, _ = sharded_run  # written by 2 processes: each fits its own shard's rows
    cases = {"sharded": (f"file://{run / 'cache'}", ["--fit-memory", "3.8MB"]), "unsharded": (str(tmp / "ref" / "cache"), [])}
    started = {}
    for name, (cache_dir, extra) in cases.items():
        (tmp_path / name).mkdir()
        cfg_path = write_config(tmp_path / name, data, layers_to_probe=LAYERS, cache_dir=cache_dir)
        started[name] = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "needleprobe", "fit", "--config", str(cfg_path), *extra],
            env={**os.environ, "NEEDLEPROBE_CHUNK_ROWS": CHUNK, "HF_HUB_OFFLINE": "1", **ONE_THREAD_ENV},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = {name: p.communicate(timeout=300) for name, p in started.items()}
    for name, p in started.items():
        assert p.returncode == 0, logs[name][1][-3000:]
        assert _probe_files(tmp_path / name / "results" / "probes" / "t_v1") == ref_probes, name
    assert "exact L-BFGS across 2 processes (each its shard of the cache" in "".join(logs["sharded"])
    assert "exact L-BFGS across 2 processes (each a contiguous share; sums over rows all-reduced), every share in " \
           "memory" in "".join(logs["unsharded"])
    stage = json.loads(next((tmp_path / "unsharded" / "results" / "run_records").glob("*.json")).read_text())["stages"]["fit"]
    assert stage["processes"] == 2 and stage["solvers"] == {"1": "lbfgs-distributed", "4": "lbfgs-distributed"}
    stage = json.loads(next((tmp_path / "sharded" / "results" / "run_records").glob("*.json")).read_text())["stages"]["fit"]
    assert stage["processes"] == 2 and stage["fit_memory"]["bytes"] == 3_800_000
    assert stage["solvers"] == {"1": "lbfgs-distributed-out-of-core", "4": "lbfgs-distributed-out-of-core"}
    io = stage["streaming"]["1"]
    assert io["passes"] > 10 and io["bytes_read"] >= io["passes"] * io["bytes_per_pass"] > 0
