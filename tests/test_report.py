"""The HTML report: its numbers must be the fitted ones, its charts must plot every probe, and it must render offline.

A report that silently drops a seed, plots a stale AUROC or breaks in a
browser is worse than none, so the checks read the page back (and, where
Chromium is installed, the DOM Chromium builds from it) and compare with the
probe JSONs and the monitor's own outputs.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import dump_dom, probe_files
from pipeline_fixture import HOSTILE_DOC, build_pipeline, pipeline_docs

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


class Elements(HTMLParser):
    """Start tags with their attributes, the id of the enclosing <svg> and doc id of the enclosing heatmap."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "wbr", "source", "col", "area", "base", "embed", "param", "track"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.items: list[dict] = []
        self.stack: list[dict] = []
        self.text_by_heatmap: dict[str, list[str]] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        parent = self.stack[-1] if self.stack else {}
        item = {
            "tag": tag,
            "attrs": a,
            "classes": set((a.get("class") or "").split()),
            "svg": a.get("id") if tag == "svg" else parent.get("svg"),
            "heatmap": a.get("data-doc-id") if "heatmap" in (a.get("class") or "").split() else parent.get("heatmap"),
            "text": [],
        }
        self.items.append(item)
        if tag not in self.VOID:
            self.stack.append(item)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i]["tag"] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        if self.stack:
            for e in self.stack[-3:]:  # an element's text includes its children's (a <title> inside a mark)
                e["text"].append(data)
            hm = self.stack[-1]["heatmap"]
            if hm is not None:
                self.text_by_heatmap.setdefault(hm, []).append(data)

    def find(self, tag=None, cls=None, svg=None):
        return [e for e in self.items if (tag is None or e["tag"] == tag) and (cls is None or cls in e["classes"])
                and (svg is None or e["svg"] == svg)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One train + monitor(val) + report; the tests only read."""
    from needleprobe.analysis.report.html import write_report

    tmp = tmp_path_factory.mktemp("report")
    cfg_path, cfg = build_pipeline(tmp, monitor_split="val")
    path = write_report(cfg)
    probes = {}
    for layer in cfg.probe.layers_to_probe:
        for seed in cfg.probe.train_seeds:
            probes[(layer, seed)] = json.loads(probe_files(cfg, layer, seed)[1].read_text())
    text = path.read_text(encoding="utf-8")
    return {"tmp": tmp, "cfg_path": cfg_path, "cfg": cfg, "path": path, "html": text, "el": Elements(text), "probes": probes}


def _stored_tokens(cfg, split: str, run: str | None = None):
    """The token logits the monitor stored in the run for all of its probes on ``split`` (no model run)."""
    from needleprobe.run.layout import Layout
    from needleprobe.analysis.logits import LogitStore, probe_refs, stored_tokens
    from needleprobe.analysis.run import Run

    layout = Layout.from_config(cfg, run)
    refs = probe_refs(Run.of_layout(layout), cfg.probe.layers_to_probe, cfg.probe.train_seeds)
    tokens = stored_tokens(cfg, LogitStore(layout.monitor_store), split, refs)
    assert tokens is not None and len(tokens.probes) == len(refs)
    return tokens


def _n_points(d: str) -> int:
    return len(re.findall(r"[ML]\s*-?[\d.]+ -?[\d.]+", d))


def test_written_where_promised_and_atomically(run):
    from needleprobe.run.layout import Layout

    layout = Layout.from_config(run["cfg"])
    assert run["path"] == layout.report == layout.run_dir / "report.html"
    assert not [p.name for p in layout.run_dir.iterdir() if ".tmp-" in p.name]  # no temp file left behind


def test_self_contained_and_escaped(run):
    """Opens with no network and no script: nothing is fetched, and document text cannot inject markup."""
    page = run["html"]
    lowered = page.lower()
    for bad in ("<script", "<link", "<img", "@import", "url(", "src="):
        assert bad not in lowered, bad
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)
    assert HOSTILE_DOC["doc_id"] not in page  # raw id never appears, only its escaped form


def test_auroc_by_layer_plots_every_probe_with_its_json_auroc(run):
    el, probes = run["el"], run["probes"]
    assert len(el.find("svg", svg="auroc-by-layer")) == 1
    points = el.find("circle", "point", svg="auroc-by-layer")
    assert len(points) == len(probes) == 4  # layers × seeds
    got = {(int(p["attrs"]["data-layer"]), int(p["attrs"]["data-seed"])): float(p["attrs"]["data-auroc"]) for p in points}
    assert got == {k: m["val_metrics"]["auroc"] for k, m in probes.items()}
    assert len(el.find("g", "errorbar", svg="auroc-by-layer")) == 4
    # a higher AUROC is drawn higher (smaller y), so the axis is not upside down or mis-scaled
    by_auc = sorted(points, key=lambda p: float(p["attrs"]["data-auroc"]))
    ys = [float(p["attrs"]["cy"]) for p in by_auc]
    assert all(a >= b for a, b in zip(ys, ys[1:]))
    # the CI bar spans the JSON interval: its pixel length orders like the interval width
    for m in probes.values():
        assert f"{m['val_metrics']['auroc']:.4f}" in run["html"]
        lo, hi = m["val_metrics"]["auroc_ci95"]
        assert f"{lo:.4f}–{hi:.4f}" in run["html"]


def test_l2_path_has_one_line_per_probe_and_grid_point(run):
    el, probes, cfg = run["el"], run["probes"], run["cfg"]
    paths = el.find("path", "l2", svg="l2-path")
    assert len(paths) == 4
    for p in paths:
        assert _n_points(p["attrs"]["d"]) == len(cfg.probe.l2_grid)
    # beside each val line, the train AUROC of every grid value (its y ordered like the probe file's numbers)
    train = el.find("path", "l2-train", svg="l2-path")
    assert len(train) == 4
    for p in train:
        m = probes[(int(p["attrs"]["data-layer"]), int(p["attrs"]["data-seed"]))]
        res = sorted(m["l2_results"], key=lambda r: r["l2"])
        assert "".join(p["text"]).endswith(", ".join(f"L2 {r['l2']:g} {r['train_auroc']:.4f}" for r in res))
        ys = [float(v) for v in re.findall(r"[ML]\s*-?[\d.]+ (-?[\d.]+)", p["attrs"]["d"])]
        assert len(ys) == len(res)
        for (a, ra), (b, rb) in zip(zip(ys, res), zip(ys[1:], res[1:])):
            assert (a > b) == (ra["train_auroc"] < rb["train_auroc"]) or ra["train_auroc"] == rb["train_auroc"]
    assert len(el.find("circle", "l2-point", svg="l2-path")) == 4 * len(cfg.probe.l2_grid)
    selected = el.find("circle", "selected", svg="l2-path")
    assert len(selected) == 4
    titles = " ".join("".join(s["text"]) for s in selected)
    for (layer, seed), m in probes.items():
        assert f"layer {layer} · seed {seed} · L2 {m['selected_l2']:g}" in titles


def test_probe_roc_rescored_from_cache_matches_json(run):
    """The ROC is recomputed from cached activations and saved weights; its AUROC must be the fitted one."""
    el, probes = run["el"], run["probes"]
    curves = el.find("path", "roc", svg="roc-probes")
    assert sorted(int(c["attrs"]["data-layer"]) for c in curves) == [1, 3]
    for c in curves:
        key = (int(c["attrs"]["data-layer"]), int(c["attrs"]["data-seed"]))
        best = max(m["val_metrics"]["auroc"] for k, m in probes.items() if k[0] == key[0])
        assert float(c["attrs"]["data-auroc"]) == pytest.approx(probes[key]["val_metrics"]["auroc"], abs=1e-12)
        assert probes[key]["val_metrics"]["auroc"] == best
        assert _n_points(c["attrs"]["d"]) >= 2
    assert "warn" not in {cls for e in el.find("p") for cls in e["classes"]}, "unexpected warning in the report"


def test_monitor_roc_matches_monitor_outputs(run):
    from needleprobe.run.layout import Layout
    from needleprobe.analysis.aggregation import AGGREGATIONS, aggregation_label

    el, cfg = run["el"], run["cfg"]
    curves = el.find("path", "roc", svg="roc-monitor")
    assert sorted(c["attrs"]["data-aggregation"] for c in curves) == sorted(AGGREGATIONS)
    with open(Layout.from_config(cfg).monitor_csv("val"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"val"}
    for c in curves:
        a = c["attrs"]
        row = next(r for r in rows if (r["split"], r["layer"], r["seed"]) == ("val", a["data-layer"], a["data-seed"])
                   and r["aggregation"] == aggregation_label(a["data-aggregation"], cfg.monitor))
        assert float(a["data-auroc"]) == pytest.approx(float(row["auroc"]), abs=1e-12)


def test_heatmaps_show_documents_tokens_and_needles(run):
    el, cfg = run["el"], run["cfg"]
    tokens = _stored_tokens(cfg, "val")
    by_id = {d: i for i, d in enumerate(tokens.doc_ids)}
    n_clean = int((tokens.doc_n_needles == 0).sum())
    n_needle = len(tokens.doc_ids) - n_clean
    maps = el.find("div", "heatmap")
    expected = min(3, n_clean) + min(3, n_needle) + min(3, len(tokens.doc_ids) - min(3, n_clean) - min(3, n_needle))
    assert len(maps) == expected and len({m["attrs"]["data-doc-id"] for m in maps}) == expected
    total_needles = 0
    for m in maps:
        i = by_id[m["attrs"]["data-doc-id"]]
        toks = [e for e in el.items if e["heatmap"] == m["attrs"]["data-doc-id"] and "tok" in e["classes"]]
        needles = [e for e in toks if "needle" in e["classes"]]
        assert len(toks) == len(tokens.token_id[i])  # one span per stored token
        assert len(needles) == int(tokens.needle[i].sum())  # outlined exactly where the stored flag says
        logits = np.array([float(e["attrs"]["data-logit"]) for e in toks])
        assert np.isfinite(logits).all()
        total_needles += len(needles)
    assert total_needles > 0
    # token text reads as the document: the needle span's words, in order, inside a needle doc's heatmap
    docs = {d["doc_id"]: d for d in pipeline_docs()}
    for m in maps:
        d = docs[m["attrs"]["data-doc-id"]]
        if d["needle_spans"] and d["text"].isascii():
            s, e = d["needle_spans"][0]
            shown = re.sub(r"\s+", "", "".join(el.text_by_heatmap[m["attrs"]["data-doc-id"]])).lower()
            assert re.sub(r"\s+", "", d["text"][s:e]).lower() in shown
            break
    else:
        pytest.fail("no ASCII needle document among the heatmaps")


def test_heatmap_escapes_token_text():
    from needleprobe.analysis.report.html import heatmap_html

    out = heatmap_html(["<b>", " &x", '"'], ["<b>", "&x", '"'], np.array([3.0, -1.0, 0.0]), np.array([1, 0, 0]), 3.0)
    assert "<b>" not in out and "&lt;b&gt;" in out and "&amp;x" in out
    assert out.count('class="tok needle"') == 1 and out.count('class="tok"') == 2


def test_no_probes_is_an_error(run, tmp_path):
    """Without probes there is nothing to report: one error naming the command to run, not an empty page."""
    import dataclasses

    from needleprobe.errors import NeedleprobeError
    from needleprobe.analysis.report.html import build_html

    cfg = run["cfg"]
    cfg = dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, output_dir=str(tmp_path / "probes")))
    with pytest.raises(NeedleprobeError, match="needleprobe fit"):
        build_html(cfg)


def test_no_monitor_note(run, tmp_path):
    """Probes but no monitor run: the probe charts still build, and the page says how to get the rest."""
    import dataclasses

    from needleprobe.analysis.report.html import build_html

    from needleprobe.run.layout import Layout

    cfg = run["cfg"]
    src = Layout.from_config(cfg).run_dir
    dst = tmp_path / "probes"  # the same probes without the run's monitor folder
    shutil.copytree(src.parent, dst, ignore=lambda d, names: ["monitor"] if Path(d) == src else [])
    cfg2 = dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, output_dir=str(dst)))
    assert not Layout.from_config(cfg2).monitor_dir.exists() and Layout.from_config(cfg2).run_dir.is_dir()
    page = build_html(cfg2)
    el = Elements(page)
    assert el.find("svg", svg="auroc-by-layer") and el.find("svg", svg="roc-probes")
    assert not el.find("svg", svg="roc-monitor") and not el.find("div", "heatmap")
    assert "needleprobe monitor" in page


def test_monitor_logits_of_a_refit_probe_are_not_shown(run, tmp_path):
    """A probe file changed since the monitor ran: its stored logits are passed over, and the page says so."""
    import dataclasses

    from needleprobe.run.layout import Layout
    from needleprobe.fit.probe import LinearProbe
    from needleprobe.analysis.report.html import build_html

    cfg = run["cfg"]
    src = Layout.from_config(cfg).run_dir
    shutil.copytree(src.parent, tmp_path / "probes")
    cfg2 = dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, output_dir=str(tmp_path / "probes")))
    pt, _ = probe_files(cfg2, 3, 1)
    probe = LinearProbe.load(pt)
    probe.intercept_ += 1.0  # a "refit": another file, the same ranking
    probe.save(pt.with_suffix(""))
    el = Elements(build_html(cfg2))
    warns = " ".join("".join(e["text"]) for e in el.find("p", "warn"))
    assert "'val' logits are of 2 of the 3 distinct probes (not of layer 3 seed 1: scored before a refit" in warns
    curves = el.find("path", "roc", svg="roc-monitor")
    assert curves and all((c["attrs"]["data-layer"], c["attrs"]["data-seed"]) != ("3", "1") for c in curves)


def test_named_run_has_its_own_report(run, capsys):
    """`fit --run NAME` then `report --run NAME`: that run's probes, in its directory; the default report is untouched."""
    from needleprobe.cli import main
    from needleprobe.run.layout import Layout

    cfg, cfg_path = run["cfg"], run["cfg_path"]
    before = run["path"].read_bytes()
    assert main(["fit", "--config", str(cfg_path), "--run", "wide", "--l2-grid", "0.5,5"]) == 0
    capsys.readouterr()
    assert main(["report", "--config", str(cfg_path), "--run", "wide"]) == 0
    path = Layout.from_config(cfg, "wide").report
    assert capsys.readouterr().err.strip() == f"wrote {path}"
    assert path.parent == run["path"].parent.with_name("t_v1-wide") and run["path"].read_bytes() == before
    page = path.read_text(encoding="utf-8")
    el = Elements(page)
    named = {(layer, seed): json.loads(probe_files(cfg, layer, seed, "wide")[1].read_text())
             for layer in cfg.probe.layers_to_probe for seed in cfg.probe.train_seeds}
    points = el.find("circle", "point", svg="auroc-by-layer")
    assert {(int(p["attrs"]["data-layer"]), int(p["attrs"]["data-seed"])): float(p["attrs"]["data-auroc"])
            for p in points} == {k: m["val_metrics"]["auroc"] for k, m in named.items()}
    assert {m["selected_l2"] for m in named.values()} <= {0.5, 5.0}
    assert len(el.find("circle", "l2-point", svg="l2-path")) == 4 * 2  # the named run's grid, not the config's
    # the named run has no monitor results of its own: the note names the command for this run
    assert not el.find("svg", svg="roc-monitor")
    assert f"needleprobe monitor --config {cfg_path} --run wide" in page
    assert "· run wide" in page


def test_named_run_without_probes_names_the_fit_command(run, capsys):
    from needleprobe.cli import main

    assert main(["report", "--config", str(run["cfg_path"]), "--run", "nothing-here"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"needleprobe fit --config {run['cfg_path']} --run nothing-here" in err[0]


def test_refuses_a_run_directory_of_another_model(run):
    """A config of another model pointed at this run directory: refused in one line, the report left as it was."""
    import dataclasses

    from needleprobe.errors import NeedleprobeError
    from needleprobe.analysis.report.html import write_report

    cfg = run["cfg"]
    before = run["path"].read_bytes()
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="someone/other-model"))
    with pytest.raises(NeedleprobeError, match=r"holds outputs of embedded:all-MiniLM-L6-v2 .* this report is someone/other-model") as e:
        write_report(other)
    assert "\n" not in str(e.value)
    assert run["path"].read_bytes() == before


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install chromium")
@pytest.mark.slow
def test_renders_in_headless_chromium(run, tmp_path):
    """The DOM Chromium builds holds the same charts and heatmaps: nothing mis-nested or dropped by the parser."""
    out = dump_dom(CHROMIUM, run["path"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = Elements(out.stdout)
    src = run["el"]
    for chart in ("auroc-by-layer", "roc-probes", "roc-monitor", "l2-path"):
        assert len(dom.find("svg", svg=chart)) == 1, chart
        assert len(dom.find(svg=chart)) == len(src.find(svg=chart)), chart  # every mark inside the chart survived
    assert len(dom.find("div", "heatmap")) == len(src.find("div", "heatmap")) > 0
    assert len(dom.find("span", "tok")) == len(src.find("span", "tok"))
    assert len(dom.find("span", "needle")) == len(src.find("span", "needle")) > 0
    # spans sit inside their heatmap in the rendered tree too
    assert all(e["heatmap"] is not None for e in dom.find("span", "tok") if "sample" not in e["classes"])


def test_verdict_and_error_lists_are_the_fits_and_the_errors_commands(run):
    """The page shows verdict.json's sentences and the lists of `needleprobe errors` (same function, same rows);
    a listed document shown as a heatmap is linked to it."""
    from needleprobe.run.layout import Layout
    from needleprobe.analysis.errors import token_errors

    el, cfg, page = run["el"], run["cfg"], run["html"]
    verdict = json.loads(Layout.from_config(cfg).verdict.read_text())
    shown = ["".join(e["text"]) for e in el.find("li") if any(x["tag"] == "ul" and "verdict" in x["classes"]
                                                                 for x in el.items)]
    assert verdict["summary"] and all(line in shown for line in verdict["summary"])
    lists = token_errors(cfg, n=10)
    assert {e["attrs"]["id"] for e in el.find("table", "errors")} == {"errors-false-positives", "errors-misses"}
    got = [(e["attrs"]["data-doc-id"], float(e["attrs"]["data-logit"])) for e in el.find("tr") if "data-logit" in e["attrs"]]
    assert got == [(e.doc_id, e.logit) for e in lists.false_positives + lists.missed_needles]
    marks = ["".join(e["text"]) for e in el.find("mark", "tokerr")]
    assert marks == [e.token for e in lists.false_positives + lists.missed_needles]
    anchors = {e["attrs"]["id"] for e in el.find("div", "doc")}
    links = [e["attrs"]["href"][1:] for e in el.find("a") if e["attrs"].get("href", "").startswith("#doc-")]
    heat_ids = {m["attrs"]["data-doc-id"] for m in el.find("div", "heatmap")}
    assert set(links) <= anchors
    assert 0 < len(links) == sum(1 for d, _ in got if d in heat_ids)
    assert 'href="#sec-errors"' in page


def test_identical_seeds_share_a_row_of_the_tables(run):
    """Seeds 0 and 1 gave identical probes (weighted balance): the tables show each probe once, as fit does; the
    charts still plot every probe file."""
    el, probes = run["el"], run["probes"]
    seeds_cells = [e for e in el.find("td") if "".join(e["text"]).strip() == "0, 1"]
    # the probe table (2 layers) and the monitor's every-probe table (2 layers)
    assert len(seeds_cells) == 4
    assert "Seeds on one row gave identical probes." in run["html"]
    assert len(el.find("circle", "point", svg="auroc-by-layer")) == len(probes)


def test_the_report_shows_the_monitors_own_recommendation(run, tmp_path):
    """The report reads what ``monitor`` stored (its CSV and run record) instead of choosing again: after a monitor
    of a weaker layer alone, the page shows that layer and the aggregation the monitor recommended, although the
    store still holds the logits of every probe (a report that chose by val AUROC would show the best layer)."""
    import dataclasses

    from needleprobe.analysis.aggregation import AGGREGATIONS, aggregation_label
    from needleprobe.analysis.monitor import monitor
    from needleprobe.analysis.report.html import build_html
    from needleprobe.analysis.run import Run

    cfg = run["cfg"]
    results = Path(cfg.probe.output_dir).parent
    shutil.copytree(results, tmp_path / "results")
    cfg2 = dataclasses.replace(cfg, probe=dataclasses.replace(
        cfg.probe, output_dir=str(tmp_path / "results" / "probes"), run_record_dir=str(tmp_path / "results" / "run_records")))
    best_layer = Run.of(cfg2).best()[0]
    weaker = next(la for la in sorted(cfg2.probe.layers_to_probe) if la != best_layer)
    rec = monitor(cfg2, layers=[weaker], seeds=[0], split="val", show_progress=False)["recommended"]
    method = next(m for m in AGGREGATIONS if aggregation_label(m, cfg2.monitor) == rec["aggregation"])
    page = build_html(cfg2)
    assert f"<h3>Document monitor on val: layer {rec['layer']} · seed {rec['seed']}</h3>" in page
    assert f"probe layer {rec['layer']} · seed {rec['seed']}, documents ranked by {method}," in page
    assert rec["layer"] == weaker
    curves = Elements(page).find("path", "roc", svg="roc-monitor")
    assert {(c["attrs"]["data-layer"], c["attrs"]["data-seed"]) for c in curves} == {(str(weaker), "0")}
    # and the table's numbers are the monitor's CSV's, to the bit
    by_label = {c["attrs"]["data-aggregation"]: float(c["attrs"]["data-auroc"]) for c in curves}
    with open(Run.of(cfg2).layout.monitor_csv("val"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["layer"]) == weaker and int(r["seed"]) == 0]
    assert by_label == {m: float(next(r["auroc"] for r in rows if r["aggregation"] == aggregation_label(m, cfg2.monitor)))
                        for m in AGGREGATIONS}
