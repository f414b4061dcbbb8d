"""The tokens a probe gets most wrong, shown in their text: ``needleprobe errors`` and the report's error tables.

An AUROC says how often the probe ranks a needle token above a negative; it
does not say which tokens it confuses.  Here the best probe of a layer scores
a cached split's rows, and the highest-scoring negatives (false positives) and
the lowest-scoring needle tokens (misses) are listed with the text around
them, the token marked ``⟦…⟧``.  Often the list explains the AUROC at once: a
false positive on the word "instructions" in ordinary prose, a miss on the
punctuation that closes an injection.

It reads the cache (activations, labels, character offsets), the probe files
and the dataset's text: no model and no tokenizer, so it takes seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..config import Config
from ..errors import NeedleprobeError

WINDOW = 40
"""Characters of text shown on each side of a token."""


@dataclass
class TokenError:
    """One misranked row: a negative scored high, or a needle token scored low."""

    rank: int
    logit: float
    doc_id: str
    token_index: int
    """position in the model input"""
    char_start: int
    char_end: int
    context: str
    """the text around the token, the token marked ``⟦…⟧``"""
    left: str = ""
    token: str = ""
    right: str = ""


@dataclass
class ErrorLists:
    """The two lists for one probe on one cached split."""

    split: str
    layer: int
    seed: int
    val_auroc: float | None
    n_rows: int
    n_positive: int
    false_positives: list[TokenError] = field(default_factory=list)
    """negatives (label 0), highest logit first"""
    missed_needles: list[TokenError] = field(default_factory=list)
    """needle tokens (label 1), lowest logit first"""
    notes: list[str] = field(default_factory=list)


def in_context(text: str, start: int, end: int, window: int = WINDOW) -> tuple[str, str, str]:
    """(left, token, right): up to ``window`` characters on each side, whitespace runs as one space, cuts as ``…``;
    line breaks and tabs inside the token shown as ↵ and ⇥."""
    a, b = max(0, start - window), min(len(text), end + window)
    left = ("…" if a > 0 else "") + re.sub(r"\s+", " ", text[a:start])
    right = re.sub(r"\s+", " ", text[end:b]) + ("…" if b < len(text) else "")
    return left, text[start:end].replace("\n", "↵").replace("\t", "⇥"), right


def token_errors(cfg: Config, *, layer: int | None = None, split: str = "val", n: int = 20, run: str | None = None,
                 window: int = WINDOW) -> ErrorLists:
    """The ``n`` highest-scoring negatives and ``n`` lowest-scoring needle tokens of the best probe of ``layer`` (by
    default of the best layer) on the cached ``split``; ties keep the cache's row order."""
    from ..cache.reader import open_cache
    from ..data.documents import load_documents
    from ..fit.fit import verify_cache
    from ..run.layout import Layout
    from .run import Run

    if n < 1:
        raise NeedleprobeError(f"-n {n}: list at least one token")
    from ..run.record import run_config

    cfg = run_config(cfg, run)  # the layers and seeds the run was fitted with
    layout = Layout.from_config(cfg, run)
    layout.refuse_foreign("errors listing", can_overwrite=False)
    cache = open_cache(cfg)
    if split not in cache.splits:
        raise NeedleprobeError(f"{cache.path}: split {split!r} is not cached (cached: {', '.join(cache.splits)}); the "
                               "test split's tokens are scored by `needleprobe monitor`")
    verify_cache(cfg, cache)
    fitted = Run.of_layout(layout)
    keys = [(lay, seed) for lay in cfg.probe.layers_to_probe for seed in cfg.probe.train_seeds]
    lay, seed = fitted.best(layer, keys)
    auroc = fitted.val_aurocs(keys)[(lay, seed)]
    view = cache.split(split)
    starts, ends = view.char_start, view.char_end  # first: an old cache says so before any work
    probe = fitted.probe(lay, seed)
    logits = probe.decision_function(view.to_numpy(lay)).astype(np.float64)
    y = view.labels.astype(bool)
    doc_ids, doc_index, token_index = view.doc_ids, view.doc_index, view.token_index
    texts = {d.doc_id: d.text for d in load_documents(cfg.dataset.resolved_path(), cfg.dataset.val_fraction)}
    rows = np.arange(y.size)
    out = ErrorLists(split, lay, seed, auroc, int(y.size), int(y.sum()))
    if probe.metadata_.get("cache_fingerprint") not in (None, cache.fingerprint):
        out.notes.append("this probe was fitted on another cache (refit with `needleprobe fit`)")
    for kind, mask, key in (("false_positives", ~y, -logits), ("missed_needles", y, logits)):
        picked = rows[mask][np.lexsort((rows[mask], key[mask]))][:n]
        items = []
        for rank, i in enumerate(picked, 1):
            doc = doc_ids[int(doc_index[i])]
            a, b = int(starts[i]), int(ends[i])
            left, tok, right = in_context(texts[doc], a, b, window)
            items.append(TokenError(rank, float(logits[i]), doc, int(token_index[i]), a, b, f"{left}⟦{tok}⟧{right}",
                                    left, tok, right))
        setattr(out, kind, items)
    return out


def print_errors(lists: ErrorLists) -> None:
    """The lists (the command's answer) on stdout, notes on stderr."""
    from rich.markup import escape
    from rich.table import Table

    from ..io.console import console, results

    con = results()
    auroc = f", val AUROC {lists.val_auroc:.4f}" if lists.val_auroc is not None else ""
    con.print(f"errors of layer {lists.layer} seed {lists.seed}{auroc} on {lists.split!r}: {lists.n_rows:,} cached rows "
              f"({lists.n_positive:,} needle tokens, {lists.n_rows - lists.n_positive:,} sampled negatives); logit > 0 "
              "is the probe's own 'needle'")
    for note in lists.notes:
        console().print(f"[yellow]{escape(note)}")
    for title, items in (("highest-scoring negatives (false positives)", lists.false_positives),
                         ("lowest-scoring needle tokens (missed needles)", lists.missed_needles)):
        t = Table(title=title, title_justify="left")
        t.add_column("#", justify="right")
        t.add_column("logit", justify="right")
        t.add_column("doc")
        t.add_column("token in context", overflow="fold")
        for e in items:
            t.add_row(str(e.rank), f"{e.logit:+.3f}", escape(e.doc_id),
                      f"{escape(e.left)}[bold reverse]⟦{escape(e.token)}⟧[/]{escape(e.right)}")
        con.print(t)

