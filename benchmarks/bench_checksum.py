#!/usr/bin/env python
"""What the crc32c chunk checksums cost: ``extract`` (and reading the cache back) with and without them.

    .venv/bin/python benchmarks/bench_checksum.py [--reps 5] [--config configs/demo.yaml]

The demo config (embedded MiniLM, the demo data written to a temporary
directory), extracted into a fresh cache ``reps`` times in cache format 2
(checksums, every chunk stored) and ``reps`` times in format 1 (no checksums),
interleaved; each time also the whole cache read back with ``to_numpy`` (all
layers, both splits).  Prints the medians and the ratio; the target is under
3% of extraction time.  Times are ``ExtractResult.seconds`` (the stage, without
Python's imports) in this one process.

On a shared machine whole-extract times vary by more than the effect, so the
checksum's own work is also timed directly: the seconds spent in the crc32c
codec while encoding (on the writer thread) and in ``ChunkStream._write`` (all
Zarr chunk writes), summed per run, as a share of that run's extract time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import needleprobe.cache.format as cache_format  # noqa: E402
import needleprobe.cache.writer as cache_writer  # noqa: E402
from zarr.codecs import Crc32cCodec  # noqa: E402
from needleprobe import open_cache  # noqa: E402
from needleprobe.config import load_config  # noqa: E402
from needleprobe.data.demo import write_demo_dataset  # noqa: E402
from needleprobe.extract.extract import extract  # noqa: E402


SPENT = {"crc32c": 0.0, "chunk writes": 0.0}


def _timed(cls, name: str, key: str) -> None:
    real = getattr(cls, name)

    def inner(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            SPENT[key] += time.perf_counter() - t

    setattr(cls, name, inner)


_timed(Crc32cCodec, "_encode_sync", "crc32c")
_timed(cache_writer.ChunkStream, "_write", "chunk writes")


def one_run(cfg_path: Path, fmt: int) -> tuple[float, float, float, float, float]:
    """(extract wall s, its process CPU s, read-back s, s in crc32c encoding, s in chunk writes) for a fresh cache."""
    for k in SPENT:
        SPENT[k] = 0.0
    cfg = load_config(cfg_path)
    shutil.rmtree(cfg.probe.cache_dir, ignore_errors=True)
    saved = cache_format.CACHE_FORMAT
    cache_format.CACHE_FORMAT = cache_writer.CACHE_FORMAT = fmt  # the fingerprint's format and the arrays'
    try:
        cpu = time.process_time()
        res = extract(cfg, show_progress=False)
        cpu = time.process_time() - cpu
    finally:
        cache_format.CACHE_FORMAT = cache_writer.CACHE_FORMAT = saved
    assert res.status == "extracted", res.status
    spent = dict(SPENT)
    cache = open_cache(cfg)
    assert cache.format == fmt
    t = time.perf_counter()
    for split in cache.splits:
        view = cache.split(split)
        for layer in cache.layers:
            view.to_numpy(layer)
    return res.seconds, cpu, time.perf_counter() - t, spent["crc32c"], spent["chunk writes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-checksum-") as tmp:
        tmp = Path(tmp)
        raw = yaml.safe_load(Path(args.config).read_text())
        raw["dataset"]["path"] = str(write_demo_dataset(tmp / "demo.jsonl"))
        raw["probe"].update(cache_dir=str(tmp / "cache"), device="cpu")
        cfg_path = tmp / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        one_run(cfg_path, 2)  # warm-up: imports, file caches
        times: dict[int, list[tuple[float, ...]]] = {1: [], 2: []}
        for i in range(args.reps):
            for fmt in ((2, 1) if i % 2 else (1, 2)):
                times[fmt].append(one_run(cfg_path, fmt))
                wall, cpu, read, crc, writes = times[fmt][-1]
                print(f"rep {i} format {fmt}: extract {wall:.2f} s wall, {cpu:.2f} s CPU; read back {read:.3f} s; "
                      f"crc32c encode {1e3 * crc:.1f} ms, chunk writes {1e3 * writes:.1f} ms", flush=True)
        med = {f: [statistics.median(x[k] for x in t) for k in range(5)] for f, t in times.items()}
        print(f"\nmedians over {args.reps} runs each (layers {raw['probe']['layers_to_probe']}, demo data):")
        for k, what in enumerate(("extract, wall", "extract, CPU (all threads)", "read back (to_numpy, every layer and split)")):
            print(f"  {what}: format 1 (no checksums) {med[1][k]:.3f} s, format 2 (crc32c) {med[2][k]:.3f} s, "
                  f"cost {100 * (med[2][k] / med[1][k] - 1):+.1f}%")
        share = statistics.median(x[3] / x[0] for x in times[2])
        extra = med[2][4] - med[1][4]
        print(f"  crc32c encoding (writer thread): median {1e3 * med[2][3]:.1f} ms per extract = {100 * share:.2f}% of its wall time")
        print(f"  all chunk writes (writer thread): format 1 {1e3 * med[1][4]:.1f} ms, format 2 {1e3 * med[2][4]:.1f} ms "
              f"(+{1e3 * extra:.1f} ms = {100 * extra / med[1][0]:.2f}% of format 1's extract time)")


if __name__ == "__main__":
    main()
