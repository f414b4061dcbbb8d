"""The document-level monitor.

The probe scores every text token of every document in a split; an
aggregation turns those token logits into one score per document ("is there
a needle somewhere in here?").  Token logits are stored in the cache's Zarr
group (``monitor/{split}``), so re-aggregating with a new k, window or
temperature never runs the model again; the model runs with the same hooks,
batching, early stop and resume as ``extract``.

Thresholds are set on needle-free documents at a target false-positive rate
and reported as TPR at 1% and 5% FPR, next to document AUROC with a bootstrap
95% CI.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .cache import array_codecs, cache_path, documents_digest, open_cache, read_rows
from .config import Config, MonitorConfig
from .data import by_split, file_sha256, load_documents
from .errors import NeedleprobeError
from .metrics import bootstrap_auroc_ci, threshold_at_fpr
from .records import FileLock, atomic_write_bytes, console, update_run_record

AGGREGATIONS = ("mean", "max", "topk_mean", "rolling_max", "softmax_mean")
LOGIT_CHUNK_ROWS = 1 << 16


def aggregate(logits: np.ndarray, method: str, mon: MonitorConfig) -> float:
    """One document score from its token logits [n_tokens]."""
    x = np.asarray(logits, dtype=np.float64)
    if x.size == 0:
        return float("-inf")
    if method == "mean":
        return float(x.mean())
    if method == "max":
        return float(x.max())
    if method == "topk_mean":
        k = min(mon.top_k, x.size)
        return float(np.partition(x, x.size - k)[x.size - k :].mean())
    if method == "rolling_max":
        w = min(mon.window, x.size)
        c = np.concatenate([[0.0], np.cumsum(x)])
        return float(((c[w:] - c[:-w]) / w).max())
    if method == "softmax_mean":
        z = x / mon.temperature
        p = np.exp(z - z.max())
        return float((p * x).sum() / p.sum())
    raise ValueError(f"unknown aggregation {method!r}")


def aggregation_label(method: str, mon: MonitorConfig) -> str:
    return {
        "topk_mean": f"topk_mean(k={mon.top_k})",
        "rolling_max": f"rolling_max(w={mon.window})",
        "softmax_mean": f"softmax_mean(T={mon.temperature:g})",
    }.get(method, method)


@dataclass
class ProbeRef:
    layer: int
    seed: int
    path: Path
    sha256: str


def _probes(cfg: Config, layers: list[int], seeds: list[int]) -> list[ProbeRef]:
    from .fit import probe_paths

    refs = []
    for layer in sorted(layers):
        for seed in seeds:
            pt, _ = probe_paths(cfg, layer, seed)
            if not pt.is_file():
                raise NeedleprobeError(f"{pt}: probe missing (run `needleprobe fit` for layer {layer}, seed {seed})")
            refs.append(ProbeRef(layer, seed, pt, file_sha256(pt)))
    return refs


def monitor_group_path(cfg: Config, split: str) -> str:
    return f"monitor/{split}"


def monitor_fingerprint(cache_fp: str, split: str, probes: list[ProbeRef], docs_digest: str) -> str:
    """What the stored token logits depend on: the cache, the split's documents (``test`` is not in the cache) and the probes."""
    key = json.dumps({"cache": cache_fp, "split": split, "docs": docs_digest,
                      "probes": [(p.layer, p.seed, p.sha256) for p in probes]})
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def score_tokens(cfg: Config, split: str, probes: list[ProbeRef], show_progress: bool = True) -> zarr.Group:
    """Per-token logits of every probe on ``split``, computed once and stored in the cache (resumable)."""
    from .extract import check_layers, check_positions, model_shape, run_batches
    from .hooks import capture, find_blocks, load_model, load_tokenizer, resolve_device
    from .cache import ChunkStream
    from .stores import open_group
    from .tokens import plan_batches, tokenize_documents

    con = console()
    from .fit import verify_cache

    cache = open_cache(cfg)
    verify_cache(cfg, cache)
    data_path = cfg.dataset.resolved_path()
    docs = by_split(load_documents(data_path, cfg.dataset.val_fraction))[split]
    fp = monitor_fingerprint(cache.fingerprint, split, probes, documents_digest(docs))
    path = cache_path(cfg)
    with FileLock(path.with_name(path.name + ".lock"), what=f"extract or monitor of {path}"):
        root = open_group(path, mode="r+")
        gpath = monitor_group_path(cfg, split)
        g = root[gpath] if gpath in root else None
        if g is not None and g.attrs.get("fingerprint") == fp and g.attrs.get("complete"):
            con.print(f"monitor: token logits for {split!r} are up to date (no model run)")
            return g
        if not docs:
            raise NeedleprobeError(f"{data_path}: split {split!r} has no documents to monitor")
        tokenizer = load_tokenizer(cfg.model)
        tdocs = tokenize_documents(tokenizer, docs, cfg.model.max_length, cfg.model.chat_template)
        check_positions(tdocs, model_shape(cfg)[2], cfg, data_path)
        order, batches = plan_batches([td.n_tokens for td in tdocs], cfg.probe.doc_batch_size, cfg.probe.max_batch_tokens)
        rows_of = [np.flatnonzero(td.labelable).astype(np.int32) for td in tdocs]
        committed = 0
        if g is not None and g.attrs.get("fingerprint") == fp and g.attrs.get("initialized"):
            committed = int(g.attrs.get("committed_rows", 0))
        else:
            g = _create_group(root, gpath, fp, tdocs, rows_of, order, probes, cache.format)
        device = resolve_device(cfg.probe.device)
        model = load_model(cfg.model, cfg.probe.model_dtype, device)
        blocks = find_blocks(model)
        layers = sorted({p.layer for p in probes})
        check_layers(layers, len(blocks), cfg.model.name)
        weights = _probe_matrices(probes, device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        con.print(f"monitor: scoring {len(tdocs)} {split} documents with {len(probes)} probe(s) on {device}")
        with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode(), capture(blocks, layers) as cap:
            stream = ChunkStream(g, ["logits"], committed, pool)
            run_batches(model, cap, split, tdocs, rows_of, batches, stream, committed, pad_id, device,
                        partial(_logit_rows, weights=weights), show_progress)
            stream.close()
    return g


def _create_group(root, gpath, fp, tdocs, rows_of, order, probes, fmt: int) -> zarr.Group:
    """Token tables in processing order, known before the model runs; logits filled by the stream.

    Arrays are stored like the cache's own (``fmt``: with crc32c checksums from format 2 on)."""
    idx = [int(i) for i in order]
    doc_index = np.concatenate([np.full(len(rows_of[i]), i, np.int32) for i in idx])
    token_index = np.concatenate([rows_of[i] for i in idx]).astype(np.int32)
    needle = np.concatenate([tdocs[i].positive[rows_of[i]] for i in idx]).astype(np.int8)
    token_id = np.concatenate([tdocs[i].input_ids[rows_of[i]] for i in idx]).astype(np.int32)
    n = int(doc_index.size)
    chunk = int(os.environ.get("NEEDLEPROBE_CHUNK_ROWS") or LOGIT_CHUNK_ROWS)
    g = root.create_group(gpath, overwrite=True)
    codecs = array_codecs(fmt, compress=True)
    g.create_array("logits", shape=(n, len(probes)), chunks=(chunk, len(probes)), dtype="float32", fill_value=0.0, **codecs)
    for name, arr in (("doc_index", doc_index), ("token_index", token_index), ("needle", needle), ("token_id", token_id)):
        a = g.create_array(name, shape=(n,), chunks=(max(1, min(n, 1 << 18)),), dtype=arr.dtype, **codecs)
        a[:] = arr
    ids = g.create_array("doc_ids", shape=(len(tdocs),), chunks=(len(tdocs),), dtype=str, **codecs)
    ids[:] = np.asarray([td.doc.doc_id for td in tdocs], dtype=str)
    nn = g.create_array("doc_n_needles", shape=(len(tdocs),), chunks=(len(tdocs),), dtype="int32", **codecs)
    nn[:] = np.array([len(td.doc.needle_spans) for td in tdocs], np.int32)
    g.attrs.update(
        {
            "fingerprint": fp,
            "probes": [{"layer": p.layer, "seed": p.seed, "sha256": p.sha256} for p in probes],
            "n_rows": n,
            "chunk_rows": chunk,
            "committed_rows": 0,
            "complete": False,
            "initialized": True,
        }
    )
    return g


def _probe_matrices(probes: list[ProbeRef], device) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per layer: (layer, W [d, P_layer], b [P_layer]) in the column order of ``probes``."""
    from .fit import load_probe

    out = []
    for layer in sorted({p.layer for p in probes}):
        ws, bs = zip(*(load_probe(p.path) for p in probes if p.layer == layer))
        out.append((layer, torch.stack(ws, 1).to(device), torch.stack(bs).to(device)))
    return out


def _logit_rows(acts: dict[int, torch.Tensor], batch_rows: list[np.ndarray], weights):
    """Probe logits [rows, n_probes] of a batch's text tokens (see ``extract.run_batches``)."""
    from .extract import row_index

    b_idx, t_idx = row_index(batch_rows, next(iter(acts.values())).device)
    logits = torch.cat([acts[layer][b_idx, t_idx].float() @ w + b for layer, w, b in weights], 1).cpu().numpy()
    return lambda: {"logits": logits}


@dataclass
class MonitorTokens:
    """Stored token logits of one split, per document (file order of the split's doc table)."""

    doc_ids: list[str]
    doc_n_needles: np.ndarray
    probes: list[dict[str, Any]]
    logits: list[np.ndarray]  # per doc: [n_tokens, n_probes], ascending token position
    needle: list[np.ndarray]  # per doc: [n_tokens] int8
    token_id: list[np.ndarray]
    token_index: list[np.ndarray]


def read_tokens(g: zarr.Group) -> MonitorTokens:
    """The stored logits per document; a damaged chunk raises ``CacheDamaged`` (one line naming it)."""
    doc_index = read_rows(g["doc_index"])
    token_index = read_rows(g["token_index"])
    order = np.lexsort((token_index, doc_index))  # per document, by position
    doc_index, token_index = doc_index[order], token_index[order]
    logits, needle, token_id = (read_rows(g[name])[order] for name in ("logits", "needle", "token_id"))
    doc_ids = [str(x) for x in read_rows(g["doc_ids"])]
    bounds = np.searchsorted(doc_index, np.arange(len(doc_ids) + 1))
    sl = [slice(bounds[i], bounds[i + 1]) for i in range(len(doc_ids))]
    return MonitorTokens(
        doc_ids, read_rows(g["doc_n_needles"]), list(g.attrs["probes"]),
        [logits[s] for s in sl], [needle[s] for s in sl], [token_id[s] for s in sl], [token_index[s] for s in sl],
    )


def monitor_dir(cfg: Config) -> Path:
    """``results/monitor/{name}_{version}``: beside ``output_dir`` (``results/probes``)."""
    from .stores import as_path

    return as_path(cfg.probe.output_dir).parent / "monitor" / cfg.dataset.key


def evaluate(tokens: MonitorTokens, mon: MonitorConfig, n_boot: int = 1000) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics rows per probe × aggregation, per-document scores)."""
    y = (tokens.doc_n_needles > 0).astype(np.int8)
    if y.min() == y.max():
        raise NeedleprobeError("the monitored split needs documents both with and without needles")
    rows, per_doc = [], [{"doc_id": d, "n_needles": int(n), "scores": {}} for d, n in zip(tokens.doc_ids, tokens.doc_n_needles)]
    from sklearn.metrics import roc_auc_score

    for j, p in enumerate(tokens.probes):
        key = f"layer_{p['layer']}_seed_{p['seed']}"
        for method in AGGREGATIONS:
            s = np.array([aggregate(lg[:, j], method, mon) for lg in tokens.logits])
            if not np.isfinite(s).all():  # documents without text tokens rank below every other
                finite = s[np.isfinite(s)]
                s = np.where(np.isfinite(s), s, (finite.min() if finite.size else 0.0) - 1.0)
            lo, hi = bootstrap_auroc_ci(y, s, np.arange(len(s)), n_boot=n_boot, seed=0)
            row = {
                "layer": p["layer"],
                "seed": p["seed"],
                "aggregation": aggregation_label(method, mon),
                "auroc": float(roc_auc_score(y, s)),
                "auroc_ci_low": lo,
                "auroc_ci_high": hi,
            }
            for fpr, name in ((0.01, "1pct"), (0.05, "5pct")):
                t = threshold_at_fpr(s[y == 0], fpr)
                row[f"threshold_{name}_fpr"] = t
                row[f"tpr_at_{name}_fpr"] = float((s[y == 1] > t).mean())
            row["n_docs"], row["n_needle_docs"] = int(len(y)), int(y.sum())
            rows.append(row)
            for d, v in zip(per_doc, s):
                d["scores"].setdefault(key, {})[method] = float(v)
    return rows, per_doc


def monitor(cfg: Config, *, layers: list[int] | None = None, seeds: list[int] | None = None, split: str | None = None,
            show_progress: bool = True) -> dict[str, Any]:
    split = split or cfg.monitor.split
    probes = _probes(cfg, layers or cfg.probe.layers_to_probe, seeds or cfg.probe.train_seeds)
    g = score_tokens(cfg, split, probes, show_progress)
    rows, per_doc = evaluate(read_tokens(g), cfg.monitor)
    out = monitor_dir(cfg)
    csv_path, jsonl_path = out / "monitor_metrics.csv", out / f"doc_scores_{split}.jsonl"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    atomic_write_bytes(jsonl_path, "".join(json.dumps(d, sort_keys=True) + "\n" for d in per_doc).encode())
    update_run_record(cfg, "monitor", {
        "split": split,
        "monitor": cfg.to_dict()["monitor"],
        "probes": [{"layer": p.layer, "seed": p.seed, "sha256": p.sha256} for p in probes],
        "outputs": {str(p): file_sha256(p) for p in (csv_path, jsonl_path)},
    })
    _print(rows, split)
    return {"metrics": rows, "csv": str(csv_path), "scores": str(jsonl_path)}


def _print(rows: list[dict[str, Any]], split: str) -> None:
    from rich.table import Table

    t = Table(title=f"document monitor on {split!r}: AUROC [95% CI] · TPR@1%FPR · TPR@5%FPR")
    for c in ("layer", "seed", "aggregation", "AUROC", "TPR@1%", "TPR@5%"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["layer"]), str(r["seed"]), r["aggregation"],
                  f"{r['auroc']:.3f} ({r['auroc_ci_low']:.3f}–{r['auroc_ci_high']:.3f})",
                  f"{r['tpr_at_1pct_fpr']:.2f}", f"{r['tpr_at_5pct_fpr']:.2f}")
    console().print(t)
