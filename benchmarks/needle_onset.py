#!/usr/bin/env python
"""Where in a needle a probe finds it: token AUROC by position inside the needle, from a run's cache and probes.

    PYTHONPATH=src python benchmarks/needle_onset.py --config configs/demo_chat.yaml --layer 12
    PYTHONPATH=src python benchmarks/needle_onset.py --config configs/demo.yaml --layer 3

A causal model's token t sees only tokens <= t: the first tokens of an injected instruction carry no sign of what
follows, so a probe on a decoder can only find a needle once enough of it has been read.  A bidirectional encoder
(MiniLM) sees the whole sentence at every token.  This reads the val split of the cache (no model run): each needle
token's position in its needle (0 = its first token, from consecutive needle rows of a document), and the AUROC of
the needle tokens at each position against every sampled negative; then the negatives within 3 tokens before a
needle against the other negatives (a bidirectional model may already score them: it sees the needle coming).
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score

import needleprobe
from needleprobe.config import load_config

BINS = ((0, 0), (1, 1), (2, 3), (4, 7), (8, 10**9))


def positions(doc: np.ndarray, tok: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each needle row in its needle or -1, whether a negative row lies 1-3 tokens before a needle)."""
    pos = np.full(len(y), -1)
    before = np.zeros(len(y), dtype=bool)
    order = np.lexsort((tok, doc))
    prev_doc, prev_tok, run = -1, -10, -1
    for i in order:
        if y[i]:
            run = run + 1 if (doc[i] == prev_doc and tok[i] == prev_tok + 1 and run >= 0) else 0
            pos[i] = run
        else:
            run = -1
        prev_doc, prev_tok = doc[i], tok[i]
    starts = {(d, t) for d, t, p in zip(doc, tok, pos) if p == 0}
    for i in np.flatnonzero(y == 0):
        before[i] = any((doc[i], tok[i] + k) in starts for k in (1, 2, 3))
    return pos, before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = load_config(args.config)
    view = needleprobe.open_cache(cfg).split("val")
    probe = needleprobe.load_probes(cfg)[(args.layer, args.seed)]
    s = probe.decision_function(view.to_numpy(args.layer))
    y = np.asarray(view.labels).astype(bool)
    pos, before = positions(np.asarray(view.doc_index), np.asarray(view.token_index), y)
    neg = s[~y]
    print(f"{cfg.model.name}, layer {args.layer}, val: {int(y.sum())} needle tokens, {int((~y).sum())} negatives; "
          f"AUROC of all needle tokens {roc_auc_score(y, s):.4f}")
    print("| position in needle | needle tokens | AUROC against all negatives |\n|---|---|---|")
    for lo, hi in BINS:
        sel = (pos >= lo) & (pos <= hi)
        label = str(lo) if lo == hi else (f"{lo}–{hi}" if hi < 10**9 else f"{lo}+")
        auc = roc_auc_score(np.r_[np.ones(sel.sum()), np.zeros(len(neg))], np.r_[s[sel], neg])
        print(f"| {label} | {int(sel.sum())} | {auc:.4f} |")
    near, far = s[before], s[~y & ~before]
    if len(near):
        auc = roc_auc_score(np.r_[np.ones(len(near)), np.zeros(len(far))], np.r_[near, far])
        print(f"negatives 1–3 tokens before a needle ({len(near)}) against the other negatives: AUROC {auc:.4f}")


if __name__ == "__main__":
    main()
