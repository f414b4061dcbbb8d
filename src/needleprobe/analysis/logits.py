"""Token logits of a run's probes: scored by running the model once, kept in a Zarr store of their own.

Token logits live in ``Layout.monitor_store`` (the run's
``monitor/token_logits.zarr``, or a transfer directory's), never in the
activation cache, which stays write-once after extract.  Logits are stored per
probe (identified by its file's sha256), so re-aggregating with a new k, window
or temperature, or asking for a subset of the probes already scored, never runs
the model again; when the model must run, it runs with the same hooks,
batching, early stop and resume as ``extract`` (:mod:`needleprobe.extract.runner`).

Store layout, one group per split::

    {split}/                    attrs: tokens (what the token tables depend on), n_rows
        doc_ids [D], doc_n_needles [D], doc_needles_lost [D]   the split's documents (file order); needles cut off
                                                             by truncation (attrs: truncation, the split's totals)
        doc_index [N], token_index [N], token_id [N], needle [N]   every text token, in processing order
        pass-{fingerprint}/logits [N, P]                     one model run's probes (attrs: probes, commit state)
"""

from __future__ import annotations

import hashlib
import json
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
from ..config import Config
from ..data.documents import by_split, file_sha256, load_documents
from ..errors import NeedleprobeError
from ..io.console import console
from .run import Run


LOGIT_CHUNK_ROWS = 1 << 16


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
    from ..extract.batching import batch_plan, budget_message, device_budget
    from ..extract.runner import SplitBatches, forwarding, run_batches
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
    with ThreadPoolExecutor(max_workers=1) as pool, forwarding(model, requests, pad_id, device) as fwd:
        stream = ChunkStream(pg, ["logits"], committed, pool)
        run_batches(fwd, SplitBatches(split, tdocs, rows_of, batches), stream, committed,
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
