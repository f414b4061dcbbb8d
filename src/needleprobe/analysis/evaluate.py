"""Transfer evaluation: saved probes scored on another dataset's activations.

The question that matters most for a monitor is whether a probe trained on
one kind of data (synthetic injections, say) catches another (real ones).
``evaluate`` scores one run's probes on a target dataset: token-level metrics
on the target's cached rows (needle tokens and the sampled negatives; for the
``test`` split, which the cache does not hold, every text token), and the
document monitor's aggregations on the target split.  ``--matrix`` does every
dataset's best probes on every dataset's val split.

Probes and target must come from the same model and activation site and share
d_model: anything else is refused in one line before any work.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, load_config
from ..errors import NeedleprobeError
from ..run.layout import Layout, RunIdentity, TransferFiles, comparison_page, transfer_path
from ..metrics import binary_metrics, bootstrap_auroc_ci
from ..fit.probe import LinearProbe
from ..fit.verdict import best_seed_per_layer, val_aurocs
from ..io.console import console, results
from ..io.files import atomic_write_json
from ..io.stores import as_path
from .run import Run

TOKEN_COLUMNS = ("layer", "seed", "split", "token_auroc", "auroc_ci_low", "auroc_ci_high", "average_precision",
                 "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "rows", "positives", "source_val_auroc")


@dataclass
class Source:
    """The probes being evaluated, where they came from, and where their transfer results go."""

    run_dir: Path
    probes: dict[tuple[int, int], LinearProbe]
    identity: RunIdentity | None

    @property
    def label(self) -> str:
        return self.identity.dataset if self.identity else self.run_dir.name


def load_source(spec: str | os.PathLike, run: str | None = None) -> Source:
    """A run's probes from its config (``.yaml``: the layers and seeds its record says it was fitted with) or its
    probe directory (every probe in it)."""
    from ..run.record import run_config

    p = as_path(spec)
    wanted = None
    if p.suffix in (".yaml", ".yml"):
        cfg = run_config(load_config(p), run)
        fitted = Run.of(cfg, run)
        if cfg.fitted is not None:
            wanted = {(layer, seed) for layer in cfg.probe.layers_to_probe for seed in cfg.probe.train_seeds}
    else:
        if run:
            raise NeedleprobeError("--probes-run names a run of a config; --probes is a directory here")
        if not p.is_dir():
            raise NeedleprobeError(f"{p}: no such probe directory (give a config or a directory of probe files)")
        fitted = Run.at(p)
    run_dir = fitted.run_dir
    probes = fitted.probes()
    if not probes:
        raise NeedleprobeError(f"{run_dir}: no probe files (probe_layer_L_seed_S.pt) here; run `needleprobe fit` first")
    if wanted is not None:
        probes = {k: v for k, v in probes.items() if k in wanted}
        if not probes:
            raise NeedleprobeError(f"{run_dir}: none of the probes its run record lists is here; run `needleprobe fit`")
    idents = {q.identity for q in probes.values()}
    if None in idents:
        raise NeedleprobeError(f"{run_dir}: a probe has no metadata (.json beside its .pt), so its model and site are unknown")
    if len(idents) > 1:
        raise NeedleprobeError(f"{run_dir}: holds probes of several runs ({'; '.join(sorted(i.describe() for i in idents))})")
    return Source(run_dir, probes, idents.pop())


def _check_compatible(source: Source, target: Config, cache) -> None:
    """Same model, site and width, or one line saying what differs."""
    want = RunIdentity.from_config(target)
    got = source.identity
    if (got.model, got.revision, got.site) != (want.model, want.revision, want.site):
        raise NeedleprobeError(
            f"{source.run_dir}: probes of {got.model}{'@' + got.revision if got.revision else ''} · {got.site}, "
            f"the target is {want.model}{'@' + want.revision if want.revision else ''} · {want.site}: "
            "probes read one model's activations at one site"
        )
    if cache is None:  # the test split: the model itself checks width and depth (``monitor.score_tokens``)
        return
    d_model = int(cache.metadata.get("d_model", 0))
    for (layer, seed), probe in source.probes.items():
        if d_model and probe.d_model != d_model:
            raise NeedleprobeError(f"{source.run_dir}: probe layer {layer} seed {seed} reads d_model {probe.d_model}, "
                                   f"the target cache has {d_model}")
        if layer not in cache.layers:
            raise NeedleprobeError(f"{source.run_dir}: probe layer {layer} is not in the target cache {cache.path} "
                                   f"(cached: {', '.join(map(str, cache.layers))}); extract it there first")


def _check_split(cfg: Config, split: str) -> None:
    """The target split needs needle and clean documents (token AUROC, document AUROC): checked before any work."""
    from ..data.documents import by_split, load_documents

    path = cfg.dataset.resolved_path()
    docs = by_split(load_documents(path, cfg.dataset.val_fraction))[split]
    with_needles = sum(1 for d in docs if d.needle_spans)
    if not docs or with_needles in (0, len(docs)):
        what = "no documents" if not docs else ("only clean documents" if with_needles == 0 else "only needle documents")
        raise NeedleprobeError(f"{path}: split {split!r} has {what}; evaluating needs documents with and without needles")


def target_cache(cfg: Config, split: str = "val", show_progress: bool = True):
    """The target's activation cache holding ``split``, extracting that split alone first when it is missing (None for
    ``test``, which no cache holds: its tokens are scored through the model)."""
    from ..cache.format import FIT_SPLITS
    from ..cache.reader import open_cache
    from ..fit.fit import verify_cache
    from ..run.layout import Layout

    if split not in FIT_SPLITS:
        return None
    path = Layout.from_config(cfg).cache
    cache = open_cache(cfg, allow_incomplete=True) if (path / "zarr.json").is_file() else None
    if cache is None or (not cache.complete and split not in cache.splits):
        from ..extract.extract import extract

        con = console()
        con.print(f"evaluate: no activation cache for {cfg.dataset.key} yet: extracting it (the {split} split only, "
                  "the one scored)" if cache is None else
                  f"evaluate: the activation cache of {cfg.dataset.key} lacks the {split} split: extracting it")
        res = extract(cfg, show_progress=show_progress, splits=(split,))
        con.print(f"extract: {res.tokens:,} tokens in {res.seconds:.1f} s → {res.path}")
        cache = open_cache(cfg, allow_incomplete=True)
    verify_cache(cfg, cache)
    return cache


def token_metrics(probe: LinearProbe, x: np.ndarray, y: np.ndarray, groups: np.ndarray, what: str) -> dict[str, Any]:
    """Token AUROC with a document-bootstrap 95% CI, AP, TPR at 1% / 5% FPR of one probe on rows ``x`` [n, d]."""
    return score_metrics(probe.decision_function(x), y, groups, what)


def score_metrics(s: np.ndarray, y: np.ndarray, groups: np.ndarray, what: str) -> dict[str, Any]:
    """The same metrics from token logits ``s`` [n] (labels ``y``, document of each row ``groups``)."""
    if y.min() == y.max():
        raise NeedleprobeError(f"{what}: every row has the same label (only {'needle' if y[0] else 'clean'} tokens); "
                               "AUROC needs both")
    m = binary_metrics(y, s)
    lo, hi = bootstrap_auroc_ci(y, s, groups, n_boot=1000, seed=0)
    return {"token_auroc": m["auroc"], "auroc_ci_low": lo, "auroc_ci_high": hi,
            "average_precision": m["average_precision"], "tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"],
            "tpr_at_5pct_fpr": m["tpr_at_5pct_fpr"], "rows": int(y.size), "positives": int(y.sum())}


def evaluate(target: Config, probes: str | os.PathLike, *, split: str = "val", source_run: str | None = None,
             layers: list[int] | None = None, show_progress: bool = True, show: bool = True) -> dict[str, Any]:
    """Score a run's probes on ``target``'s ``split``; write ``eval_metrics.csv``/``.json`` under the source run.

    Returns what ``eval_metrics.json`` holds, and where it is (``output_dir``); ``show``: print the table on stdout.
    """
    from ..data.documents import file_sha256
    from .aggregation import document_metrics
    from .logits import LogitStore, ProbeRef, score_tokens, truncation_line
    from .monitor import write_rows_csv

    source = load_source(probes, source_run)
    if source.identity.site not in target.probe.sites:
        raise NeedleprobeError(
            f"{source.run_dir}: probes of site {source.identity.site}, the target config has "
            f"{', '.join(target.probe.sites)}: probes read one model's activations at one site"
        )
    target = target.for_site(source.identity.site)
    if layers:
        unknown = sorted(set(layers) - {layer for layer, _ in source.probes})
        if unknown:
            raise NeedleprobeError(f"{source.run_dir}: no probes of layer(s) {unknown} "
                                   f"(it has {sorted({layer for layer, _ in source.probes})})")
        source.probes = {k: v for k, v in source.probes.items() if k[0] in layers}
    _check_split(target, split)
    cache = target_cache(target, split, show_progress)
    _check_compatible(source, target, cache)
    out_dir = transfer_path(source.run_dir, target.dataset.key, split)
    files = TransferFiles(out_dir)
    rows: list[dict[str, Any]] = []
    fitted = Run.at(source.run_dir)
    refs = [ProbeRef(layer, seed, fitted.probe_path(layer, seed), file_sha256(fitted.probe_path(layer, seed)))
            for layer, seed in sorted(source.probes)]
    tokens = None
    if split == "test":  # not cached: every text token, scored through the model (stored for the next time)
        tokens = score_tokens(target, LogitStore(files.token_logits), split, refs, show_progress=show_progress)
        groups = np.concatenate([np.full(len(n), i) for i, n in enumerate(tokens.needle)])
        y = np.concatenate(tokens.needle).astype(np.int8)
        for j, ((layer, seed), probe) in enumerate(sorted(source.probes.items())):
            logits = np.concatenate([lg[:, j] for lg in tokens.logits])
            rows.append(_row(layer, seed, split, score_metrics(logits, y, groups, f"{target.dataset.key} {split}"), probe))
    else:
        view = cache.split(split)
        y, groups = view.labels, view.doc_index
        for (layer, seed), probe in sorted(source.probes.items()):
            m = token_metrics(probe, view.to_numpy(layer), y, groups, f"{cache.path} {split}")
            rows.append(_row(layer, seed, split, m, probe))
    if tokens is None:
        tokens = score_tokens(target, LogitStore(files.token_logits), split, refs, show_progress=show_progress)
    line = truncation_line(split, tokens, target.model.max_length)
    if line:
        console().print(f"[yellow]evaluate: {line}")
    doc_rows, _ = document_metrics(tokens, target.monitor, split)
    write_rows_csv(files.eval_csv, rows)
    write_rows_csv(files.doc_csv, doc_rows)
    summary = {
        "source": {"probes": str(source.run_dir), "dataset": source.identity.dataset, "model": source.identity.model,
                   "site": source.identity.site},
        "target": {"config": target.source, "dataset": target.dataset.key, "split": split,
                   "cache": None if cache is None else str(cache.path),
                   "cache_fingerprint": None if cache is None else cache.fingerprint},
        "token_rows": "cached rows (needle tokens and sampled negatives)" if split != "test" else "every text token",
        "token_metrics": rows,
        "document_metrics": doc_rows,
        "truncation": tokens.truncation,
    }
    atomic_write_json(files.eval_json, summary)
    if show:
        _print(source, target, split, rows, doc_rows)
    console().print(f"transfer results in {out_dir}")
    return {**summary, "output_dir": str(out_dir)}


def _row(layer: int, seed: int, split: str, m: dict[str, Any], probe: LinearProbe) -> dict[str, Any]:
    return {"layer": layer, "seed": seed, "split": split, **m, "source_val_auroc": probe.val_auroc_}


def _print(source: Source, target: Config, split: str, rows: list[dict[str, Any]], doc_rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from ..fit.verdict import SAME_SEEDS, one_row_per_probe

    seeds = one_row_per_probe(source.probes)  # identical seeds share a row
    t = Table(title=f"probes of {source.label} on {target.dataset.key} ({split})",
              caption=SAME_SEEDS if any(len(g) > 1 for g in seeds.values()) else None)
    for c in ("layer", "seed", "own val AUROC", "token AUROC [95% CI]", "AP", "TPR at 1% FPR", "TPR at 5% FPR",
              "doc AUROC (best aggregation)"):
        t.add_column(c, justify="right")
    for r in (r for r in rows if (r["layer"], r["seed"]) in seeds):
        docs = [d for d in doc_rows if (d["layer"], d["seed"]) == (r["layer"], r["seed"])]
        best = max(docs, key=lambda d: d["auroc"]) if docs else None
        own = r["source_val_auroc"]
        t.add_row(str(r["layer"]), ", ".join(map(str, seeds[(r["layer"], r["seed"])])), "–" if own is None else f"{own:.4f}",
                  f"{r['token_auroc']:.4f} ({r['auroc_ci_low']:.3f}–{r['auroc_ci_high']:.3f})",
                  f"{r['average_precision']:.3f}", f"{r['tpr_at_1pct_fpr']:.3f}", f"{r['tpr_at_5pct_fpr']:.3f}",
                  "–" if best is None else f"{best['auroc']:.3f} ({best['aggregation']})")
    results().print(t)


def transfer_matrix(cfgs: list[Config], *, show_progress: bool = True, show: bool = True) -> dict[str, Any]:
    """Every dataset's best probes on every dataset's val split (token AUROC): a CSV per layer, trained-on × evaluated-on.

    Each pair's numbers are also written under the source run (``transfer/{target}-val/eval_metrics.csv``), where a
    comparison report finds them.  Returns the CSV's path and its cells; ``show``: print the tables on stdout.
    """
    from .monitor import write_rows_csv

    if len(cfgs) < 2:
        raise NeedleprobeError("--matrix needs at least two configs")
    cfgs = [c.single_site("evaluate --matrix") for c in cfgs]
    keys = [c.dataset.key for c in cfgs]
    if len(set(keys)) != len(keys):
        raise NeedleprobeError(f"--matrix: each config must name another dataset, got {keys}")
    models = {(RunIdentity.from_config(c).model, c.model.revision, c.probe.activation_site) for c in cfgs}
    if len(models) > 1:
        raise NeedleprobeError(f"--matrix: every config must use the same model and site, got {sorted(map(str, models))}")
    sources = [load_source(Layout.from_config(c).run_dir) for c in cfgs]
    caches = [target_cache(c, "val", show_progress) for c in cfgs]
    table: dict[tuple[int, str, str], float] = {}
    for src, scfg in zip(sources, cfgs):
        best = {layer: (seed, src.probes[(layer, seed)]) for layer, seed in best_seed_per_layer(val_aurocs(src.probes)).items()}
        for tcfg, cache in zip(cfgs, caches):
            _check_compatible(src, tcfg, cache)
            view = cache.split("val")
            y, groups = view.labels, view.doc_index
            rows = []
            for layer, (seed, probe) in sorted(best.items()):
                m = token_metrics(probe, view.to_numpy(layer), y, groups, f"{cache.path} val")
                rows.append(_row(layer, seed, "val", m, probe))
                table[(layer, scfg.dataset.key, tcfg.dataset.key)] = m["token_auroc"]
            write_rows_csv(TransferFiles(transfer_path(src.run_dir, tcfg.dataset.key, "val")).eval_csv, rows)
    layers = sorted({layer for layer, _, _ in table})
    lines = [["layer", "trained_on", *keys]]
    for layer in layers:
        for k in keys:
            lines.append([str(layer), k, *(repr(table[(layer, k, t)]) if (layer, k, t) in table else "" for t in keys)])
    out = comparison_page([s.run_dir for s in sources], f"transfer_matrix_{'+'.join(keys)}.csv")
    from ..io.files import atomic_write_bytes

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    atomic_write_bytes(out, buf.getvalue().encode())
    if show:
        _print_matrix(keys, layers, table)
    console().print(f"transfer matrix in {out}")
    cells = [{"layer": layer, "trained_on": s, "evaluated_on": t, "token_auroc": table[(layer, s, t)]}
             for layer in layers for s in keys for t in keys if (layer, s, t) in table]
    return {"csv": str(out), "datasets": keys, "cells": cells}


def _print_matrix(keys: list[str], layers: list[int], table: dict[tuple[int, str, str], float]) -> None:
    from rich.table import Table

    for layer in layers:
        t = Table(title=f"layer {layer}: token AUROC of each dataset's best probe (rows) on each dataset's val (columns)")
        t.add_column("trained on")
        for k in keys:
            t.add_column(k, justify="right")
        for s in keys:
            t.add_row(s, *(f"{table[(layer, s, k)]:.4f}" if (layer, s, k) in table else "–" for k in keys))
        results().print(t)
