"""What the report pages show, read from what the other stages stored: the probes (through ``Run``), the monitor's
results and token logits (``monitor.stored_results``), the transfer results of ``evaluate``; nothing is decided again here."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...config import Config
from ...errors import NeedleprobeError

if TYPE_CHECKING:
    from ...run.layout import Layout


def command(name: str, cfg: Config, run: str | None = None) -> str:
    """``needleprobe NAME --config X [--run R]``: the command a note tells the user to run for this run."""
    return f"needleprobe {name} --config {cfg.source or '<config>'}" + (f" --run {run}" if run else "")


@dataclass
class ProbeInfo:
    layer: int
    seed: int
    pt: Path
    probe: Any  # probe.LinearProbe

    @property
    def meta(self) -> dict[str, Any]:
        return self.probe.metadata_

    @property
    def auroc(self) -> float:
        return float(self.meta["val_metrics"]["auroc"])

    @property
    def ci(self) -> tuple[float, float] | None:
        ci = self.meta.get("val_metrics", {}).get("auroc_ci95")
        return (float(ci[0]), float(ci[1])) if ci else None


def load_probe_infos(cfg: Config, run: str | None = None) -> tuple[list[ProbeInfo], list[str]]:
    """Probes of the config's layers × seeds that exist on disk, and the ones that do not."""
    from ..run import Run

    fitted = Run.of(cfg, run)
    found, missing = [], []
    for layer in sorted(cfg.probe.layers_to_probe):
        for seed in cfg.probe.train_seeds:
            if fitted.has(layer, seed):
                found.append(ProbeInfo(layer, seed, fitted.probe_path(layer, seed), fitted.probe(layer, seed)))
            else:
                missing.append(f"layer {layer} seed {seed}")
    return found, missing


def best_per_layer(probes: list[ProbeInfo]) -> dict[int, ProbeInfo]:
    """Each layer's best seed (``verdict.best_seed_per_layer``: highest val AUROC, ties to the lowest seed)."""
    from ...fit.verdict import best_seed_per_layer

    by_key = {(p.layer, p.seed): p for p in probes}
    return {layer: by_key[(layer, seed)] for layer, seed in best_seed_per_layer({k: p.auroc for k, p in by_key.items()}).items()}


def best_overall(probes: list[ProbeInfo]) -> ProbeInfo:
    """The best probe (``verdict.ranked_layers``: val AUROC, then the layer's seed mean, then the earlier layer)."""
    from ...fit.verdict import ranked_layers

    by_key = {(p.layer, p.seed): p for p in probes}
    return by_key[ranked_layers({k: p.auroc for k, p in by_key.items()})[0]]


@dataclass
class MonitorView:
    split: str
    tokens: Any  # monitor.MonitorTokens
    column: int
    layer: int
    seed: int
    agg_rows: list[dict[str, Any]] = field(default_factory=list)
    doc_scores: dict[str, np.ndarray] = field(default_factory=dict)
    all_probe_aurocs: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)
    chosen: str = "max"
    seeds: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    """(layer, seed) of each distinct monitored probe → the seeds that gave it (``verdict.one_row_per_probe``)"""
    calibration_split: str = ""
    """whose clean documents set the thresholds (and whose AUROC chose the aggregation)"""
    n_calibration_clean: int = 0


def choose_monitor_tokens(cfg: Config, run: str | None, probes: list[ProbeInfo]) -> tuple[tuple[str, Any] | None, list[str]]:
    """(split, stored token logits of the run's current probes) to show: the config's split first; notes on the rest.

    Logits are looked up by each probe file's sha256 and each split's current
    documents, so a refit probe or an edited dataset is never shown with the
    old logits; the notes say which stored splits were passed over and why.
    """
    from ...data.documents import file_sha256
    from ...run.layout import Layout
    from ..logits import LogitStore, ProbeRef, stored_tokens

    layout = Layout.from_config(cfg, run)
    refs = [ProbeRef(p.layer, p.seed, p.pt, file_sha256(p.pt)) for p in probes]
    store = LogitStore(layout.monitor_store)
    order = [cfg.monitor.split] + [s for s in ("test", "val", "train") if s != cfg.monitor.split]
    stored = set(_stored_splits(layout.monitor_store))
    notes: list[str] = []
    for split in order:
        tokens = stored_tokens(cfg, store, split, refs)
        if tokens is not None:
            if len(tokens.probes) < len(refs):
                from ...fit.verdict import one_row_per_probe

                have = {(int(p["layer"]), int(p["seed"])) for p in tokens.probes}
                distinct = one_row_per_probe({(p.layer, p.seed): p.probe for p in probes})  # identical seeds once
                lack = [(layer, g) for (layer, _), g in distinct.items() if not any((layer, s) in have for s in g)]
                if lack:
                    names = ", ".join(f"layer {layer} seed{'s' if len(g) > 1 else ''} {', '.join(map(str, g))}"
                                      for layer, g in lack)
                    notes.append(f"the monitor's {split!r} logits are of {len(distinct) - len(lack)} of the "
                                 f"{len(distinct)} distinct probes (not of {names}: scored before a refit, or never)")
            return (split, tokens), notes
        if split in stored:
            notes.append(f"the monitor's stored {split!r} logits are of other probe files or other documents "
                         "(refit or dataset edited since the monitor ran)")
    return None, notes


def _stored_splits(store_path) -> list[str]:
    """Split groups in a monitor store (none when it does not exist or cannot be read)."""
    from ...io.stores import open_group

    if not (store_path / "zarr.json").is_file():
        return []
    try:
        return sorted(open_group(store_path, mode="r").group_keys())
    except Exception:  # a damaged store reads as absent here; the monitor itself reports the damage
        return []


DETECTION_PREFIXES = ("detected_spans_", "detection_rate_", "latency_median_", "latency_p90_")


def monitor_view(cfg: Config, split: str, tokens, probes: list[ProbeInfo], stored) -> MonitorView:
    """The monitor's results on ``split`` as ``needleprobe monitor`` stored them, with document scores for the charts.

    ``stored``: (metrics rows, recommended row) from :func:`monitor.stored_results`.  The probe and aggregation
    shown are the ones the monitor recommended, and the table's numbers are its CSV's: the report decides nothing
    again.  The stored token logits are only aggregated (``monitor.document_scores``) for the ROC curves, the
    heatmaps and the per-probe AUROC table.
    """
    from sklearn.metrics import roc_auc_score

    from ...fit.verdict import one_row_per_probe, ranked_layers
    from ..aggregation import AGGREGATIONS, aggregation_label, doc_labels, document_scores
    from ..calibration import TARGET_FPRS

    rows, rec = stored
    cols = [(int(p["layer"]), int(p["seed"])) for p in tokens.probes]
    if rec is not None and (int(rec["layer"]), int(rec["seed"])) in cols:
        j = cols.index((int(rec["layer"]), int(rec["seed"])))
    else:  # no recommendation (the calibration split lacks needle or clean documents): the best probe shown
        j = cols.index(ranked_layers({k: p.auroc for p in probes if (k := (p.layer, p.seed)) in cols})[0])
    view = MonitorView(split, tokens, j, cols[j][0], cols[j][1])
    by_key = {(p.layer, p.seed): p.probe for p in probes}
    view.seeds = one_row_per_probe({k: by_key[k] for k in cols if k in by_key})
    y = doc_labels(tokens)
    for jj, (layer, seed) in enumerate(cols):
        per = {}
        for method in AGGREGATIONS:
            s = document_scores(tokens, jj, method, cfg.monitor)
            if jj == j:
                view.doc_scores[method] = s
            per[method] = float(roc_auc_score(y, s))
        view.all_probe_aurocs.append((layer, seed, per))
    method_of = {aggregation_label(m, cfg.monitor): m for m in AGGREGATIONS}
    mine = {r["aggregation"]: r for r in rows if (int(r["layer"]), int(r["seed"])) == cols[j]}
    if not mine:
        return view
    for label, method in method_of.items():
        r = mine[label]
        row = {"method": method, "label": label, "auroc": r["auroc"], "ci": (r["auroc_ci_low"], r["auroc_ci_high"]),
               "cal_auroc": r["calibration_auroc"], "tpr_above_clean": r["tpr_above_clean"],
               "fpr_upper95_above_clean": r["fpr_upper95_above_clean"]}
        for _, name in TARGET_FPRS:
            row[f"tpr_{name}"] = r[f"tpr_at_{name}_fpr"]
        row["detection"] = {k: v for k, v in r.items() if k == "n_needle_spans" or k.startswith(DETECTION_PREFIXES)}
        view.agg_rows.append(row)
    first = next(iter(mine.values()))
    view.calibration_split, view.n_calibration_clean = first["calibration_split"], int(first["n_calibration_clean_docs"])
    view.chosen = method_of[rec["aggregation"]] if rec is not None else AGGREGATIONS[0]
    return view


@dataclass
class RunView:
    """One run of a comparison: its config, its directory, its probes and how deep the model is."""

    cfg: Config
    layout: "Layout"
    probes: list[ProbeInfo]
    missing: list[str]
    n_layers: int | None
    n_layers_from: str
    parts: list[str] = field(default_factory=list)  # what tells it apart: dataset key, then model slug, site

    @property
    def label(self) -> str:
        return " · ".join(self.parts)

    @property
    def best(self) -> dict[int, ProbeInfo]:
        return best_per_layer(self.probes)

    def depth(self, layer: int) -> float | None:
        """Relative depth of a layer: layer / n_layers (None when the depth is unknown)."""
        return layer / self.n_layers if self.n_layers else None


def model_depth(cfg: Config) -> tuple[int | None, str]:
    """(number of blocks, where it was read): the cache's metadata, else the model's config (no weights loaded)."""
    from ...cache.reader import open_cache

    try:
        n = open_cache(cfg, allow_incomplete=True).metadata.get("n_layers")
    except NeedleprobeError:
        n = None
    if n:
        return int(n), "cache"
    from ...model.hooks import model_shape

    n = model_shape(cfg)[0]
    return (int(n), "model config") if n else (None, "unknown")


def load_runs(cfgs: list[Config], run: str | None = None) -> list[RunView]:
    """The runs to compare, each with its probes; one line naming the config when one cannot be compared."""
    from collections import Counter

    from ...run.layout import Layout, RunIdentity, model_dir_name

    if len(cfgs) < 2:
        raise NeedleprobeError("a comparison needs two configs or more (--config A.yaml --config B.yaml); "
                               "with one --config, `needleprobe report` writes that run's own report")
    views: list[RunView] = []
    seen: dict[str, str] = {}
    from ...run.record import run_config

    for cfg in [run_config(c, run) for c in cfgs]:  # each run as it was fitted (its record)
        layout = Layout.from_config(cfg, run)
        where = cfg.source or cfg.dataset.key
        if str(layout.run_dir) in seen:
            raise NeedleprobeError(f"{where}: the same run as {seen[str(layout.run_dir)]} ({layout.run_dir}); "
                                   "a comparison needs different runs")
        seen[str(layout.run_dir)] = where
        owner = layout.owner()
        if owner is not None and owner != RunIdentity.from_config(cfg):
            raise NeedleprobeError(f"{layout.run_dir}: holds probes of {owner.describe()}, but {where} is "
                                   f"{layout.identity.describe()}")
        probes, missing = load_probe_infos(cfg, run)
        if not probes:
            raise NeedleprobeError(f"{where}: no probes in {layout.run_dir} (run `{command('fit', cfg, run)}` first)")
        views.append(RunView(cfg, layout, probes, missing, *model_depth(cfg), parts=[cfg.dataset.key]))
    extras = (lambda v: model_dir_name(v.cfg.model.name, v.cfg.model.gguf_file), lambda v: v.cfg.probe.activation_site)
    for extra in extras:  # only runs that share a label get told apart
        count = Counter(v.label for v in views)
        for v in views:
            if count[v.label] > 1:
                v.parts.append(extra(v))
    count = Counter(v.label for v in views)
    for i, v in enumerate(views):
        if count[v.label] > 1:  # the same dataset, model and site in two output directories
            v.parts.append(f"#{i + 1}")
    return views


@dataclass
class TransferCell:
    auroc: float
    seed: int
    stale: bool


def read_transfer(source: RunView, target: RunView) -> tuple[dict[int, TransferCell] | None, str | None]:
    """(layer → token AUROC of ``source``'s best probe on ``target``'s val, or None when not evaluated; a problem).

    Read from ``{source run}/transfer/{target dataset}-val/eval_metrics.csv``.  Per
    layer, the row of the seed that is best on the source's own val (the one
    ``evaluate --matrix`` scores); a row whose ``source_val_auroc`` is not the
    probe's current one, or of a seed that is no longer the best, was scored
    with probes refit since (``stale``).
    """
    from ...run.layout import TransferFiles

    path = TransferFiles(source.layout.transfer_dir(target.layout, "val")).eval_csv
    if not path.is_file():
        return None, None
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        parsed = [(int(r["layer"]), int(r["seed"]), float(r["token_auroc"]), r.get("source_val_auroc") or "") for r in rows]
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:
        return None, f"{path}: cannot read ({type(e).__name__}: {str(e)[:80]})"
    current = {(p.layer, p.seed): p.auroc for p in source.probes}
    best = source.best
    out: dict[int, TransferCell] = {}
    for layer in sorted({r[0] for r in parsed}):
        rows_l = [r for r in parsed if r[0] == layer]
        want = best[layer].seed if layer in best else None
        pick = next((r for r in rows_l if r[1] == want), None)
        if pick is None:
            pick = max(rows_l, key=lambda r: (float(r[3]) if r[3] else -1.0, -r[1]))
        own = float(pick[3]) if pick[3] else None
        refit = own is None or current.get((layer, pick[1])) != own or (want is not None and pick[1] != want)
        out[layer] = TransferCell(pick[2], pick[1], refit)
    return out, None


def read_monitor(v: RunView) -> tuple[dict[str, Any] | None, str | None]:
    """(what the run's document monitor recommends, a note): read from the monitor's stored outputs, never recomputed.

    The run record's ``monitor:{split}`` section (the config's ``monitor.split`` first, then test, val, train) holds the
    recommended row (probe, aggregation chosen on the calibration split, its AUROC with CI and TPR at the calibrated
    thresholds on the split) and the sha256 of ``monitor_metrics_{split}.csv``; a CSV changed since is not trusted.
    A fit drops these sections, so what is left describes the run's current probes.
    """
    from ...data.documents import file_sha256
    from ...run.record import read_run_record

    stages = read_run_record(v.layout.run_record).get("stages", {})
    changed = []
    for split in dict.fromkeys([v.cfg.monitor.split, "test", "val", "train"]):
        sec = stages.get(f"monitor:{split}")
        if not sec:
            continue
        csv_path = str(v.layout.monitor_csv(split))
        try:
            same = file_sha256(csv_path) == sec.get("outputs", {}).get(csv_path)
        except OSError:
            same = False
        if not same:
            changed.append(split)
            continue
        if sec.get("recommended") is None:
            return None, f"{v.label}: the monitor on {split!r} made no recommendation (its calibration split lacks needle or clean documents)"
        return {**sec["recommended"], "split": split, "calibration_split": sec.get("calibration_split", "")}, None
    why = (f"its stored results on {', '.join(map(repr, changed))} changed since the monitor wrote them; " if changed else "")
    return None, f"{v.label}: no document monitor results ({why}run `{command('monitor', v.cfg)}`)"
