"""From token logits to documents: the aggregations, and the document metrics of every probe and aggregation.

An aggregation turns a document's token logits into one score ("is there a
needle somewhere in here?").  Each (probe, aggregation) gets document AUROC
with a bootstrap 95% CI and TPR at 1% and 5% FPR with thresholds set on the
calibration split (:mod:`needleprobe.analysis.calibration`); the aggregation
and layer to recommend are chosen on the calibration split and reported on the
evaluated one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import MonitorConfig
from ..errors import NeedleprobeError
from ..metrics import binary_metrics, bootstrap_auroc_ci
from .calibration import TARGET_FPRS, calibrated_rates
from .logits import MonitorTokens


AGGREGATIONS = ("mean", "max", "topk_mean", "rolling_max", "softmax_mean")


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
