#!/usr/bin/env python
"""Out-of-core fit benchmark: exact L-BFGS with a layer several times the memory budget, against the in-memory fit.

    .venv/bin/python benchmarks/bench_out_of_core.py [--n 40000] [--d 1536] [--budget 96MB]

A synthetic cache (``synthetic_cache.py``: bfloat16, 4 MiB chunks, ~57 rows per
document) is written once under ``build/bench-fit/``.  Each fit runs in a child
process of its own, so its peak RSS (``VmHWM``) is its own:

* ``in memory``: ``fit.lbfgs_layer`` (the whole layer in float32);
* ``out of core``: ``streaming.streamed_fit_data`` with ``--budget`` (rows read
  from the cache at every pass, the next block prefetched);
* ``2-process``: the out-of-core fit under ``torchrun --nproc-per-node 2``
  (gloo): each process its contiguous share of the rows within ``--budget``,
  the sums over rows all-reduced (rank 0's time and RSS; bytes of both);
* ``read``: three passes of the same reader over the train rows, no solver
  (the cache's read speed, decoding included: the floor of a streamed pass).

Reported: seconds, passes, time per pass, bytes read, the RSS growth over the
child's RSS after imports (against the budget), and the largest val-AUROC
difference over the grid, the selected L2 and the weights' relative difference.
The cache was just written, so its file pages are usually in the page cache:
``read`` is then memory-speed decoding, not the disk.

``--s3`` repeats the out-of-core fit and the reader with the cache copied to a
local S3-compatible endpoint (``local_s3.py``: moto's server on localhost,
reached through s3fs as a real bucket is): time per pass and bytes per pass
against the same cache on local disk.  moto answers from memory over
loopback, so this measures the client path's cost per request and per byte
(HTTP, signing, zarr's concurrent chunk reads), not a data centre's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
READ_PASSES = 3


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def child(mode: str, path: str, budget: str) -> None:
    """One measurement, printed as one JSON line."""
    from needleprobe.io.runtime import fit_settings, one_malloc_arena

    one_malloc_arena()  # as ``needleprobe fit`` does
    import numpy as np
    import torch

    from needleprobe import open_cache
    from needleprobe.config import parse_bytes
    from needleprobe.fit.fit import lbfgs_layer
    from needleprobe.fit.probe import fit_grid
    from needleprobe.fit.plan import Budget, choose
    from needleprobe.fit.streaming import LayerRows, streamed_fit_data

    cache = open_cache(path)
    cpu = torch.device("cpu")
    comm = None
    if mode == "2-process":  # one of torchrun's processes: its contiguous share of the rows, sums all-reduced
        from needleprobe.fit.comm import FitComm
        from needleprobe.io.processes import Dist

        dist = Dist.from_env()
        comm = FitComm(dist, cpu)
    base = _rss()["VmRSS"]
    t0 = time.perf_counter()
    rec: dict = {"mode": mode}
    with fit_settings():
        if mode == "read":
            train = cache.split("train")
            choice = choose("auto", cache, 0, cpu, Budget(parse_bytes(budget), "bench"))
            rows = LayerRows(train, 0, 0, train.n_rows, block_rows=choice.plan.block_rows,
                             piece_rows=choice.plan.piece_rows, check_stored=False)  # as a fit's passes
            sum(b.shape[0] for _, b in rows.blocks())
            t0 = time.perf_counter()  # after a first pass (thread and buffer start-up), three timed ones
            for _ in range(READ_PASSES):
                n = sum(b.shape[0] for _, b in rows.blocks())
            rows.close()
            rec.update(rows=n, bytes_read=rows.stats.bytes_read // (READ_PASSES + 1) * READ_PASSES)
        else:
            if mode == "memory":
                data = lbfgs_layer(cache, 0, GRID, cpu)
            else:
                choice = choose("auto", cache, 0, cpu, Budget(parse_bytes(budget), "bench"), comm)
                rec.update(solver=choice.solver, held_rows=choice.plan.held_rows, block_rows=choice.plan.block_rows)
                data = streamed_fit_data(cache, 0, GRID, cpu, choice, comm)
            r = fit_grid(data, GRID, "weighted", 0)
            rec.update(val_auroc=[x["val_auroc"] for x in r["l2_results"]], n_iter=[x["n_iter"] for x in r["l2_results"]],
                       selected_l2=r["selected_l2"], weight=np.asarray(r["weight"], np.float64).tolist())
            if data.io is not None:
                rec.update(passes=data.io.passes, bytes_read=data.io.bytes_read, bytes_per_pass=data.io.pass_bytes,
                           wait_s=data.io.wait_seconds)
    rec.update(seconds=time.perf_counter() - t0, rss_growth=_rss()["VmHWM"] - base, rss_base=base)
    if comm is not None:  # bytes over both processes (held rows: rank 0's); rank 0 reports
        total = comm.allsum(np.array([rec["bytes_read"], rec["bytes_per_pass"]], dtype=np.int64))
        rec.update(bytes_read=int(total[0]), bytes_per_pass=int(total[1]))
        last = comm.dist.rank != 0
        comm.dist.close()
        if last:
            return
    print(json.dumps(rec))


def synthetic(n: int, n_val: int, d: int) -> Path:
    path = ROOT / "build" / "bench-fit" / f"ooc-{n}x{d}"
    if not (path / "zarr.json").exists():
        from synthetic_cache import write_synthetic_cache

        write_synthetic_cache(path, n, n_val, d, feature_dtype="bfloat16")
    return path


def measure(mode: str, path: str, budget: str, env: dict | None = None) -> dict:
    """One child process's measurement (its own RSS; ``env`` points it at an S3 endpoint)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] \
        if mode == "2-process" else [sys.executable]
    r = subprocess.run([*launch, __file__, "--child", mode, path, budget], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if r.returncode:
        sys.exit(f"{mode} on {path}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(n: int, n_val: int, d: int, budget: str) -> list[str]:
    import numpy as np

    from needleprobe.config import parse_bytes
    from needleprobe.io.console import human_bytes

    path = synthetic(n, n_val, d)
    layer_bytes = (n + n_val) * d * 4
    out = [f"synthetic cache: {n:,} train + {n_val:,} val rows × {d} (bfloat16 on disk, {human_bytes((n + n_val) * d * 2)}; "
           f"{human_bytes(layer_bytes)} in float32), budget {budget} ({layer_bytes / parse_bytes(budget):.1f}× smaller "
           f"than the layer)", "",
           "| fit | wall | passes | per pass | read | RSS growth | max val-AUROC diff | L2 | weights rel. diff |",
           "|---|---|---|---|---|---|---|---|---|"]
    got = {}
    for mode in ("memory", "out-of-core", "2-process", "read"):
        got[mode] = measure(mode, str(path), budget)
    mem, ooc, rd, two = got["memory"], got["out-of-core"], got["read"], got["2-process"]
    passes = ooc["passes"]
    def against_memory(other: dict) -> tuple[float, float]:
        """(largest val-AUROC difference over the grid, the weights' relative difference) from the in-memory fit."""
        wm = np.array(mem["weight"])
        return (max(abs(a - b) for a, b in zip(mem["val_auroc"], other["val_auroc"])),
                float(np.abs(wm - np.array(other["weight"])).max() / np.abs(wm).max()))

    diff, rel = against_memory(ooc)
    out.append(f"| in memory | {mem['seconds']:.1f} s | ({passes} by the same iterations) | "
               f"{1e3 * mem['seconds'] / passes:.0f} ms | – | {human_bytes(mem['rss_growth'])} | – | {mem['selected_l2']:g} | – |")
    out.append(f"| out of core | {ooc['seconds']:.1f} s | {passes} | {1e3 * ooc['seconds'] / passes:.0f} ms | "
               f"{human_bytes(ooc['bytes_read'])} ({human_bytes(ooc['bytes_per_pass'])} per pass; solver waited "
               f"{ooc['wait_s']:.1f} s) | {human_bytes(ooc['rss_growth'])} | {diff:.1e} | {ooc['selected_l2']:g} | {rel:.1e} |")
    diff2, rel2 = against_memory(two)
    out.append(f"| 2 processes (torchrun, gloo), {budget} each | {two['seconds']:.1f} s | {two['passes']} | "
               f"{1e3 * two['seconds'] / two['passes']:.0f} ms | {human_bytes(two['bytes_read'])} "
               f"({human_bytes(two['bytes_per_pass'])} per pass, both processes; {two['held_rows']:,} rows held by "
               f"rank 0) | {human_bytes(two['rss_growth'])} (rank 0) | {diff2:.1e} | {two['selected_l2']:g} | {rel2:.1e} |")
    per = rd["seconds"] / READ_PASSES
    out.append(f"| read only (the reader, no solver) | {rd['seconds']:.2f} s | {READ_PASSES} | {1e3 * per:.0f} ms | "
               f"{human_bytes(rd['bytes_read'])} ({rd['bytes_read'] / rd['seconds'] / 1e6:.0f} MB/s) | "
               f"{human_bytes(rd['rss_growth'])} | | | |")
    out += ["", f"held rows {ooc['held_rows']:,} of {n:,}, blocks of {ooc['block_rows']:,} rows; iterations per L2 "
            f"{ooc['n_iter']} (in memory {mem['n_iter']}); child RSS after imports {human_bytes(ooc['rss_base'])}"]
    return out


def run_s3(n: int, n_val: int, d: int, budget: str) -> list[str]:
    """The same out-of-core fit and reader on local disk and from a bucket: per pass, time and bytes."""
    from local_s3 import LocalS3

    from needleprobe.io.console import human_bytes

    path = synthetic(n, n_val, d)
    with LocalS3() as s3:
        t0 = time.perf_counter()
        s3.filesystem().put(str(path), f"{s3.bucket}/ooc", recursive=True)
        upload = time.perf_counter() - t0
        url = f"{s3.bucket_url}/ooc"
        got = {(where, mode): measure(mode, src, budget, env)
               for where, src, env in (("local disk", str(path), None), ("S3 (moto, localhost)", url, s3.env))
               for mode in ("out-of-core", "read")}
    out = [f"synthetic cache: {n:,} train + {n_val:,} val rows × {d} (bfloat16, {human_bytes((n + n_val) * d * 2)}), "
           f"budget {budget}; copied to the bucket in {upload:.1f} s", "",
           "| store | fit | passes | per pass | read per pass | read in all | reader alone per pass | reader speed |",
           "|---|---|---|---|---|---|---|---|"]
    for where in ("local disk", "S3 (moto, localhost)"):
        ooc, rd = got[(where, "out-of-core")], got[(where, "read")]
        per_read = rd["seconds"] / READ_PASSES
        out.append(f"| {where} | {ooc['seconds']:.1f} s | {ooc['passes']} | {1e3 * ooc['seconds'] / ooc['passes']:.0f} ms | "
                   f"{human_bytes(ooc['bytes_per_pass'])} | {human_bytes(ooc['bytes_read'])} | {1e3 * per_read:.0f} ms | "
                   f"{rd['bytes_read'] / rd['seconds'] / 1e6:.0f} MB/s |")
    local, remote = got[("local disk", "out-of-core")], got[("S3 (moto, localhost)", "out-of-core")]
    same = local["weight"] == remote["weight"] and local["val_auroc"] == remote["val_auroc"]
    out += ["", f"time per pass, S3 / local disk: {remote['seconds'] / remote['passes'] / (local['seconds'] / local['passes']):.1f}×; "
            f"same bytes per pass: {local['bytes_per_pass'] == remote['bytes_per_pass']}; "
            f"the same probe from both: {same}"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40_000, help="train rows")
    ap.add_argument("--n-val", type=int, default=8_000)
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--budget", default="96MB", help="--fit-memory of the out-of-core fit")
    ap.add_argument("--s3", action="store_true", help="the out-of-core fit and the reader from a local S3 endpoint "
                    "against local disk, instead of the in-memory comparison")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CACHE", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    lines = (run_s3 if args.s3 else run)(args.n, args.n_val, args.d, args.budget)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
