"""Self-contained HTML pages: one per run (how good are its probes, and where do they fire?), and one
comparing several runs (AUROC by layer and by relative depth, the transfer matrix, each run's best probe).

Everything is read from what the other stages left behind (probe JSONs and
weights, the activation cache, the monitor's stored token logits, the transfer
results of ``evaluate``); no model runs except the tokenizer, for token text.
The pages have no external resources: charts are inline SVG written here,
styles are one ``<style>`` block, so they open offline and can be mailed
around.  A missing stage is a note in the page, never an error, except when
there is no probe at all.

Where they go: ``report.html`` in the run directory (``Layout.report``); a
comparison in the deepest directory holding every compared run, as
``comparison_{A}_vs_{B}....html`` (dataset keys, with the model slug and site
added where two runs share one).

Stable hooks for tests and scripts: ``<svg class="chart">`` with ids
``auroc-by-layer``, ``roc-probes``, ``roc-monitor``, ``l2-path``; plotted
series carry ``data-layer``/``data-seed``/``data-auroc`` (exact ``repr`` of
the JSON value); heatmaps are ``div.heatmap`` of ``span.tok`` (needle tokens
``span.tok.needle``).  In a comparison: charts ``compare-by-layer`` and
``compare-by-depth`` with one ``path.run`` per run and ``circle.point`` marks
carrying ``data-run`` (the run's label), ``data-layer``, ``data-seed``,
``data-auroc`` and ``data-x`` (the layer, or layer / n_layers); transfer cells
``td[data-source][data-target][data-layer][data-auroc]`` (``td.missing``,
``td.stale``); the best-probe table ``#best-probes`` with one ``tr[data-run]``
per run; the document monitors ``#monitor-compare`` with one ``tr[data-monitor]`` per run (``data-split``,
``data-layer``, ``data-seed``, ``data-aggregation``, ``data-doc-auroc``, ``data-ci-low``, ``data-ci-high`` when it
has monitor results).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...config import Config
from ...errors import NeedleprobeError
from .charts import PALETTE, RDBU, chart_auroc_by_layer, chart_l2_path, chart_roc, diverging, esc, note
from .css import CSS
from .data import MonitorView, command, ProbeInfo, best_overall, best_per_layer, choose_monitor_tokens, load_probe_infos, monitor_view


N_EXTREME_DOCS = 3
N_RANDOM_DOCS = 3
HEATMAP_SEED = 0
MAX_HEATMAP_TOKENS = 1024  # per document; longer ones are cut (and say so)


def report_path(cfg: Config, run: str | None = None) -> Path:
    """``report.html`` in the run directory (``layout.Layout.report``)."""
    from ...run.layout import Layout

    return Layout.from_config(cfg, run).report


@dataclass
class Cell:
    """A table cell with attributes: ``data`` become ``data-*`` attributes; text is escaped like any cell's."""

    text: str
    cls: str = ""
    style: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    title: str = ""

    def html(self) -> str:
        a = f' class="{esc(self.cls)}"' if self.cls else ""
        a += f' style="{esc(self.style)}"' if self.style else ""
        a += f' title="{esc(self.title)}"' if self.title else ""
        a += "".join(f' data-{k}="{esc(v)}"' for k, v in self.data.items())
        return f"<td{a}>{esc(self.text)}</td>"


def table(headers: list[str], rows: list[list[str | Cell]], *, row_classes: list[str] | None = None, cls: str = "data",
          table_id: str | None = None, row_data: list[dict[str, Any]] | None = None) -> str:
    """Cells are escaped here; pass plain text (or a :class:`Cell`). ``row_data``: ``data-*`` attributes per row."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        c = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        c += "".join(f' data-{k}="{esc(v)}"' for k, v in (row_data[i] if row_data else {}).items())
        body.append(f"<tr{c}>" + "".join(x.html() if isinstance(x, Cell) else f"<td>{esc(x)}</td>" for x in r) + "</tr>")
    tid = f' id="{esc(table_id)}"' if table_id else ""
    return (f'<div class="table-wrap"><table class="{cls}"{tid}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _f4(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _f3(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def probe_roc_section(cfg: Config, cache, probes: list[ProbeInfo]) -> tuple[str, list[str]]:
    """ROC of each layer's best probe on the cached val rows; warnings if a probe no longer reproduces its AUROC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    warnings: list[str] = []
    if cache is None:
        return note("No activation cache, so no ROC curves: run `needleprobe extract`."), warnings
    try:
        val = cache.split("val")
        y = val.labels
    except NeedleprobeError as e:
        return note(f"Cannot read the val split: {e}"), warnings
    curves = []
    best = best_per_layer(probes)
    layers = sorted(best)
    for i, layer in enumerate(layers):
        p = best[layer]
        if layer not in val.layers:
            warnings.append(f"layer {layer} is not in the cache; its ROC curve is missing")
            continue
        probe = p.probe
        x = val.to_numpy(layer)
        if x.shape[1] != probe.d_model:
            warnings.append(f"probe layer {layer} seed {p.seed} has d_model {probe.d_model}, the cache {x.shape[1]}")
            continue
        s = probe.decision_function(x)
        del x
        auc = float(roc_auc_score(y, s))
        if abs(auc - p.auroc) > 1e-9:
            warnings.append(
                f"probe layer {layer} seed {p.seed} scores val AUROC {auc:.10f} on this cache, its JSON says "
                f"{p.auroc:.10f} (Δ {auc - p.auroc:+.1e}): the cached activations changed since the fit, refit"
            )
        fpr, tpr, _ = roc_curve(y, s)
        curves.append({
            "fpr": fpr, "tpr": tpr, "color": PALETTE[i % len(PALETTE)],
            "legend": f"layer {layer} · seed {p.seed} · {auc:.4f}",
            "attrs": {"layer": layer, "seed": p.seed, "auroc": repr(auc)},
        })
    if not curves:
        return note("No probe could be scored on the cached val rows."), warnings
    n_pos = int(y.sum())
    html_ = chart_roc("roc-probes", "token-level ROC of the best probe per layer on val", curves)
    html_ += (f'<p class="caption">{len(y):,} val rows ({n_pos:,} needle tokens, {len(y) - n_pos:,} sampled negatives); '
              "legend: layer · seed · AUROC.</p>")
    return html_, warnings


def monitor_roc_html(view: MonitorView) -> tuple[str, str]:
    """(the ROC chart with its caption, the metric tables)."""
    from sklearn.metrics import roc_curve

    y = (np.asarray(view.tokens.doc_n_needles) > 0).astype(np.int8)
    if not view.agg_rows:
        return note(f"The monitored split {view.split!r} has documents of one kind only (needle or clean), "
                    "so there is no document ROC."), ""
    curves = []
    for i, r in enumerate(view.agg_rows):
        fpr, tpr, _ = roc_curve(y, view.doc_scores[r["method"]])
        curves.append({
            "fpr": fpr, "tpr": tpr, "color": PALETTE[i % len(PALETTE)],
            "legend": f"{r['label']} · {r['auroc']:.3f}",
            "attrs": {"aggregation": r["method"], "layer": view.layer, "seed": view.seed, "auroc": repr(r["auroc"])},
        })
    chart = chart_roc("roc-monitor", f"document-level ROC per aggregation, layer {view.layer} seed {view.seed}", curves)
    chart += (f'<p class="caption">{len(y):,} {esc(view.split)} documents ({int(y.sum()):,} with needles); '
            f"probe layer {view.layer} · seed {view.seed}; legend: aggregation · AUROC.</p>")
    out = f"<h3>Document monitor on {esc(view.split)}: layer {view.layer} · seed {view.seed}</h3>"
    rows, classes = [], []
    for r in view.agg_rows:
        lo, hi = r["ci"]
        rows.append([r["label"], _f4(r["auroc"]), f"{lo:.3f}–{hi:.3f}" if math.isfinite(lo) else "–",
                     _f3(r["tpr_1pct"]), _f3(r["tpr_5pct"]),
                     f"{_f3(r['tpr_above_clean'])} (FPR ≤ {r['fpr_upper95_above_clean']:.1%})"])
        classes.append("best" if r["method"] == view.chosen else "")
    out += table(["aggregation", "doc AUROC", "95% CI (docs)", "TPR @ 1% FPR", "TPR @ 5% FPR",
                  "TPR above every clean one"], rows, row_classes=classes)
    from ..calibration import TARGET_FPRS, clean_docs_needed

    held = "held out" if view.calibration_split != view.split else "the same split"
    missing = [f"{fpr:.0%} FPR needs at least {clean_docs_needed(fpr)}" for fpr, name in TARGET_FPRS
               if any(r[f"tpr_{name}"] is None for r in view.agg_rows)]
    out += (f'<p class="caption">Thresholds set on the {view.n_calibration_clean} clean {esc(view.calibration_split)} '
            f"documents ({held}); the aggregation highlighted has the best document AUROC there. The last column "
            "flags what scores above every one of them, its false-positive rate at most the bound given (one-sided "
            "95%, exact binomial, from none of them flagged)."
            + (f" No TPR where the clean documents are too few to measure the rate ({esc('; '.join(missing))})."
               if missing else "") + "</p>")
    out += detection_html(view)
    shown = [(layer, seed, per) for layer, seed, per in view.all_probe_aurocs
             if not view.seeds or (layer, seed) in view.seeds]  # identical seeds once
    if len(shown) > 1:
        from ..aggregation import AGGREGATIONS

        out += "<h3>Every monitored probe (document AUROC)</h3>"
        rows = [[str(layer), ", ".join(map(str, view.seeds.get((layer, seed), [seed])))]
                + [_f4(per.get(m)) for m in AGGREGATIONS] for layer, seed, per in shown]
        classes = ["best" if (layer, seed) == (view.layer, view.seed) else "" for layer, seed, _ in shown]
        out += table(["layer", "seed", *AGGREGATIONS], rows, row_classes=classes)
    out += '<p class="caption">Highlighted: the aggregation (and probe) used for the heatmaps below.</p>'
    return chart, out


def detection_html(view: MonitorView) -> str:
    """Needle detection per aggregation, as the monitor stored it: the share of needle spans the running aggregate
    flags before they end, and how many tokens into the span."""
    rows, classes = [], []
    n = (view.agg_rows[0]["detection"].get("n_needle_spans") or 0) if view.agg_rows else 0
    if not n:
        return ""
    for r in view.agg_rows:
        d = r["detection"]
        cells = []
        for key in ("at_1pct_fpr", "at_5pct_fpr", "above_clean"):
            rate = d.get(f"detection_rate_{key}")
            cells.append("–" if rate is None else f"{rate:.0%} ({d[f'detected_spans_{key}']}/{n})"
                         + ("" if d.get(f"latency_median_{key}") is None else
                            f" · {d[f'latency_median_{key}']:g} / {d[f'latency_p90_{key}']:g} tokens"))
        rows.append([r["label"], *cells])
        classes.append("best" if r["method"] == view.chosen else "")
    return (f"<h3>Needle detection on {esc(view.split)}</h3>"
            + table(["aggregation", "@ 1% FPR", "@ 5% FPR", "above every clean one"], rows, row_classes=classes)
            + f'<p class="caption">Of the {n} needle spans (runs of needle tokens), the share whose running '
            "document aggregate (the aggregate of the tokens so far, as a monitor watching the text sees it) is above "
            "the threshold at one of the span's tokens, and the latency: tokens from the span's first token to the "
            "first such one, median / 90th percentile. A causal model cannot see a needle before it starts.</p>")


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Text of each token as it reads in context (WordPiece ``##x`` joins its word, byte-level ``Ġx`` gets its space).

    Each token is decoded after up to three preceding tokens and the context's
    own decoding is stripped off, so the tokenizer's own rules decide spaces.
    A character split over several byte-level tokens shows on the token that
    completes it (earlier pieces show as U+FFFD).
    """
    out = []
    for i, t in enumerate(ids):
        if i == 0:
            out.append(tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False))
            continue
        ctx = ids[max(0, i - 3) : i]
        prev = tokenizer.decode(ctx, skip_special_tokens=False, clean_up_tokenization_spaces=False).rstrip("\ufffd")
        full = tokenizer.decode(ctx + [t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(full[len(prev):] if full.startswith(prev) else tokenizer.decode([t], skip_special_tokens=False))
    return out


def _visible(ws: str) -> str:
    return ws.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·") or "∅"


def heatmap_html(texts: list[str], raw: list[str], logits: np.ndarray, needle: np.ndarray, scale: float) -> str:
    parts = []
    for text, r, lg, nd in zip(texts, raw, logits, needle):
        core = text.strip()
        lead = text[: len(text) - len(text.lstrip())]
        trail = text[len(text.rstrip()):] if core else ""
        shown = core or _visible(text)
        rgb = diverging(float(lg) / scale)
        ink = "#fff" if float(lg) / scale > 0.62 else "#1f2328"
        cls = "tok needle" if nd else "tok"
        tip = f"{r!r} · logit {float(lg):+.3f}" + (" · needle" if nd else "")
        if core:
            parts.append(esc(lead))
        parts.append(f'<span class="{cls}" style="background:rgb{rgb};color:{ink}" data-logit="{float(lg):.4f}" '
                     f'title="{esc(tip)}">{esc(shown)}</span>')
        nl = (lead + trail).count("\n") if core else text.count("\n")
        parts.append(esc(trail.replace("\n", "")) + "\n" * nl if core else "\n" * nl)
    return "".join(parts)


def heatmap_picks(view: MonitorView) -> list[tuple[int, str]]:
    """(document, why) shown as heatmaps: the top-scored clean ones, the lowest-scored needle ones, a few at random."""
    y = np.asarray(view.tokens.doc_n_needles) > 0
    s = view.doc_scores[view.chosen]
    order = np.argsort(-s, kind="stable")
    picks: list[tuple[int, str]] = []
    clean = [int(i) for i in order if not y[i]][:N_EXTREME_DOCS]
    needles = [int(i) for i in order[::-1] if y[i]][:N_EXTREME_DOCS]
    picks += [(i, "clean · highest score") for i in clean]
    picks += [(i, "needle · lowest score") for i in needles]
    rest = np.array(sorted(set(range(len(s))) - {i for i, _ in picks}), dtype=int)
    if rest.size:
        rng = np.random.default_rng(HEATMAP_SEED)
        picks += [(int(i), "random") for i in sorted(rng.choice(rest, size=min(N_RANDOM_DOCS, rest.size), replace=False))]
    return picks


def heatmaps_section(cfg: Config, view: MonitorView) -> str:
    from ..aggregation import aggregation_label

    tok = view.tokens
    y = np.asarray(tok.doc_n_needles) > 0
    s = view.doc_scores[view.chosen]
    picks = heatmap_picks(view)
    if not picks:
        return note("No documents to show.")
    tok_note = ""
    try:
        from ...model.hooks import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    except NeedleprobeError as e:
        tokenizer, tok_note = None, note(f"Token text unavailable ({e}); showing token ids.", kind="warn")
    col = view.column
    shown = [tok.logits[i][:MAX_HEATMAP_TOKENS, col] for i, _ in picks]
    allv = np.abs(np.concatenate(shown)) if shown else np.zeros(1)
    scale = float(np.percentile(allv, 99)) if allv.size else 1.0
    scale = scale if scale > 1e-6 else 1.0
    grad = ", ".join(f"rgb{diverging(v)} {(v + 1) * 50:.0f}%" for v, _ in RDBU)
    out = [
        tok_note,
        '<div class="heat-legend"><span>logit</span><span class="num">−' + f"{scale:.2f}" + "</span>"
        f'<span class="colorbar" style="background:linear-gradient(to right, {grad})"></span>'
        f'<span class="num">+{scale:.2f}</span><span class="tok needle sample">needle token</span>'
        '<span class="muted">hover a token for its logit</span></div>',
    ]
    for i, why in picks:
        ids = [int(t) for t in tok.token_id[i][:MAX_HEATMAP_TOKENS]]
        if tokenizer is not None:
            texts = token_texts(tokenizer, ids)
            raw = tokenizer.convert_ids_to_tokens(ids)
        else:
            texts, raw = [f"#{t} " for t in ids], [f"#{t}" for t in ids]
        lg = tok.logits[i][:MAX_HEATMAP_TOKENS, col]
        nd = tok.needle[i][:MAX_HEATMAP_TOKENS]
        cut = len(tok.token_id[i]) - len(ids)
        kind = "needle" if y[i] else "clean"
        out.append(
            f'<div class="doc {kind}" id="{doc_anchor(view.split, tok.doc_ids[i])}"><div class="doc-head">'
            f'<span class="badge {kind}">{esc(why)}</span>'
            f'<code>{esc(tok.doc_ids[i])}</code><span class="muted">{int(tok.doc_n_needles[i])} needle(s) · '
            f"{len(tok.token_id[i]):,} tokens · {esc(aggregation_label(view.chosen, cfg.monitor))} = {s[i]:.3f}"
            f"{f' · first {MAX_HEATMAP_TOKENS} tokens shown' if cut > 0 else ''}</span></div>"
            f'<div class="heatmap" data-doc-id="{esc(tok.doc_ids[i])}">{heatmap_html(texts, raw, lg, nd, scale)}</div></div>'
        )
    return "".join(out)


def _header(cfg: Config, layout, facts: dict[str, Any] | None, probes: list[ProbeInfo], best: ProbeInfo) -> str:
    from ... import __version__

    if facts is None:
        fp = '<span class="bad">no cache</span>'
    elif facts["matches_config"]:
        fp = f'{esc(facts["fingerprint"])} <span class="ok">✓ matches config</span>'
    else:
        fp = f'{esc(facts["fingerprint"])} <span class="bad">✗ stale for this config</span>'
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    items = [
        ("model", esc(cfg.model.name)), ("activation site", esc(cfg.probe.activation_site)),
        ("cache fingerprint", fp), ("layers × seeds", esc(f"{sorted({p.layer for p in probes})} × {sorted({p.seed for p in probes})}")),
        ("best probe", esc(f"layer {best.layer} · seed {best.seed} · val AUROC {best.auroc:.4f}")),
        ("class balance", esc(cfg.probe.class_balance)),
        ("dataset file", esc(cfg.dataset.resolved_path())), ("generated", esc(f"{now} · needleprobe {__version__}")),
        ("run directory", esc(layout.run_dir)),
    ]
    meta = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (("sec-layers", "AUROC by layer"), ("sec-roc", "ROC curves"),
                                                        ("sec-l2", "L2 path"), ("sec-heat", "token heatmaps"),
                                                        ("sec-errors", "tokens it gets wrong")))
    return (f'<header><div class="wrap"><h1>needleprobe report <span>· {esc(_run_title(cfg, layout.run))}</span></h1>'
            f'<dl class="meta">{meta}</dl><nav>{nav}</nav></div></header>')


def _run_title(cfg: Config, run: str | None) -> str:
    return cfg.dataset.key + (f" · run {run}" if run else "")


def _probe_table(probes: list[ProbeInfo], best: dict[int, ProbeInfo]) -> str:
    """One row per distinct probe (identical seeds share one, as ``fit`` prints them)."""
    from ...fit.verdict import SAME_SEEDS, one_row_per_probe

    seeds = one_row_per_probe({(p.layer, p.seed): p.probe for p in probes})
    rows, classes = [], []
    for p in (p for p in probes if (p.layer, p.seed) in seeds):
        v = p.meta.get("val_metrics", {})
        ci = p.ci
        converged = all(r.get("converged", True) for r in p.meta.get("l2_results", []))
        rows.append([str(p.layer), ", ".join(map(str, seeds[(p.layer, p.seed)])), _f4(p.auroc),
                     f"{ci[0]:.4f}–{ci[1]:.4f}" if ci else "–",
                     _f4(v.get("average_precision")), _f4(v.get("tpr_at_1pct_fpr")),
                     _f4((p.meta.get("train_metrics") or {}).get("auroc")), f"{p.meta.get('selected_l2', float('nan')):g}",
                     "yes" if converged else "NO"])
        classes.append("best" if best.get(p.layer) is p else "")
    shared = f'<p class="caption">{SAME_SEEDS[0].upper()}{SAME_SEEDS[1:]}.</p>' if len(seeds) < len(probes) else ""
    return table(["layer", "seed", "val AUROC", "95% CI (docs)", "AP", "TPR @ 1% FPR", "train AUROC", "selected L2",
                  "converged"], rows, row_classes=classes) + shared


def doc_anchor(split: str, doc_id: str) -> str:
    """An HTML id for a document's heatmap (any doc id, safely)."""
    return f"doc-{split}-" + hashlib.sha256(doc_id.encode()).hexdigest()[:12]


def verdict_html(layout, probes: list[ProbeInfo]) -> str:
    """The fit's verdict (``verdict.json``), when the fit that wrote these probes wrote one."""
    try:
        v = json.loads(layout.verdict.read_text())
    except (OSError, ValueError):
        return note("No verdict.json beside these probes (fitted by an older needleprobe): refit to get it.")
    if {(d["layer"], d["seed"]) for d in v.get("layers", [])} - {(p.layer, p.seed) for p in probes}:
        return note("verdict.json does not describe these probes: refit to update it.", kind="warn")
    items = "".join(f"<li>{esc(line)}</li>" for line in v.get("summary", []))
    return f'<h3>Verdict</h3><ul class="verdict">{items}</ul>'


N_ERRORS = 10


def errors_html(cfg: Config, run: str | None, view: "MonitorView | None") -> str:
    """The two lists of :func:`token_errors.token_errors` as tables; doc ids link to their heatmaps when shown."""
    from ..errors import token_errors

    try:
        lists = token_errors(cfg, run=run, n=N_ERRORS)
    except NeedleprobeError as e:
        return note(f"No error lists: {e}", kind="warn")
    shown = set()
    if view is not None and view.split == lists.split and view.doc_scores:
        shown = {view.tokens.doc_ids[i] for i, _ in heatmap_picks(view)}
    out = [f'<p class="caption">layer {lists.layer} · seed {lists.seed} on {esc(lists.split)}: {lists.n_rows:,} rows '
           f"({lists.n_positive:,} needle tokens); logit &gt; 0 is the probe's own \"needle\".</p>"]
    for title, kind, items in (("Highest-scoring negatives (false positives)", "false-positives", lists.false_positives),
                               ("Lowest-scoring needle tokens (misses)", "misses", lists.missed_needles)):
        rows = []
        for e in items:
            doc = esc(e.doc_id)
            if e.doc_id in shown:
                doc = f'<a href="#{doc_anchor(lists.split, e.doc_id)}">{doc}</a>'
            rows.append(f'<tr data-doc-id="{esc(e.doc_id)}" data-logit="{e.logit!r}"><td>{e.rank}</td>'
                        f"<td>{e.logit:+.3f}</td><td>{doc}</td><td class=\"context\">{esc(e.left)}"
                        f'<mark class="tokerr">{esc(e.token)}</mark>{esc(e.right)}</td></tr>')
        out.append(f"<h3>{esc(title)}</h3>")
        out.append(f'<div class="table-wrap"><table class="data errors" id="errors-{kind}"><thead><tr><th>#</th>'
                   "<th>logit</th><th>document</th><th>token in context</th></tr></thead><tbody>"
                   + "".join(rows) + "</tbody></table></div>")
    return "".join(out)


def _cache_and_facts(cfg: Config, probes, warnings: list[str]):
    """(cache, its facts) or (None, None) when it cannot be opened; what the reader should know goes to ``warnings``."""
    from ...cache.reader import open_cache

    try:
        cache = open_cache(cfg)
    except NeedleprobeError as e:
        warnings.append(str(e))
        return None, None
    from ...cache.inspect import cache_facts

    facts = cache_facts(cfg)
    if facts["damaged"]:  # a report from a damaged cache would mislead: the one-line error instead
        raise NeedleprobeError(facts["damaged"][0])
    if facts["matches_config"] is False:
        warnings.append("the cache is stale for this config (" + "; ".join(facts["differences"]) + "): run `needleprobe extract`")
    other = sorted({p.meta.get("cache_fingerprint") for p in probes} - {cache.fingerprint})
    if other:
        warnings.append(f"some probes were fitted on another cache ({', '.join(map(str, other))}): refit with `needleprobe fit`")
    return cache, facts


def _monitor_sections(cfg: Config, run: str | None, layout, probes):
    """(the monitor's view or None, its ROC html, its tables, the heatmaps html), from the monitor's stored results."""
    view, mon_notes = None, []
    found, mon_notes = choose_monitor_tokens(cfg, run, probes)
    if found is not None:
        from ..monitor import stored_results
        from ..run import Run

        stored = stored_results(Run.of_layout(layout), found[0])
        if stored is None or not stored[0]:
            mon_notes.append(f"the monitor's {found[0]!r} metrics are not of the current probe files")
        else:
            view = monitor_view(cfg, found[0], found[1], probes, stored)
    if view is None:
        why = ("; ".join(mon_notes) + ". ") if mon_notes else ""
        mon_html = note(f"No up-to-date monitor results. {why}Run `{command('monitor', cfg, run)}` "
                        "to score whole documents, then write the report again.")
        return None, mon_html, "", mon_html
    from ..logits import truncation_line

    cut = truncation_line(view.split, view.tokens, cfg.model.max_length)
    extra = "".join(note(n, kind="warn") for n in mon_notes + ([f"Truncation: {cut}."] if cut else []))
    mon_html, mon_tables = monitor_roc_html(view)
    return view, extra + mon_html, mon_tables, heatmaps_section(cfg, view)


def build_html(cfg: Config, run: str | None = None) -> str:
    from ...run.layout import Layout

    from ...run.record import run_config

    cfg = run_config(cfg, run)  # the layers and seeds the run was fitted with
    layout = Layout.from_config(cfg, run)
    probes, missing = load_probe_infos(cfg, run)
    if not probes:
        raise NeedleprobeError(f"{layout.run_dir}: no probes for this config (run `{command('fit', cfg, run)}` first)")
    best = best_overall(probes)
    per_layer = best_per_layer(probes)
    warnings: list[str] = [f"probe missing: {m} (run `{command('fit', cfg, run)}`)" for m in missing]
    cache, facts = _cache_and_facts(cfg, probes, warnings)
    roc_probes, w = probe_roc_section(cfg, cache, probes)
    warnings += w
    view, mon_html, mon_tables, heat_html = _monitor_sections(cfg, run, layout, probes)

    seed_note = ("" if any(p.meta.get("seed_dependent") for p in probes) or len({p.seed for p in probes}) < 2 else
                 " With <code>class_balance: weighted</code> the fit does not depend on the seed, so the seeds coincide.")
    body = [
        _header(cfg, layout, facts, probes, best),
        '<main class="wrap">',
        "".join(note(x, kind="warn") for x in warnings),
        '<section class="card" id="sec-layers"><h2>Probe quality by layer</h2>'
        '<p class="explain">Token-level AUROC of each probe on the validation rows (needle tokens against sampled '
        "non-needle tokens), at the L2 strength chosen on validation. Error bars are 95% intervals from a bootstrap over "
        f"documents, since tokens of one document are not independent.{seed_note}</p>",
        chart_auroc_by_layer(probes),
        _probe_table(probes, per_layer),
        '<p class="caption">Highlighted: the best seed of each layer (used for the ROC curves).</p>',
        verdict_html(layout, probes),
        "</section>",
        '<section class="card" id="sec-roc"><h2>ROC curves</h2>'
        '<p class="explain">Left: token-level ROC of the best probe of each layer, re-scored here from the cached val '
        "activations (logit = x · w + b). Right: document-level ROC of the monitor, which scores every token of a "
        "document and aggregates the logits into one score per document, for the best monitored probe.</p>"
        f'<div class="grid2"><div><h3>Probes (tokens, val)</h3>{roc_probes}</div>'
        f"<div><h3>Monitor (documents{'' if view is None else ', ' + esc(view.split)})</h3>{mon_html}</div></div>"
        f"{mon_tables}</section>",
        '<section class="card" id="sec-l2"><h2>Regularisation path</h2>'
        '<p class="explain">Validation AUROC for every L2 strength tried, one line per layer (colour) and seed (dash). '
        "Hollow rings mark the selected strength: the best val AUROC, ties going to the stronger penalty. A flat path "
        "means the choice barely matters; a peak at the edge of the grid means the grid should be widened.</p>",
        chart_l2_path(probes),
        "</section>",
        '<section class="card" id="sec-heat"><h2>Token heatmaps</h2>'
        '<p class="explain">Each token coloured by the probe logit (red: needle-like, blue: not; white is the decision '
        "boundary, logit 0). Outlined tokens are the labelled needle. Shown: the clean documents the monitor scores "
        "highest (its likeliest false alarms), the needle documents it scores lowest (its likeliest misses), and a few "
        f"random documents (fixed seed {HEATMAP_SEED})"
        + ("" if view is None else f"; probe layer {view.layer} · seed {view.seed}, documents ranked by "
           f"{esc(view.chosen)}, the aggregation with the best document AUROC on {esc(view.calibration_split)}")
        + '. The single tokens the best probe ranks most wrongly on the cached val rows are listed under '
        '<a href="#sec-errors">tokens it gets wrong</a>, linked to these documents where they are shown.</p>'
        + heat_html + "</section>",
        '<section class="card" id="sec-errors"><h2>Tokens it gets wrong</h2>'
        '<p class="explain">The highest-scoring negatives (false positives) and the lowest-scoring needle tokens '
        "(misses) of the best probe on the cached val rows, in their text: the same lists as <code>"
        + esc(command("errors", cfg, run)) + "</code>. A document id links to its heatmap above when it is shown there.</p>"
        + errors_html(cfg, run, view) + "</section>",
        f'<footer>Written by <code>needleprobe report</code> from {esc(str(layout.run_dir))}'
        f"{'' if cache is None else ' and ' + esc(cache.path)}. Self-contained: no scripts, no external resources.</footer>",
        "</main>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>needleprobe report · {esc(_run_title(cfg, run))}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_report(cfg: Config, run: str | None = None) -> Path:
    """Write ``report.html`` in the run directory (atomically) and return its path."""
    from ...run.layout import Layout
    from ...io.files import atomic_write_bytes

    layout = Layout.from_config(cfg, run)
    layout.refuse_foreign("report", can_overwrite=False)
    path = layout.report
    atomic_write_bytes(path, build_html(cfg, run).encode("utf-8"))
    return path
