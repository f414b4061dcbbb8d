"""Metrics that turn probe logits into numbers worth reporting.

Standard metrics are delegated to scikit-learn so that numbers agree with what
anyone else would compute.  The one thing written by hand is a *weighted*
AUROC that handles many weight vectors at once: a bootstrap over documents is
just AUROC under integer resampling weights, and evaluating 1000 such weight
vectors with one sort and a few cumulative sums is far cheaper than 1000 calls
to ``roc_auc_score``.

Bad inputs (one class only, mismatched shapes, non-finite scores) raise
``ValueError``: they are programming errors upstream, not user-fixable config.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    roc_auc_score,
    roc_curve,
)

__all__ = [
    "tpr_at_fpr",
    "threshold_at_fpr",
    "binary_metrics",
    "weighted_auroc",
    "bootstrap_auroc_ci",
]

# Bootstrap resamples evaluated per weighted_auroc call; bounds memory to a few
# [_BOOT_CHUNK, n] float64 matrices whatever n_boot is.
_BOOT_CHUNK = 64


# --------------------------------------------------------------------------- #
# input validation
# --------------------------------------------------------------------------- #
def _labels(y_true: np.ndarray) -> np.ndarray:
    """Binary labels as a 1-D bool array (accepts bool or 0/1)."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty")
    if y.dtype != bool:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("y_true must contain only 0/1 (or bool) labels")
        y = y == 1
    return y


def _scores(scores: np.ndarray, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return s


def _require_both_classes(y: np.ndarray) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        only = "positive" if n_neg == 0 else "negative"
        raise ValueError(
            f"only one class present (all {y.size} labels are {only}); "
            "ranking metrics need both positives and negatives"
        )
    return n_pos, n_neg


def _check_fpr(max_fpr: float) -> float:
    max_fpr = float(max_fpr)
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    return max_fpr


# --------------------------------------------------------------------------- #
# point metrics
# --------------------------------------------------------------------------- #
def tpr_at_fpr(y_true: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """Highest TPR achievable with FPR <= max_fpr (sklearn roc_curve, no interpolation).

    No interpolation because an interpolated point is not reachable by any
    single threshold; a monitor has to pick one.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    _require_both_classes(y)
    max_fpr = _check_fpr(max_fpr)
    # Keep every ROC vertex so no attainable operating point is dropped.
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    # roc_curve always starts at (0, 0), so the mask is never empty.
    return float(tpr[fpr <= max_fpr].max())


def threshold_at_fpr(negative_scores: np.ndarray, max_fpr: float) -> float:
    """Smallest t with fraction(negative_scores > t) <= max_fpr.

    Used by the document monitor: the threshold is calibrated on clean
    documents only, and a document is flagged when its score is strictly
    above t.  The answer is always one of the negative scores (the count above
    t only changes there); for max_fpr = 1 that is the minimum negative score.
    """
    neg = np.asarray(negative_scores, dtype=np.float64)
    if neg.ndim != 1 or neg.size == 0:
        raise ValueError(f"negative_scores must be a non-empty 1-D array, got shape {neg.shape}")
    if not np.all(np.isfinite(neg)):
        raise ValueError("negative_scores contain NaN or infinite values")
    max_fpr = _check_fpr(max_fpr)
    n = neg.size
    sorted_neg = np.sort(neg)
    candidates = np.unique(sorted_neg)  # ascending
    n_above = n - np.searchsorted(sorted_neg, candidates, side="right")  # non-increasing
    ok = n_above / n <= max_fpr  # same arithmetic as the definition
    # ok is monotone False..True and the maximum always qualifies (0 above it).
    return float(candidates[np.argmax(ok)])


def binary_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Headline metrics for logits; plain Python numbers so the dict is JSON-ready.

    accuracy and f1 threshold at logit 0 (probability 0.5), i.e. the probe's
    own decision rule; the rank metrics ignore calibration altogether.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    n_pos, n_neg = _require_both_classes(y)
    pred = s > 0
    return {
        "auroc": float(roc_auc_score(y, s)),
        "average_precision": float(average_precision_score(y, s)),
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0.0)),
        "tpr_at_1pct_fpr": tpr_at_fpr(y, s, 0.01),
        "tpr_at_5pct_fpr": tpr_at_fpr(y, s, 0.05),
        "n": int(y.size),
        "n_positive": n_pos,
        "n_negative": n_neg,
    }


# --------------------------------------------------------------------------- #
# weighted AUROC and the grouped bootstrap
# --------------------------------------------------------------------------- #
def weighted_auroc(y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC for each row of a weight matrix, all rows in one vectorised pass.

    weights: [B, n] (or [n]) non-negative sample weights.  Returns [B] (or a
    0-d scalar array).  Equals ``roc_auc_score(y, s, sample_weight=w)``, ties
    counted as 1/2: AUROC = sum over tied-score groups of
    P_t * (negatives strictly below + N_t / 2) / (P * N).
    Rows whose positive or negative weight sums to zero get NaN (undefined),
    so a bootstrap can drop them without an exception per row.
    """
    y = _labels(y_true)
    n = y.size
    s = _scores(scores, n)
    _require_both_classes(y)
    w = np.asarray(weights, dtype=np.float64)
    scalar = w.ndim == 1
    if scalar:
        w = w[None, :]
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights must have shape ({n},) or (B, {n}), got {np.shape(weights)}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")

    # Sort once; tie groups are runs of equal scores in sorted order.
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    y_sorted = y[order]
    ws = w[:, order]
    pos = np.add.reduceat(np.where(y_sorted, ws, 0.0), starts, axis=1)  # [B, T]
    neg = np.add.reduceat(np.where(y_sorted, 0.0, ws), starts, axis=1)  # [B, T]
    del ws

    neg_below = np.cumsum(neg, axis=1)
    neg_below -= neg  # exclusive cumsum: negative weight strictly below each tie group
    neg_below += 0.5 * neg  # ties count half
    num = np.einsum("bt,bt->b", pos, neg_below)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where(den > 0, num / den, np.nan)
    return auc[0] if scalar else auc


def bootstrap_auroc_ci(
    y_true: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile (1 - alpha) CI of AUROC from a bootstrap over groups (documents).

    Tokens of one document are correlated, so resampling tokens would give a
    CI that is far too narrow; resampling whole documents respects that.  A
    resample draws the G distinct groups G times with replacement and weights
    each row by its group's draw count, which makes each resample one row of a
    weight matrix for :func:`weighted_auroc`.  Resamples are processed in
    chunks of 64 so memory is O(64 * n).  Resamples in which a class has zero
    weight are skipped; if more than half are skipped, ValueError (the groups
    are too few or too class-pure for a meaningful CI).  Deterministic given
    ``seed``.
    """
    y = _labels(y_true)
    n = y.size
    s = _scores(scores, n)
    _require_both_classes(y)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {g.shape}")
    n_boot = int(n_boot)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    _, inv = np.unique(g, return_inverse=True)
    inv = inv.reshape(-1)
    n_groups = int(inv.max()) + 1
    rng = np.random.default_rng(seed)

    aucs = np.empty(n_boot, dtype=np.float64)
    for lo in range(0, n_boot, _BOOT_CHUNK):
        b = min(_BOOT_CHUNK, n_boot - lo)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        # Per-resample draw counts via one flat bincount (row r offset by r * G).
        flat = (draws + (np.arange(b) * n_groups)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n_groups).reshape(b, n_groups)
        aucs[lo : lo + b] = weighted_auroc(y, s, counts[:, inv])

    valid = aucs[~np.isnan(aucs)]
    n_skipped = n_boot - valid.size
    if n_skipped * 2 > n_boot:
        raise ValueError(
            f"{n_skipped} of {n_boot} bootstrap resamples contained only one class; "
            f"too few groups ({n_groups}) with both classes for a group bootstrap CI"
        )
    lo_q, hi_q = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(lo_q), float(hi_q)
