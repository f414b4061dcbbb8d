"""Thresholds set on clean calibration documents, and what is known about their false-positive rate.

Thresholds are set on the needle-free documents of a calibration split
(``monitor.calibration_split``, default ``val``) at a target false-positive
rate and applied to the evaluated split, as a deployed monitor would be: set
on data it has seen, used on data it has not.  A clean set of n documents
cannot tell an FPR below 1/n from 0, so a target needing more than the
calibration split has is left empty, with a note, never guessed.  The
operating point is the 5% FPR threshold when the clean calibration documents
can set it, else the threshold just above the highest of them; either way with
a one-sided 95% upper bound on its FPR from the clean calibration documents
above it (exact binomial, Clopper–Pearson: :func:`metrics.fpr_upper_bound`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..metrics import FPR_CONFIDENCE, clean_docs_to_bound, fpr_upper_bound, threshold_at_fpr


TARGET_FPRS = ((0.01, "1pct"), (0.05, "5pct"))
"""False-positive rates the monitor sets thresholds for, and their names in the CSV's columns."""


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
