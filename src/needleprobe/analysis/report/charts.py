"""Inline SVG charts of the report pages (no scripts, no external resources): axes, lines, ROC curves, colour ramps."""

from __future__ import annotations

import html
import math
from typing import Any, Iterable


from .data import ProbeInfo, RunView


PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#bab0ac")
SEED_DASH = ("", "7 4", "2 3", "10 3 2 3", "4 2")


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


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
                 # 9 parameters: a chart's id, axes and frame, the layout ones keyword-only with defaults
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


AUROC_RAMP = ((0.0, (202, 0, 32)), (0.5, (247, 247, 247)), (0.75, (146, 197, 222)), (1.0, (5, 113, 176)))


"""Transfer cells: red below chance, white at chance (0.5), blue towards 1."""


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


def note(text: str, *, kind: str = "note", raw: bool = False) -> str:
    return f'<p class="{kind}">{text if raw else esc(text)}</p>'
