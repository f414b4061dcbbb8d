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

import csv
import datetime as _dt
import hashlib
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ...config import Config
from ...errors import NeedleprobeError

if TYPE_CHECKING:
    from ...run.layout import Layout


PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#bab0ac")
SEED_DASH = ("", "7 4", "2 3", "10 3 2 3", "4 2")
N_EXTREME_DOCS = 3
N_RANDOM_DOCS = 3
HEATMAP_SEED = 0
MAX_HEATMAP_TOKENS = 1024  # per document; longer ones are cut (and say so)


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def command(name: str, cfg: Config, run: str | None = None) -> str:
    """``needleprobe NAME --config X [--run R]``: the command a note tells the user to run for this run."""
    return f"needleprobe {name} --config {cfg.source or '<config>'}" + (f" --run {run}" if run else "")


def report_path(cfg: Config, run: str | None = None) -> Path:
    """``report.html`` in the run directory (``layout.Layout.report``)."""
    from ...run.layout import Layout

    return Layout.from_config(cfg, run).report


# ---------------------------------------------------------------------------
# inputs


@dataclass
class ProbeInfo:
    layer: int
    seed: int
    pt: Path
    probe: Any  # probe.LinearProbe

    @property
    def meta(self) -> dict[str, Any]:
        return self.probe.metadata_

    @property
    def auroc(self) -> float:
        return float(self.meta["val_metrics"]["auroc"])

    @property
    def ci(self) -> tuple[float, float] | None:
        ci = self.meta.get("val_metrics", {}).get("auroc_ci95")
        return (float(ci[0]), float(ci[1])) if ci else None


def load_probe_infos(cfg: Config, run: str | None = None) -> tuple[list[ProbeInfo], list[str]]:
    """Probes of the config's layers × seeds that exist on disk, and the ones that do not."""
    from ..run import Run

    fitted = Run.of(cfg, run)
    found, missing = [], []
    for layer in sorted(cfg.probe.layers_to_probe):
        for seed in cfg.probe.train_seeds:
            if fitted.has(layer, seed):
                found.append(ProbeInfo(layer, seed, fitted.probe_path(layer, seed), fitted.probe(layer, seed)))
            else:
                missing.append(f"layer {layer} seed {seed}")
    return found, missing


def best_per_layer(probes: list[ProbeInfo]) -> dict[int, ProbeInfo]:
    """Each layer's best seed (``verdict.best_seed_per_layer``: highest val AUROC, ties to the lowest seed)."""
    from ...fit.verdict import best_seed_per_layer

    by_key = {(p.layer, p.seed): p for p in probes}
    return {layer: by_key[(layer, seed)] for layer, seed in best_seed_per_layer({k: p.auroc for k, p in by_key.items()}).items()}


def best_overall(probes: list[ProbeInfo]) -> ProbeInfo:
    """The best probe (``verdict.ranked_layers``: val AUROC, then the layer's seed mean, then the earlier layer)."""
    from ...fit.verdict import ranked_layers

    by_key = {(p.layer, p.seed): p for p in probes}
    return by_key[ranked_layers({k: p.auroc for k, p in by_key.items()})[0]]


# ---------------------------------------------------------------------------
# SVG charts


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:g}"
    return f"1e{int(round(math.log10(abs(v))))}" if math.isclose(abs(v), 10 ** round(math.log10(abs(v)))) else f"{v:.0e}"


class Plot:
    """A minimal x/y chart: scales, grid, axes, legend; callers add marks in data coordinates."""

    def __init__(self, chart_id: str, label: str, xlim: tuple[float, float], ylim: tuple[float, float], *,
                 xlog: bool = False, width: int = 760, height: int = 360, legend_width: int = 200,
                 legend_inside: bool = False):
        self.id, self.label = chart_id, label
        self.xlog = xlog
        self.x0, self.x1 = (math.log10(xlim[0]), math.log10(xlim[1])) if xlog else xlim
        self.y0, self.y1 = ylim
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = 62, width - legend_width, 14, height - 48
        self.legend_inside = legend_inside
        self.marks: list[str] = []
        self.legend_items: list[str] = []

    def px(self, x: float) -> float:
        v = math.log10(x) if self.xlog else x
        return self.left + (v - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def axes(self, xticks: Iterable[tuple[float, str]], yticks: Iterable[tuple[float, str]], xlabel: str, ylabel: str) -> None:
        g = ['<g class="grid">']
        ax = ['<g class="axis">']
        for v, lab in xticks:
            x = self.px(v)
            g.append(f'<line x1="{x:.1f}" y1="{self.top}" x2="{x:.1f}" y2="{self.bottom}"/>')
            ax.append(f'<text x="{x:.1f}" y="{self.bottom + 17}" text-anchor="middle">{esc(lab)}</text>')
        for v, lab in yticks:
            y = self.py(v)
            g.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.right}" y2="{y:.1f}"/>')
            ax.append(f'<text x="{self.left - 8}" y="{y + 4:.1f}" text-anchor="end">{esc(lab)}</text>')
        w, h = self.right - self.left, self.bottom - self.top
        ax.append(f'<rect class="frame" x="{self.left}" y="{self.top}" width="{w}" height="{h}"/>')
        ax.append(f'<text class="label" x="{self.left + w / 2:.1f}" y="{self.h - 8}" text-anchor="middle">{esc(xlabel)}</text>')
        ax.append(f'<text class="label" transform="translate(16 {self.top + h / 2:.1f}) rotate(-90)" '
                  f'text-anchor="middle">{esc(ylabel)}</text>')
        self.marks[:0] = g + ["</g>"] + ax + ["</g>"]

    def error_bar(self, cx: float, ci: tuple[float, float], color: str, attrs: str) -> None:
        """A vertical 95% interval at x = ``cx`` with end caps; ``attrs`` are the group's data attributes."""
        lo, hi = self.py(ci[0]), self.py(ci[1])
        self.add(
            f'<g class="errorbar" stroke="{color}" {attrs}>'
            f'<line x1="{cx:.1f}" y1="{lo:.1f}" x2="{cx:.1f}" y2="{hi:.1f}"/>'
            f'<line x1="{cx - 4:.1f}" y1="{lo:.1f}" x2="{cx + 4:.1f}" y2="{lo:.1f}"/>'
            f'<line x1="{cx - 4:.1f}" y1="{hi:.1f}" x2="{cx + 4:.1f}" y2="{hi:.1f}"/></g>'
        )

    def add(self, svg: str) -> None:
        self.marks.append(svg)

    def path_d(self, xs: Iterable[float], ys: Iterable[float]) -> str:
        pts, last = [], None
        for x, y in zip(xs, ys):
            p = (round(self.px(x), 1), round(self.py(y), 1))
            if p != last:
                pts.append(p)
                last = p
        return "M" + " L".join(f"{a:.1f} {b:.1f}" for a, b in pts)

    def legend(self, label: str, color: str, *, dash: str = "", marker: bool = False, ring: bool = False) -> None:
        """One legend row: a line sample (dashed if ``dash``), a dot (``marker``) or a hollow ring alone (``ring``)."""
        i = len(self.legend_items)
        x, y = (self.right - 226, 0) if self.legend_inside else (self.right + 18, self.top + 12 + 20 * i)
        d = f' stroke-dasharray="{dash}"' if dash else ""
        if ring:
            sample = f'<circle cx="{x + 12}" cy="{y}" r="5.5" fill="white" stroke="{color}" stroke-width="2"/>'
        else:
            sample = f'<line x1="{x}" y1="{y}" x2="{x + 24}" y2="{y}" stroke="{color}" stroke-width="2.5"{d}/>'
            if marker:
                sample += f'<circle cx="{x + 12}" cy="{y}" r="4" fill="{color}"/>'
        self.legend_items.append(f'<g class="legend-item">{sample}<text x="{x + 32}" y="{y + 4}">{esc(label)}</text></g>')

    def render(self) -> str:
        legend = "".join(self.legend_items)
        if self.legend_inside and self.legend_items:
            # stacked up from the bottom-right corner (empty on a ROC plot), on a white box
            n = len(self.legend_items)
            y0 = self.bottom - 14 - 20 * (n - 1)
            box = (f'<rect class="legend-box" x="{self.right - 234}" y="{y0 - 12}" width="228" height="{20 * n + 4}" '
                   'rx="4" fill="white" fill-opacity="0.92" stroke="#d1d9e0"/>')
            legend = box + "".join(f'<g transform="translate(0 {y0 + 20 * i})">{it}</g>' for i, it in enumerate(self.legend_items))
        return (
            f'<svg class="chart" id="{esc(self.id)}" viewBox="0 0 {self.w} {self.h}" role="img" aria-label="{esc(self.label)}" '
            f'xmlns="http://www.w3.org/2000/svg">'
            + "".join(self.marks)
            + f'<g class="legend">{legend}</g></svg>'
        )


def _auroc_ylim(values: Iterable[float]) -> tuple[float, float]:
    lo = min(values)
    y0 = max(0.0, math.floor((lo - 0.01) * 20) / 20)
    y0 = min(y0, 0.95)
    return y0, 1.0 + (1.0 - y0) * 0.04


def _yticks(y0: float, y1: float) -> list[tuple[float, str]]:
    return [(v, f"{v:g}") for v in nice_ticks(y0, min(y1, 1.0)) if v <= 1.0]


def chart_auroc_by_layer(probes: list[ProbeInfo]) -> str:
    layers = sorted({p.layer for p in probes})
    seeds = sorted({p.seed for p in probes})
    vals = [p.auroc for p in probes] + [c for p in probes if p.ci for c in p.ci]
    plot = Plot("auroc-by-layer", "validation AUROC by layer and seed with 95% CI", (-0.5, len(layers) - 0.5), _auroc_ylim(vals))
    plot.axes([(i, str(layer)) for i, layer in enumerate(layers)], _yticks(plot.y0, plot.y1), "layer", "val AUROC (token level)")
    if plot.y0 <= 0.5:
        plot.add(f'<line class="chance" x1="{plot.left}" y1="{plot.py(0.5):.1f}" x2="{plot.right}" y2="{plot.py(0.5):.1f}"/>')
    spread = min(0.5, 0.16 * (len(seeds) - 1))
    for p in probes:
        j = seeds.index(p.seed)
        x = layers.index(p.layer) + (j / (len(seeds) - 1) - 0.5) * spread if len(seeds) > 1 else layers.index(p.layer)
        cx, color = plot.px(x), PALETTE[j % len(PALETTE)]
        ci_txt = ""
        if p.ci:
            plot.error_bar(cx, p.ci, color, f'data-layer="{p.layer}" data-seed="{p.seed}"')
            ci_txt = f" (95% CI {p.ci[0]:.4f}–{p.ci[1]:.4f})"
        plot.add(
            f'<circle class="point" cx="{cx:.1f}" cy="{plot.py(p.auroc):.1f}" r="4.5" fill="{color}" '
            f'data-layer="{p.layer}" data-seed="{p.seed}" data-auroc="{p.auroc!r}">'
            f"<title>layer {p.layer} · seed {p.seed} · AUROC {p.auroc:.4f}{esc(ci_txt)} · L2 {p.meta.get('selected_l2', '?')}</title></circle>"
        )
    for j, s in enumerate(seeds):
        plot.legend(f"seed {s}", PALETTE[j % len(PALETTE)], marker=True)
    return plot.render()


def chart_l2_path(probes: list[ProbeInfo]) -> str:
    l2s = [r["l2"] for p in probes for r in p.meta.get("l2_results", [])]
    aucs = [r[k] for p in probes for r in p.meta.get("l2_results", []) for k in ("val_auroc", "train_auroc")
            if r.get(k) is not None]
    if not l2s:
        return note("The probe files have no l2_results; refit with `needleprobe fit`.")
    lo, hi = min(l2s), max(l2s)
    plot = Plot("l2-path", "train and validation AUROC against the L2 strength, per layer and seed", (lo / 1.8, hi * 1.8),
                _auroc_ylim(aucs), xlog=True)
    decades = range(math.floor(math.log10(lo / 1.8)) + 1, math.floor(math.log10(hi * 1.8)) + 1)
    xt = [(10.0**k, fmt_num(10.0**k)) for k in decades]
    if len(xt) < 2:
        xt = [(v, fmt_num(v)) for v in sorted(set(l2s))]
    plot.axes(xt, _yticks(plot.y0, plot.y1), "L2 strength (log scale)", "AUROC")
    layers = sorted({p.layer for p in probes})
    seeds = sorted({p.seed for p in probes})
    for p in probes:
        res = sorted(p.meta.get("l2_results", []), key=lambda r: r["l2"])
        color = PALETTE[layers.index(p.layer) % len(PALETTE)]
        dash = SEED_DASH[seeds.index(p.seed) % len(SEED_DASH)]
        d_attr = f' stroke-dasharray="{dash}"' if dash else ""
        xs, ys = [r["l2"] for r in res], [r["val_auroc"] for r in res]
        train = [(r["l2"], r["train_auroc"]) for r in res if r.get("train_auroc") is not None]
        if train:  # the fit's own rows: the gap to the val line is what the probe memorised at that L2
            plot.add(f'<path class="series l2-train" d="{plot.path_d(*zip(*train))}" stroke="{color}" stroke-opacity="0.4" '
                     f'stroke-width="1.5"{d_attr} data-layer="{p.layer}" data-seed="{p.seed}">'
                     f"<title>layer {p.layer} · seed {p.seed} · train AUROC: "
                     + esc(", ".join(f"L2 {x:g} {y:.4f}" for x, y in train)) + "</title></path>")
        plot.add(f'<path class="series l2" d="{plot.path_d(xs, ys)}" stroke="{color}"{d_attr} '
                 f'data-layer="{p.layer}" data-seed="{p.seed}"/>')
        for r in res:
            sel = r["l2"] == p.meta.get("selected_l2")
            look = f'r="5.5" fill="white" stroke="{color}" stroke-width="2"' if sel else f'r="3" fill="{color}"'
            plot.add(
                f'<circle class="l2-point{" selected" if sel else ""}" cx="{plot.px(r["l2"]):.1f}" cy="{plot.py(r["val_auroc"]):.1f}" '
                f"{look}>"
                f"<title>layer {p.layer} · seed {p.seed} · L2 {r['l2']:g} · AUROC {r['val_auroc']:.4f}"
                f"{' · selected' if sel else ''}{'' if r.get('converged', True) else ' · NOT converged'}</title></circle>"
            )
    for i, layer in enumerate(layers):
        plot.legend(f"layer {layer}", PALETTE[i % len(PALETTE)])
    if len(seeds) > 1:
        for j, s in enumerate(seeds):
            plot.legend(f"seed {s}", "#57606a", dash=SEED_DASH[j % len(SEED_DASH)])
    plot.legend("selected L2", "#57606a", ring=True)
    if any(r.get("train_auroc") is not None for p in probes for r in p.meta.get("l2_results", [])):
        plot.legend("train AUROC (faint)", "#c4cad1")
    return plot.render()


def chart_roc(chart_id: str, label: str, curves: list[dict[str, Any]]) -> str:
    """``curves``: dicts with fpr, tpr, color, legend and ``attrs`` (extra data-* attributes)."""
    plot = Plot(chart_id, label, (0.0, 1.0), (0.0, 1.0), width=480, height=440, legend_width=16, legend_inside=True)
    ticks = [(v, f"{v:g}") for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    plot.axes(ticks, ticks, "false positive rate", "true positive rate")
    plot.add(f'<line class="chance" x1="{plot.px(0):.1f}" y1="{plot.py(0):.1f}" x2="{plot.px(1):.1f}" y2="{plot.py(1):.1f}"/>')
    for c in curves:
        attrs = "".join(f' data-{k}="{esc(v)}"' for k, v in c["attrs"].items())
        plot.add(f'<path class="series roc" d="{plot.path_d(c["fpr"], c["tpr"])}" stroke="{c["color"]}"{attrs}>'
                 f"<title>{esc(c['legend'])}</title></path>")
        plot.legend(c["legend"], c["color"])
    return plot.render()


# ---------------------------------------------------------------------------
# HTML pieces


def note(text: str, *, kind: str = "note", raw: bool = False) -> str:
    return f'<p class="{kind}">{text if raw else esc(text)}</p>'


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


# ---------------------------------------------------------------------------
# probe ROC curves from the cache


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


# ---------------------------------------------------------------------------
# the document monitor


@dataclass
class MonitorView:
    split: str
    tokens: Any  # monitor.MonitorTokens
    column: int
    layer: int
    seed: int
    agg_rows: list[dict[str, Any]] = field(default_factory=list)
    doc_scores: dict[str, np.ndarray] = field(default_factory=dict)
    all_probe_aurocs: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)
    chosen: str = "max"
    seeds: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    """(layer, seed) of each distinct monitored probe → the seeds that gave it (``verdict.one_row_per_probe``)"""
    calibration_split: str = ""
    """whose clean documents set the thresholds (and whose AUROC chose the aggregation)"""
    n_calibration_clean: int = 0


def choose_monitor_tokens(cfg: Config, run: str | None, probes: list[ProbeInfo]) -> tuple[tuple[str, Any] | None, list[str]]:
    """(split, stored token logits of the run's current probes) to show: the config's split first; notes on the rest.

    Logits are looked up by each probe file's sha256 and each split's current
    documents, so a refit probe or an edited dataset is never shown with the
    old logits; the notes say which stored splits were passed over and why.
    """
    from ...data.documents import file_sha256
    from ...run.layout import Layout
    from ..monitor import LogitStore, ProbeRef, stored_tokens

    layout = Layout.from_config(cfg, run)
    refs = [ProbeRef(p.layer, p.seed, p.pt, file_sha256(p.pt)) for p in probes]
    store = LogitStore(layout.monitor_store)
    order = [cfg.monitor.split] + [s for s in ("test", "val", "train") if s != cfg.monitor.split]
    stored = set(_stored_splits(layout.monitor_store))
    notes: list[str] = []
    for split in order:
        tokens = stored_tokens(cfg, store, split, refs)
        if tokens is not None:
            if len(tokens.probes) < len(refs):
                from ...fit.verdict import one_row_per_probe

                have = {(int(p["layer"]), int(p["seed"])) for p in tokens.probes}
                distinct = one_row_per_probe({(p.layer, p.seed): p.probe for p in probes})  # identical seeds once
                lack = [(layer, g) for (layer, _), g in distinct.items() if not any((layer, s) in have for s in g)]
                if lack:
                    names = ", ".join(f"layer {layer} seed{'s' if len(g) > 1 else ''} {', '.join(map(str, g))}"
                                      for layer, g in lack)
                    notes.append(f"the monitor's {split!r} logits are of {len(distinct) - len(lack)} of the "
                                 f"{len(distinct)} distinct probes (not of {names}: scored before a refit, or never)")
            return (split, tokens), notes
        if split in stored:
            notes.append(f"the monitor's stored {split!r} logits are of other probe files or other documents "
                         "(refit or dataset edited since the monitor ran)")
    return None, notes


def _stored_splits(store_path) -> list[str]:
    """Split groups in a monitor store (none when it does not exist or cannot be read)."""
    from ...io.stores import open_group

    if not (store_path / "zarr.json").is_file():
        return []
    try:
        return sorted(open_group(store_path, mode="r").group_keys())
    except Exception:  # a damaged store reads as absent here; the monitor itself reports the damage
        return []


def monitor_view(cfg: Config, split: str, tokens, probes: list[ProbeInfo], stored) -> MonitorView:
    """The monitor's results on ``split`` as ``needleprobe monitor`` stored them, with document scores for the charts.

    ``stored``: (metrics rows, recommended row) from :func:`monitor.stored_results`.  The probe and aggregation
    shown are the ones the monitor recommended, and the table's numbers are its CSV's: the report decides nothing
    again.  The stored token logits are only aggregated (``monitor.document_scores``) for the ROC curves, the
    heatmaps and the per-probe AUROC table.
    """
    from sklearn.metrics import roc_auc_score

    from ...fit.verdict import one_row_per_probe, ranked_layers
    from ..monitor import AGGREGATIONS, TARGET_FPRS, aggregation_label, doc_labels, document_scores

    rows, rec = stored
    cols = [(int(p["layer"]), int(p["seed"])) for p in tokens.probes]
    if rec is not None and (int(rec["layer"]), int(rec["seed"])) in cols:
        j = cols.index((int(rec["layer"]), int(rec["seed"])))
    else:  # no recommendation (the calibration split lacks needle or clean documents): the best probe shown
        j = cols.index(ranked_layers({k: p.auroc for p in probes if (k := (p.layer, p.seed)) in cols})[0])
    view = MonitorView(split, tokens, j, cols[j][0], cols[j][1])
    by_key = {(p.layer, p.seed): p.probe for p in probes}
    view.seeds = one_row_per_probe({k: by_key[k] for k in cols if k in by_key})
    y = doc_labels(tokens)
    for jj, (layer, seed) in enumerate(cols):
        per = {}
        for method in AGGREGATIONS:
            s = document_scores(tokens, jj, method, cfg.monitor)
            if jj == j:
                view.doc_scores[method] = s
            per[method] = float(roc_auc_score(y, s))
        view.all_probe_aurocs.append((layer, seed, per))
    method_of = {aggregation_label(m, cfg.monitor): m for m in AGGREGATIONS}
    mine = {r["aggregation"]: r for r in rows if (int(r["layer"]), int(r["seed"])) == cols[j]}
    if not mine:
        return view
    for label, method in method_of.items():
        r = mine[label]
        row = {"method": method, "label": label, "auroc": r["auroc"], "ci": (r["auroc_ci_low"], r["auroc_ci_high"]),
               "cal_auroc": r["calibration_auroc"], "tpr_above_clean": r["tpr_above_clean"],
               "fpr_upper95_above_clean": r["fpr_upper95_above_clean"]}
        for _, name in TARGET_FPRS:
            row[f"tpr_{name}"] = r[f"tpr_at_{name}_fpr"]
        view.agg_rows.append(row)
    first = next(iter(mine.values()))
    view.calibration_split, view.n_calibration_clean = first["calibration_split"], int(first["n_calibration_clean_docs"])
    view.chosen = method_of[rec["aggregation"]] if rec is not None else AGGREGATIONS[0]
    return view


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
    from ..monitor import TARGET_FPRS, clean_docs_needed

    held = "held out" if view.calibration_split != view.split else "the same split"
    missing = [f"{fpr:.0%} FPR needs at least {clean_docs_needed(fpr)}" for fpr, name in TARGET_FPRS
               if any(r[f"tpr_{name}"] is None for r in view.agg_rows)]
    out += (f'<p class="caption">Thresholds set on the {view.n_calibration_clean} clean {esc(view.calibration_split)} '
            f"documents ({held}); the aggregation highlighted has the best document AUROC there. The last column "
            "flags what scores above every one of them, its false-positive rate at most the bound given (one-sided "
            "95%, exact binomial, from none of them flagged)."
            + (f" No TPR where the clean documents are too few to measure the rate ({esc('; '.join(missing))})."
               if missing else "") + "</p>")
    shown = [(layer, seed, per) for layer, seed, per in view.all_probe_aurocs
             if not view.seeds or (layer, seed) in view.seeds]  # identical seeds once
    if len(shown) > 1:
        from ..monitor import AGGREGATIONS

        out += "<h3>Every monitored probe (document AUROC)</h3>"
        rows = [[str(layer), ", ".join(map(str, view.seeds.get((layer, seed), [seed])))]
                + [_f4(per.get(m)) for m in AGGREGATIONS] for layer, seed, per in shown]
        classes = ["best" if (layer, seed) == (view.layer, view.seed) else "" for layer, seed, _ in shown]
        out += table(["layer", "seed", *AGGREGATIONS], rows, row_classes=classes)
    out += '<p class="caption">Highlighted: the aggregation (and probe) used for the heatmaps below.</p>'
    return chart, out


# ---------------------------------------------------------------------------
# token heatmaps


RDBU = ((-1.0, (103, 160, 204)), (-0.5, (190, 215, 236)), (0.0, (247, 247, 247)), (0.5, (244, 165, 130)), (1.0, (178, 24, 43)))
"""RdBu with a paler blue arm: the page asks "where does the probe fire?", so red must stand out."""


def ramp(v: float, stops) -> tuple[int, int, int]:
    """The colour at ``v`` on a piecewise-linear ramp of (value, rgb) ``stops`` (clamped at both ends)."""
    v = max(stops[0][0], min(stops[-1][0], v))
    for (a, ca), (b, cb) in zip(stops, stops[1:]):
        if v <= b:
            t = (v - a) / (b - a)
            return tuple(int(round(x + (y - x) * t)) for x, y in zip(ca, cb))  # type: ignore[return-value]
    return stops[-1][1]


def diverging(v: float) -> tuple[int, int, int]:
    """RdBu-like colour for v in [-1, 1]: blue below zero, white at zero, red above."""
    return ramp(v, RDBU)


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
    from ..monitor import aggregation_label

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


# ---------------------------------------------------------------------------
# the page


CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f3f5f8;--card:#fff;--accent:#0969da}
*{box-sizing:border-box}
body{margin:0;font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:var(--bg)}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:.9em}
.wrap{max-width:1080px;margin:0 auto;padding:0 24px}
header{background:#1f2633;color:#fff;padding:26px 0 22px}
header h1{margin:0;font-size:24px;font-weight:650;letter-spacing:-.01em}
header h1 span{color:#9fb3c8;font-weight:400}
dl.meta{display:grid;grid-template-columns:max-content 1fr max-content 1fr;gap:3px 18px;margin:14px 0 0;font-size:13px}
dl.meta dt{color:#9fb3c8}dl.meta dd{margin:0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
.ok{color:#3fb950}.bad{color:#ff7b72}
nav{margin-top:14px;font-size:13px}nav a{color:#c9d8ea;margin-right:16px;text-decoration:none;border-bottom:1px dotted #7d8fa5}
section.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:20px 26px 22px;margin:20px 0;box-shadow:0 1px 2px #1f232808}
h2{font-size:19px;margin:0 0 4px}h3{font-size:15px;margin:20px 0 6px}
p.explain{color:var(--muted);margin:0 0 14px;max-width:86ch}
p.caption{color:var(--muted);font-size:13px;margin:4px 0 12px}
p.note,p.warn{border-radius:6px;padding:8px 12px;margin:8px 0;font-size:14px}
p.note{background:#ddf4ff;border:1px solid #54aeff66}
p.warn{background:#fff8c5;border:1px solid #d4a72c66}
.table-wrap{overflow-x:auto}
table.data{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums;margin:6px 0 4px}
table.data th{font-weight:600;color:var(--muted);text-align:right;padding:4px 12px;border-bottom:2px solid var(--line)}
table.data td{text-align:right;padding:3px 12px;border-bottom:1px solid #eaeef2}
table.data th:first-child,table.data td:first-child{text-align:left}
table.data tr.best td{background:#e6f4ea;font-weight:600}
svg.chart{width:100%;max-width:780px;height:auto;display:block;margin:6px 0 2px;font-family:inherit}
svg .grid line{stroke:#edf0f3;stroke-width:1}
svg .axis text{font-size:11px;fill:#59636e}
svg .axis text.label{font-size:12px;fill:#1f2328}
svg .frame{fill:none;stroke:#aab4bf}
svg .chance{stroke:#9aa4ae;stroke-dasharray:4 4;stroke-width:1}
svg .errorbar line{stroke-width:1.6}
svg .point{stroke:#fff;stroke-width:1}
svg path.series{fill:none;stroke-width:2;stroke-linejoin:round;opacity:.9}
svg .legend text{font-size:12px;fill:#1f2328}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:8px 28px}
@media (max-width:1000px){.grid2{grid-template-columns:1fr}}
.heat-legend{display:flex;align-items:center;gap:8px;font-size:13px;color:var(--muted);margin:6px 0 14px;flex-wrap:wrap}
.colorbar{display:inline-block;width:180px;height:12px;border-radius:3px;border:1px solid var(--line)}
.heat-legend .num{font-variant-numeric:tabular-nums}
.doc{margin:0 0 16px}
.doc-head{display:flex;align-items:baseline;gap:10px;font-size:13px;margin-bottom:5px;flex-wrap:wrap}
.badge{font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.04em;padding:2px 8px;border-radius:10px}
.badge.clean{background:#ddf4ff;color:#0550ae}.badge.needle{background:#ffebe9;color:#a40e26}
.muted{color:var(--muted)}
.heatmap{font-size:14px;line-height:1.95;white-space:pre-wrap;overflow-wrap:anywhere;border:1px solid var(--line);
 border-radius:8px;padding:10px 14px;background:#fff;max-height:340px;overflow-y:auto}
.tok{border-radius:3px;padding:1px 1px}
.tok.needle{outline:2px solid #1f2328;outline-offset:-1px}
.tok.sample{background:#f7f7f7;color:var(--fg);padding:1px 6px}
footer{color:var(--muted);font-size:12px;padding:8px 0 40px}
table.matrix td{text-align:center;min-width:92px;border:2px solid #fff}
table.matrix td:first-child{text-align:left}
table.matrix td.missing{color:var(--muted);background:#f6f8fa}
table.matrix td.stale{font-style:italic}
table.data td{white-space:nowrap}
table.data td.name{white-space:normal;min-width:9em;text-align:left}
table#runs th{text-align:left}
table.errors th:last-child{text-align:left}
table.errors td.context{white-space:normal;text-align:left;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
mark.tokerr{background:#ffd8a8;font-weight:700;padding:0 1px;border-radius:2px}
ul.verdict{margin:6px 0 4px;padding-left:20px}
table.data td.path{white-space:normal;word-break:break-all;min-width:14em;text-align:left;
 font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
"""


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


def build_html(cfg: Config, run: str | None = None) -> str:
    from ...cache.cache import open_cache
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
    try:
        cache = open_cache(cfg)
    except NeedleprobeError as e:
        cache, facts = None, None
        warnings.append(str(e))
    else:
        from ...cache.inspect import cache_facts

        facts = cache_facts(cfg)
        if facts["damaged"]:  # a report from a damaged cache would mislead: the one-line error instead
            raise NeedleprobeError(facts["damaged"][0])
        if facts["matches_config"] is False:
            warnings.append("the cache is stale for this config (" + "; ".join(facts["differences"]) + "): run `needleprobe extract`")
        other = sorted({p.meta.get("cache_fingerprint") for p in probes} - {cache.fingerprint})
        if other:
            warnings.append(f"some probes were fitted on another cache ({', '.join(map(str, other))}): refit with `needleprobe fit`")

    roc_probes, w = probe_roc_section(cfg, cache, probes)
    warnings += w

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
        heat_html, mon_tables = mon_html, ""
    else:
        from ..monitor import truncation_line

        cut = truncation_line(view.split, view.tokens, cfg.model.max_length)
        extra = "".join(note(n, kind="warn") for n in mon_notes + ([f"Truncation: {cut}."] if cut else []))
        mon_html, mon_tables = monitor_roc_html(view)
        mon_html = extra + mon_html
        heat_html = heatmaps_section(cfg, view)

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
        f'<footer>Written by <code>needleprobe.report.write_report</code> from {esc(str(layout.run_dir))}'
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


# ---------------------------------------------------------------------------
# comparison of runs


AUROC_RAMP = ((0.0, (202, 0, 32)), (0.5, (247, 247, 247)), (0.75, (146, 197, 222)), (1.0, (5, 113, 176)))
"""Transfer cells: red below chance, white at chance (0.5), blue towards 1."""


@dataclass
class RunView:
    """One run of a comparison: its config, its directory, its probes and how deep the model is."""

    cfg: Config
    layout: "Layout"
    probes: list[ProbeInfo]
    missing: list[str]
    n_layers: int | None
    n_layers_from: str
    parts: list[str] = field(default_factory=list)  # what tells it apart: dataset key, then model slug, site

    @property
    def label(self) -> str:
        return " · ".join(self.parts)

    @property
    def best(self) -> dict[int, ProbeInfo]:
        return best_per_layer(self.probes)

    def depth(self, layer: int) -> float | None:
        """Relative depth of a layer: layer / n_layers (None when the depth is unknown)."""
        return layer / self.n_layers if self.n_layers else None


def model_depth(cfg: Config) -> tuple[int | None, str]:
    """(number of blocks, where it was read): the cache's metadata, else the model's config (no weights loaded)."""
    from ...cache.cache import open_cache

    try:
        n = open_cache(cfg, allow_incomplete=True).metadata.get("n_layers")
    except NeedleprobeError:
        n = None
    if n:
        return int(n), "cache"
    from ...model.hooks import model_shape

    n = model_shape(cfg)[0]
    return (int(n), "model config") if n else (None, "unknown")


def load_runs(cfgs: list[Config], run: str | None = None) -> list[RunView]:
    """The runs to compare, each with its probes; one line naming the config when one cannot be compared."""
    from collections import Counter

    from ...run.layout import Layout, RunIdentity, model_dir_name

    if len(cfgs) < 2:
        raise NeedleprobeError("a comparison needs two configs or more (--config A.yaml --config B.yaml); "
                               "with one --config, `needleprobe report` writes that run's own report")
    views: list[RunView] = []
    seen: dict[str, str] = {}
    from ...run.record import run_config

    for cfg in [run_config(c, run) for c in cfgs]:  # each run as it was fitted (its record)
        layout = Layout.from_config(cfg, run)
        where = cfg.source or cfg.dataset.key
        if str(layout.run_dir) in seen:
            raise NeedleprobeError(f"{where}: the same run as {seen[str(layout.run_dir)]} ({layout.run_dir}); "
                                   "a comparison needs different runs")
        seen[str(layout.run_dir)] = where
        owner = layout.owner()
        if owner is not None and owner != RunIdentity.from_config(cfg):
            raise NeedleprobeError(f"{layout.run_dir}: holds probes of {owner.describe()}, but {where} is "
                                   f"{layout.identity.describe()}")
        probes, missing = load_probe_infos(cfg, run)
        if not probes:
            raise NeedleprobeError(f"{where}: no probes in {layout.run_dir} (run `{command('fit', cfg, run)}` first)")
        views.append(RunView(cfg, layout, probes, missing, *model_depth(cfg), parts=[cfg.dataset.key]))
    extras = (lambda v: model_dir_name(v.cfg.model.name, v.cfg.model.gguf_file), lambda v: v.cfg.probe.activation_site)
    for extra in extras:  # only runs that share a label get told apart
        count = Counter(v.label for v in views)
        for v in views:
            if count[v.label] > 1:
                v.parts.append(extra(v))
    count = Counter(v.label for v in views)
    for i, v in enumerate(views):
        if count[v.label] > 1:  # the same dataset, model and site in two output directories
            v.parts.append(f"#{i + 1}")
    return views


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-") or "run"


def comparison_path(views: list[RunView]) -> Any:
    """``comparison_{A}_vs_{B}....html`` in the runs' common directory (A, B: dataset keys, told apart when shared)."""
    name = "comparison_" + "_vs_".join("-".join(_file_part(x) for x in v.parts) for v in views) + ".html"
    if len(name) > 200:  # file names stop at 255 bytes
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"comparison_{len(views)}_runs_{digest}.html"
    from ...run.layout import comparison_page

    return comparison_page([v.layout.run_dir for v in views], name)


def _dodge(i: int, n: int) -> float:
    """Pixels to shift run ``i`` of ``n`` sideways, so runs probing the same layers do not hide each other."""
    return (i - (n - 1) / 2) * 5.0


def chart_runs(chart_id: str, label: str, views: list[RunView], by: str) -> str:
    """Val AUROC of each run's best seed per layer, one line per run; ``by`` "layer" or "depth" (layer / n_layers)."""
    shown = [v for v in views if by == "layer" or v.n_layers]
    vals = [x for v in shown for p in v.best.values() for x in (p.auroc, *(p.ci or ()))]
    if by == "layer":
        layers = sorted({layer for v in shown for layer in v.best})
        lo, hi = layers[0] - 0.5, layers[-1] + 0.5
        n_ticks = min(10, max(2, layers[-1] - layers[0]))
        ticks = [(float(t), f"{t:g}") for t in nice_ticks(layers[0], layers[-1], n=n_ticks)
                 if float(t).is_integer()] or [(float(x), str(x)) for x in layers]
        xlabel = "layer (block index)"
    else:
        lo, hi = -0.03, 1.03
        ticks = [(v, f"{v:g}") for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0)]
        xlabel = "relative depth (layer / number of layers)"
    longest = max(len(v.label) for v in shown)
    legend_width = min(340, max(200, 56 + 7 * longest))
    plot = Plot(chart_id, label, (lo, hi), _auroc_ylim(vals), width=560 + legend_width, legend_width=legend_width)
    plot.axes(ticks, _yticks(plot.y0, plot.y1), xlabel, "val AUROC (token level, best seed)")
    if plot.y0 <= 0.5:
        plot.add(f'<line class="chance" x1="{plot.left}" y1="{plot.py(0.5):.1f}" x2="{plot.right}" y2="{plot.py(0.5):.1f}"/>')
    for v in shown:
        k = views.index(v)
        color, dx = PALETTE[k % len(PALETTE)], _dodge(k, len(views))
        best = sorted(v.best.items())
        xs = [float(layer) if by == "layer" else v.depth(layer) for layer, _ in best]
        run_attr = f'data-run="{esc(v.label)}"'
        d = "M" + " L".join(f"{plot.px(x) + dx:.1f} {plot.py(p.auroc):.1f}" for x, (_, p) in zip(xs, best))
        plot.add(f'<path class="series run" d="{d}" stroke="{color}" {run_attr}/>')  # one per run, even of one point
        for x, (layer, p) in zip(xs, best):
            cx = plot.px(x) + dx
            ci_txt = ""
            if p.ci:
                plot.error_bar(cx, p.ci, color,
                               f'{run_attr} data-layer="{layer}" data-ci-low="{p.ci[0]!r}" data-ci-high="{p.ci[1]!r}"')
                ci_txt = f" (95% CI {p.ci[0]:.4f}–{p.ci[1]:.4f})"
            where = f"layer {layer}" + ("" if by == "layer" else f" of {v.n_layers} (depth {x:.3f})")
            plot.add(
                f'<circle class="point" cx="{cx:.1f}" cy="{plot.py(p.auroc):.1f}" r="4.5" fill="{color}" {run_attr} '
                f'data-layer="{layer}" data-seed="{p.seed}" data-auroc="{p.auroc!r}" data-x="{x!r}">'
                f"<title>{esc(v.label)} · {esc(where)} · seed {p.seed} · AUROC {p.auroc:.4f}{esc(ci_txt)}</title></circle>"
            )
        text = v.label if len(v.label) * 7 + 56 <= legend_width else v.label[: (legend_width - 56) // 7 - 1] + "…"
        plot.legend(text, color, marker=True)
    return plot.render()


def _by_layer_table(views: list[RunView]) -> str:
    layers = sorted({layer for v in views for layer in v.best})
    rows = []
    for layer in layers:
        row: list[str | Cell] = [str(layer)]
        for v in views:
            p = v.best.get(layer)
            row.append(Cell("–") if p is None else Cell(
                f"{p.auroc:.4f} (seed {p.seed})" + (f" · depth {v.depth(layer):.2f}" if v.n_layers else ""),
                data={"run": v.label, "layer": layer, "auroc": repr(p.auroc)}))
        rows.append(row)
    return table(["layer", *(v.label for v in views)], rows, table_id="auroc-by-layer-table")


@dataclass
class TransferCell:
    auroc: float
    seed: int
    stale: bool


def read_transfer(source: RunView, target: RunView) -> tuple[dict[int, TransferCell] | None, str | None]:
    """(layer → token AUROC of ``source``'s best probe on ``target``'s val, or None when not evaluated; a problem).

    Read from ``{source run}/transfer/{target dataset}-val/eval_metrics.csv``.  Per
    layer, the row of the seed that is best on the source's own val (the one
    ``evaluate --matrix`` scores); a row whose ``source_val_auroc`` is not the
    probe's current one, or of a seed that is no longer the best, was scored
    with probes refit since (``stale``).
    """
    from ...run.layout import TransferFiles

    path = TransferFiles(source.layout.transfer_dir(target.layout, "val")).eval_csv
    if not path.is_file():
        return None, None
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        parsed = [(int(r["layer"]), int(r["seed"]), float(r["token_auroc"]), r.get("source_val_auroc") or "") for r in rows]
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:
        return None, f"{path}: cannot read ({type(e).__name__}: {str(e)[:80]})"
    current = {(p.layer, p.seed): p.auroc for p in source.probes}
    best = source.best
    out: dict[int, TransferCell] = {}
    for layer in sorted({r[0] for r in parsed}):
        rows_l = [r for r in parsed if r[0] == layer]
        want = best[layer].seed if layer in best else None
        pick = next((r for r in rows_l if r[1] == want), None)
        if pick is None:
            pick = max(rows_l, key=lambda r: (float(r[3]) if r[3] else -1.0, -r[1]))
        own = float(pick[3]) if pick[3] else None
        refit = own is None or current.get((layer, pick[1])) != own or (want is not None and pick[1] != want)
        out[layer] = TransferCell(pick[2], pick[1], refit)
    return out, None


def _evaluate_command(sources: list[RunView], targets: list[RunView], run: str | None) -> list[str]:
    """The commands that fill the missing cells: one ``--matrix`` when it can, else one ``evaluate`` per pair."""
    cfgs = {id(v): v.cfg.source or "<config>" for v in sources + targets}
    if run is None and len({v.cfg.dataset.key for v in sources + targets}) == len({id(v) for v in sources + targets}):
        group = list(dict.fromkeys(cfgs[id(v)] for v in sources + targets))
        return ["needleprobe evaluate --matrix " + " ".join(group)]
    runflag = f" --probes-run {run}" if run else ""
    return [f"needleprobe evaluate --probes {cfgs[id(s)]}{runflag} --config {cfgs[id(t)]}" for s, t in zip(sources, targets)]


def transfer_section(views: list[RunView], run: str | None) -> tuple[str, list[str]]:
    """Heatmap tables of token AUROC (rows trained on, columns evaluated on), one per layer and model; warnings."""
    groups: dict[tuple[str, str | None, str], list[RunView]] = {}
    for v in views:
        groups.setdefault((v.layout.identity.model, v.cfg.model.revision, v.cfg.probe.activation_site), []).append(v)
    shared = {k: g for k, g in groups.items() if len(g) > 1}
    warnings: list[str] = []
    if not shared:
        return note("No two of these runs share a model and activation site, so there is no transfer to show: a probe "
                    "reads one model's activations at one site."), warnings
    out = []
    for (model, revision, site), group in shared.items():
        targets: list[RunView] = []  # one column per dataset (the first run of it gives the data)
        for v in group:
            if v.cfg.dataset.key not in {t.cfg.dataset.key for t in targets}:
                targets.append(v)
        cells: dict[tuple[int, int], dict[int, TransferCell]] = {}
        missing: list[tuple[RunView, RunView]] = []
        for i, s in enumerate(group):
            for j, t in enumerate(targets):
                got, problem = read_transfer(s, t)
                if problem:
                    warnings.append(problem)
                if got is None:
                    missing.append((s, t))
                else:
                    cells[(i, j)] = got
        title = f"{model}{'@' + revision if revision else ''} · {site}"
        out.append(f"<h3>{esc(title)}</h3>")
        layers = sorted({layer for c in cells.values() for layer in c})
        stale = [(group[i], targets[j]) for (i, j), c in sorted(cells.items()) if any(x.stale for x in c.values())]
        for layer in layers:
            rows = []
            for i, s in enumerate(group):
                row: list[str | Cell] = [s.label]
                for j, t in enumerate(targets):
                    c = cells.get((i, j), {}).get(layer)
                    key = {"layer": layer, "source": s.label, "target": t.cfg.dataset.key}
                    if c is None:
                        row.append(Cell("–", cls="missing", data=key, title="not evaluated"))
                        continue
                    rgb = ramp(c.auroc, AUROC_RAMP)
                    ink = "#fff" if c.auroc > 0.85 or c.auroc < 0.15 else "#1f2328"
                    tip = (f"probes of {s.label} (layer {layer}, seed {c.seed}) on {t.cfg.dataset.key} val: "
                           f"token AUROC {c.auroc:.4f}" + (" · scored with probes refit since" if c.stale else ""))
                    row.append(Cell(f"{c.auroc:.4f}" + (" *" if c.stale else ""), cls="stale" if c.stale else "",
                                    style=f"background:rgb{rgb};color:{ink}", title=tip,
                                    data={**key, "seed": c.seed, "auroc": repr(c.auroc)}))
                rows.append(row)
            out.append(f'<p class="caption">layer {layer}: token AUROC on the val split (rows: trained on; columns: '
                       "evaluated on; the diagonal is each run on its own data)</p>")
            out.append(table(["trained on ↓ · evaluated on →", *(t.cfg.dataset.key for t in targets)], rows,
                             cls="data matrix", table_id=f"transfer-{_file_part(title)}-layer-{layer}"))
        if stale:
            pairs = "; ".join(f"{s.label} on {t.cfg.dataset.key}" for s, t in stale)
            cmds = _evaluate_command([s for s, _ in stale], [t for _, t in stale], run)
            warnings.append(f"{title}: transfer results marked * were scored with probes refit since ({pairs}): "
                            f"evaluate again with `{'` and `'.join(cmds)}`")
        if missing:
            pairs = "; ".join(f"{s.label} on {t.cfg.dataset.key}" for s, t in missing)
            cmds = _evaluate_command([s for s, _ in missing], [t for _, t in missing], run)
            out.append(note(f"Not evaluated yet ({esc(title)}): {esc(pairs)}. Fill "
                            f"{'them' if len(missing) > 1 else 'it'} with "
                            + " and ".join(f"<code>{esc(c)}</code>" for c in cmds) + ", then write the comparison again.",
                            raw=True))
    lone = [v for v in views if len(groups[(v.layout.identity.model, v.cfg.model.revision, v.cfg.probe.activation_site)]) == 1]
    if lone:
        out.append(note("Without another run of the same model and site here, so without transfer: "
                        + "; ".join(v.label for v in lone) + "."))
    return "".join(out), warnings


def read_monitor(v: RunView) -> tuple[dict[str, Any] | None, str | None]:
    """(what the run's document monitor recommends, a note): read from the monitor's stored outputs, never recomputed.

    The run record's ``monitor:{split}`` section (the config's ``monitor.split`` first, then test, val, train) holds the
    recommended row (probe, aggregation chosen on the calibration split, its AUROC with CI and TPR at the calibrated
    thresholds on the split) and the sha256 of ``monitor_metrics_{split}.csv``; a CSV changed since is not trusted.
    A fit drops these sections, so what is left describes the run's current probes.
    """
    from ...data.documents import file_sha256
    from ...run.record import read_run_record

    stages = read_run_record(v.layout.run_record).get("stages", {})
    changed = []
    for split in dict.fromkeys([v.cfg.monitor.split, "test", "val", "train"]):
        sec = stages.get(f"monitor:{split}")
        if not sec:
            continue
        csv_path = str(v.layout.monitor_csv(split))
        try:
            same = file_sha256(csv_path) == sec.get("outputs", {}).get(csv_path)
        except OSError:
            same = False
        if not same:
            changed.append(split)
            continue
        if sec.get("recommended") is None:
            return None, f"{v.label}: the monitor on {split!r} made no recommendation (its calibration split lacks needle or clean documents)"
        return {**sec["recommended"], "split": split, "calibration_split": sec.get("calibration_split", "")}, None
    why = (f"its stored results on {', '.join(map(repr, changed))} changed since the monitor wrote them; " if changed else "")
    return None, f"{v.label}: no document monitor results ({why}run `{command('monitor', v.cfg)}`)"


def _monitor_table(views: list[RunView]) -> str:
    """Per run, the document monitor it recommends: aggregation, document AUROC with CI, TPR at the thresholds set on
    the clean calibration documents, and the operating point that any number of them gives."""
    from ..monitor import operating_point
    from ...fit.verdict import one_row_per_probe

    rows, data, notes = [], [], []
    for v in views:
        r, problem = read_monitor(v)
        if problem:
            notes.append(problem)
        if r is None:
            rows.append([Cell(v.label, cls="name")] + ["–"] * 7)
            data.append({"monitor": v.label})
            continue
        group = one_row_per_probe({(p.layer, p.seed): p.probe for p in v.probes}).get((r["layer"], r["seed"]), [r["seed"]])
        n_pos, n_neg = r["n_needle_docs"], r["n_docs"] - r["n_needle_docs"]

        def rate(name: str) -> str:
            if r.get(f"tpr_at_{name}_fpr") is None:
                return "–"
            return f"{r[f'tpr_at_{name}_fpr']:.2f} ({r[f'tp_at_{name}_fpr']}/{n_pos}, FP {r[f'fp_at_{name}_fpr']}/{n_neg})"

        op = operating_point(r) if "threshold_above_clean" in r else None
        deploy = "–" if op is None else (
            f"{'threshold at ' + format(op['target_fpr'], '.0%') + ' FPR' if op['target_fpr'] else 'above every clean one'}: "
            f"{op['tp']}/{n_pos} flagged, FP {op['fp']}/{n_neg}, FPR ≤ {op['fpr_upper95']:.1%} (95%)")
        rows.append([Cell(v.label, cls="name"), f"{r['split']} (set on {r['calibration_split']})",
                     f"layer {r['layer']} · seed{'s' if len(group) > 1 else ''} {', '.join(map(str, group))}",
                     r["aggregation"], f"{r['auroc']:.3f} ({r['auroc_ci_low']:.3f}–{r['auroc_ci_high']:.3f})",
                     rate("1pct"), rate("5pct"), deploy])
        data.append({"monitor": v.label, "split": r["split"], "layer": r["layer"], "seed": r["seed"],
                     "aggregation": r["aggregation"], "doc-auroc": repr(r["auroc"]), "ci-low": repr(r["auroc_ci_low"]),
                     "ci-high": repr(r["auroc_ci_high"])})
    out = table(["run", "split (thresholds set on)", "probe", "aggregation", "doc AUROC [95% CI]", "TPR @ 1% FPR",
                 "TPR @ 5% FPR", "operating point"], rows, table_id="monitor-compare", row_data=data)
    return out + "".join(note(n) for n in notes)


def _best_table(views: list[RunView]) -> str:
    rows, data = [], []
    for v in views:
        b = best_overall(v.probes)
        ci = f"{b.ci[0]:.4f}–{b.ci[1]:.4f}" if b.ci else "–"
        depth = f"{v.depth(b.layer):.3f} ({b.layer}/{v.n_layers})" if v.n_layers else "– (depth unknown)"
        rows.append([Cell(v.label, cls="name"), str(b.layer), str(b.seed), _f4(b.auroc), ci,
                     f"{b.meta.get('selected_l2', float('nan')):g}", depth])
        data.append({"run": v.label, "layer": b.layer, "seed": b.seed, "auroc": repr(b.auroc),
                     "l2": repr(b.meta.get("selected_l2")), "n-layers": v.n_layers or ""})
    return table(["run", "layer", "seed", "val AUROC", "95% CI (docs)", "selected L2", "relative depth"], rows,
                 table_id="best-probes", row_data=data)


def _runs_table(views: list[RunView]) -> str:
    rows = [[Cell(v.label, cls="name"), Cell(v.cfg.model.name, cls="path"), v.cfg.probe.activation_site,
             Cell(v.cfg.dataset.key, cls="name"), f"{v.n_layers} ({v.n_layers_from})" if v.n_layers else "unknown",
             Cell(str(v.layout.run_dir), cls="path")] for v in views]
    return table(["run", "model", "site", "dataset", "blocks (read from)", "run directory"], rows, table_id="runs",
                 row_data=[{"run": v.label} for v in views])


def _comparison_html(views: list[RunView], run: str | None) -> str:
    from ... import __version__

    warnings = [f"{v.label}: probe missing: {m} (run `{command('fit', v.cfg, run)}`)" for v in views for m in v.missing]
    unknown = [v for v in views if not v.n_layers]
    for v in unknown:
        warnings.append(f"{v.label}: the number of layers of {v.cfg.model.name} is unknown (no cache, no model config "
                        "to read), so it is left out of the relative-depth chart")
    transfer_html, w = transfer_section(views, run)
    warnings += w
    title = " vs ".join(v.label for v in views)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    items = [
        ("runs", esc(len(views))), ("models", esc(", ".join(dict.fromkeys(v.cfg.model.name for v in views)))),
        ("datasets", esc(", ".join(dict.fromkeys(v.cfg.dataset.key for v in views)))),
        ("activation sites", esc(", ".join(dict.fromkeys(v.cfg.probe.activation_site for v in views)))),
        ("generated", esc(f"{now} · needleprobe {__version__}")),
    ]
    meta = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (("sec-layers", "AUROC by layer and depth"),
                                                        ("sec-transfer", "transfer matrix"),
                                                        ("sec-monitor", "document monitors"), ("sec-best", "best probes")))
    depth_chart = (chart_runs("compare-by-depth", "validation AUROC by relative depth, one line per run", views, "depth")
                   if len(unknown) < len(views) else note("No run's depth is known, so no relative-depth chart."))
    body = [
        f'<header><div class="wrap"><h1>needleprobe comparison <span>· {esc(title)}</span></h1>'
        f'<dl class="meta">{meta}</dl><nav>{nav}</nav></div></header>',
        '<main class="wrap">',
        "".join(note(x, kind="warn") for x in warnings),
        '<section class="card" id="sec-layers"><h2>Probe quality by layer</h2>'
        '<p class="explain">Token-level val AUROC of each run\'s best seed per layer, at the L2 strength chosen on '
        "validation; error bars are 95% intervals from a bootstrap over documents. Runs on different datasets are "
        "measured on different val sets, so compare their shapes more than their levels.</p>"
        "<h3>By layer</h3>",
        chart_runs("compare-by-layer", "validation AUROC by layer, one line per run", views, "layer"),
        "<h3>By relative depth</h3>"
        '<p class="caption">The same points at layer / number of layers, so models of different depth line up '
        "(layer 0 is the first block).</p>",
        depth_chart,
        _by_layer_table(views),
        '<p class="caption">Each cell: val AUROC of the layer\'s best seed (its relative depth).</p></section>',
        '<section class="card" id="sec-transfer"><h2>Transfer matrix</h2>'
        '<p class="explain">Token AUROC of each run\'s best probe per layer (rows: the data it was trained on) on the '
        "cached val rows of each dataset (columns), as written by <code>needleprobe evaluate</code>. Off the diagonal "
        "is the question a monitor must answer: does a probe trained on one kind of needle catch another?</p>",
        transfer_html,
        "</section>",
        '<section class="card" id="sec-monitor"><h2>Document monitors</h2>'
        '<p class="explain">What each run\'s document monitor recommends, as <code>needleprobe monitor</code> stored it: '
        "the probe and aggregation with the best document AUROC on the calibration split, its AUROC (95% CI over "
        "documents) on the split scored, the share of needle documents flagged at thresholds set on the clean "
        "calibration documents for 1% and 5% FPR (– where too few to set one), and the operating point it would "
        "deploy with the upper bound on its false-positive rate. Runs scored on different splits or datasets are "
        "measured on different documents.</p>",
        _monitor_table(views),
        "</section>",
        '<section class="card" id="sec-best"><h2>Best probe of each run</h2>'
        '<p class="explain">The probe with the best val AUROC (ties: the layer with the better seed mean, then the '
        "earlier layer), and what each run is.</p>",
        _best_table(views),
        "<h3>The runs</h3>",
        _runs_table(views),
        "</section>",
        f"<footer>Written by <code>needleprobe.report.write_comparison</code> from "
        f"{esc(', '.join(str(v.layout.run_dir) for v in views))}. Self-contained: no scripts, no external resources.</footer>",
        "</main>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>needleprobe comparison · {esc(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def build_comparison(cfgs: list[Config], run: str | None = None) -> tuple[Any, str]:
    """(where the comparison of ``cfgs``' runs goes, its HTML)."""
    views = load_runs(cfgs, run)
    return comparison_path(views), _comparison_html(views, run)


def write_comparison(cfgs: list[Config], run: str | None = None) -> Any:
    """Write one HTML page comparing the runs of ``cfgs`` (atomically) in their common directory; return its path."""
    from ...io.files import atomic_write_bytes

    path, page = build_comparison(cfgs, run)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
