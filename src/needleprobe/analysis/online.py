"""Running document aggregates: the value an aggregation has after each token of a stream.

The running value after token t is, by definition, the offline aggregate (:func:`needleprobe.analysis.aggregation.aggregate`)
of the tokens up to t, so after the last token it equals the document score exactly (the same floating-point
operations, not merely close).  ``max`` and ``rolling_max`` are computed in one vectorised pass whose every value
is bit-identical to the offline one (a running maximum; the same sequential cumulative sum); ``mean``,
``topk_mean`` and ``softmax_mean`` re-aggregate the prefix (their offline forms use pairwise sums and a max shift
that no incremental update reproduces bit for bit).  That costs O(n) per token, microseconds next to a forward
pass.

A crossing is a running value strictly above the threshold, as a document is flagged when its score is strictly
above it.  Needle detection (:func:`needle_detection`) uses the same running values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import MonitorConfig


def running_values(logits: np.ndarray, method: str, mon: MonitorConfig, start: int = 0,
                   stop: int | None = None) -> np.ndarray:
    """Running aggregates float64 [stop - start]: entry i is ``aggregate(logits[: start + i + 1])``."""
    from .aggregation import aggregate

    x = np.asarray(logits, dtype=np.float64)
    stop = x.size if stop is None else min(stop, x.size)
    if stop <= start:
        return np.zeros(0)
    if method == "max":
        return np.maximum.accumulate(x[:stop])[start:]
    if method == "rolling_max":
        w = mon.window
        c = np.concatenate([[0.0], np.cumsum(x[:stop])])
        n = np.arange(1, stop + 1)
        out = c[1:] / n  # prefixes shorter than the window: their mean, as the offline window shrinks to them
        if stop >= w:
            out[w - 1 :] = np.maximum.accumulate((c[w:] - c[:-w]) / w)
        return out[start:]
    return np.array([aggregate(x[: t + 1], method, mon) for t in range(start, stop)])


def first_crossing(values: np.ndarray, threshold: float) -> int | None:
    """Index of the first running value strictly above ``threshold`` (None: none is)."""
    above = np.flatnonzero(np.asarray(values) > threshold)
    return int(above[0]) if above.size else None


class RunningAggregate:
    """One sequence's aggregate, fed token logits as they arrive (``extend``); ``value`` is the offline aggregate of
    everything fed so far."""

    def __init__(self, method: str, mon: MonitorConfig, threshold: float | None = None):
        self.method, self.mon, self.threshold = method, mon, threshold
        self.logits: list[float] = []
        self.values: list[float] = []
        self.crossed_at: int | None = None
        """Index (into the tokens fed) of the first token after which the value was above the threshold."""

    def extend(self, logits) -> np.ndarray:
        """Feed token logits [k]; returns the running values after each of them [k]."""
        n0 = len(self.logits)
        self.logits.extend(float(v) for v in np.asarray(logits, dtype=np.float32).reshape(-1))
        new = running_values(np.asarray(self.logits, dtype=np.float32), self.method, self.mon, start=n0)
        self.values.extend(new.tolist())
        if self.crossed_at is None and self.threshold is not None:
            hit = first_crossing(new, self.threshold)
            if hit is not None:
                self.crossed_at = n0 + hit
        return new

    @property
    def value(self) -> float:
        return self.values[-1] if self.values else float("-inf")


def needle_runs(needle: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [first, end) index ranges of the runs of consecutive needle tokens [n] (int or bool): the needle
    spans as the monitor's token tables hold them (a span cut off by truncation has no tokens, so no run)."""
    m = np.asarray(needle).astype(bool).astype(np.int8)
    edges = np.diff(np.concatenate([[0], m, [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def span_latencies(logits: np.ndarray, needle: np.ndarray, method: str, mon: MonitorConfig,
                   thresholds: list[float | None]) -> list[list[int | None]]:
    """Per threshold, per needle span of one document: the detection latency in tokens, or None when missed.

    A span is detected when the running aggregate is above the threshold at one of its tokens; the latency is the
    number of tokens from the span's first token to the first such one (0: already above at its first token, which
    also counts an aggregate that crossed before the span began and is still above)."""
    runs = needle_runs(needle)
    out: list[list[int | None]] = [[] for _ in thresholds]
    set_ = [t for t in thresholds if t is not None]
    x = np.asarray(logits, dtype=np.float64)
    bound = np.maximum.accumulate(x) if x.size else x  # no aggregation is above the running max
    for first, end in runs:
        skip = 0
        if set_ and method not in ("max", "rolling_max"):  # re-aggregated prefixes: skip the tokens that cannot cross
            low = min(set_) - 1e-9 * (1.0 + abs(min(set_)))  # a margin for the last bits of a mean's rounding
            above = np.flatnonzero(bound[first:end] > low)
            skip = int(above[0]) if above.size else end - first
        vals = np.concatenate([np.full(skip, -np.inf), running_values(x, method, mon, start=first + skip, stop=end)])
        for i, t in enumerate(thresholds):
            out[i].append(None if t is None else first_crossing(vals, t))
    return out


def detection_summary(latencies: list[int | None]) -> dict[str, Any]:
    """Share of spans detected and the latency's median and 90th percentile (tokens) over the detected ones."""
    hit = np.array([v for v in latencies if v is not None], dtype=np.float64)
    n = len(latencies)
    return {
        "n_spans": n,
        "detected": int(hit.size),
        "rate": hit.size / n if n else None,
        "latency_median": float(np.median(hit)) if hit.size else None,
        "latency_p90": float(np.percentile(hit, 90)) if hit.size else None,
    }
