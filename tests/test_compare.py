"""The comparison report: every run's line carries its probes' numbers, relative depth lines models up, the
transfer matrix shows what ``evaluate`` wrote, and the page renders offline.

Three runs, built once: the pipeline data (``t_v1``) and a second dataset whose name would break an unescaped
page, both on the embedded MiniLM (6 blocks), and a tiny random GPT-2 (3 blocks) on the pipeline data.  Probe
and record directories carry ``{model}/{site}``, so the two ``t_v1`` runs are kept apart.  The two MiniLM
datasets are evaluated on each other with ``evaluate --matrix``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from needleprobe.run.layout import model_slug

from conftest import dump_dom, probe_files, write_config, write_jsonl
from pipeline_fixture import pipeline_docs
from test_report import CHROMIUM, Elements
from tiny_models import make_tiny_model

HOSTILE_NAME = 'u&<i>"q'  # a dataset name is any name without '/': it ends up in titles, labels and attributes


def second_docs() -> list[dict]:
    """Another kind of data: the demo's test-split needles (their own wording), as train and val."""
    from needleprobe.data.demo import build_demo_documents

    test = [d for d in build_demo_documents(0) if d["split"] == "test"]
    return [{**d, "split": "train"} for d in test[:12]] + [{**d, "split": "val"} for d in test[12:26]]


def _load(cfg_path):
    from needleprobe.config import load_config

    return load_config(cfg_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train the three runs, evaluate the MiniLM pair both ways, write the comparison; the tests only read."""
    from needleprobe.cli import main
    from needleprobe.analysis.report.compare import write_comparison

    tmp = tmp_path_factory.mktemp("compare")
    where = {"output_dir": str(tmp / "results" / "probes" / "{model}" / "{site}"),
             "run_record_dir": str(tmp / "results" / "run_records" / "{model}" / "{site}")}
    data_a = write_jsonl(tmp / "data_a.jsonl", pipeline_docs())
    data_b = write_jsonl(tmp / "data_b.jsonl", second_docs())
    gpt2 = make_tiny_model("gpt2", tmp / "tiny-gpt2", n_layers=3)
    LABELS["g"] = f"t_v1 · {model_slug(str(gpt2))}"  # a local directory: its name and a digest of its path
    paths = {
        "a": write_config(tmp, data_a, config_name="a.yaml", class_balance="downsample", **where),
        "b": write_config(tmp, data_b, dataset=HOSTILE_NAME, config_name="b.yaml", **where),
        "g": write_config(tmp, data_a, model=str(gpt2), config_name="g.yaml", layers_to_probe=[1, 2], max_length=256,
                          negatives_per_doc=8, **where),
    }
    for p in paths.values():
        assert main(["train", "--config", str(p), "--no-progress"]) == 0
    assert main(["evaluate", "--matrix", str(paths["a"]), str(paths["b"]), "--no-progress"]) == 0
    cfgs = {k: _load(p) for k, p in paths.items()}
    path = write_comparison([cfgs["a"], cfgs["b"], cfgs["g"]])
    page = path.read_text(encoding="utf-8")
    return {"tmp": tmp, "paths": paths, "cfgs": cfgs, "path": path, "html": page, "el": Elements(page)}


def _probes(cfg) -> dict[tuple[int, int], dict]:
    return {(layer, seed): json.loads(probe_files(cfg, layer, seed)[1].read_text())
            for layer in cfg.probe.layers_to_probe for seed in cfg.probe.train_seeds}


def _best_per_layer(cfg) -> dict[int, tuple[int, dict]]:
    """layer → (seed, probe JSON) with the best val AUROC; ties go to the lowest seed."""
    out: dict[int, tuple[int, dict]] = {}
    for (layer, seed), m in sorted(_probes(cfg).items()):
        if layer not in out or m["val_metrics"]["auroc"] > out[layer][1]["val_metrics"]["auroc"]:
            out[layer] = (seed, m)
    return out


LABELS = {"a": "t_v1 · embedded--all-MiniLM-L6-v2", "b": f"{HOSTILE_NAME}_v1", "g": None}  # g: set by `runs`


def _points(el, chart: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in el.find("circle", "point", svg=chart):
        out.setdefault(p["attrs"]["data-run"], []).append(p["attrs"])
    return out


def test_written_in_the_runs_common_directory(runs):
    from needleprobe.run.layout import Layout

    dirs = [Layout.from_config(c).run_dir for c in runs["cfgs"].values()]
    assert dirs[0].parent == dirs[1].parent != dirs[2].parent  # {model}/{site} kept the two t_v1 runs apart
    assert runs["path"] == runs["tmp"] / "results" / "probes" / (
        f"comparison_t_v1-embedded--all-MiniLM-L6-v2_vs_u-i-q_v1_vs_{LABELS['g'].replace(' · ', '-')}.html")
    assert not [p for p in runs["path"].parent.iterdir() if ".tmp-" in p.name]


def test_self_contained_and_escaped(runs):
    page = runs["html"]
    lowered = page.lower()
    for bad in ("<script", "<link", "<img", "@import", "url(", "src="):
        assert bad not in lowered, bad
    assert not re.search(r"<[^>]*\son\w+\s*=", lowered)  # no event handlers either
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)
    assert HOSTILE_NAME not in page and "u&amp;&lt;i&gt;&quot;q_v1" in page
    assert {p["data-run"] for p in sum(_points(runs["el"], "compare-by-layer").values(), [])} == set(LABELS.values())


def test_every_run_has_one_point_per_layer_with_its_json_auroc(runs):
    el, cfgs = runs["el"], runs["cfgs"]
    points = _points(el, "compare-by-layer")
    bars = {}
    for g in el.find("g", "errorbar", svg="compare-by-layer"):
        bars[(g["attrs"]["data-run"], int(g["attrs"]["data-layer"]))] = (float(g["attrs"]["data-ci-low"]),
                                                                          float(g["attrs"]["data-ci-high"]))
    lines = {e["attrs"]["data-run"]: e["attrs"]["d"] for e in el.find("path", "run", svg="compare-by-layer")}
    assert set(points) == set(lines) == set(LABELS.values())
    for key, cfg in cfgs.items():
        label = LABELS[key]
        best = _best_per_layer(cfg)
        got = {int(p["data-layer"]): p for p in points[label]}
        assert sorted(got) == sorted(cfg.probe.layers_to_probe) == sorted(best)  # one point per layer, no more
        for layer, (seed, m) in best.items():
            assert float(got[layer]["data-auroc"]) == m["val_metrics"]["auroc"]  # exact: the repr of the JSON value
            assert int(got[layer]["data-seed"]) == seed and float(got[layer]["data-x"]) == layer
            assert bars[(label, layer)] == tuple(m["val_metrics"]["auroc_ci95"])
        assert len(re.findall(r"[ML]\s*-?[\d.]+ -?[\d.]+", lines[label])) == len(best)
    # the downsampled run's seeds differ, so "best seed" is a real choice there
    seeds_a = _probes(cfgs["a"])
    assert all(seeds_a[(layer, 0)]["val_metrics"]["auroc"] != seeds_a[(layer, 1)]["val_metrics"]["auroc"]
               for layer in cfgs["a"].probe.layers_to_probe)
    # a higher AUROC is drawn higher
    allp = sorted(sum(points.values(), []), key=lambda p: float(p["data-auroc"]))
    ys = [float(p["cy"]) for p in allp]
    assert all(a >= b for a, b in zip(ys, ys[1:]))


def test_relative_depth_is_layer_over_the_models_depth(runs):
    from needleprobe.cache.reader import open_cache

    el, cfgs = runs["el"], runs["cfgs"]
    depth = {k: open_cache(c).metadata["n_layers"] for k, c in cfgs.items()}
    assert depth == {"a": 6, "b": 6, "g": 3}
    points = _points(el, "compare-by-depth")
    for key, cfg in cfgs.items():
        got = {int(p["data-layer"]): float(p["data-x"]) for p in points[LABELS[key]]}
        assert got == {layer: layer / depth[key] for layer in cfg.probe.layers_to_probe}
    # drawn in depth order across models: GPT-2's layer 2 (2/3) right of MiniLM's layer 3 (1/2), its layer 1 (1/3)
    # left of it; runs are shifted sideways by a few pixels at most
    flat = [(float(p["data-x"]), float(p["cx"])) for p in sum(points.values(), [])]
    for xa, ca in flat:
        for xb, cb in flat:
            if xa < xb - 0.05:
                assert ca < cb
    assert "relative depth (layer / number of layers)" in runs["html"]


def test_depth_read_from_the_model_when_the_cache_is_gone(runs, tmp_path):
    from needleprobe.analysis.report.compare import build_comparison

    a, b = runs["cfgs"]["a"], runs["cfgs"]["b"]
    gone = dataclasses.replace(a, probe=dataclasses.replace(a.probe, cache_dir=str(tmp_path / "no-cache")))
    _, page = build_comparison([gone, b])
    el = Elements(page)
    got = {int(p["data-layer"]): float(p["data-x"]) for p in _points(el, "compare-by-depth")["t_v1"]}
    assert got == {1: 1 / 6, 3: 3 / 6}
    assert "6 (model config)" in page and "6 (cache)" in page


def _csv_auroc(source, target, layer: int, seed: int) -> float:
    from needleprobe.run.layout import Layout

    path = Layout.from_config(source).transfer_dir(Layout.from_config(target), "val") / "eval_metrics.csv"
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["layer"]) == layer]
    assert [int(r["seed"]) for r in rows] == [seed]  # --matrix scores the best seed of each layer
    return float(rows[0]["token_auroc"])


def test_transfer_matrix_cells_are_the_evaluated_numbers(runs):
    el, cfgs = runs["el"], runs["cfgs"]
    cells = [e for e in el.find("td") if "data-auroc" in e["attrs"] and "data-target" in e["attrs"]]
    by_label = {LABELS[k]: k for k in ("a", "b")}
    by_key = {cfgs[k].dataset.key: k for k in ("a", "b")}
    seen = set()
    for c in cells:
        a = c["attrs"]
        src, tgt, layer = by_label[a["data-source"]], by_key[a["data-target"]], int(a["data-layer"])
        seed = _best_per_layer(cfgs[src])[layer][0]
        assert float(a["data-auroc"]) == _csv_auroc(cfgs[src], cfgs[tgt], layer, seed)
        assert int(a["data-seed"]) == seed and "background:rgb(" in a["style"]
        assert "".join(c["text"]).strip() == f"{float(a['data-auroc']):.4f}"
        seen.add((src, tgt, layer))
    assert seen == {(s, t, layer) for s in "ab" for t in "ab" for layer in (1, 3)}  # 2 × 2 pairs × 2 layers
    # the diagonal is each run on its own val: its best probe's own val AUROC
    for k in "ab":
        for layer, (seed, m) in _best_per_layer(cfgs[k]).items():
            assert _csv_auroc(cfgs[k], cfgs[k], layer, seed) == pytest.approx(m["val_metrics"]["auroc"], abs=1e-12)
    assert not el.find("td", "missing") and not el.find("td", "stale")
    assert f"{LABELS['g']}." in re.sub(r"\s+", " ", runs["html"])  # GPT-2 has no partner: said, not drawn


def test_missing_and_stale_pairs_are_marked_with_the_command_that_fills_them(runs, tmp_path):
    from needleprobe.run.layout import Layout
    from needleprobe.analysis.report.compare import build_comparison

    a, b = runs["cfgs"]["a"], runs["cfgs"]["b"]
    root = runs["tmp"] / "results" / "probes"
    shutil.copytree(root, tmp_path / "probes", ignore=lambda d, names: [n for n in names if n.endswith(".html")])
    out = str(tmp_path / "probes" / "{model}" / "{site}")
    a2, b2 = (dataclasses.replace(c, probe=dataclasses.replace(c.probe, output_dir=out)) for c in (a, b))
    la, lb = Layout.from_config(a2), Layout.from_config(b2)
    shutil.rmtree(la.transfer_dir(lb, "val"))  # a's probes never scored on b
    seed, m = _best_per_layer(b2)[3]
    m["val_metrics"]["auroc"] += 1e-6  # b's layer-3 probe "refit" since its evaluation
    probe_files(b2, 3, seed)[1].write_text(json.dumps(m))
    (seed_a, _), other = _best_per_layer(a2)[1], 1 - _best_per_layer(a2)[1][0]
    m = json.loads(probe_files(a2, 1, other)[1].read_text())
    m["val_metrics"]["auroc"] = 0.99999  # a's layer-1 best seed is now another one than the evaluated one
    probe_files(a2, 1, other)[1].write_text(json.dumps(m))
    path, page = build_comparison([a2, b2])
    el = Elements(page)
    missing = el.find("td", "missing")
    # no shared dataset key here, so the labels are the keys
    assert {(e["attrs"]["data-source"], e["attrs"]["data-target"]) for e in missing} == {("t_v1", lb.identity.dataset)}
    assert {int(e["attrs"]["data-layer"]) for e in missing} == {1, 3}
    stale = el.find("td", "stale")
    assert {(e["attrs"]["data-source"], e["attrs"]["data-layer"]) for e in stale} == {(LABELS["b"], "3"), ("t_v1", "1")}
    assert {e["attrs"]["data-seed"] for e in stale if e["attrs"]["data-source"] == "t_v1"} == {str(seed_a)}
    text = re.sub(r"\s+", " ", "".join(sum((e["text"] for e in el.find("p")), [])))
    assert f"needleprobe evaluate --matrix {a.source} {b.source}" in text
    assert "scored with probes refit since" in text
    assert path == tmp_path / "probes" / "embedded--all-MiniLM-L6-v2" / "resid_post" / "comparison_t_v1_vs_u-i-q_v1.html"


def test_best_probe_table_matches_the_jsons(runs):
    import numpy as np

    from needleprobe.run.layout import Layout

    el, cfgs = runs["el"], runs["cfgs"]
    best_rows = [e for e in el.items if e["tag"] == "tr" and "data-auroc" in e["attrs"]]
    run_rows = [e for e in el.items if e["tag"] == "tr" and "data-run" in e["attrs"] and "data-auroc" not in e["attrs"]]
    assert [r["attrs"]["data-run"] for r in best_rows] == [r["attrs"]["data-run"] for r in run_rows] == [
        LABELS[k] for k in ("a", "b", "g")]
    for row, run_row, (key, cfg) in zip(best_rows, run_rows, cfgs.items()):
        probes = _probes(cfg)
        mean = {layer: np.mean([m["val_metrics"]["auroc"] for (l2, _), m in probes.items() if l2 == layer])
                for layer, _ in probes}
        (layer, seed), m = max(probes.items(), key=lambda kv: (kv[1]["val_metrics"]["auroc"], mean[kv[0][0]],
                                                               -kv[0][0], -kv[0][1]))
        a = row["attrs"]
        assert (int(a["data-layer"]), int(a["data-seed"])) == (layer, seed)
        assert float(a["data-auroc"]) == m["val_metrics"]["auroc"] and float(a["data-l2"]) == m["selected_l2"]
        lo, hi = m["val_metrics"]["auroc_ci95"]
        n = 3 if key == "g" else 6
        assert _cells(el, row) == [LABELS[key], str(layer), str(seed), f"{m['val_metrics']['auroc']:.4f}",
                                   f"{lo:.4f}–{hi:.4f}", f"{m['selected_l2']:g}", f"{layer / n:.3f} ({layer}/{n})"]
        assert _cells(el, run_row) == [LABELS[key], cfg.model.name, "resid_post", cfg.dataset.key, f"{n} (cache)",
                                       str(Layout.from_config(cfg).run_dir)]


def _cells(el, row) -> list[str]:
    return [re.sub(r"\s+", " ", "".join(e["text"])).strip() for e in _children(el, row) if e["tag"] == "td"]


def _children(el, row) -> list[dict]:
    i = el.items.index(row)
    out = []
    for e in el.items[i + 1:]:
        if e["tag"] == "tr":
            break
        out.append(e)
    return out


def test_runs_of_different_models_only_have_no_matrix(runs):
    from needleprobe.analysis.report.compare import build_comparison

    path, page = build_comparison([runs["cfgs"]["b"], runs["cfgs"]["g"]])
    el = Elements(page)
    assert not el.find("table", "matrix")
    assert "No two of these runs share a model and activation site" in page
    assert path.name == "comparison_u-i-q_v1_vs_t_v1.html"
    assert set(_points(el, "compare-by-depth")) == {f"{HOSTILE_NAME}_v1", "t_v1"}


def test_cli_writes_it_and_prints_the_path(runs, capsys):
    from needleprobe.cli import main

    p = runs["paths"]
    runs["path"].unlink()
    assert main(["report", "--config", str(p["a"]), "--config", str(p["b"]), "--config", str(p["g"])]) == 0
    assert capsys.readouterr().err.strip() == f"wrote {runs['path']}"
    page = runs["path"].read_text(encoding="utf-8")
    strip = lambda t: re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "", t)  # noqa: E731
    assert strip(page) == strip(runs["html"])


def _error(capsys, *argv) -> str:
    from needleprobe.cli import main

    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_inputs_are_one_line(runs, capsys, tmp_path):
    from needleprobe.errors import NeedleprobeError
    from needleprobe.analysis.report.compare import write_comparison

    p = runs["paths"]
    unfitted = write_config(runs["tmp"], runs["tmp"] / "data_a.jsonl", dataset="unfitted", config_name="unfitted.yaml",
                            output_dir=str(tmp_path / "none"))
    err = _error(capsys, "report", "--config", str(p["a"]), "--config", str(unfitted))
    assert err.startswith("needleprobe: error: ") and f"run `needleprobe fit --config {unfitted}` first" in err
    err = _error(capsys, "report", "--config", str(p["a"]), "--config", str(p["a"]))
    assert "the same run as" in err
    err = _error(capsys, "report", "--config", str(p["a"]), "--config", str(tmp_path / "absent.yaml"))
    assert "absent.yaml" in err
    with pytest.raises(NeedleprobeError, match="two configs or more"):
        write_comparison([runs["cfgs"]["a"]])
    a = runs["cfgs"]["a"]
    other = dataclasses.replace(a, model=dataclasses.replace(a.model, name="someone/other-model"),
                                probe=dataclasses.replace(a.probe, output_dir=str(runs["tmp"] / "results" / "probes" /
                                                                                 "embedded--all-MiniLM-L6-v2" / "{site}")))
    with pytest.raises(NeedleprobeError, match=r"holds probes of embedded:all-MiniLM-L6-v2 .* someone/other-model"):
        write_comparison([other, runs["cfgs"]["b"]])  # its run directory is the MiniLM run's
    err = _error(capsys, "report", "--config", str(p["a"]), "--config", str(p["b"]), "--run", "never-fitted")
    assert "needleprobe fit --config" in err and "--run never-fitted" in err


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install chromium")
@pytest.mark.slow
def test_renders_in_headless_chromium(runs, tmp_path):
    """The DOM Chromium builds holds the same charts, lines, points and matrix cells as the page."""
    out = dump_dom(CHROMIUM, Path(runs["path"]), tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    dom, src = Elements(out.stdout), runs["el"]
    for chart in ("compare-by-layer", "compare-by-depth"):
        assert len(dom.find("svg", svg=chart)) == 1, chart
        assert len(dom.find(svg=chart)) == len(src.find(svg=chart)), chart
        assert len(dom.find("circle", "point", svg=chart)) == 6 > 0
    cells = lambda e: [x for x in e.find("td") if "data-auroc" in x["attrs"]]  # noqa: E731
    assert len(cells(dom)) == len(cells(src)) > 0
    assert [x["attrs"]["data-auroc"] for x in cells(dom)] == [x["attrs"]["data-auroc"] for x in cells(src)]


def test_common_directory_and_file_name_rules(tmp_path):
    """Local and object-store runs share their deepest common directory; a name too long for a file is shortened."""
    from types import SimpleNamespace

    from needleprobe.errors import NeedleprobeError
    from needleprobe.analysis.report.compare import comparison_path
    from needleprobe.analysis.report.data import RunView
    from needleprobe.run.layout import common_dir
    from needleprobe.io.stores import RemotePath

    assert common_dir([RemotePath("memory://b/probes/m1/t_v1"), RemotePath("memory://b/probes/m2/t_v1")]) == \
        RemotePath("memory://b/probes")
    assert common_dir([Path("results/probes/a"), Path("results/probes/b")]) == Path("results/probes")
    with pytest.raises(NeedleprobeError, match="share no directory but the root"):
        common_dir([Path("/srv/a/probes/t_v1"), Path("/home/b/probes/u_v1")])

    def view(run_dir, *parts):
        return RunView(None, SimpleNamespace(run_dir=run_dir), [], [], None, "", list(parts))

    short = comparison_path([view(tmp_path / "m" / "a", "a_v1"), view(tmp_path / "m" / "b", "b<?>_v1", "x/y")])
    assert short == tmp_path / "m" / "comparison_a_v1_vs_b-_v1-x-y.html"
    long = comparison_path([view(tmp_path / f"r{i}", "d" * 40 + f"{i}_v1") for i in range(6)])
    assert long.parent == tmp_path and re.fullmatch(r"comparison_6_runs_[0-9a-f]{12}\.html", long.name)


def test_document_monitors_are_compared_from_what_the_monitor_stored(runs):
    """Per run: the monitor's recommended probe and aggregation, its document AUROC with CI and TPR at the calibrated
    thresholds, read from the run record and CSV the monitor wrote; a run never monitored says how to fill it."""
    from needleprobe.run.layout import Layout
    from needleprobe.analysis.monitor import monitor
    from needleprobe.analysis.report.compare import build_comparison

    cfgs = runs["cfgs"]
    res = monitor(cfgs["a"], split="val", show_progress=False)
    best = res["recommended"]
    _, page = build_comparison([cfgs["a"], cfgs["b"]])
    el = Elements(page)
    rows = {e["attrs"]["data-monitor"]: e for e in el.find("tr") if "data-monitor" in e["attrs"]}
    assert list(rows) == [LABELS["a"].split(" · ")[0], f"{HOSTILE_NAME}_v1"]
    a = rows["t_v1"]["attrs"]
    assert (a["data-split"], int(a["data-layer"]), int(a["data-seed"]), a["data-aggregation"]) == (
        "val", best["layer"], best["seed"], best["aggregation"])
    assert float(a["data-doc-auroc"]) == best["auroc"] and float(a["data-ci-low"]) == best["auroc_ci_low"]
    cells = _cells(el, rows["t_v1"])
    assert cells[4] == f"{best['auroc']:.3f} ({best['auroc_ci_low']:.3f}–{best['auroc_ci_high']:.3f})"
    assert cells[5] == "–" and cells[6] == "–"  # too few clean val documents to set 1% or 5%
    op = res["operating_point"]
    assert cells[7].startswith(f"above every clean one: {op['tp']}/{best['n_needle_docs']} flagged")
    assert _cells(el, rows[f"{HOSTILE_NAME}_v1"])[1:] == ["–"] * 7
    assert "no document monitor results (run `needleprobe monitor --config" in page
    # a CSV changed since the monitor wrote it is not trusted
    csv_path = Layout.from_config(cfgs["a"]).monitor_csv("val")
    csv_path.write_text(csv_path.read_text() + "\n")
    assert "changed since the monitor wrote them" in build_comparison([cfgs["a"], cfgs["b"]])[1]
