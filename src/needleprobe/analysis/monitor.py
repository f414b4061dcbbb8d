"""The document-level monitor.

The probe scores every text token of every document in a split; an
aggregation turns those token logits into one score per document ("is there
a needle somewhere in here?").  Token logits live in a Zarr store of their own
(``Layout.monitor_store``: the run's ``monitor/token_logits.zarr``, or a
transfer directory's), never in the activation cache, which stays write-once
after extract.  Logits are stored per probe (identified by its file's
sha256), so re-aggregating with a new k, window or temperature, or asking for
a subset of the probes already scored, never runs the model again; when the
model must run, it runs with the same hooks, batching, early stop and resume
as ``extract`` (:mod:`needleprobe.extract.runner`).

Store layout, one group per split::

    {split}/                    attrs: tokens (what the token tables depend on), n_rows
        doc_ids [D], doc_n_needles [D], doc_needles_lost [D]   the split's documents (file order); needles cut off
                                                             by truncation (attrs: truncation, the split's totals)
        doc_index [N], token_index [N], token_id [N], needle [N]   every text token, in processing order
        pass-{fingerprint}/logits [N, P]                     one model run's probes (attrs: probes, commit state)

Thresholds are set on the needle-free documents of a calibration split
(``monitor.calibration_split``, default ``val``) at a target false-positive
rate and applied to the evaluated split, as a deployed monitor would be: set
on data it has seen, used on data it has not.  TPR at 1% and 5% FPR (with the
threshold, true and false positives) is reported next to document AUROC with a
bootstrap 95% CI.  A clean set of n documents cannot tell an FPR below 1/n
from 0, so a target needing more than the calibration split has is left empty,
with a note, never guessed.  The aggregation and layer to recommend are chosen
on the calibration split too, and reported on the evaluated one, always with an
operating point: the 5% FPR threshold when the clean calibration documents can
set it, else the threshold just above the highest of them; either way with what
is known about its FPR, a one-sided 95% upper bound from the clean calibration
documents above it (exact binomial, Clopper–Pearson: :func:`metrics.fpr_upper_bound`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ..cache.format import CACHE_FORMAT, documents_digest
from ..cache.integrity import CacheDamaged, array_codecs, read_rows
from ..cache.writer import ChunkStream
from ..config import Config, MonitorConfig
from ..data.documents import by_split, file_sha256, load_documents
from ..errors import NeedleprobeError
from ..run.layout import Layout
from ..metrics import (FPR_CONFIDENCE, binary_metrics, bootstrap_auroc_ci, clean_docs_to_bound, fpr_upper_bound,
                      threshold_at_fpr)
from ..io.console import console, results
from ..io.files import FileLock, atomic_write_bytes
from ..run.record import update_run_record
from .run import Run

AGGREGATIONS = ("mean", "max", "topk_mean", "rolling_max", "softmax_mean")
LOGIT_CHUNK_ROWS = 1 << 16
TARGET_FPRS = ((0.01, "1pct"), (0.05, "5pct"))
"""False-positive rates the monitor sets thresholds for, and their names in the CSV's columns."""


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
    """A saved probe as the monitor uses it: where its file is and what it holds (sha256)."""

    layer: int
    seed: int
    path: Path
    sha256: str

    @property
    def key(self) -> dict[str, Any]:
        return {"layer": self.layer, "seed": self.seed, "sha256": self.sha256}


def probe_refs(run: "Run", layers: list[int], seeds: list[int]) -> list[ProbeRef]:
    """The run's probe files for ``layers`` × ``seeds`` (a missing one is an error naming it)."""
    refs = []
    for layer in sorted(layers):
        for seed in seeds:
            pt = run.probe_path(layer, seed)
            if not pt.is_file():
                raise NeedleprobeError(f"{pt}: probe missing (run `needleprobe fit` for layer {layer}, seed {seed})")
            refs.append(ProbeRef(layer, seed, pt, file_sha256(pt)))
    return refs


def tokens_fingerprint(cfg: Config, docs_digest: str) -> str:
    """What a split's token tables (and so every stored logit row) depend on, besides the probes."""
    from ..model.checkpoints import fingerprint_fields as model_fields

    m, p = cfg.model, cfg.probe
    key = json.dumps({"docs": docs_digest, "model": m.name, "revision": m.revision, "max_length": m.max_length,
                      "chat_template": m.chat_template, "model_dtype": p.model_dtype, "site": p.activation_site,
                      "tables": 2, **model_fields(m)})  # tables 2: with the needles truncation cut off
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _pass_name(probes: list[ProbeRef]) -> str:
    key = json.dumps([p.key for p in probes])
    return "pass-" + hashlib.sha256(key.encode()).hexdigest()[:12]


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
    truncation: dict[str, Any] = field(default_factory=dict)
    """What truncation to ``model.max_length`` cost the split: ``truncated_docs``, ``needles_lost``, and
    ``left_out`` (ids of needle documents that lost every needle: in no list above, neither needle nor clean)."""


def truncation_line(split: str, tokens: MonitorTokens, max_length: int) -> str | None:
    """One line on what truncation did to ``split``'s documents (None when it cut none)."""
    t = tokens.truncation
    if not t.get("truncated_docs"):
        return None
    line = (f"{split!r}: {t['truncated_docs']} document(s) truncated to model.max_length ({max_length} tokens), "
            f"{t['needles_lost']} needle(s) cut off")
    if t.get("left_out"):
        ids = ", ".join(t["left_out"][:5]) + (", …" if len(t["left_out"]) > 5 else "")
        line += (f"; {len(t['left_out'])} needle document(s) lost every needle and are left out of the document "
                 f"metrics, counted neither as needle nor as clean documents ({ids})")
    return line


class LogitStore:
    """The monitor's Zarr store (one group per split); see the module docstring."""

    def __init__(self, path):
        self.path = path

    def _root(self, mode: str) -> zarr.Group | None:
        from ..io.stores import open_group

        if mode in ("r", "r+") and not (self.path / "zarr.json").is_file():
            return None
        if mode != "r":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        return open_group(self.path, mode=mode)

    def split_group(self, split: str, tokens_fp: str, mode: str = "r") -> zarr.Group | None:
        """The split's group when its token tables are current (``tokens_fp``), else None (``mode`` "r+" to write)."""
        root = self._root(mode)
        if root is None or split not in root.group_keys():
            return None
        g = root[split]
        return g if g.attrs.get("tokens") == tokens_fp and g.attrs.get("initialized") else None

    @staticmethod
    def stored(g: zarr.Group) -> dict[tuple[int, int, str], tuple[zarr.Group, int]]:
        """(layer, seed, sha256) → (its complete pass group, column) for every probe with stored logits."""
        out = {}
        for name in sorted(g.group_keys()):
            pg = g[name]
            if name.startswith("pass-") and pg.attrs.get("complete"):
                for j, p in enumerate(pg.attrs.get("probes", [])):
                    out.setdefault((int(p["layer"]), int(p["seed"]), p["sha256"]), (pg, j))
        return out

    def read(self, g: zarr.Group, probes: list[ProbeRef]) -> MonitorTokens | None:
        """The logits of ``probes`` (columns in that order), or None when one of them is not stored."""
        have = self.stored(g)
        if any((p.layer, p.seed, p.sha256) not in have for p in probes):
            return None
        doc_index = read_rows(g["doc_index"])
        token_index = read_rows(g["token_index"])
        order = np.lexsort((token_index, doc_index))  # per document, by position
        doc_index, token_index = doc_index[order], token_index[order]
        cache: dict[str, np.ndarray] = {}
        cols = []
        for p in probes:
            pg, j = have[(p.layer, p.seed, p.sha256)]
            if pg.path not in cache:
                cache[pg.path] = read_rows(pg["logits"])
            cols.append(cache[pg.path][:, j])
        logits = np.stack(cols, 1)[order]
        needle, token_id = (read_rows(g[name])[order] for name in ("needle", "token_id"))
        doc_ids = [str(x) for x in read_rows(g["doc_ids"])]
        bounds = np.searchsorted(doc_index, np.arange(len(doc_ids) + 1))
        sl = [slice(bounds[i], bounds[i + 1]) for i in range(len(doc_ids))]
        n_needles = read_rows(g["doc_n_needles"])
        seen = n_needles - read_rows(g["doc_needles_lost"])  # the needles the model saw
        apart = (n_needles > 0) & (seen == 0)  # every needle cut off: neither a needle document nor a clean one
        keep = np.flatnonzero(~apart)
        truncation = {**g.attrs.get("truncation", {}), "left_out": [doc_ids[i] for i in np.flatnonzero(apart)]}
        return MonitorTokens(
            [doc_ids[i] for i in keep], seen[keep], [p.key for p in probes], [logits[sl[i]] for i in keep],
            [needle[sl[i]] for i in keep], [token_id[sl[i]] for i in keep], [token_index[sl[i]] for i in keep], truncation,
        )

    def create_split(self, split: str, tokens_fp: str, tdocs, rows_of, order) -> zarr.Group:
        """Token tables in processing order, known before the model runs (replaces a stale group)."""
        idx = [int(i) for i in order]
        root = self._root("a")
        g = root.create_group(split, overwrite=True)
        codecs = array_codecs(CACHE_FORMAT, compress=True)
        n = int(sum(len(rows_of[i]) for i in idx))
        tables = {
            "doc_index": np.concatenate([np.full(len(rows_of[i]), i, np.int32) for i in idx]),
            "token_index": np.concatenate([rows_of[i] for i in idx]).astype(np.int32),
            "needle": np.concatenate([tdocs[i].positive[rows_of[i]] for i in idx]).astype(np.int8),
            "token_id": np.concatenate([tdocs[i].input_ids[rows_of[i]] for i in idx]).astype(np.int32),
        }
        for name, arr in tables.items():
            a = g.create_array(name, shape=(n,), chunks=(max(1, min(n, 1 << 18)),), dtype=arr.dtype, **codecs)
            a[:] = arr
        ids = g.create_array("doc_ids", shape=(len(tdocs),), chunks=(max(1, len(tdocs)),), dtype=str, **codecs)
        ids[:] = np.asarray([td.doc.doc_id for td in tdocs], dtype=str)
        nn = g.create_array("doc_n_needles", shape=(len(tdocs),), chunks=(max(1, len(tdocs)),), dtype="int32", **codecs)
        nn[:] = np.array([len(td.doc.needle_spans) for td in tdocs], np.int32)
        lost = g.create_array("doc_needles_lost", shape=(len(tdocs),), chunks=(max(1, len(tdocs)),), dtype="int32",
                              **codecs)
        lost[:] = np.array([td.needles_lost for td in tdocs], np.int32)
        truncation = {"truncated_docs": sum(1 for td in tdocs if td.truncated),
                      "needles_lost": sum(td.needles_lost for td in tdocs),
                      "needle_tokens_lost": sum(td.needle_tokens_lost for td in tdocs)}
        g.attrs.update({"tokens": tokens_fp, "n_rows": n, "truncation": truncation, "initialized": True})
        return g

    @staticmethod
    def open_pass(g: zarr.Group, probes: list[ProbeRef]) -> tuple[zarr.Group, int]:
        """The pass group for exactly ``probes`` (resumed when it was interrupted), and its committed rows."""
        name = _pass_name(probes)
        if name in g.group_keys() and g[name].attrs.get("initialized"):
            return g[name], int(g[name].attrs.get("committed_rows", 0))
        n = int(g.attrs["n_rows"])
        chunk = int(os.environ.get("NEEDLEPROBE_CHUNK_ROWS") or LOGIT_CHUNK_ROWS)
        pg = g.create_group(name, overwrite=True)
        pg.create_array("logits", shape=(n, len(probes)), chunks=(chunk, len(probes)), dtype="float32", fill_value=0.0,
                        **array_codecs(CACHE_FORMAT, compress=True))
        pg.attrs.update({"probes": [p.key for p in probes], "n_rows": n, "chunk_rows": chunk, "committed_rows": 0,
                         "complete": False, "initialized": True})
        return pg, 0

    def drop_split(self, split: str) -> None:
        root = self._root("r+")
        if root is not None and split in root.group_keys():
            del root[split]

    @staticmethod
    def drop_stale(g: zarr.Group, current: dict[tuple[int, int], str]) -> None:
        """Remove passes none of whose probes is a current probe file ((layer, seed) → sha256): refit since."""
        for name in list(g.group_keys()):
            if not name.startswith("pass-"):
                continue
            probes = g[name].attrs.get("probes", [])
            if not any(current.get((int(p["layer"]), int(p["seed"]))) == p["sha256"] for p in probes):
                del g[name]


def stored_tokens(cfg: Config, store: LogitStore, split: str, probes: list[ProbeRef]) -> MonitorTokens | None:
    """The logits of those of ``probes`` that ``store`` holds for ``cfg``'s current ``split`` (None if none); no model."""
    data_path = cfg.dataset.resolved_path()
    docs = by_split(load_documents(data_path, cfg.dataset.val_fraction))[split] if data_path.is_file() else []
    g = store.split_group(split, tokens_fingerprint(cfg, documents_digest(docs))) if docs else None
    if g is None:
        return None
    have = store.stored(g)
    kept = [p for p in probes if (p.layer, p.seed, p.sha256) in have]
    try:
        return store.read(g, kept) if kept else None
    except CacheDamaged:  # the monitor recomputes damaged logits on its next run
        return None


def score_tokens(cfg: Config, store: LogitStore, split: str, probes: list[ProbeRef], *, show_progress: bool = True,
                 current: dict[tuple[int, int], str] | None = None, loaded: dict[str, Any] | None = None) -> MonitorTokens:
    """Per-token logits of ``probes`` on ``cfg``'s ``split``: read from ``store``, the model run only for probes it lacks.

    ``cfg`` says which documents and model (the probes may come from another
    run, as in a transfer evaluation); ``current`` lists the probe files that
    are still current, so passes of probes refit since are dropped.
    ``loaded``: a dict that keeps the tokenizer and model between calls (two
    splits of one command load the model once).
    """
    from ..model.hooks import check_layers, check_positions, find_blocks, load_model, load_tokenizer, model_shape
    from ..io.runtime import resolve_device
    from ..extract.sites import capture_sites
    from ..extract.batching import batch_plan, budget_message, device_budget
    from ..extract.runner import Forward, SplitBatches, run_batches
    from ..data.tokens import tokenize_documents

    con = console()
    data_path = cfg.dataset.resolved_path()
    docs = by_split(load_documents(data_path, cfg.dataset.val_fraction))[split]
    if not docs:
        raise NeedleprobeError(f"{data_path}: split {split!r} has no documents to monitor")
    tokens_fp = tokens_fingerprint(cfg, documents_digest(docs))
    g = store.split_group(split, tokens_fp, mode="r+")
    if g is not None:
        if current is not None:
            store.drop_stale(g, current)
        try:
            found = store.read(g, probes)
        except CacheDamaged as e:  # derived data: recompute rather than repair
            con.print(f"[yellow]monitor: {e.damage}; recomputing the stored logits of {split!r}", soft_wrap=True)
            store.drop_split(split)
            g = found = None
        if found is not None:
            con.print(f"monitor: token logits of {len(probes)} probe(s) on {split!r} already stored (no model run)")
            return found
    loaded = {} if loaded is None else loaded
    if "tokenizer" not in loaded:
        loaded["tokenizer"] = load_tokenizer(cfg.model)
    tokenizer = loaded["tokenizer"]
    tdocs = tokenize_documents(tokenizer, docs, cfg.model.max_length, cfg.model.chat_template)
    n_layers, d_model, limit = model_shape(cfg)
    check_positions(tdocs, limit, cfg, data_path)
    layers = sorted({p.layer for p in probes})
    if n_layers is not None:
        check_layers(layers, n_layers, cfg.model.name)
    weights = _probe_matrices(probes, d_model)
    lengths = [td.n_tokens for td in tdocs]
    order, batches = batch_plan(lengths, cfg.probe)
    rows_of = [np.flatnonzero(td.labelable).astype(np.int32) for td in tdocs]
    if g is None:
        g = store.create_split(split, tokens_fp, tdocs, rows_of, order)
    have = store.stored(g)
    missing = [p for p in probes if (p.layer, p.seed, p.sha256) not in have]
    pg, committed = store.open_pass(g, missing)
    device = resolve_device(cfg.probe.device)
    if "model" not in loaded:
        loaded["model"] = load_model(cfg.model, cfg.probe.model_dtype, device)
    model = loaded["model"]
    blocks = find_blocks(model)
    check_layers(sorted({p.layer for p in missing}), len(blocks), cfg.model.name)
    mats = [(layer, w.to(device), b.to(device)) for layer, w, b in _by_layer(missing, weights)]
    found = device_budget(cfg.probe, cfg.model.max_length, model, device, len({p.layer for p in missing}))
    if found is not None:  # the row order does not depend on the batches
        batches = batch_plan(lengths, cfg.probe, found[0])[1]
        con.print(budget_message(*found, device))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    con.print(f"monitor: scoring {len(tdocs)} {split} documents with {len(missing)} probe(s) on {device}")
    site = cfg.single_site("the monitor").probe.activation_site
    requests = [(site, layer) for layer in sorted({p.layer for p in missing})]
    with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode(), capture_sites(blocks, requests) as cap:
        stream = ChunkStream(pg, ["logits"], committed, pool)
        run_batches(Forward(model, cap, pad_id, device), SplitBatches(split, tdocs, rows_of, batches), stream, committed,
                    partial(logit_rows, weights=mats), show_progress)
        stream.close()
    pg.attrs["complete"] = True
    found = store.read(g, probes)
    assert found is not None
    return found


def _probe_matrices(probes: list[ProbeRef], d_model: int | None) -> dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, seed, sha256) → (weight [d], bias []) of each probe, checked against the model's width."""
    from ..fit.probe import LinearProbe

    out = {}
    for p in probes:
        probe = LinearProbe.load(p.path)
        if d_model is not None and probe.d_model != d_model:
            raise NeedleprobeError(f"{p.path}: the probe reads d_model {probe.d_model}, the model's width is {d_model} "
                                   "(a probe of another model?)")
        out[(p.layer, p.seed, p.sha256)] = (torch.from_numpy(probe.coef_), torch.tensor(probe.intercept_, dtype=torch.float32))
    return out


def _by_layer(probes: list[ProbeRef], weights) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per layer: (layer, W [d, P_layer], b [P_layer]), columns in the order of ``probes``."""
    out = []
    for layer in sorted({p.layer for p in probes}):
        ws, bs = zip(*(weights[(p.layer, p.seed, p.sha256)] for p in probes if p.layer == layer))
        out.append((layer, torch.stack(ws, 1), torch.stack(bs)))
    return out


def logit_rows(acts: dict[int, torch.Tensor], batch_rows: list[np.ndarray], weights):
    """Probe logits [rows, n_probes] of a batch's text tokens (see ``runner.run_batches``)."""
    from ..extract.runner import host_later, row_index

    b_idx, t_idx = row_index(batch_rows, next(iter(acts.values())).device)
    by_layer = {layer: a for (_, layer), a in acts.items()}  # one site per run
    collect = host_later({"logits": torch.cat([by_layer[layer][b_idx, t_idx].float() @ w + b for layer, w, b in weights], 1)})
    return lambda: {"logits": collect()["logits"].numpy()}


def document_scores(tokens: MonitorTokens, j: int, method: str, mon: MonitorConfig) -> np.ndarray:
    """One score per document (file order) for probe column ``j``; documents without text tokens rank lowest."""
    s = np.array([aggregate(lg[:, j], method, mon) for lg in tokens.logits])
    if not np.isfinite(s).all():
        finite = s[np.isfinite(s)]
        s = np.where(np.isfinite(s), s, (finite.min() if finite.size else 0.0) - 1.0)
    return s


def doc_labels(tokens: MonitorTokens) -> np.ndarray:
    """1 for a document with needles, 0 for a clean one [D]."""
    return (np.asarray(tokens.doc_n_needles) > 0).astype(np.int8)


def clean_docs_needed(fpr: float) -> int:
    """How many clean documents resolve a false-positive rate: below 1/n, n clean documents only tell "none"."""
    return math.ceil(round(1.0 / fpr, 9))


def calibrated_rates(clean_cal: np.ndarray, scores: np.ndarray, y: np.ndarray, fpr: float) -> dict[str, Any]:
    """A threshold set on a calibration split's clean document scores [C] at ``fpr``, applied to other scores [D].

    The threshold is the smallest t with at most ``fpr`` of the clean
    calibration documents above it; a document is flagged when its score is
    strictly above t.  Returns threshold, TP, FP, TPR, the evaluated split's
    own FPR and the upper 95% bound on the FPR from the calibration documents
    above t (``fpr_upper95``); all None, with a ``note``, when C < 1/fpr.
    ``fpr`` 0: just above the highest clean calibration score (any C).
    """
    need = clean_docs_needed(fpr) if fpr > 0 else 1
    if clean_cal.size < need:
        return {"threshold": None, "tp": None, "fp": None, "tpr": None, "fpr": None, "fpr_upper95": None,
                "note": f"{fpr:.0%} FPR needs at least {need} clean calibration documents, there are {clean_cal.size}"}
    t = threshold_at_fpr(clean_cal, fpr)
    pos, neg = scores[y == 1], scores[y == 0]
    tp, fp = int((pos > t).sum()), int((neg > t).sum())
    return {"threshold": t, "tp": tp, "fp": fp, "tpr": tp / pos.size if pos.size else None,
            "fpr": fp / neg.size if neg.size else None,
            "fpr_upper95": fpr_upper_bound(int((clean_cal > t).sum()), clean_cal.size), "note": None}


def clean_docs_advice(fpr: float) -> str:
    """How many clean calibration documents a false-positive rate needs: to set its threshold, and to show it."""
    return (f"a {fpr:.0%} false-positive rate needs at least {clean_docs_needed(fpr)} clean documents to set its "
            f"threshold, and {clean_docs_to_bound(fpr)} with none above it to show the rate is below {fpr:.0%} "
            f"at {FPR_CONFIDENCE:.0%} confidence")


def operating_point(row: dict[str, Any]) -> dict[str, Any]:
    """The threshold to deploy a monitor row with: at the highest target FPR the clean calibration documents can set,
    else just above the highest clean calibration score (which the CSV's ``*_above_clean`` columns hold)."""
    for fpr, name in reversed(TARGET_FPRS):
        if row[f"threshold_{name}_fpr"] is not None:
            key = f"at_{name}_fpr"
            return {"target_fpr": fpr, "threshold": row[f"threshold_{name}_fpr"], "tp": row[f"tp_{key}"],
                    "fp": row[f"fp_{key}"], "fpr": row[f"observed_fpr_{key}"], "fpr_upper95": row[f"fpr_upper95_{key}"],
                    **_detection(row, key)}
    return {"target_fpr": None, "threshold": row["threshold_above_clean"], "tp": row["tp_above_clean"],
            "fp": row["fp_above_clean"], "fpr": row["observed_fpr_above_clean"],
            "fpr_upper95": row["fpr_upper95_above_clean"], **_detection(row, "above_clean")}


def _detection(row: dict[str, Any], key: str) -> dict[str, Any]:
    """The operating point's needle detection (rows written before detection was measured have none)."""
    return {k: row.get(f"{k}_{key}") for k in ("detected_spans", "detection_rate", "latency_median", "latency_p90")} | {
        "n_needle_spans": row.get("n_needle_spans")}


def document_metrics(tokens: MonitorTokens, mon: MonitorConfig, split: str, n_boot: int = 1000, *,
                     calibration: MonitorTokens | None = None, calibration_split: str | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics rows per probe × aggregation, per-document scores) of ``split``.

    Thresholds come from the clean documents of ``calibration`` (the same
    probes' logits on ``calibration_split``), or of ``split`` itself when it
    is None (in-sample, as a transfer evaluation does).  Each row also holds
    the aggregation's document AUROC on the calibration split, which
    :func:`recommend` chooses by.
    """
    y = doc_labels(tokens)
    if y.min() == y.max():
        raise NeedleprobeError(f"split {split!r} needs documents both with and without needles for the monitor's metrics")
    cal, cal_split = (tokens, split) if calibration is None else (calibration, calibration_split or "calibration")
    y_cal = doc_labels(cal)
    cal_col = {(p["layer"], p["seed"], p.get("sha256")): j for j, p in enumerate(cal.probes)}
    rows, per_doc = [], [{"doc_id": d, "n_needles": int(n), "scores": {}} for d, n in zip(tokens.doc_ids, tokens.doc_n_needles)]
    for j, p in enumerate(tokens.probes):
        key = f"layer_{p['layer']}_seed_{p['seed']}"
        jc = cal_col[(p["layer"], p["seed"], p.get("sha256"))]
        for method in AGGREGATIONS:
            s = document_scores(tokens, j, method, mon)
            s_cal = s if cal is tokens else document_scores(cal, jc, method, mon)
            lo, hi = bootstrap_auroc_ci(y, s, np.arange(len(s)), n_boot=n_boot, seed=0)
            row = {
                "split": split,
                "layer": p["layer"],
                "seed": p["seed"],
                "aggregation": aggregation_label(method, mon),
                "auroc": binary_metrics(y, s)["auroc"],
                "auroc_ci_low": lo,
                "auroc_ci_high": hi,
            }
            rates = {name: calibrated_rates(s_cal[y_cal == 0], s, y, fpr) for fpr, name in TARGET_FPRS}
            for _, name in TARGET_FPRS:
                row[f"threshold_{name}_fpr"] = rates[name]["threshold"]
                row[f"tpr_at_{name}_fpr"] = rates[name]["tpr"]
            row["n_docs"], row["n_needle_docs"] = int(len(y)), int(y.sum())
            row["calibration_split"] = cal_split
            row["n_calibration_clean_docs"] = int((y_cal == 0).sum())
            row["calibration_auroc"] = binary_metrics(y_cal, s_cal)["auroc"] if 0 < y_cal.sum() < y_cal.size else None
            for _, name in TARGET_FPRS:
                row[f"tp_at_{name}_fpr"] = rates[name]["tp"]
                row[f"fp_at_{name}_fpr"] = rates[name]["fp"]
                row[f"observed_fpr_at_{name}_fpr"] = rates[name]["fpr"]
                row[f"fpr_upper95_at_{name}_fpr"] = rates[name]["fpr_upper95"]
            if (y_cal == 0).any():  # an operating point even where no target FPR can be set
                top = calibrated_rates(s_cal[y_cal == 0], s, y, 0.0)
                for k in ("threshold", "tp", "fp", "tpr"):
                    row[f"{k}_above_clean"] = top[k]
                row["observed_fpr_above_clean"], row["fpr_upper95_above_clean"] = top["fpr"], top["fpr_upper95"]
            else:
                row.update({f"{k}_above_clean": None for k in ("threshold", "tp", "fp", "tpr", "observed_fpr",
                                                               "fpr_upper95")})
            row.update(detection_columns(tokens, j, method, mon, {
                **{f"at_{name}_fpr": rates[name]["threshold"] for _, name in TARGET_FPRS},
                "above_clean": row["threshold_above_clean"]}))
            row["note"] = "; ".join(r["note"] for r in rates.values() if r["note"]) or None
            rows.append(row)
            for d, v in zip(per_doc, s):
                d["scores"].setdefault(key, {})[method] = float(v)
    return rows, per_doc


def detection_columns(tokens: MonitorTokens, j: int, method: str, mon: MonitorConfig,
                      thresholds: dict[str, float | None]) -> dict[str, Any]:
    """Needle detection at each threshold (column suffix → threshold; None: not set): the share of needle spans
    (runs of needle tokens) whose running aggregate is above the threshold at one of their tokens, and the latency
    in tokens from a span's first token to that one, median and 90th percentile (:mod:`needleprobe.analysis.online`)."""
    from .online import detection_summary, span_latencies

    names = list(thresholds)
    lat: dict[str, list[int | None]] = {name: [] for name in names}
    for lg, needle in zip(tokens.logits, tokens.needle):
        if needle.any():
            for name, got in zip(names, span_latencies(lg[:, j], needle, method, mon, [thresholds[n] for n in names])):
                lat[name] += got
    out: dict[str, Any] = {"n_needle_spans": len(lat[names[0]]) if names else 0}
    for name in names:
        d = detection_summary(lat[name]) if thresholds[name] is not None else {}
        out[f"detected_spans_{name}"] = d.get("detected")
        out[f"detection_rate_{name}"] = d.get("rate")
        out[f"latency_median_{name}"] = d.get("latency_median")
        out[f"latency_p90_{name}"] = d.get("latency_p90")
    return out


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row of the probe and aggregation to deploy: the best document AUROC on the calibration split (ties: the
    aggregation listed first, then the lower layer and seed), so the choice never peeks at the evaluated split it
    reports.  None when the calibration split lacks needle or clean documents."""
    ok = [r for r in rows if r["calibration_auroc"] is not None]
    if not ok:
        return None
    order = {aggregation: i for i, aggregation in enumerate(dict.fromkeys(r["aggregation"] for r in rows))}
    return min(ok, key=lambda r: (-r["calibration_auroc"], order[r["aggregation"]], r["layer"], r["seed"]))


def write_rows_csv(path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def read_rows_csv(path) -> list[dict[str, Any]]:
    """The rows :func:`write_rows_csv` wrote, typed again: an empty cell is None, numbers are ints or floats (floats
    were written with ``repr``, so they read back exactly)."""
    def typed(v: str) -> Any:
        if v == "":
            return None
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: typed(v) for k, v in r.items()} for r in csv.DictReader(f)]


def stored_results(run: "Run", split: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None] | None:
    """(metrics rows, recommended row) that ``monitor`` wrote for ``split``, kept to the probes whose files are still
    the ones it scored (sha256 in the run record; the recommendation None when its probe changed since); None when
    the monitor has not run on ``split`` or its CSV is not one it recorded.  Readers (the report) show these
    instead of deciding again."""
    section = run.record().get("stages", {}).get(f"monitor:{split}")
    if not section or run.layout is None:
        return None
    csv_path = run.layout.monitor_csv(split)
    if not csv_path.is_file() or file_sha256(csv_path) not in section.get("outputs", {}).values():
        return None  # (by content: a run directory copied or moved keeps its results)
    current = {(p["layer"], p["seed"]) for p in section.get("probes", [])
               if run.has(p["layer"], p["seed"]) and file_sha256(run.probe_path(p["layer"], p["seed"])) == p["sha256"]}
    rows = [r for r in read_rows_csv(csv_path) if (r["layer"], r["seed"]) in current]
    rec = section.get("recommended")
    return rows, rec if rec is not None and (rec["layer"], rec["seed"]) in current else None


def monitor(cfg: Config, *, layers: list[int] | None = None, seeds: list[int] | None = None, split: str | None = None,
            run: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Score ``split`` with the run's probes, aggregate per document, and write the monitor's outputs in the run.

    The run's layers and seeds are the ones it was fitted with (its record: ``records.run_config``); ``layers``
    and ``seeds`` pick some of them.
    """
    from ..run.record import run_config

    cfg = run_config(cfg, run)
    split = split or cfg.monitor.split
    layout = Layout.from_config(cfg, run)
    layout.refuse_foreign("monitor", can_overwrite=False)
    for picked, have, what in ((layers, cfg.probe.layers_to_probe, "layer"), (seeds, cfg.probe.train_seeds, "seed")):
        lacking = sorted(set(picked or ()) - set(have))
        if lacking:
            raise NeedleprobeError(f"--{what} {','.join(map(str, picked))}: {layout.run_dir} has no probes of {what}(s) "
                                   f"{', '.join(map(str, lacking))} (its {what}s: {', '.join(map(str, have))})")
    fitted = Run.of_layout(layout)
    probes = probe_refs(fitted, layers or cfg.probe.layers_to_probe, seeds or cfg.probe.train_seeds)

    cal_split = cfg.monitor.calibration_split
    with FileLock(layout.lock, what=f"fit or monitor of {layout.run_dir}"):
        current = {k: file_sha256(fitted.probe_path(*k)) for k in fitted.metadata()}
        store, loaded = LogitStore(layout.monitor_store), {}
        calibration = None
        data_path = cfg.dataset.resolved_path()
        docs = by_split(load_documents(data_path, cfg.dataset.val_fraction))
        kinds = {bool(d.needle_spans) for d in docs[split]}
        if kinds != {True, False}:  # before any model runs, for this split or the calibration one
            what = "no documents" if not kinds else "only needle documents" if True in kinds else "only clean documents"
            raise NeedleprobeError(f"{data_path}: split {split!r} has {what}; the monitor's document AUROC needs "
                                   "documents with and without needles")
        if cal_split != split:  # thresholds from another split's clean documents: its logits too (stored once)
            if not docs[cal_split]:
                raise NeedleprobeError(f"monitor.calibration_split {cal_split!r}: the dataset has no {cal_split} "
                                       "documents to set thresholds on; name a split with needle-free documents")
            calibration = score_tokens(cfg, store, cal_split, probes, show_progress=show_progress, current=current,
                                       loaded=loaded)
        tokens = score_tokens(cfg, store, split, probes, show_progress=show_progress, current=current, loaded=loaded)
        truncated = {name: t.truncation for name, t in ((cal_split, calibration), (split, tokens)) if t is not None}
        for name, t in ((cal_split, calibration), (split, tokens)):
            line = None if t is None else truncation_line(name, t, cfg.model.max_length)
            if line:
                console().print(f"[yellow]monitor: {line}")
        rows, per_doc = document_metrics(tokens, cfg.monitor, split, calibration=calibration, calibration_split=cal_split)
        best = recommend(rows)
        csv_path, jsonl_path = layout.monitor_csv(split), layout.doc_scores(split)
        write_rows_csv(csv_path, rows)
        atomic_write_bytes(jsonl_path, "".join(json.dumps(d, sort_keys=True) + "\n" for d in per_doc).encode())
        update_run_record(layout, cfg, f"monitor:{split}", {
            "split": split,
            "calibration_split": cal_split,
            "truncation": truncated,
            "probes": [p.key for p in probes],
            "recommended": None if best is None else {**best, "operating_point": operating_point(best)},
            "outputs": {str(p): file_sha256(p) for p in (csv_path, jsonl_path)},
        })
    from ..fit.probe import LinearProbe
    from ..fit.verdict import one_row_per_probe

    _print(rows, split, best, one_row_per_probe({(p.layer, p.seed): LinearProbe.load(p.path) for p in probes}))
    return {"metrics": rows, "csv": str(csv_path), "scores": str(jsonl_path), "recommended": best,
            "operating_point": None if best is None else operating_point(best)}


def _pct(x: float) -> str:
    return f"{x:.0%}" if x >= 0.1 else f"{x:.1%}"


def _rate_cell(r: dict[str, Any], name: str) -> str:
    """TPR, then (on a line of its own) the needle documents flagged and the clean ones flagged (FP)."""
    if r[f"tpr_at_{name}_fpr"] is None:
        return "–"
    return f"{r[f'tpr_at_{name}_fpr']:.2f}\n{r[f'tp_at_{name}_fpr']}, FP {r[f'fp_at_{name}_fpr']}"


def monitor_table(rows: list[dict[str, Any]], split: str, seeds: dict[tuple[int, int], list[int]] | None = None):
    """The monitor's table, laid out for 80 columns: each cell's second line holds the confidence interval or the
    counts (their totals are in the title), and the aggregation names are never cut.

    ``seeds``: (layer, seed) of each distinct probe → the seeds that gave it (``verdict.one_row_per_probe``), so
    identical seeds share a row; None: a row per probe.
    """
    from rich.table import Table

    from ..fit.verdict import SAME_SEEDS

    seeds = seeds or {(r["layer"], r["seed"]): [r["seed"]] for r in rows}
    r0 = rows[0]
    cal, n_clean = r0["calibration_split"], r0["n_calibration_clean_docs"]
    where = "the same split" if cal == split else "held out"
    n_pos = r0["n_needle_docs"]
    t = Table(title=f"document monitor on {split!r}: AUROC [95% CI]; TPR (needle documents flagged of {n_pos}, FP: "
                    f"clean ones flagged of {r0['n_docs'] - n_pos}) at thresholds set on the {n_clean} clean {cal!r} "
                    f"documents ({where})",
              caption=SAME_SEEDS if any(len(g) > 1 for g in seeds.values()) else None)
    t.add_column("layer", justify="right")
    t.add_column("seed", justify="right")
    t.add_column("aggregation", no_wrap=True)
    for c in ("AUROC\n95% CI", "TPR at\n1% FPR", "TPR at\n5% FPR"):
        t.add_column(c, justify="right")
    for r in (r for r in rows if (r["layer"], r["seed"]) in seeds):
        t.add_row(str(r["layer"]), ", ".join(map(str, seeds[(r["layer"], r["seed"])])), r["aggregation"],
                  f"{r['auroc']:.3f}\n{r['auroc_ci_low']:.3f}–{r['auroc_ci_high']:.3f}",
                  _rate_cell(r, "1pct"), _rate_cell(r, "5pct"))
    return t


def _print(rows: list[dict[str, Any]], split: str, best: dict[str, Any] | None = None,
           seeds: dict[tuple[int, int], list[int]] | None = None) -> None:
    """The table and the recommendation (the answer, on stdout), and a warning (stderr) for each FPR the calibration
    split cannot resolve.  ``seeds``: as for :func:`monitor_table`."""
    from rich.markup import escape

    out = results()
    seeds = seeds or {(r["layer"], r["seed"]): [r["seed"]] for r in rows}
    r0 = rows[0]
    cal, n_clean = r0["calibration_split"], r0["n_calibration_clean_docs"]
    out.print(monitor_table(rows, split, seeds))
    for fpr, name in TARGET_FPRS:
        if r0[f"tpr_at_{name}_fpr"] is None:
            console().print(f"[yellow]warning: no TPR at {fpr:.0%} FPR: {cal!r} has {n_clean} clean documents, and "
                            f"{clean_docs_advice(fpr)} (add needle-free documents, or set monitor.calibration_split)")
    if best is None:
        out.print(f"no recommendation: {cal!r} needs documents with and without needles to choose an aggregation on")
        return
    same = seeds.get((best["layer"], best["seed"]), [best["seed"]])
    who = f"seed {best['seed']}" if len(same) == 1 else f"seeds {', '.join(map(str, same))} (identical probes)"
    line = (f"recommended: layer {best['layer']} {who}, {best['aggregation']} (best document AUROC on "
            f"{cal!r}: {best['calibration_auroc']:.3f}); on {split!r}: AUROC {best['auroc']:.3f} "
            f"({best['auroc_ci_low']:.3f}–{best['auroc_ci_high']:.3f})")
    op, n_pos = operating_point(best), best["n_needle_docs"]
    flags = (f"it flags {op['tp']}/{n_pos} needle documents and {op['fp']}/{best['n_docs'] - n_pos} clean ones "
             f"(FPR {op['fpr']:.0%} on {split!r})")
    bound = f"FPR at most {_pct(op['fpr_upper95'])} at {FPR_CONFIDENCE:.0%} confidence"
    if op["target_fpr"] is not None:
        line += (f"; at {op['target_fpr']:.0%} FPR (threshold {op['threshold']:.3f} from {n_clean} clean {cal!r} "
                 f"documents; {bound}, exact binomial) {flags}")
    else:
        fpr = TARGET_FPRS[-1][0]
        line += (f"; no {fpr:.0%} FPR threshold can be set from {n_clean} clean {cal!r} documents, so the operating "
                 f"point is just above the highest of them, threshold {op['threshold']:.3f}: {flags}; none of the "
                 f"{n_clean} is above it, so its FPR is at most {_pct(op['fpr_upper95'])} at {FPR_CONFIDENCE:.0%} "
                 f"confidence (exact binomial, Clopper–Pearson); {clean_docs_advice(fpr)}")
    out.print(escape(line))
    if op.get("detection_rate") is not None:
        out.print(escape(
            f"needle detection at that threshold: {op['detected_spans']}/{op['n_needle_spans']} needle spans "
            f"({op['detection_rate']:.0%}) have the running aggregate above it before the span ends, "
            f"{op['latency_median']:g} tokens after the span's first token (median; 90th percentile "
            f"{op['latency_p90']:g})"))
