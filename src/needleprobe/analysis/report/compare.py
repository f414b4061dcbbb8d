"""The page comparing several runs: AUROC by layer and by relative depth, the transfer matrix, each run's best
probe and document monitor (hooks for tests and scripts: see :mod:`needleprobe.analysis.report.html`)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from typing import Any


from ...config import Config
from .charts import AUROC_RAMP, chart_runs, esc, note, ramp
from .css import CSS
from .data import RunView, TransferCell, best_overall, command, load_runs, read_monitor, read_transfer
from .html import Cell, _f4, table


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


def _monitor_table(views: list[RunView]) -> str:
    """Per run, the document monitor it recommends: aggregation, document AUROC with CI, TPR at the thresholds set on
    the clean calibration documents, and the operating point that any number of them gives."""
    from ..calibration import operating_point
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
        f"<footer>Written by <code>needleprobe report --config A --config B</code> from "
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
