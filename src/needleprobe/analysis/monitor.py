"""The ``monitor`` command: a run's probes on a split, document by document, and the outputs it stores.

The probe scores every text token of every document in a split
(:mod:`needleprobe.analysis.logits`: the model runs once, logits are kept per
probe); an aggregation turns a document's token logits into one score
(:mod:`needleprobe.analysis.aggregation`); thresholds are set on the clean
documents of a calibration split (:mod:`needleprobe.analysis.calibration`).
This module runs those steps, writes the metrics CSV and the run record's
recommendation, reads them back for the report, and prints the table.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from ..config import Config
from ..data.documents import by_split, file_sha256, load_documents
from ..errors import NeedleprobeError
from ..io.console import console, results
from ..io.files import FileLock, atomic_write_bytes
from ..metrics import FPR_CONFIDENCE
from ..run.layout import Layout
from ..run.record import update_run_record
from .aggregation import document_metrics, recommend
from .calibration import TARGET_FPRS, clean_docs_advice, operating_point
from .logits import LogitStore, probe_refs, score_tokens, truncation_line
from .run import Run


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
            f"{op['latency_median']:g} token{'' if op['latency_median'] == 1 else 's'} after the span's first token "
            f"(median; 90th percentile {op['latency_p90']:g})"))
