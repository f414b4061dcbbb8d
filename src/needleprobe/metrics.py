"""Metrics that turn probe logits into numbers worth reporting.

The rank metrics reproduce scikit-learn's arithmetic operation for operation
(``roc_curve``/``auc``, ``average_precision_score``, ``accuracy_score``,
``f1_score``; tested equal), so reported numbers agree with what anyone else
would compute.  They are written here because one sort serves all of them, and
because importing scikit-learn (with scipy) costs longer than a whole probe fit
on small data.  The bootstrap CI is written by hand for speed: the AUROC of a
resample is a quadratic form in its per-document draw counts (see
:func:`bootstrap_auroc_ci`); :func:`paired_bootstrap_auroc_diff` runs two
scorings of the same rows through the same resamples.

Bad inputs (one class only, mismatched shapes, non-finite scores) raise
``ValueError``: they are programming errors upstream, not user-fixable config.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "tpr_at_fpr",
    "threshold_at_fpr",
    "fpr_upper_bound",
    "clean_docs_to_bound",
    "binary_metrics",
    "weighted_auroc",
    "bootstrap_auroc_ci",
    "paired_bootstrap_auroc_diff",
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
def _counts_at_thresholds(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fps, tps) float64 at each distinct score, highest first: scikit-learn's ``confusion_matrix_at_thresholds``.

    Counts are exact integers, so the order of rows within a tie does not
    matter and any sort serves.
    """
    order = np.argsort(s)[::-1]
    s_desc = s[order]
    threshold_idxs = np.r_[np.flatnonzero(np.diff(s_desc)), y.size - 1]
    tps = np.cumsum(y[order], dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs.astype(np.float64) - tps
    return fps, tps


def _auroc(fps: np.ndarray, tps: np.ndarray) -> float:
    """``roc_auc_score``: ``roc_curve`` (collinear points dropped) then the trapezoidal ``auc``."""
    if fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    fpr, tpr = fps / fps[-1], tps / tps[-1]
    d = fpr[1:] - fpr[:-1]
    return float(np.sum(d * (tpr[1:] + tpr[:-1]) / 2.0, dtype=np.float64))


def _average_precision(fps: np.ndarray, tps: np.ndarray) -> float:
    """``average_precision_score``: the step integral of the precision-recall curve."""
    precision = tps / (tps + fps)  # every threshold holds at least one row, so never 0/0
    recall = tps / tps[-1]
    precision = np.concatenate((precision[::-1], [1.0]))
    recall = np.concatenate((recall[::-1], [0.0]))
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _tpr_at_fpr(fps: np.ndarray, tps: np.ndarray, max_fpr: float) -> float:
    fpr = np.r_[0.0, fps] / fps[-1]
    tpr = np.r_[0.0, tps] / tps[-1]
    return float(tpr[fpr <= max_fpr].max())  # the curve starts at (0, 0), so never empty


def tpr_at_fpr(y_true: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """Highest TPR achievable with FPR <= max_fpr (every ROC vertex, no interpolation).

    No interpolation because an interpolated point is not reachable by any
    single threshold; a monitor has to pick one.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    _require_both_classes(y)
    max_fpr = _check_fpr(max_fpr)
    return _tpr_at_fpr(*_counts_at_thresholds(y, s), max_fpr)


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


FPR_CONFIDENCE = 0.95
"""Confidence of the false-positive-rate bounds the monitor states (one-sided)."""


def fpr_upper_bound(k: int, n: int, confidence: float = FPR_CONFIDENCE) -> float:
    """One-sided upper confidence bound on a false-positive rate seen as ``k`` of ``n`` clean documents flagged:
    exact binomial (Clopper–Pearson), ``Beta(confidence; k + 1, n - k)``; for k = 0 that is 1 − (1 − confidence)^(1/n),
    about 3/n at 95% (the rule of three)."""
    from scipy.stats import beta

    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    return 1.0 if k == n else float(beta.ppf(confidence, k + 1, n - k))


def clean_docs_to_bound(fpr: float, confidence: float = FPR_CONFIDENCE) -> int:
    """How many clean documents, none flagged, put the upper bound of :func:`fpr_upper_bound` at or below ``fpr``."""
    import math

    return math.ceil(round(math.log(1.0 - confidence) / math.log(1.0 - fpr), 9))


def binary_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Headline metrics for logits, all from one sort; plain Python numbers so the dict is JSON-ready.

    accuracy and f1 threshold at logit 0 (probability 0.5), i.e. the probe's
    own decision rule; the rank metrics ignore calibration altogether.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    n_pos, n_neg = _require_both_classes(y)
    fps, tps = _counts_at_thresholds(y, s)
    pred = s > 0
    tp = int(np.count_nonzero(pred & y))
    n_pred = int(np.count_nonzero(pred))
    return {
        "auroc": _auroc(fps, tps),
        "average_precision": _average_precision(fps, tps),
        "accuracy": float(np.count_nonzero(pred == y) / y.size),
        "f1": float(2.0 * tp / (n_pos + n_pred)),  # n_pos > 0, so never 0/0
        "tpr_at_1pct_fpr": _tpr_at_fpr(fps, tps, 0.01),
        "tpr_at_5pct_fpr": _tpr_at_fpr(fps, tps, 0.05),
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


def _group_index(groups: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """(group of each row as 0..G-1 in sorted group order [n], G)."""
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {g.shape}")
    _, inv = np.unique(g, return_inverse=True)
    inv = inv.reshape(-1)
    return inv, int(inv.max()) + 1


def _check_boot(n_boot: int, alpha: float) -> int:
    n_boot = int(n_boot)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return n_boot


def _draw_counts(n_boot: int, n_groups: int, seed: int):
    """Per-group draw counts [b, G] of the resamples, in chunks of ``_BOOT_CHUNK`` (G draws with replacement each)."""
    rng = np.random.default_rng(seed)
    for lo in range(0, n_boot, _BOOT_CHUNK):
        b = min(_BOOT_CHUNK, n_boot - lo)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        # Per-resample draw counts via one flat bincount (row r offset by r * G).
        flat = (draws + (np.arange(b) * n_groups)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n_groups).reshape(b, n_groups)


def _resample_aurocs(y: np.ndarray, s: np.ndarray, inv: np.ndarray, n_groups: int, n_boot: int):
    """counts [b, G] → AUROC [b] (NaN where a class weighs zero): group pairs or weighted rows, whichever is cheaper."""
    g_pos, g_neg = np.unique(inv[y]).size, np.unique(inv[~y]).size
    if _pairs_are_cheaper(y.size, n_boot, g_pos, g_neg, y):
        return _GroupPairs(y, s, inv, n_groups).aurocs
    return lambda counts: weighted_auroc(y, s, counts[:, inv])


def _skipped_check(n_skipped: int, n_boot: int, n_groups: int) -> None:
    if n_skipped * 2 > n_boot:
        raise ValueError(
            f"{n_skipped} of {n_boot} bootstrap resamples contained only one class; "
            f"too few groups ({n_groups}) with both classes for a group bootstrap CI"
        )


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
    each row by its group's draw count c_g.  Its AUROC is then a quadratic form
    in c, ``c·A·c / ((c·P)(c·N))``, where ``A[g, h]`` counts the (positive of g,
    negative of h) pairs ranked correctly (ties half) and P, N count each
    group's positives and negatives: A is built from one ranking, and every
    resample is a row of one [B, G+] × [G+, G-] product instead of a pass over
    the rows.  Where that matrix would cost more than the rows (many groups,
    few rows each), resamples weight the rows (:func:`weighted_auroc`); both
    sum exact integers in float64, so they give the same numbers.  Resamples in
    which a class has zero weight are skipped; if more than half are skipped,
    ValueError (the groups are too few or too class-pure for a meaningful CI).
    Deterministic given ``seed``.
    """
    y = _labels(y_true)
    n = y.size
    s = _scores(scores, n)
    _require_both_classes(y)
    inv, n_groups = _group_index(groups, n)
    n_boot = _check_boot(n_boot, alpha)
    aurocs_of = _resample_aurocs(y, s, inv, n_groups, n_boot)
    aucs = np.concatenate([aurocs_of(c) for c in _draw_counts(n_boot, n_groups, seed)])
    valid = aucs[~np.isnan(aucs)]
    _skipped_check(n_boot - valid.size, n_boot, n_groups)
    lo_q, hi_q = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(lo_q), float(hi_q)


def paired_bootstrap_auroc_diff(
    y_true: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    counts: np.ndarray | None = None,
) -> dict[str, float | int]:
    """AUROC(a) − AUROC(b) of two scorings of the same rows, with a paired document-bootstrap CI.

    Is layer A really better than layer B, or did the val set favour it?  Both
    probes score the same val rows, so each resample draws the documents once
    and computes both AUROCs on it: the document-to-document variation that
    moves both together cancels in the difference, which unpaired CIs cannot
    see.  The draws are those of :func:`bootstrap_auroc_ci` with the same seed;
    ``counts`` [B, G] (draw count of each group, groups in sorted order) gives
    them explicitly instead.  Returns ``difference`` (on all rows), ``ci_low``,
    ``ci_high`` (percentile, 1 - alpha), ``share_a_better`` (fraction of
    resamples where A's AUROC is higher) and ``n_boot`` (resamples used).
    """
    y = _labels(y_true)
    n = y.size
    sa, sb = _scores(scores_a, n), _scores(scores_b, n)
    _require_both_classes(y)
    inv, n_groups = _group_index(groups, n)
    if counts is not None:
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[1] != n_groups or (counts < 0).any():
            raise ValueError(f"counts must be non-negative with shape (B, {n_groups}), got shape {counts.shape}")
        n_boot = _check_boot(counts.shape[0], alpha)
        blocks = [counts]
    else:
        n_boot = _check_boot(n_boot, alpha)
        blocks = _draw_counts(n_boot, n_groups, seed)
    fa = _resample_aurocs(y, sa, inv, n_groups, n_boot)
    fb = _resample_aurocs(y, sb, inv, n_groups, n_boot)
    diffs = np.concatenate([fa(c) - fb(c) for c in blocks])
    valid = diffs[~np.isnan(diffs)]
    _skipped_check(n_boot - valid.size, n_boot, n_groups)
    lo_q, hi_q = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    point = _auroc(*_counts_at_thresholds(y, sa)) - _auroc(*_counts_at_thresholds(y, sb))
    return {"difference": float(point), "ci_low": float(lo_q), "ci_high": float(hi_q),
            "share_a_better": float(np.mean(valid > 0)), "n_boot": int(valid.size)}


# Costs relative to one row of one resample on the row path (measured on a 2-core
# CPU: 37 ns): one ``searchsorted`` query while building A, one entry of the
# resample product.  They only choose between two exact computations.
_BUILD_COST = 3.0
_MATMUL_COST = 0.01
_MAX_PAIR_ENTRIES = 1 << 24  # A in float64: at most 128 MiB


def _pairs_are_cheaper(n: int, n_boot: int, g_pos: int, g_neg: int, y: np.ndarray) -> bool:
    if g_pos * g_neg > _MAX_PAIR_ENTRIES:
        return False
    n_pos = int(y.sum())
    build = min(g_neg * n_pos, g_pos * (n - n_pos))
    return build * _BUILD_COST + n_boot * g_pos * g_neg * _MATMUL_COST <= n_boot * n


class _GroupPairs:
    """AUROC of integer group weightings from per-group-pair counts, built from one ranking.

    ``aurocs(counts)`` equals ``weighted_auroc(y, s, counts[:, inv])``: with
    integer counts every sum is an exact integer in float64 (below 2**53), so
    both give the correctly rounded quotient of the same two numbers.
    """

    def __init__(self, y: np.ndarray, s: np.ndarray, inv: np.ndarray, n_groups: int):
        pos_g = np.bincount(inv[y], minlength=n_groups)
        neg_g = np.bincount(inv[~y], minlength=n_groups)
        self.gp, self.gn = np.flatnonzero(pos_g), np.flatnonzero(neg_g)  # groups with positives, with negatives
        self.n_pos = pos_g[self.gp].astype(np.float64)
        self.n_neg = neg_g[self.gn].astype(np.float64)
        self.a2 = _pair_counts(y, s, inv, self.gp, self.gn)  # [G+, G-]

    def aurocs(self, counts: np.ndarray) -> np.ndarray:
        """counts [B, G] → AUROC [B]; NaN where a class weighs zero."""
        cp = counts[:, self.gp].astype(np.float64)
        cn = counts[:, self.gn].astype(np.float64)
        num = ((cp @ self.a2) * cn).sum(axis=1) * 0.5
        den = (cp @ self.n_pos) * (cn @ self.n_neg)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)


def _pair_counts(y: np.ndarray, s: np.ndarray, inv: np.ndarray, gp: np.ndarray, gn: np.ndarray) -> np.ndarray:
    """2·A [len(gp), len(gn)] float64: per (positive group, negative group), twice the number of
    (positive, negative) row pairs with the positive scored higher, plus the tied pairs (exact integers).

    One loop over the groups of one side, each a ``searchsorted`` of the other
    side's ranks: whichever side makes fewer queries.
    """
    r = np.unique(s, return_inverse=True)[1].reshape(-1)  # dense ranks: equal scores share one
    rp, rn = r[y], r[~y]
    ip, ineg = np.searchsorted(gp, inv[y]), np.searchsorted(gn, inv[~y])
    a2 = np.empty((gp.size, gn.size), dtype=np.float64)
    if gn.size * rp.size <= gp.size * rn.size:
        order = np.lexsort((rn, ineg))
        sorted_r, bounds = rn[order], np.searchsorted(ineg[order], np.arange(gn.size + 1))
        for h in range(gn.size):
            part = sorted_r[bounds[h] : bounds[h + 1]]  # negatives of group h, ascending
            below2 = np.searchsorted(part, rp, "left") + np.searchsorted(part, rp, "right")
            a2[:, h] = np.bincount(ip, weights=below2, minlength=gp.size)
    else:
        order = np.lexsort((rp, ip))
        sorted_r, bounds = rp[order], np.searchsorted(ip[order], np.arange(gp.size + 1))
        for k in range(gp.size):
            part = sorted_r[bounds[k] : bounds[k + 1]]  # positives of group k, ascending
            above2 = 2 * part.size - np.searchsorted(part, rn, "left") - np.searchsorted(part, rn, "right")
            a2[k] = np.bincount(ineg, weights=above2, minlength=gn.size)
    return a2
