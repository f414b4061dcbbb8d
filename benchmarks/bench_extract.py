#!/usr/bin/env python
"""Extraction throughput: a naive Hugging Face loop vs needleprobe's forward vs ``extract()``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_extract.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]

Measured on the same documents and model, in one run, as tokens/s (real
tokens: no padding, train + val, the splits extract processes):

(a) naive   one document per forward, ``output_hidden_states=True``, every layer
            (decoders loaded with ``AutoModelForCausalLM``, so the LM head and the
            full-vocabulary logits are computed, as a naive script would; BERT
            with ``AutoModel``).  Inputs are tokenized and on the device before
            the timer starts.
(b) forward needleprobe's batches (``plan_batches``, ``bucket_length``, right
            padding, ``model_inputs``) through ``capture``/``run_forward`` with the
            early stop at the highest probed layer; stores nothing, inputs built
            before the timer starts.
(c) extract ``needleprobe.extract.extract(cfg)`` end to end on a fresh cache dir.
            c' is the same call minus the model, tokenizer and model-config
            loading it does, timed inside that call (wrappers on
            ``needleprobe.extract.load_model`` / ``load_tokenizer`` /
            ``model_shape``, which add microseconds).

Repetitions are interleaved (a, b, c, a, b, c, ...) because the machine is
shared: tokens/s are medians, ratios are the median of each repetition's own
ratio (its measurements ran back to back), from wall time and, as a cross-check
that a busy machine disturbs far less, from process CPU time.  doc_batch_size 8
and 16 are both run (16 is skipped when its batch plan equals 8's).  Peak RSS of
``needleprobe extract`` (a child process per run) is measured at 1x and 4x the
documents.  On CPU, torch runs one thread unless ``--threads`` says otherwise
(see its help).  ``--profile`` adds a cProfile of one extract() per case,
``--progress`` times extract() with its progress bar too.

Cases: the embedded MiniLM (6 blocks) probed at [2] and at [5]; a random model
of gemma-3-270m's shape (18 blocks, vocab 262144; built once into
$TMPDIR/needleprobe-bench-models) probed at [6].  Documents: the first train
and val documents of the demo data (120 for MiniLM, 4 for the Gemma shape,
whose naive loop computes 262144-way logits; ``--scale`` multiplies them).

Targets: c'/b >= 0.9;  c'/a >= 0.9 * n_layers / (highest probed layer + 1);
RSS(4x)/RSS(1x) <= 1.2.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models.make_tokenizer

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import needleprobe.extract as npx  # noqa: E402
from needleprobe.config import EMBEDDED_MODEL, ModelConfig, load_config  # noqa: E402
from needleprobe.data import by_split, load_documents  # noqa: E402
from needleprobe.demo_data import build_demo_documents  # noqa: E402
from needleprobe.hooks import (  # noqa: E402
    capture,
    find_blocks,
    load_model,
    load_tokenizer,
    model_inputs,
    model_location,
    run_forward,
)
from needleprobe.records import console  # noqa: E402
from needleprobe.tokens import apply_caps, bucket_length, plan_batches, tokenize_documents  # noqa: E402

FIT_SPLITS = ("train", "val")

GEMMA_SHAPE = dict(
    hidden_size=640,
    num_hidden_layers=18,
    intermediate_size=2048,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    vocab_size=262144,
    sliding_window=512,
    max_position_embeddings=32768,
)


# ---------------------------------------------------------------------------
# setup


def pick_docs(all_docs: list[dict], n_train: int, n_val: int) -> list[dict]:
    """The first N train and M val demo documents; each split keeps at least one needle document."""
    out = []
    for split, n in (("train", n_train), ("val", n_val)):
        pool = [d for d in all_docs if d["split"] == split]
        take = pool[:n]
        if not any(d["needle_spans"] for d in take):
            first = next(d for d in pool if d["needle_spans"])
            take[-1] = first
        out += take
    return out


def repeat_docs(docs: list[dict], k: int) -> list[dict]:
    """k copies of each document with new doc_ids (same split), copy-major."""
    return [dict(d, doc_id=f"{d['doc_id']}-r{r}") for r in range(k) for d in docs]


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def write_config(path: Path, work: Path, data: Path, model: str, layers: list[int], max_length: int,
                 device: str, dtype: str, batch: int) -> Path:
    cfg = {
        "dataset": {"name": "bench", "version": "v1", "path": str(data), "val_fraction": 0.2},
        "model": {"name": model, "max_length": max_length},
        "probe": {
            "layers_to_probe": layers,
            "negatives_per_doc": 32,
            "device": device,
            "model_dtype": dtype,
            "feature_dtype": "float32",
            "doc_batch_size": batch,
            "cache_dir": str(work / "cache"),
            "output_dir": str(work / "probes"),
            "run_record_dir": str(work / "run_records"),
        },
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def gemma_shaped_model(root: Path) -> Path:
    """A random model of gemma-3-270m's shape (Gemma3ForCausalLM, seed 0) with the tiny BPE tokenizer.

    Built once and reused from ``root`` (building and saving takes ~15 s on 2 cores).
    """
    import transformers as tf
    from tiny_models import make_tokenizer

    out = root / "gemma3-270m-shape-seed0"
    marker = out / "bench_complete.json"
    spec = dict(GEMMA_SHAPE, transformers=tf.__version__)
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    if out.exists():
        shutil.rmtree(out)
    make_tokenizer(out)
    tok = tf.AutoTokenizer.from_pretrained(out)
    config = tf.Gemma3TextConfig(
        **GEMMA_SHAPE,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(config).eval()
    model.save_pretrained(out)
    del model
    marker.write_text(json.dumps(spec))
    return out


@dataclass
class Case:
    key: str
    title: str
    model: str  # needleprobe model.name
    layers: list[int]
    n_layers: int
    max_length: int
    decoder: bool
    data: Path
    group: str  # cases of one group share the model, documents and the naive measurement


# ---------------------------------------------------------------------------
# the three measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Every tensor the benchmark hands to a model is made here, on the benchmark's device."""
    return torch.from_numpy(array).to(device)


def naive_inputs(tdocs: dict[str, list], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """(a)'s inputs: one unpadded document per forward, on ``device`` before the timer starts, as (b)'s are."""
    out = []
    for name in FIT_SPLITS:
        for td in tdocs[name]:
            ids = on_device(td.input_ids[None], device)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def batch_inputs(model, tdocs: dict[str, list], pad_id: int, batch_size: int,
                 device: torch.device) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """(b)'s inputs: needleprobe's batches (``plan_batches``, ``bucket_length``, right padding, ``model_inputs``)
    on ``device``, and the plan's shape."""
    inputs, sizes, padded, tokens = [], [], 0, 0
    for name in FIT_SPLITS:
        docs = tdocs[name]
        _, batches = plan_batches([td.n_tokens for td in docs], batch_size, None)
        for batch in batches:
            lens = [docs[i].n_tokens for i in batch]
            T = bucket_length(max(lens))
            ids = np.full((len(batch), T), pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), T), dtype=np.int64)
            for j, i in enumerate(batch):
                ids[j, : lens[j]] = docs[i].input_ids
                mask[j, : lens[j]] = 1
            inputs.append(model_inputs(model, on_device(ids, device), on_device(mask, device)))
            sizes.append(len(batch))
            padded += ids.size
            tokens += sum(lens)
    info = {"batches": len(sizes), "mean_docs": statistics.mean(sizes), "max_docs": max(sizes),
            "pad_frac": 1 - tokens / padded, "tokens": tokens}
    return inputs, info


def tokenized_splits(case: Case) -> tuple[dict[str, list], Any]:
    """needleprobe's tokenization of the case's train and val documents (what extract feeds the model)."""
    mc = ModelConfig(name=case.model, max_length=case.max_length)
    tok = load_tokenizer(mc)
    splits = by_split(load_documents(case.data, 0.2))
    return {name: apply_caps(tokenize_documents(tok, splits[name], case.max_length, False), None, None) for name in FIT_SPLITS}, tok


class Naive:
    """(a): one document per forward, all hidden states, LM head for decoders."""

    def __init__(self, case: Case, tdocs: dict[str, list], device: torch.device, dtype: str):
        from transformers import AutoModel, AutoModelForCausalLM

        from needleprobe.hooks import TORCH_DTYPES

        cls = AutoModelForCausalLM if case.decoder else AutoModel
        where = model_location(ModelConfig(name=case.model))
        self.model = cls.from_pretrained(where, dtype=TORCH_DTYPES[dtype]).to(device).eval()
        self.model_class = type(self.model).__name__
        self.device = device
        self.inputs = naive_inputs(tdocs, device)
        self.tokens = sum(int(x["input_ids"].shape[1]) for x in self.inputs)

    def warm_up(self) -> None:
        """One untimed forward (first-call allocator / kernel selection)."""
        with torch.inference_mode():
            self.model(**self.inputs[-1], output_hidden_states=True)
        sync(self.device)

    def run(self) -> tuple[float, float]:
        t, tc = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for enc in self.inputs:
                out = self.model(**enc, output_hidden_states=True)
                del out
        sync(self.device)
        return time.perf_counter() - t, time.process_time() - tc


class Forward:
    """(b): needleprobe's batches through capture/run_forward with the early stop; nothing stored."""

    def __init__(self, case: Case, tdocs: dict[str, list], pad_id: int, device: torch.device, dtype: str):
        self.model = load_model(ModelConfig(name=case.model, max_length=case.max_length), dtype, device)
        self.blocks = find_blocks(self.model)
        self.device = device
        self.tdocs = tdocs
        self.pad_id = pad_id
        self.plans: dict[int, tuple[list, dict]] = {}

    def plan(self, batch_size: int) -> tuple[list, dict[str, Any]]:
        """Device inputs of every batch (built once per batch size) and the plan's shape."""
        if batch_size not in self.plans:
            self.plans[batch_size] = batch_inputs(self.model, self.tdocs, self.pad_id, batch_size, self.device)
        return self.plans[batch_size]

    def warm_up(self, layers: list[int]) -> None:
        """One untimed pass over batch 8's plan (first-call allocator / kernel selection)."""
        self.run(layers, 8)

    def run(self, layers: list[int], batch_size: int) -> tuple[float, float]:
        inputs, _ = self.plan(batch_size)
        t, tc = time.perf_counter(), time.process_time()
        with torch.inference_mode(), capture(self.blocks, layers) as cap:
            for inp in inputs:
                acts = run_forward(self.model, cap, inp)
                del acts
        sync(self.device)
        return time.perf_counter() - t, time.process_time() - tc


# -- (c) -------------------------------------------------------------------

LOAD_PARTS = ("load_model", "load_tokenizer", "model_shape")
LOOP_NAMES = ("run_batches", "_run_split")  # extract's per-split batch loop (renamed during a refactor)
LOOP_KEY = "batch loop"


@contextlib.contextmanager
def instrumented(device: torch.device):
    """Time the stages of extract() by wrapping the names it looks up in its module (src untouched)."""
    times: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def wrap(name: str, fn: Callable, do_sync: bool = False) -> Callable:
        def inner(*a, **k):
            t, tc = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                if do_sync:
                    sync(device)
                times[name] += time.perf_counter() - t
                times[name + "#cpu"] += time.process_time() - tc
                calls[name] += 1

        inner.__wrapped_module__ = fn.__module__
        return inner

    base_stream = getattr(npx, "ChunkStream", object)

    class TimedStream(base_stream):
        def add(self, rows):
            t = time.perf_counter()
            try:
                return super().add(rows)
            finally:
                times["stream.add"] += time.perf_counter() - t
                calls["stream.add"] += 1

        def close(self):
            t = time.perf_counter()
            try:
                return super().close()
            finally:
                times["stream.close"] += time.perf_counter() - t
                calls["stream.close"] += 1

    # Names are looked up in extract's module at call time, so rebinding them there times each stage.
    # Only names that exist are wrapped (extract.py is being refactored); the batch loop's helpers are
    # rebound in whichever module defines the loop.
    patched: list[tuple[Any, str, Any]] = []

    def patch(mod, name: str, new) -> None:
        patched.append((mod, name, getattr(mod, name)))
        setattr(mod, name, new)

    for name in LOOP_NAMES + ("load_model", "load_tokenizer", "model_shape", "tokenize_documents", "plan_split",
                              "gather_rows", "load_documents", "file_sha256", "versions"):
        if callable(getattr(npx, name, None)):
            patch(npx, name, wrap(LOOP_KEY if name in LOOP_NAMES else name, getattr(npx, name)))
    loop = next((getattr(npx, n) for n in LOOP_NAMES if hasattr(npx, n)), None)
    loop_mod = sys.modules[loop.__wrapped_module__] if loop is not None else npx
    for name in ("model_inputs", "run_forward"):
        if callable(getattr(loop_mod, name, None)):
            patch(loop_mod, name, wrap(name, getattr(loop_mod, name), do_sync=(name == "run_forward")))
    if hasattr(npx, "ChunkStream"):
        patch(npx, "ChunkStream", TimedStream)
    try:
        yield times, calls
    finally:
        for mod, name, old in reversed(patched):
            setattr(mod, name, old)


def run_extract(cfg_path: Path, device: torch.device, show_progress: bool = False, profile: cProfile.Profile | None = None):
    """One extract() on a fresh cache dir; returns (total seconds, stage times, result)."""
    cfg = load_config(cfg_path)
    shutil.rmtree(cfg.probe.cache_dir, ignore_errors=True)
    with instrumented(device) as (times, calls):
        if profile is not None:
            profile.enable()
        t, tc = time.perf_counter(), time.process_time()
        res = npx.extract(cfg, show_progress=show_progress)
        total = time.perf_counter() - t
        times["total#cpu"] = time.process_time() - tc
        if profile is not None:
            profile.disable()
    assert res.status == "extracted", res.status
    shutil.rmtree(cfg.probe.cache_dir, ignore_errors=True)
    return total, dict(times), dict(calls), res


# ---------------------------------------------------------------------------
# peak RSS of the CLI

_RSS_HELPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "sys.stderr.write(r.stderr[-2000:] if r.returncode else '')\n"
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def peak_rss_kib(cfg_path: Path, threads: int | None) -> tuple[int, float]:
    """Peak RSS (KiB) of one `needleprobe extract` run, read by a fresh helper process, and its wall time."""
    cfg = load_config(cfg_path)
    shutil.rmtree(cfg.probe.cache_dir, ignore_errors=True)
    exe = Path(sys.executable).with_name("needleprobe")
    cmd = [str(exe), "extract", "--config", str(cfg_path), "--no-progress"] if exe.exists() else \
        [sys.executable, "-m", "needleprobe", "extract", "--config", str(cfg_path), "--no-progress"]
    t = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    out = subprocess.run([sys.executable, "-c", _RSS_HELPER, *cmd], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    rc, kib = out.stdout.split()[-2:]
    if int(rc) != 0:
        raise RuntimeError(f"needleprobe extract failed (rc {rc}):\n{out.stderr}")
    shutil.rmtree(cfg.probe.cache_dir, ignore_errors=True)
    return int(kib), wall


# ---------------------------------------------------------------------------
# driver


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x == x else "–"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few documents, one repetition: a smoke run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype (features stay float32)")
    ap.add_argument("--reps", type=int, help="interleaved repetitions (default 3, --quick 1)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the document counts (e.g. 8 on a GPU)")
    ap.add_argument("--cases", default="minilm,gemma", help="comma list of case groups: minilm, gemma")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS runs")
    ap.add_argument("--profile", action="store_true", help="cProfile one extract() per case and print the top functions")
    ap.add_argument("--progress", action="store_true",
                    help="also time extract() with its progress bar shown (bs 8, right after each plain run; paired ratio)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads, also given to the extract child processes as OMP_NUM_THREADS (default 1 "
                    "on --device cpu; 0 = torch's own choice). On a busy shared machine torch's default (one thread "
                    "per core) makes OpenMP threads wait on each other: measured 5-17x slower and erratic on 2 cores")
    ap.add_argument("--work", help="working directory (default: a fresh temp dir, removed at the end)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.quick else 3)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    groups = [g.strip() for g in args.cases.split(",") if g.strip()]
    console().quiet = True  # extract's own messages would interleave with the table
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="needleprobe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_root = Path(tempfile.gettempdir()) / "needleprobe-bench-models"
    model_root.mkdir(parents=True, exist_ok=True)

    def n(x: int) -> int:
        return max(1, round(x * args.scale))

    all_docs = build_demo_documents(0)
    # sizes: MiniLM ~190 tokens/doc, the Gemma-shaped model's tiny BPE ~560 tokens/doc
    sizes = {"minilm": (n(6), n(2)) if args.quick else (n(96), n(24)),
             "gemma": (n(1), n(1)) if args.quick else (n(3), n(1))}
    cases: list[Case] = []
    if "minilm" in groups:
        data = write_jsonl(work / "minilm.jsonl", pick_docs(all_docs, *sizes["minilm"]))
        for layers in ([2], [5]):
            cases.append(Case(f"minilm-L{layers[0]}", "MiniLM-L6 (BERT)", EMBEDDED_MODEL, layers, 6, 512, False, data, "minilm"))
    if "gemma" in groups:
        t = time.perf_counter()
        gdir = gemma_shaped_model(model_root)
        print(f"gemma-3-270m-shaped random model ready in {time.perf_counter() - t:.1f} s ({gdir})", file=sys.stderr)
        data = write_jsonl(work / "gemma.jsonl", pick_docs(all_docs, *sizes["gemma"]))
        cases.append(Case("gemma-L6", "Gemma-3-270m shape (random)", str(gdir), [6], 18, 1024, True, data, "gemma"))

    batch_sizes = [8, 16]
    skipped: list[str] = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results: list[dict[str, Any]] = []
    rss_rows: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}

    for group in dict.fromkeys(c.group for c in cases):
        gcases = [c for c in cases if c.group == group]
        c0 = gcases[0]
        t = time.perf_counter()
        tdocs, tok = tokenized_splits(c0)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        naive = Naive(c0, tdocs, device, args.dtype)
        fwd = Forward(c0, tdocs, pad_id, device, args.dtype)
        n_docs = sum(len(v) for v in tdocs.values())
        plans = {bs: fwd.plan(bs)[1] for bs in batch_sizes}
        # a batch size whose plan equals batch 8's would measure the same thing again: skip it
        run_bs = [bs for bs in batch_sizes if bs == 8 or plans[bs]["batches"] != plans[8]["batches"]]
        skipped += [f"{group} bs {bs}" for bs in batch_sizes if bs not in run_bs]
        print(f"[{group}] {n_docs} docs, {naive.tokens:,} tokens; setup {time.perf_counter() - t:.1f} s; "
              f"batch sizes measured {run_bs}", file=sys.stderr)
        cfgs = {(c.key, bs): write_config(work / f"{c.key}-bs{bs}.yaml", work / f"{c.key}-bs{bs}", c.data, c.model,
                                          c.layers, c.max_length, args.device, args.dtype, bs)
                for c in gcases for bs in run_bs}

        naive.warm_up()
        fwd.warm_up(gcases[0].layers)

        # per repetition: a (wall, cpu); b (wall, cpu); c (wall, stage times incl. "#cpu" entries, calls)
        a_times: list[tuple[float, float]] = []
        b_times: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        c_times: dict[tuple, list[tuple[float, dict, dict]]] = defaultdict(list)
        for rep in range(reps):
            a_times.append(naive.run())
            print(f"  rep {rep + 1}/{reps}: a {a_times[-1][0]:.1f}s", end="", file=sys.stderr, flush=True)
            for c in gcases:
                for bs in run_bs:
                    b_times[(c.key, bs)].append(fwd.run(c.layers, bs))
                    total, times, calls, res = run_extract(cfgs[(c.key, bs)], device)
                    assert res.tokens == naive.tokens, (res.tokens, naive.tokens)
                    c_times[(c.key, bs)].append((total, times, calls))
                    print(f" | {c.key} bs{bs}: b {b_times[(c.key, bs)][-1][0]:.1f}s c {total:.1f}s", end="", file=sys.stderr, flush=True)
                    if args.progress and bs == 8:  # the same extract with its progress bar, right after
                        console().quiet = False
                        try:
                            total_p, *_ = run_extract(cfgs[(c.key, bs)], device, show_progress=True)
                        finally:
                            console().quiet = True
                        c_times[(c.key, "progress")].append((total_p, {"ratio": total_p / total}, {}))
            print(file=sys.stderr)
        if args.profile:
            for c in gcases:
                prof = cProfile.Profile()
                run_extract(cfgs[(c.key, 8)], device, profile=prof)
                s = io.StringIO()
                st = pstats.Stats(prof, stream=s).strip_dirs()
                st.sort_stats("tottime").print_stats(25)
                st.sort_stats("cumulative").print_stats(40)
                profiles[c.key] = s.getvalue()

        a_wall = [x[0] for x in a_times]
        a_cpu = [x[1] for x in a_times]
        for c in gcases:
            for bs in run_bs:
                cs = c_times[(c.key, bs)]
                b_wall = [x[0] for x in b_times[(c.key, bs)]]
                b_cpu = [x[1] for x in b_times[(c.key, bs)]]
                totals = [x[0] for x in cs]
                loads = [sum(x[1].get(p, 0.0) for p in LOAD_PARTS) for x in cs]
                excl = [t - ld for t, ld in zip(totals, loads)]
                excl_cpu = [x[1]["total#cpu"] - sum(x[1].get(p + "#cpu", 0.0) for p in LOAD_PARTS) for x in cs]
                stage = {k: med([x[1].get(k, 0.0) for x in cs]) for k in cs[0][1]}
                row = {
                    "case": c, "bs": bs, "docs": n_docs, "tokens": naive.tokens, "plan": plans[bs],
                    "naive_class": naive.model_class,
                    "a": naive.tokens / med(a_wall), "b": naive.tokens / med(b_wall),
                    "c_total": naive.tokens / med(totals), "c_excl": naive.tokens / med(excl),
                    "c_total_s": med(totals), "c_excl_s": med(excl), "load_s": med(loads),
                    "a_s": med(a_wall), "b_s": med(b_wall),
                    # paired: each repetition's ratio (its measurements ran back to back), then the median
                    "ca": med([a / ce for a, ce in zip(a_wall, excl)]),
                    "cb": med([b / ce for b, ce in zip(b_wall, excl)]),
                    "cb_total": med([b / ct for b, ct in zip(b_wall, totals)]),
                    "ca_cpu": med([a / ce for a, ce in zip(a_cpu, excl_cpu)]),
                    "cb_cpu": med([b / ce for b, ce in zip(b_cpu, excl_cpu)]),
                    "stage": stage, "calls": cs[0][2],
                }
                if (c.key, "progress") in c_times and bs == 8:
                    row["c_progress"] = med([x[1]["ratio"] for x in c_times[(c.key, "progress")]])
                results.append(row)

        if not args.no_rss and group == "minilm":
            base_docs = [json.loads(line) for line in c0.data.read_text().splitlines()]
            for k in (1, 4):
                data = write_jsonl(work / f"rss-x{k}.jsonl", repeat_docs(base_docs, k))
                cfgp = write_config(work / f"rss-x{k}.yaml", work / f"rss-x{k}", data, c0.model, c0.layers, c0.max_length,
                                    args.device, args.dtype, 8)
                kib, wall = peak_rss_kib(cfgp, args.threads)
                rss_rows.append({"k": k, "docs": len(base_docs) * k, "kib": kib, "wall": wall, "case": c0})
            print(f"  rss: {[r['kib'] for r in rss_rows]} KiB", file=sys.stderr)
        del naive, fwd

    # ------------------------------------------------------------------ report
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"
    print("\n## needleprobe extract benchmark\n")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {dev_name}; model dtype {args.dtype}; feature dtype float32; torch {torch.__version__}; "
          f"{reps} interleaved repetition(s), medians; tokens = real (unpadded) train+val tokens; "
          f"1-min load average {load_before:.1f} at start, {load_after:.1f} at end\n")
    print("a = naive loop (1 doc/forward, output_hidden_states, all layers; decoders with LM head); "
          "b = needleprobe batches + early stop, nothing stored; c = extract() end to end; "
          "c' = c minus its model/tokenizer/config loading (timed inside the same call). "
          "tok/s columns: medians of wall time. Ratios: the median over repetitions of each repetition's ratio "
          "(its a, b, c ran back to back), from wall time; 'cpu' columns: the same from process CPU time, "
          "which a busy shared machine disturbs much less (a cross-check).\n")
    print("| case | layers | bs | docs | tokens | batches (mean/max docs, pad) | a tok/s | b tok/s | c tok/s | c' tok/s "
          "| c'/a | target c'/a | c'/b | target c'/b | c/b (incl. load) | c'/a cpu | c'/b cpu |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c: Case = r["case"]
        p = r["plan"]
        tgt_a = 0.9 * c.n_layers / (max(c.layers) + 1)
        ca, cb = r["ca"], r["cb"]
        print(f"| {c.title} | {c.layers} of {c.n_layers} | {r['bs']} | {r['docs']} | {r['tokens']:,} | "
              f"{p['batches']} ({p['mean_docs']:.1f}/{p['max_docs']}, {p['pad_frac']:.0%}) | {fmt_rate(r['a'])} | "
              f"{fmt_rate(r['b'])} | {fmt_rate(r['c_total'])} | {fmt_rate(r['c_excl'])} | {ca:.2f} | ≥ {tgt_a:.2f} {verdict(ca >= tgt_a)} | "
              f"{cb:.2f} | ≥ 0.90 {verdict(cb >= 0.9)} | {r['cb_total']:.2f} | {r['ca_cpu']:.2f} {verdict(r['ca_cpu'] >= tgt_a)} | "
              f"{r['cb_cpu']:.2f} {verdict(r['cb_cpu'] >= 0.9)} |")

    print("\n### where extract() spends its time (median seconds per call)\n")
    print("| case | bs | a s | b s | c total | load (model+tok+config) | tokenize | plan_split | other setup | "
          "batch loop | ↳ run_forward | ↳ model_inputs | ↳ gather_rows | ↳ stream.add | ↳ loop rest | stream.close |"
          + (" c with bar / c without |" if any("c_progress" in r for r in results) else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if any("c_progress" in r for r in results) else ""))
    for r in results:
        s = r["stage"]
        load = r["load_s"]
        loop = s.get(LOOP_KEY, 0.0)
        inner = sum(s.get(k, 0.0) for k in ("run_forward", "model_inputs", "gather_rows", "stream.add"))
        setup = r["c_total_s"] - load - s.get("tokenize_documents", 0.0) - s.get("plan_split", 0.0) - loop
        tail = s.get("stream.close", 0.0)
        line = (f"| {r['case'].key} | {r['bs']} | {r['a_s']:.2f} | {r['b_s']:.2f} | {r['c_total_s']:.2f} | {load:.2f} | "
                f"{s.get('tokenize_documents', 0.0):.2f} | {s.get('plan_split', 0.0):.3f} | {setup - tail:.2f} | {loop:.2f} | "
                f"{s.get('run_forward', 0.0):.2f} | {s.get('model_inputs', 0.0):.3f} | {s.get('gather_rows', 0.0):.3f} | "
                f"{s.get('stream.add', 0.0):.3f} | {loop - inner:.3f} | {tail:.3f} |")
        if any("c_progress" in x for x in results):
            line += f" {r['c_progress']:.3f} |" if "c_progress" in r else " – |"
        print(line)
    if args.quick:
        print("\n--quick is a smoke run: with so few documents the fixed per-run cost of extract() (zarr group and "
              "array creation, tokenizer/model loading, the first cold batch) dominates, so the targets apply to "
              "the full run only.")
    if skipped:
        print(f"\nnot measured (batch plan identical to bs 8: every length bucket holds ≤ 8 docs): {', '.join(skipped)}")
    print("\nload = load_model + load_tokenizer + AutoConfig inside extract(). It is small because the safetensors "
          "weights are memory-mapped (pages are read when the first forward touches them, so that cost is inside the "
          "batch loop) and the files are in the page cache after (a) and (b); a cold first load would take longer.")
    print("\n'other setup' = c total − load − tokenize − plan_split − batch loop − stream.close: reading and hashing the "
          "JSONL, zarr group/array creation, the run's metadata (versions()), the file lock; "
          "'loop rest' = padding arrays, progress bar, skip bookkeeping.")

    if rss_rows:
        r1, r4 = rss_rows[0], rss_rows[-1]
        ratio = r4["kib"] / r1["kib"]
        print("\n### peak RSS of `needleprobe extract --no-progress` (child process, ru_maxrss)\n")
        print("| case | docs | peak RSS | wall s |")
        print("|---|---|---|---|")
        for r in rss_rows:
            print(f"| {r['case'].title} {r['case'].layers}, bs 8 | {r['docs']} ({r['k']}×) | {r['kib'] / 1024:,.0f} MiB | {r['wall']:.1f} |")
        print(f"\nRSS 4×/1× = {ratio:.3f} (target ≤ 1.20: {verdict(ratio <= 1.2)})")

    for key, text in profiles.items():
        print(f"\n### cProfile of one extract() — {key}\n\n```\n{text}\n```")

    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbenchmark wall time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
