"""Tests for needleprobe.metrics: agreement with scikit-learn and bootstrap behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from needleprobe import metrics
from needleprobe.metrics import (
    binary_metrics,
    bootstrap_auroc_ci,
    threshold_at_fpr,
    tpr_at_fpr,
    weighted_auroc,
)


def _problem(n: int, seed: int, shift: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    y[:2] = [True, False]  # both classes always present
    s = rng.normal(size=n) + shift * y
    return y, s


# --------------------------------------------------------------------------- #
# weighted_auroc
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("decimals", [None, 1, 0])  # None: continuous; 1, 0: heavy ties
def test_weighted_auroc_matches_sklearn(decimals):
    rng = np.random.default_rng(1)
    y, s = _problem(300, seed=2)
    if decimals is not None:
        s = np.round(s, decimals)
    w = rng.integers(0, 5, size=(20, s.size)).astype(float)
    got = weighted_auroc(y, s, w)
    assert got.shape == (20,)
    want = [roc_auc_score(y, s, sample_weight=row) for row in w]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_weighted_auroc_1d_and_unit_weights():
    y, s = _problem(200, seed=3)
    s = np.round(s, 1)
    got = weighted_auroc(y, s, np.ones(s.size))
    assert np.ndim(got) == 0
    assert abs(float(got) - roc_auc_score(y, s)) < 1e-12
    w = np.random.default_rng(4).random(s.size)  # non-integer weights too
    assert abs(float(weighted_auroc(y, s, w)) - roc_auc_score(y, s, sample_weight=w)) < 1e-12


def test_weighted_auroc_zero_class_weight_is_nan():
    y = np.array([1, 1, 0, 0])
    s = np.array([0.9, 0.2, 0.5, 0.1])
    w = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=float)
    got = weighted_auroc(y, s, w)
    assert got[0] == pytest.approx(0.75)
    assert np.isnan(got[1])


def test_weighted_auroc_rejects_bad_weights():
    y, s = _problem(10, seed=0)
    with pytest.raises(ValueError):
        weighted_auroc(y, s, -np.ones(10))
    with pytest.raises(ValueError):
        weighted_auroc(y, s, np.ones(9))


# --------------------------------------------------------------------------- #
# tpr_at_fpr / threshold_at_fpr
# --------------------------------------------------------------------------- #
def _brute_tpr_at_fpr(y, s, max_fpr):
    """Try every threshold 'flag if s >= t' (plus flag-nothing) and keep the best TPR."""
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        fpr = pred[~y].mean()
        if fpr <= max_fpr:
            best = max(best, pred[y].mean())
    return best


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("max_fpr", [0.0, 0.01, 0.05, 0.1, 0.3, 1.0])
def test_tpr_at_fpr_brute_force(max_fpr, decimals):
    y, s = _problem(400, seed=5)
    if decimals is not None:
        s = np.round(s, decimals)
    assert tpr_at_fpr(y, s, max_fpr) == pytest.approx(_brute_tpr_at_fpr(y, s, max_fpr), abs=1e-15)


@pytest.mark.parametrize("max_fpr", [0.0, 0.01, 0.05, 0.07, 0.29, 0.5, 0.999])
@pytest.mark.parametrize("decimals", [None, 1])
def test_threshold_at_fpr_property(max_fpr, decimals):
    neg = np.random.default_rng(6).normal(size=100)
    if decimals is not None:
        neg = np.round(neg, decimals)  # ties
    t = threshold_at_fpr(neg, max_fpr)
    assert t in neg
    assert np.mean(neg > t) <= max_fpr
    lower = neg[neg < t]
    if lower.size:  # the next lower distinct negative score would exceed max_fpr
        assert np.mean(neg > lower.max()) > max_fpr


def test_threshold_at_fpr_edges():
    neg = np.array([3.0, 1.0, 2.0, 2.0])
    assert threshold_at_fpr(neg, 0.0) == 3.0
    assert threshold_at_fpr(neg, 0.25) == 2.0
    assert threshold_at_fpr(neg, 0.74) == 2.0
    assert threshold_at_fpr(neg, 0.75) == 1.0
    assert threshold_at_fpr(neg, 1.0) == 1.0
    with pytest.raises(ValueError):
        threshold_at_fpr(neg, 1.5)
    with pytest.raises(ValueError):
        threshold_at_fpr(np.array([]), 0.1)


# --------------------------------------------------------------------------- #
# binary_metrics
# --------------------------------------------------------------------------- #
def test_binary_metrics_matches_sklearn():
    y, s = _problem(500, seed=7, shift=1.5)
    s = s - 0.5  # logits: threshold 0 is meaningful
    m = binary_metrics(y.astype(int), s)
    assert set(m) == {
        "auroc", "average_precision", "accuracy", "f1", "tpr_at_1pct_fpr",
        "tpr_at_5pct_fpr", "n", "n_positive", "n_negative",
    }
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-15)
    assert m["average_precision"] == pytest.approx(average_precision_score(y, s), abs=1e-15)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, s > 0), abs=1e-15)
    assert m["f1"] == pytest.approx(f1_score(y, s > 0), abs=1e-15)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(_brute_tpr_at_fpr(y, s, 0.01))
    assert m["tpr_at_5pct_fpr"] == pytest.approx(_brute_tpr_at_fpr(y, s, 0.05))
    assert (m["n"], m["n_positive"], m["n_negative"]) == (500, int(y.sum()), int((~y).sum()))
    for k, v in m.items():
        assert type(v) is (int if k.startswith("n") else float), k
    json.dumps(m)


@pytest.mark.parametrize("decimals", [None, 2, 1, 0])  # None: continuous; then heavier and heavier ties
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_equal_sklearn_with_ties(seed, decimals):
    """One sort gives every rank metric, each within 1e-12 of scikit-learn's own function."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 3000))
    y = rng.random(n) < rng.uniform(0.03, 0.6)
    y[:2] = [True, False]
    s = rng.normal(size=n) * 3 + 2 * y - 1
    if decimals is not None:
        s = np.round(s, decimals)
    m = binary_metrics(y, s)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    want = {
        "auroc": roc_auc_score(y, s),
        "average_precision": average_precision_score(y, s),
        "accuracy": accuracy_score(y, s > 0),
        "f1": f1_score(y, s > 0, zero_division=0.0),
        "tpr_at_1pct_fpr": tpr[fpr <= 0.01].max(),
        "tpr_at_5pct_fpr": tpr[fpr <= 0.05].max(),
    }
    for k, v in want.items():
        assert abs(m[k] - v) <= 1e-12, (k, m[k], v)
    for max_fpr in (0.0, 0.1, 1.0):
        assert abs(tpr_at_fpr(y, s, max_fpr) - tpr[fpr <= max_fpr].max()) <= 1e-12


@pytest.mark.parametrize(
    "fn",
    [
        lambda y, s: binary_metrics(y, s),
        lambda y, s: tpr_at_fpr(y, s, 0.05),
        lambda y, s: weighted_auroc(y, s, np.ones(s.size)),
        lambda y, s: bootstrap_auroc_ci(y, s, np.arange(s.size), n_boot=10),
    ],
)
@pytest.mark.parametrize("label", [0, 1])
def test_one_class_raises(fn, label):
    s = np.linspace(-1, 1, 20)
    with pytest.raises(ValueError, match="one class"):
        fn(np.full(20, label), s)


# --------------------------------------------------------------------------- #
# bootstrap_auroc_ci
# --------------------------------------------------------------------------- #
def _documents(n_docs: int = 200, tokens: int = 50, seed: int = 0):
    """Documents with a shared per-document offset: tokens within a doc are correlated."""
    rng = np.random.default_rng(seed)
    doc_label = rng.random(n_docs) < 0.4
    doc_label[:2] = [True, False]
    doc_effect = rng.normal(scale=1.5, size=n_docs)
    doc = np.repeat(np.arange(n_docs), tokens)
    y = doc_label[doc]
    s = 0.8 * y + doc_effect[doc] + rng.normal(scale=0.5, size=doc.size)
    return y, s, doc


def test_bootstrap_ci_contains_point_and_is_deterministic():
    y, s, doc = _documents()
    point = roc_auc_score(y, s)
    lo, hi = bootstrap_auroc_ci(y, s, doc, n_boot=300, seed=0)
    assert isinstance(lo, float) and isinstance(hi, float)
    assert lo < point < hi
    assert bootstrap_auroc_ci(y, s, doc, n_boot=300, seed=0) == (lo, hi)
    assert bootstrap_auroc_ci(y, s, doc, n_boot=300, seed=1) != (lo, hi)


def test_bootstrap_ci_wider_for_correlated_groups():
    y, s, doc = _documents()
    lo_g, hi_g = bootstrap_auroc_ci(y, s, doc, n_boot=300, seed=0)
    lo_t, hi_t = bootstrap_auroc_ci(y, s, np.arange(y.size), n_boot=300, seed=0)
    # 200 documents carry far less information than 10 000 independent tokens.
    assert hi_g - lo_g > 2 * (hi_t - lo_t)


def test_bootstrap_ci_too_few_groups_raises():
    # Two groups, one per class: each resample is one-class with probability 1/2;
    # seed 6 gives 112 of 200 one-class resamples (> half), so it must raise.
    y = np.array([1] * 5 + [0] * 5)
    s = np.arange(10.0)
    g = np.array([0] * 5 + [1] * 5)
    with pytest.raises(ValueError, match="bootstrap resamples"):
        bootstrap_auroc_ci(y, s, g, n_boot=200, seed=6)


def test_bootstrap_ci_non_multiple_of_chunk():
    y, s, doc = _documents(n_docs=40, tokens=5)
    lo, hi = bootstrap_auroc_ci(y, s, doc, n_boot=65, seed=3)
    assert 0.0 <= lo <= hi <= 1.0


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_group_pair_aurocs_equal_row_weighted_auroc(decimals):
    """The per-group-pair form of a resample's AUROC equals weighting every row, and sklearn's weighted AUROC."""
    y, s, doc = _documents(n_docs=60, tokens=20, seed=4)
    if decimals is not None:
        s = np.round(s, decimals)  # ties within and across documents and classes
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 4, size=(40, 60))
    counts[0] = 1  # the plain AUROC
    counts[1, np.unique(doc[y])] = 0  # no positive weight: undefined
    got = metrics._GroupPairs(y, s, doc, 60).aurocs(counts)
    rows = metrics.weighted_auroc(y, s, counts[:, doc])
    np.testing.assert_array_equal(got, rows)  # both sum exact integers, so equal to the bit
    assert np.isnan(got[1])
    for b in (0, *range(2, 40)):
        assert abs(got[b] - roc_auc_score(y, s, sample_weight=counts[b, doc])) <= 1e-12


@pytest.mark.parametrize("n_docs, tokens", [(40, 30), (200, 1)])
def test_bootstrap_ci_same_on_both_paths(monkeypatch, n_docs, tokens):
    """Group pairs or weighted rows: the same resamples give the same CI, whichever is cheaper."""
    y, s, doc = _documents(n_docs=n_docs, tokens=tokens, seed=2)
    s = np.round(s, 1)
    got = {}
    for pairs in (True, False):
        monkeypatch.setattr(metrics, "_pairs_are_cheaper", lambda *a, pairs=pairs: pairs)
        got[pairs] = bootstrap_auroc_ci(y, s, doc, n_boot=150, seed=7)
    assert got[True] == got[False]


def test_bootstrap_ci_is_the_document_bootstrap():
    """Spelled out: G documents drawn G times with replacement per resample (in chunks of 64 from
    default_rng(seed)), rows weighted by draw counts, one-class resamples skipped, percentiles."""
    y, s, doc = _documents(n_docs=30, tokens=10, seed=3)
    s = np.round(s, 1)
    n_boot, rng, aucs = 100, np.random.default_rng(11), []
    for lo in range(0, n_boot, 64):
        for draw in rng.integers(0, 30, size=(min(64, n_boot - lo), 30)):
            w = np.bincount(draw, minlength=30)[doc]
            if w[y].sum() > 0 and w[~y].sum() > 0:
                aucs.append(roc_auc_score(y, s, sample_weight=w))
    want = np.quantile(aucs, [0.025, 0.975])
    got = bootstrap_auroc_ci(y, s, doc, n_boot=n_boot, seed=11)
    assert abs(got[0] - want[0]) <= 1e-12 and abs(got[1] - want[1]) <= 1e-12


# --------------------------------------------------------------------------- #
# paired_bootstrap_auroc_diff
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n_docs, tokens", [(30, 10), (120, 1)])  # group pairs, then weighted rows
def test_paired_difference_is_the_hand_computation_on_given_resamples(n_docs, tokens):
    """Given draw counts: each resample's AUROC(a) − AUROC(b) with the same document weights, then percentiles."""
    y, s_a, doc = _documents(n_docs=n_docs, tokens=tokens, seed=8)
    s_a = np.round(s_a, 1)
    s_b = np.round(s_a + np.random.default_rng(9).normal(scale=0.7, size=s_a.size), 1)
    counts = np.random.default_rng(10).multinomial(n_docs, np.full(n_docs, 1 / n_docs), size=150)
    counts[0, np.unique(doc[y])] = 0  # a resample without positives: skipped
    diffs = []
    for c in counts:
        w = c[doc]
        if w[y].sum() > 0 and w[~y].sum() > 0:
            diffs.append(roc_auc_score(y, s_a, sample_weight=w) - roc_auc_score(y, s_b, sample_weight=w))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    got = metrics.paired_bootstrap_auroc_diff(y, s_a, s_b, doc, counts=counts)
    assert abs(got["ci_low"] - lo) <= 1e-12 and abs(got["ci_high"] - hi) <= 1e-12
    assert got["n_boot"] == len(diffs) == 149
    assert got["share_a_better"] == pytest.approx(np.mean(np.array(diffs) > 0), abs=1e-15)
    assert abs(got["difference"] - (roc_auc_score(y, s_a) - roc_auc_score(y, s_b))) <= 1e-12


def test_paired_difference_draws_the_resamples_of_the_single_ci():
    """Against a constant scoring (AUROC 0.5 on every resample) the difference CI is the single CI minus 0.5."""
    y, s, doc = _documents(n_docs=50, tokens=8, seed=1)
    got = metrics.paired_bootstrap_auroc_diff(y, s, np.zeros_like(s), doc, n_boot=200, seed=4)
    lo, hi = bootstrap_auroc_ci(y, s, doc, n_boot=200, seed=4)
    assert abs(got["ci_low"] - (lo - 0.5)) <= 1e-12 and abs(got["ci_high"] - (hi - 0.5)) <= 1e-12


def test_pairing_removes_the_shared_document_variation():
    """Two scorings sharing a document effect: the paired CI of their difference is far narrower than either CI."""
    y, s_a, doc = _documents(n_docs=200, tokens=20, seed=2)
    s_b = s_a + np.random.default_rng(3).normal(scale=0.3, size=s_a.size)
    got = metrics.paired_bootstrap_auroc_diff(y, s_a, s_b, doc, n_boot=300, seed=0)
    lo_a, hi_a = bootstrap_auroc_ci(y, s_a, doc, n_boot=300, seed=0)
    assert got["ci_high"] - got["ci_low"] < 0.25 * (hi_a - lo_a)
    assert got["ci_low"] <= got["difference"] <= got["ci_high"]
