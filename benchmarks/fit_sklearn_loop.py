#!/usr/bin/env python
"""The baseline process of ``make bench-fit``: what a user would write with scikit-learn instead of ``needleprobe fit``.

    python benchmarks/fit_sklearn_loop.py CONFIG OUT.json [--tol 1e-4]

Reads the same cache through ``needleprobe.open_cache`` (which imports zarr,
not torch), standardises each layer with the train rows' mean and std, and fits
``LogisticRegression(lbfgs, C=1/(l2·n), sample_weight=balanced)`` cold, value by
value, for every layer × L2 value of the config: the objective ``needleprobe
fit`` minimises.  One fit per (layer, value), not per seed: with balanced
weights the seed changes nothing, and ``needleprobe fit`` fits such seeds once
too.  Writes val AUROC per layer and value to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from needleprobe import load_config, open_cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--tol", type=float, default=1e-4, help="scikit-learn's tol (its default 1e-4)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    cache = open_cache(cfg)
    train, val = cache.split("train"), cache.split("val")
    y, y_val = train.labels, val.labels
    n, n_pos = y.size, int(y.sum())
    s = np.where(y == 1, n / (2.0 * n_pos), n / (2.0 * (n - n_pos))).astype(np.float32)
    out: dict[str, dict[str, float]] = {}
    for layer in sorted(cfg.probe.layers_to_probe):
        x = train.to_numpy(layer)
        mean, std = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
        std[std < 1e-12] = 1.0
        x = ((x - mean) / std).astype(np.float32)
        x_val = ((val.to_numpy(layer) - mean) / std).astype(np.float32)
        out[str(layer)] = {}
        for l2 in cfg.probe.l2_grid:
            m = LogisticRegression(C=1.0 / (l2 * n), tol=args.tol, max_iter=10_000).fit(x, y, sample_weight=s)
            out[str(layer)][repr(float(l2))] = float(roc_auc_score(y_val, m.decision_function(x_val)))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
