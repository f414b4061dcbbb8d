"""Running aggregates equal the offline ones exactly, and needle detection counts what a hand count gives."""

from __future__ import annotations

import numpy as np
import pytest

from needleprobe.config import MonitorConfig
from needleprobe.analysis.online import (RunningAggregate, detection_summary, first_crossing, needle_runs,
                                       running_values, span_latencies)
from needleprobe.analysis.aggregation import AGGREGATIONS, aggregate, document_metrics
from needleprobe.analysis.logits import MonitorTokens


@pytest.mark.parametrize("method", AGGREGATIONS)
@pytest.mark.parametrize("n", [1, 3, 7, 40, 133])
def test_running_value_after_each_token_is_the_offline_aggregate_bit_for_bit(method, n):
    mon = MonitorConfig(top_k=4, window=10, temperature=2.0)
    x = np.random.default_rng(n).normal(scale=3.0, size=n).astype(np.float32)
    vals = running_values(x, method, mon)
    assert vals.shape == (n,)
    for t in range(n):
        assert vals[t] == aggregate(x[: t + 1], method, mon), (method, t)
    assert running_values(x, method, mon, start=n // 2).tolist() == vals[n // 2 :].tolist()


@pytest.mark.parametrize("method", AGGREGATIONS)
def test_fed_in_chunks_the_last_value_is_the_document_score(method):
    mon = MonitorConfig(top_k=3, window=5, temperature=5.0)
    x = np.random.default_rng(1).normal(size=57).astype(np.float32)
    agg = RunningAggregate(method, mon, threshold=float(np.quantile(x, 0.9)))
    for chunk in np.split(x, [20, 21, 22, 40]):  # a prefill, then tokens one by one, then a chunk
        agg.extend(chunk)
    assert agg.value == aggregate(x, method, mon)
    assert agg.crossed_at == first_crossing(running_values(x, method, mon), agg.threshold)


def test_needle_spans_detection_and_latency_by_hand():
    mon = MonitorConfig(window=2)
    #                 0    1    2    3    4    5    6    7    8    9
    x = np.array([0.0, 0.0, 1.0, 3.0, 5.0, 0.0, 0.0, 0.0, 0.0, 9.0], np.float32)
    needle = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0], np.int8)
    assert needle_runs(needle) == [(2, 5), (7, 9)]
    # max: running max 0 0 1 3 5 5 5 5 5 9 → threshold 2: span 1 crosses at token 3 (1 after its start);
    # span 2 starts already above (latency 0); threshold 6: neither (token 9 is after span 2 ends)
    assert span_latencies(x, needle, "max", mon, [2.0, 6.0, None]) == [[1, 0], [None, None], [None, None]]
    # mean: prefix means 0 0 .33 1 1.8 1.5 1.29 1.125 1 1.8 → threshold 1.2: span 1 at token 4 (2 after its start);
    # span 2 (tokens 7, 8: 1.125, 1.0) is missed, though the mean was above 1.2 before it began; threshold 1.1: 0
    assert span_latencies(x, needle, "mean", mon, [1.2, 1.1]) == [[2, None], [2, 0]]
    assert detection_summary([1, 0, None, 4]) == {"n_spans": 4, "detected": 3, "rate": 0.75, "latency_median": 1.0,
                                                   "latency_p90": pytest.approx(3.4)}


def test_monitor_rows_hold_detection_at_each_threshold():
    """Two needle documents and two clean ones, max aggregation, counted by hand."""
    mon = MonitorConfig()
    docs = [  # (logits, needle)
        ([0.0, 1.0, 4.0, 0.0], [0, 1, 1, 0]),  # needle from token 1: max crosses 2.5 at token 2 → latency 1
        ([0.0, 0.0, 0.5, 3.0, 0.0], [0, 0, 1, 1, 1]),  # needle from token 2: crosses 2.5 at token 3 → latency 1
        ([0.0, 2.0, 0.0], [0, 0, 0]),
        ([1.0, 2.5, 0.0], [0, 0, 0]),
    ]
    tokens = MonitorTokens(
        [f"d{i}" for i in range(4)], np.array([1, 1, 0, 0]), [{"layer": 0, "seed": 0, "sha256": "x"}],
        [np.array(lg, np.float32)[:, None] for lg, _ in docs], [np.array(n, np.int8) for _, n in docs],
        [np.arange(len(lg)) for lg, _ in docs], [np.arange(len(lg)) for lg, _ in docs])
    rows, _ = document_metrics(tokens, mon, "val", n_boot=10)
    row = next(r for r in rows if r["aggregation"] == "max")
    assert row["threshold_above_clean"] == 2.5  # the highest clean score: a crossing is strictly above it
    assert row["n_needle_spans"] == 2
    assert (row["detected_spans_above_clean"], row["detection_rate_above_clean"]) == (2, 1.0)
    assert (row["latency_median_above_clean"], row["latency_p90_above_clean"]) == (1.0, 1.0)
    assert row["detection_rate_at_5pct_fpr"] is None  # two clean documents cannot set a 5% FPR threshold


@pytest.mark.parametrize("method", AGGREGATIONS)
def test_span_latencies_equal_a_brute_force_count(method):
    """The shortcut that skips tokens below every threshold finds what evaluating every prefix finds."""
    mon = MonitorConfig(top_k=3, window=4, temperature=2.0)
    rng = np.random.default_rng(7)
    x = rng.normal(size=120).astype(np.float32)
    needle = np.zeros(120, np.int8)
    needle[[*range(10, 25), *range(60, 64), *range(90, 118)]] = 1
    thresholds = [float(np.quantile(x, q)) for q in (0.5, 0.8, 0.95)] + [None]
    want = []
    for t in thresholds:
        row = []
        for first, end in needle_runs(needle):
            hit = [i for i in range(first, end) if t is not None and aggregate(x[: i + 1], method, mon) > t]
            row.append(hit[0] - first if hit else None)
        want.append(row)
    assert span_latencies(x, needle, method, mon, thresholds) == want
