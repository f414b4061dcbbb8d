"""A cache that can tell it is damaged: checksummed chunks, ``inspect --verify``, ``extract --repair``,
format-1 caches, a full disk, and a crash recorded as a crash.

Every damaged cache here is a copy of one reference run (extract, fit, monitor)
with 64-row chunks; a repaired cache must equal the reference exactly.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import ONE_THREAD_ENV, small_docs, threads, write_config, write_jsonl

from needleprobe import open_cache
from needleprobe.cache.integrity import CacheDamaged
from needleprobe.cli import main
from needleprobe.config import load_config
from needleprobe.extract.runner import IN_FLIGHT

CHUNK = "64"
LAYERS = [1, 4]


def _files(root: Path, monitor: bool = True) -> dict[str, bytes]:
    """Every file of a cache (``monitor=False``: without the monitor's results) as bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock") and (monitor or not p.relative_to(root).parts[0] == "monitor")
    }


def _stats(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file: a rewritten file gets a new inode (zarr writes a temporary file and renames)."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def assert_same_arrays(got: Path, want: Path) -> None:
    """Every array of two caches holds the same values; a difference is reported with its size, then bytes are compared."""
    g, w = zarr.open_group(str(got), mode="r"), zarr.open_group(str(want), mode="r")
    names = sorted(k for k, v in w.members(max_depth=None) if isinstance(v, zarr.Array))
    assert names == sorted(k for k, v in g.members(max_depth=None) if isinstance(v, zarr.Array))
    for name in names:
        a, b = g[name][:], w[name][:]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype.kind in "fc":
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            assert np.array_equal(a, b), f"{name}: max |difference| {diff.max():.3e} over {(diff > 0).sum()} values"
        else:
            assert np.array_equal(a, b), f"{name}: {(a != b).sum()} entries differ"
    assert _files(got) == _files(want)


def _damage(path: Path, how: str) -> None:
    if how == "random":
        path.write_bytes(random.Random(str(path)).randbytes(100))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "deleted":
        path.unlink()
    else:
        raise KeyError(how)


REASON = {"random": "checksum mismatch", "empty": "checksum mismatch", "deleted": "chunk file missing"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(dataset, reference dir, cache path relative to it): extract + fit + monitor on val, 64-row chunks."""
    from needleprobe.analysis.monitor import monitor

    tmp = tmp_path_factory.mktemp("integrity")
    data = write_jsonl(tmp / "d.jsonl", small_docs(14, 16))  # val: documents with and without needles
    ref = tmp / "ref"
    ref.mkdir()
    cfg_path = write_config(ref, data, layers_to_probe=LAYERS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEEDLEPROBE_CHUNK_ROWS", CHUNK)
        assert main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
        monitor(load_config(cfg_path), split="val", show_progress=False)
    cache = open_cache(cfg_path)
    assert cache.split("train").n_rows > 5 * int(CHUNK) and cache.format == 2
    return data, ref, cache.path.relative_to(ref)


@pytest.fixture
def run(reference, tmp_path, monkeypatch):
    """A copy of the reference run in tmp_path: (config path, cache path, reference cache path)."""
    data, ref, rel = reference
    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", CHUNK)
    cfg_path = write_config(tmp_path, data, layers_to_probe=LAYERS)
    shutil.copytree(ref / "cache", tmp_path / "cache")
    shutil.copytree(ref / "results", tmp_path / "results")
    return cfg_path, tmp_path / rel, ref / rel


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("needleprobe: error: ") and "Traceback" not in err, err
    return err.removeprefix("needleprobe: error: ")


# ---------------------------------------------------------------------------
# detection


@pytest.mark.parametrize("how", ["random", "empty", "deleted"])
def test_damaged_chunk_is_named_on_every_read_path(run, how, capsys):
    cfg_path, cache_dir, _ = run
    _damage(cache_dir / "train" / "layer_1" / "c" / "3" / "0", how)
    want = f"{cache_dir}/train/layer_1 chunk 3 (rows 192–255) is damaged ({REASON[how]}): run needleprobe extract --repair"

    assert main(["fit", "--config", str(cfg_path)]) == 2
    assert _one_line_error(capsys) == want
    train = open_cache(cfg_path).split("train")
    with pytest.raises(CacheDamaged) as e:
        train.to_numpy(1)
    assert str(e.value) == want and (e.value.damage.chunk, e.value.damage.start, e.value.damage.stop) == (3, 192, 256)
    with pytest.raises(CacheDamaged):
        train.activations(1)[250:260]
    assert train.activations(1)[:192].shape == (192, 384)  # chunks before it read as before
    train.to_numpy(4)  # and the other layer is whole
    from needleprobe.fit.streaming import LayerRows

    streamed = LayerRows(train, 1, 0, train.n_rows, block_rows=32, piece_rows=64)  # an out-of-core fit's reads
    with pytest.raises(CacheDamaged) as e:
        sum(block.shape[0] for _, block in streamed.blocks())
    assert str(e.value) == want

    assert main(["inspect", "--config", str(cfg_path), "--verify"]) == 2
    out, err = capsys.readouterr()  # the table and the damaged chunks are the answer; the error a message
    assert f"damaged: {want.split(': run')[0]}" in out.splitlines()
    assert err.splitlines() == [f"needleprobe: error: {cache_dir}: 1 of 50 chunks are damaged (crc32c checksums): "
                                "run needleprobe extract --repair"]
    assert main(["inspect", "--config", str(cfg_path), "--verify", "--json"]) == 2
    out, err = capsys.readouterr()
    facts = json.loads(out)
    assert facts["verified"] == {"chunks": 50, "format": 2, "damaged": [want.split(": run")[0]],
                                 "remedies": ["run needleprobe extract --repair"]}
    assert "1 of 50 chunks are damaged" in err


def test_rows_read_from_the_chunk_files_are_zarrs_bytes(run, monkeypatch):
    """Activations on a local disk are read straight from their chunk files: the bytes Zarr reads, for any rows."""
    from needleprobe.cache import integrity

    cfg_path, _, _ = run
    train = open_cache(cfg_path).split("train")
    rows = train.activations(1)
    arr = rows.parts[0]
    direct = []
    real = integrity._read_chunk_files
    monkeypatch.setattr(integrity, "_read_chunk_files", lambda *a: direct.append(a[1:3]) or real(*a))
    n, c = arr.shape[0], arr.chunks[0]
    assert n % c  # a padded edge chunk
    zarrs = arr[:]  # Zarr's own reader
    spans = [(0, n), (0, 1), (c - 1, c + 1), (c, 2 * c), (5, n - 3), (n - 1, n), (n - c // 2, n)]
    for a, b in spans:
        got = rows.read(a, b, out=np.empty((b - a, arr.shape[1]), arr.dtype))
        assert got.tobytes() == zarrs[a:b].tobytes(), (a, b)
    assert direct == spans
    assert train.to_numpy(4).tobytes() == train.activations(4).parts[0][:].tobytes()


def test_fit_has_the_disk_read_its_layers_ahead_as_far_as_the_budget_holds_them(run, monkeypatch):
    """``fit`` asks the kernel to read every chunk file of the layers it will hold in memory (train and val), in fit
    order, and stops at the first layer its memory budget cannot hold."""
    from needleprobe.fit.fit import _read_ahead
    from needleprobe.fit.plan import Budget, LayerShape

    cfg_path, cache_dir, _ = run
    hinted = []

    def fadvise(fd, offset, length, advice):
        assert (offset, length, advice) == (0, 0, os.POSIX_FADV_WILLNEED)
        hinted.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    cfg = load_config(cfg_path)
    cache = open_cache(cfg)
    files = {layer: sorted(str(p.resolve()) for split in ("train", "val")
                           for p in (cache_dir / split / f"layer_{layer}" / "c").rglob("*") if p.is_file())
             for layer in LAYERS}
    _read_ahead(cfg, cache, Budget(1 << 40, "test"))
    assert sorted(hinted) == sorted(f for layer in LAYERS for f in files[layer]) and len(hinted) > 2 * len(LAYERS)
    hinted.clear()
    first = LayerShape.of(cache, LAYERS[0], len(set(cfg.probe.l2_grid))).in_memory_bytes()
    _read_ahead(cfg, cache, Budget(first, "test"))  # room for the first layer only
    assert sorted(hinted) == files[LAYERS[0]]


def test_undamaged_cache_verifies(run, capsys):
    cfg_path, _, _ = run
    assert main(["inspect", "--config", str(cfg_path), "--verify"]) == 0
    assert "all 50 chunks verified (crc32c checksums)" in capsys.readouterr().out


def test_damaged_small_arrays_and_monitor_results_are_named(run, capsys):
    cfg_path, cache_dir, _ = run
    _damage(cache_dir / "val" / "labels" / "c" / "0", "empty")
    want = f"{cache_dir}/val/labels chunk 0 (rows 0–569) is damaged (checksum mismatch): run needleprobe extract --repair"
    for argv in (["fit"], ["report"], ["inspect"]):
        assert main([*argv, "--config", str(cfg_path)]) == 2, argv
        assert _one_line_error(capsys) == want, argv
    assert main(["extract", "--config", str(cfg_path), "--repair", "--no-progress"]) == 0
    capsys.readouterr()

    # the monitor's stored logits (in the run, not the cache): a damaged chunk is recomputed, never read
    from needleprobe.run.layout import Layout

    store = Layout.from_config(load_config(cfg_path)).monitor_store
    (logits,) = [p for p in (store / "val").glob("pass-*/logits/c/2/0")]
    _damage(logits, "random")
    assert main(["report", "--config", str(cfg_path)]) == 0  # without the damaged monitor results
    assert main(["monitor", "--config", str(cfg_path), "--split", "val", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "logits chunk 2 (rows 128–191) is damaged (checksum mismatch)" in err and "recomputing" in err
    assert main(["monitor", "--config", str(cfg_path), "--split", "val", "--no-progress"]) == 0
    assert "already stored (no model run)" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# repair


def test_repair_rewrites_only_damaged_chunks_and_equals_an_undamaged_cache(run, capsys, monkeypatch):
    import needleprobe.extract.extract as ex

    cfg_path, cache_dir, ref_dir = run
    damaged = {
        "train/layer_1/c/3/0": "random",
        "train/layer_4/c/5/0": "deleted",  # the last, partial chunk
        "val/layer_4/c/0/0": "empty",
        "train/labels/c/0": "random",  # small arrays: rewritten from the plan
        "val/doc_ids/c/0": "deleted",
    }
    for rel, how in damaged.items():
        _damage(cache_dir / rel, how)
    before = _stats(cache_dir)
    calls = []
    import needleprobe.extract.repair as repair

    real = repair.run_batches

    def spy(fwd, split, *a, **k):
        calls.append((k.get("label") or split.name, split.tokens_in(split.batches)))
        return real(fwd, split, *a, **k)

    monkeypatch.setattr(repair, "run_batches", spy)
    res = ex.extract(load_config(cfg_path), repair=True, show_progress=False)
    assert res.status == "repaired" and len(res.repaired) == 5
    # one model run per damaged row range (train 192–255 and 320–350, val 0–63), each a few batches only
    assert [name for name, _ in calls] == ["train (repair)", "train (repair)", "val (repair)"]
    total = sum(open_cache(cfg_path).split(s).stats["tokens"] for s in ("train", "val"))
    assert res.tokens == sum(t for _, t in calls) < total / 2

    after = _stats(cache_dir)
    rewritten = {k for k in after if before.get(k) != after[k]}
    assert rewritten == set(damaged)
    assert main(["inspect", "--config", str(cfg_path), "--verify"]) == 0
    assert "all 50 chunks verified" in capsys.readouterr().out
    assert_same_arrays(cache_dir, ref_dir)
    assert ex.extract(load_config(cfg_path), repair=True, show_progress=False).status == "up to date"
    assert "all 50 chunks verified, nothing to repair" in capsys.readouterr().err


def test_repair_refuses_under_torchrun(monkeypatch, tmp_path):
    from needleprobe.errors import NeedleprobeError
    from needleprobe.extract.extract import extract

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = load_config(write_config(tmp_path, tmp_path / "d.jsonl"))
    with pytest.raises(NeedleprobeError, match="extract --repair runs in one process and repairs every shard: run it without torchrun"):
        extract(cfg, repair=True)


# ---------------------------------------------------------------------------
# format 1 (no checksums)


def test_format_1_cache_stays_readable_and_up_to_date(reference, tmp_path, monkeypatch, capsys):
    """A cache written before checksums (format 1) is read, fitted, verified and repaired; it is never "stale"."""
    import needleprobe.cache.format as cache_format
    import needleprobe.cache.writer as cache_writer
    from needleprobe.cache.integrity import checksummed
    from needleprobe.extract.extract import extract
    from needleprobe.cache.inspect import cache_facts

    data, ref, rel = reference
    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", CHUNK)
    cfg_path = write_config(tmp_path, data, layers_to_probe=LAYERS)
    with monkeypatch.context() as mp:
        mp.setattr(cache_format, "CACHE_FORMAT", 1)  # the fingerprint's format
        mp.setattr(cache_writer, "CACHE_FORMAT", 1)  # and the arrays'
        assert extract(load_config(cfg_path), show_progress=False).status == "extracted"
    cache = open_cache(cfg_path)
    assert cache.format == 1 and cache.fields["cache_format"] == 1
    assert not checksummed(cache.root["train/layer_1"]) and not checksummed(cache.root["train/labels"])
    # same rows as the format-2 reference
    for s in ("train", "val"):
        np.testing.assert_array_equal(cache.split(s).to_numpy(1), open_cache(ref / "config.yaml").split(s).to_numpy(1))
    facts = cache_facts(load_config(cfg_path))
    assert facts["matches_config"] is True and facts["format"] == 1, facts["differences"]
    assert extract(load_config(cfg_path), show_progress=False).status == "up to date"
    assert main(["fit", "--config", str(cfg_path)]) == 0
    assert main(["inspect", "--config", str(cfg_path), "--verify"]) == 0
    assert "all 50 chunks verified (format 1, no checksums" in " ".join(capsys.readouterr().out.split())

    # without checksums, foreign bytes are still found when they cannot be decoded, and repaired in format 1
    good = _files(cache.path)
    _damage(cache.path / "train" / "layer_1" / "c" / "2" / "0", "random")
    assert main(["fit", "--config", str(cfg_path)]) == 2
    assert "train/layer_1 chunk 2 (rows 128–191) is damaged (cannot be decoded: ValueError" in _one_line_error(capsys)
    assert main(["extract", "--config", str(cfg_path), "--repair", "--no-progress"]) == 0
    assert _files(cache.path) == good


# ---------------------------------------------------------------------------
# a full disk


def test_too_little_free_space_is_refused_before_the_model_loads(reference, tmp_path, monkeypatch, capsys):
    import needleprobe.extract.extract as ex
    import needleprobe.extract.space as space

    data, _, _ = reference
    cfg_path = write_config(tmp_path, data, layers_to_probe=LAYERS)
    monkeypatch.setattr(space, "free_bytes", lambda path: 1000)
    with monkeypatch.context() as mp:
        mp.setattr(ex, "load_model", lambda *a, **k: pytest.fail("the model loaded before the disk check"))
        assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 2
    err = _one_line_error(capsys)
    need = re.search(r"the cache needs ([\d.]+) MiB more on disk but only 1000 B is free there", err)
    assert need and "--force" in err
    assert not (tmp_path / "cache").exists()
    assert main(["extract", "--config", str(cfg_path), "--no-progress", "--force"]) == 0
    from needleprobe.cache.inspect import dir_size

    on_disk = dir_size(open_cache(cfg_path).path) / 2**20  # what it said it needed is what it took, within 10%
    assert abs(float(need[1]) - on_disk) <= 0.1 * on_disk, (need[1], on_disk)


def _fail_chunk_writes_after(monkeypatch, k: int) -> None:
    """The k+1-th chunk written to a local Zarr store (and every later one) fails as on a full disk."""
    from zarr.storage import LocalStore

    real, count = LocalStore.set, [0]

    async def set_(self, key, value):
        if "/c/" in key:
            count[0] += 1
            if count[0] > k:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_)


def test_disk_full_mid_run_keeps_committed_rows_and_resumes(reference, tmp_path, monkeypatch, capsys):
    data, ref, rel = reference
    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", CHUNK)
    cfg_path = write_config(tmp_path, data, layers_to_probe=LAYERS)
    with monkeypatch.context() as mp:
        _fail_chunk_writes_after(mp, 10 + 2 * 3)  # train's 10 small arrays, then 3 chunks of both layers
        assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert err == (
        f"{tmp_path / rel}: disk full (No space left on device); the 192 rows committed so far are kept "
        "(train 192/351, val 0/570): free some space and run extract again to resume"
    )
    assert main(["fit", "--config", str(cfg_path)]) == 2
    assert "cache is incomplete: the last extract failed with: OSError: [Errno 28] No space left on device (at " in _one_line_error(capsys)
    assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert _files(tmp_path / rel) == _files(ref / rel, monitor=False)


def _can_mount_tmpfs(where: Path) -> str | None:
    """None when an unprivileged user + mount namespace can mount a tmpfs here; otherwise why not."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "needs Linux and unshare(1)"
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace here ({r.stderr.strip()[:200]})"


def test_real_full_disk_on_a_3_mb_tmpfs(reference, tmp_path, monkeypatch):
    """On a real 3 MB filesystem: refused up front, then (--force) a one-line disk-full error, then a resume after
    the filesystem grows gives the cache of an uninterrupted run."""
    from needleprobe.extract.extract import extract

    mnt = tmp_path / "small_disk"
    why = _can_mount_tmpfs(mnt)
    if why:
        pytest.skip(why)
    data, _, _ = reference
    layers = [0, 1, 2, 3, 4, 5]  # ~8 MB of rows
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    cfg_path = write_config(tmp_path, data, layers_to_probe=layers, cache_dir=str(mnt / "cache"))
    script = (
        'mount -t tmpfs -o size=3m tmpfs "$MNT" || exit 90\n'
        'step() { echo "=== $1" >&2; "$PY" -m needleprobe extract --config "$CFG" --no-progress $2; echo "rc=$?" >&2; }\n'
        "step refused\n"
        "step forced --force\n"
        'mount -o remount,size=64m "$MNT" || exit 91\n'
        "step resumed\n"
        'cp -a "$MNT/cache" "$OUT/cache"\n'
    )
    env = {**os.environ, "MNT": str(mnt), "PY": sys.executable, "CFG": str(cfg_path), "OUT": str(tmp_path / "out"),
           "NEEDLEPROBE_CHUNK_ROWS": CHUNK, "HF_HUB_OFFLINE": "1", **ONE_THREAD_ENV}
    (tmp_path / "out").mkdir()
    proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", CHUNK)
    with threads(1):  # while the steps run; they run one thread too: bit-identity holds for one thread configuration
        want = extract(load_config(write_config(ref_dir, data, layers_to_probe=layers)), show_progress=False)
    out, err = proc.communicate(timeout=600)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = dict(part.split("\n", 1) for part in r.stderr.split("=== ")[1:])
    refused, forced, resumed = (steps[k].strip().splitlines() for k in ("refused", "forced", "resumed"))
    assert refused[-1] == "rc=2" and forced[-1] == "rc=2" and resumed[-1] == "rc=0", r.stderr[-3000:]
    err = refused[-2]
    need = re.search(r"the cache needs ([\d.]+) MiB more on disk but only 3.0 MiB is free there", err)
    assert need and "--force" in err, err
    from needleprobe.cache.inspect import dir_size

    on_disk = dir_size(Path(want.path)) / 2**20  # ~8.5 MiB: what it said it needed is what the cache takes
    assert abs(float(need[1]) - on_disk) <= 0.1 * on_disk, (need[1], on_disk)
    err = forced[-2]
    assert err.startswith("needleprobe: error: ") and "disk full (No space left on device); the " in err, forced
    assert "rows committed so far are kept" in err and err.endswith("free some space and run extract again to resume")
    assert "Traceback" not in r.stderr
    assert any("resuming into" in line for line in resumed)
    rel = Path(want.path).relative_to(ref_dir / "cache")
    assert _files(tmp_path / "out" / "cache" / rel) == _files(Path(want.path))


# ---------------------------------------------------------------------------
# a crash is recorded as a crash


def test_a_crash_is_recorded_and_a_repairing_resume_clears_it(reference, tmp_path, monkeypatch, capsys):
    import needleprobe.extract.extract as ex

    data, ref, rel = reference
    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", CHUNK)
    cfg_path = write_config(tmp_path, data, layers_to_probe=LAYERS)
    real, calls = ex.gather_rows, [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 5 + IN_FLIGHT:  # two chunks of train are committed by then (rows are stored IN_FLIGHT batches late)
            raise RuntimeError("the device fell over")
        return real(*a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(ex, "gather_rows", failing)
        with pytest.raises(RuntimeError, match="the device fell over"):  # not a user error: its traceback stays
            main(["extract", "--config", str(cfg_path), "--no-progress"])
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg_path)]) == 2
    err = _one_line_error(capsys)
    assert "cache is incomplete: the last extract failed with: RuntimeError: the device fell over (at " in err
    assert "interrupted" not in err
    from rich.console import Console

    from needleprobe.cache.inspect import cache_summary

    con = Console(width=400, record=True, file=io.StringIO())
    con.print(cache_summary(load_config(cfg_path)))
    assert "incomplete: the last extract failed with: RuntimeError: the device fell over (at " in con.export_text()

    # a committed chunk damaged meanwhile: --repair mends it, then resumes the rest
    assert open_cache(cfg_path, allow_incomplete=True).root["train"].attrs["committed_rows"] == 2 * int(CHUNK)
    _damage(tmp_path / rel / "train" / "layer_1" / "c" / "1" / "0", "random")
    assert main(["extract", "--config", str(cfg_path), "--repair", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "repaired 1 chunk(s)" in err and "resuming into" in err
    assert open_cache(cfg_path).last_failure is None
    assert _files(tmp_path / rel) == _files(ref / rel, monitor=False)  # the record is gone from the root's attrs


def test_ctrl_c_is_still_an_interruption(reference, tmp_path, monkeypatch, capsys):
    import needleprobe.extract.extract as ex

    data, _, _ = reference
    cfg_path = write_config(tmp_path, data, layers_to_probe=[1])
    real, calls = ex.gather_rows, [0]

    def interrupted(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex, "gather_rows", interrupted)
    assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 130
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg_path)]) == 2
    assert "cache is incomplete (an extract was interrupted: run extract again to resume)" in _one_line_error(capsys)
