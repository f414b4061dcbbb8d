#!/usr/bin/env python
"""A multi-site extract against a single-site one of the same layers: the cost of more sites from one forward.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_site_extract.py [--reps 3] [--docs 120]

On the offline demo data (the first ``--docs`` train and a third as many val
documents), the embedded MiniLM, layers 2 and 4, float32, one torch thread
(a shared machine): ``extract()`` into a fresh cache with ``activation_site:
resid_post``, then with every site BERT has (resid_pre, resid_mid,
resid_post), in alternating order, ``--reps`` times each.  Reported: the
median of each repetition's own time ratio multi / single (target ≤ 1.1), and
whether the multi-site run's resid_post cache is the single-site cache byte
for byte.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

from needleprobe.config import load_config  # noqa: E402
from needleprobe.data.demo import write_demo_dataset  # noqa: E402
from needleprobe.extract.extract import extract  # noqa: E402
from needleprobe.run.layout import Layout  # noqa: E402

SITES = ["resid_pre", "resid_mid", "resid_post"]


def config(tmp: Path, data: Path, sites, docs: int) -> Path:
    raw = {
        "dataset": {"name": "bench", "version": "v1", "path": str(data)},
        "model": {"name": "embedded:all-MiniLM-L6-v2", "max_length": 512},
        "probe": {"layers_to_probe": [2, 4], "negatives_per_doc": 32, "model_dtype": "float32",
                  "feature_dtype": "float32", "device": "cpu", "doc_batch_size": 8, "activation_site": sites,
                  "max_train_docs": docs, "max_val_docs": max(1, docs // 3), "cache_dir": str(tmp / "cache")},
    }
    path = tmp / f"{'-'.join(sites) if isinstance(sites, list) else sites}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "zarr.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--docs", type=int, default=120, help="train documents (val: a third as many)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = write_demo_dataset(tmp / "d.jsonl")
        single, multi = config(tmp, data, "resid_post", args.docs), config(tmp, data, SITES, args.docs)
        extract(load_config(single), show_progress=False)  # warm-up: weights and files in the page cache
        shutil.rmtree(tmp / "cache")
        ratios, times = [], {"single": [], "multi": []}
        same = True
        for rep in range(args.reps):
            order = ("single", "multi") if rep % 2 == 0 else ("multi", "single")
            took = {}
            for which in order:
                shutil.rmtree(tmp / "cache", ignore_errors=True)
                cfg = load_config(single if which == "single" else multi)
                t0 = time.perf_counter()
                extract(cfg, show_progress=False)
                took[which] = time.perf_counter() - t0
                if which == "multi":
                    shutil.copytree(Layout.from_config(cfg.for_site("resid_post")).cache, tmp / "multi_post", dirs_exist_ok=True)
                else:
                    shutil.copytree(Layout.from_config(cfg).cache, tmp / "single_post", dirs_exist_ok=True)
            same = same and files(tmp / "multi_post") == files(tmp / "single_post")
            shutil.rmtree(tmp / "multi_post")
            shutil.rmtree(tmp / "single_post")
            for k, v in took.items():
                times[k].append(v)
            ratios.append(took["multi"] / took["single"])
        print(f"MiniLM-L6, layers 2 and 4, {args.docs} train + {max(1, args.docs // 3)} val demo documents, "
              f"1 torch thread, {args.reps} alternating repetitions (medians)")
        print("| extract | seconds |")
        print("|---|---|")
        print(f"| 1 site (resid_post) | {statistics.median(times['single']):.2f} |")
        print(f"| 3 sites ({', '.join(SITES)}) | {statistics.median(times['multi']):.2f} |")
        r = statistics.median(ratios)
        print(f"\nmulti / single: {r:.3f} (target ≤ 1.1) {'PASS' if r <= 1.1 else 'FAIL'}; "
              f"resid_post cache the same bytes: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
