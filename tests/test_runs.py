"""A workspace for comparative research: runs of several models, sites and datasets never overwrite each other,
and every run directory describes one fit."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import probe_files, small_docs, write_config, write_jsonl
from tiny_models import make_tiny_model

from needleprobe.analysis.check import check
from needleprobe.cli import main
from needleprobe.config import load_config
from needleprobe.data.documents import file_sha256
from needleprobe.run.layout import Layout


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One MiniLM run (layers 1, 3, 4) and a tiny GPT-2 beside it, sharing dataset and output directory."""
    tmp = tmp_path_factory.mktemp("workspace")
    data = write_jsonl(tmp / "d.jsonl", small_docs(12, 8))
    (tmp / "minilm").mkdir()
    first = write_config(tmp / "minilm", data, layers_to_probe=[1, 3, 4])
    assert main(["train", "--config", str(first), "--no-progress"]) == 0
    gpt2 = make_tiny_model("gpt2", tmp / "gpt2-model", n_layers=3)
    raw = yaml.safe_load(first.read_text())
    raw["model"]["name"] = str(gpt2)
    raw["probe"]["layers_to_probe"] = [1]
    second = tmp / "second.yaml"
    second.write_text(yaml.safe_dump(raw))
    return tmp, data, first, second


def test_a_second_model_never_replaces_the_first_models_probes(workspace, capsys):
    tmp, data, first, second = workspace
    run = Layout.from_config(load_config(first)).run_dir
    before = _files(run)
    assert main(["train", "--config", str(second), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("needleprobe: error: ") and "holds outputs of embedded:all-MiniLM-L6-v2 · resid_post · t_v1" in err
    assert "gpt2-model · resid_post · t_v1" in err and "{model}" in err and "--overwrite" in err
    assert _files(run) == before
    # every command on the first config still works
    assert main(["check", "--config", str(first)]) == 0
    assert main(["monitor", "--config", str(first), "--layer", "1", "--split", "val", "--no-progress"]) == 0
    # one config line keeps both: placeholders in the output directories
    raw = yaml.safe_load(second.read_text())
    raw["probe"]["output_dir"] = str(tmp / "results" / "probes" / "{model}" / "{site}")
    raw["probe"]["run_record_dir"] = str(tmp / "results" / "run_records" / "{model}")
    apart = tmp / "apart.yaml"
    apart.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(apart), "--no-progress"]) == 0
    lay = Layout.from_config(load_config(apart))
    assert lay.run_dir.is_dir() and "gpt2-model" in str(lay.run_dir) and lay.run_record.is_file()
    assert _files(run) == before and check(load_config(apart)) == []


def test_a_partial_refit_is_a_named_run_beside_the_first(workspace, capsys):
    """The README's re-fit with another grid on two layers, then check and report on what it wrote."""
    _, _, first, _ = workspace
    cfg = load_config(first)
    run = Layout.from_config(cfg).run_dir
    before = _files(run)
    flags = ["--layers", "3,4", "--l2-grid", "1,3,10,30"]
    assert main(["fit", "--config", str(first), *flags]) == 2
    err = capsys.readouterr().err
    assert "holds probes of layer(s) 1 (seed(s) 0, 1) that this fit would not rewrite" in err and "--run NAME" in err
    assert _files(run) == before
    assert main(["fit", "--config", str(first), *flags, "--run", "wide-l2"]) == 0
    assert main(["check", "--config", str(first), *flags, "--run", "wide-l2"]) == 0
    assert main(["report", "--config", str(first), "--run", "wide-l2", *flags[:2]]) == 0
    assert _files(run) == before  # the default run is untouched
    wide = Layout.from_config(cfg, "wide-l2")
    assert wide.run_dir.name == "t_v1-wide-l2" and wide.report.is_file()
    # the files on disk, the CSV and the run record describe the same probes
    on_disk = sorted(p.name for p in wide.run_dir.glob("probe_layer_*"))
    assert on_disk == [f"probe_layer_{L}_seed_{s}.{e}" for L in (3, 4) for s in (0, 1) for e in ("json", "pt")]
    rows = list(csv.DictReader(open(wide.metrics_csv)))
    assert {(r["layer"], r["seed"]) for r in rows} == {("3", "0"), ("3", "1"), ("4", "0"), ("4", "1")}
    assert {float(r["l2"]) for r in rows} == {1.0, 3.0, 10.0, 30.0}
    record = json.loads(wide.run_record.read_text())
    assert record["run"] == "wide-l2" and record["config"]["probe"]["l2_grid"] == [1.0, 3.0, 10.0, 30.0]
    outputs = record["stages"]["fit"]["outputs"]
    assert sorted(outputs) == sorted(str(wide.run_dir / n) for n in on_disk + ["probe_metrics.csv", "verdict.json"])
    assert all(file_sha256(p) == h for p, h in outputs.items())
    # the run remembers its flags: check without them passes; a flag that is not the run's is named
    assert check(cfg, run="wide-l2") == []
    assert main(["check", "--config", str(first), "--run", "wide-l2", "--l2-grid", "1,3"]) == 1
    assert "l2_grid: [1.0, 3.0, 10.0, 30.0] vs [1.0, 3.0]" in capsys.readouterr().out  # check's answer


def test_refit_of_the_whole_run_says_when_a_probe_gets_worse_and_overwrite_drops_the_rest(workspace, tmp_path, capsys):
    tmp, data, first, _ = workspace
    raw = yaml.safe_load(first.read_text())
    raw["probe"]["output_dir"] = str(tmp_path / "probes")
    raw["probe"]["run_record_dir"] = str(tmp_path / "rr")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["fit", "--config", str(cfg_path)]) == 0
    cfg = load_config(cfg_path)
    best = {k: json.loads(probe_files(cfg, *k)[1].read_text())["val_metrics"]["auroc"] for k in ((1, 0), (3, 0), (4, 0))}
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg_path), "--l2-grid", "30"]) == 0  # an update of the same run
    err = capsys.readouterr().err
    worse = [k for k in best if json.loads(probe_files(cfg, *k)[1].read_text())["val_metrics"]["auroc"] < best[k]]
    assert worse, "a single strong L2 should lose somewhere"
    for layer, seed in worse:
        assert f"replaced by a probe with lower val AUROC: layer {layer} seed {seed}: val AUROC {best[(layer, seed)]:.4f} →" in err
    assert check(cfg) == []  # the YAML's grid is not the run's, and the run record says which one it is
    assert main(["fit", "--config", str(cfg_path), "--layers", "3", "--overwrite"]) == 0
    run = Layout.from_config(cfg).run_dir
    assert sorted(p.name for p in run.glob("probe_layer_*.pt")) == ["probe_layer_3_seed_0.pt", "probe_layer_3_seed_1.pt"]
    assert main(["check", "--config", str(cfg_path), "--layers", "3"]) == 0


def test_a_run_remembers_its_flags_through_monitor_check_errors_and_report(workspace, tmp_path, capsys):
    """fit with flags, then monitor, check, errors and report with none: each reads the run's settings from its record,
    the monitor keeps to its own section, and flags only narrow (a layer or seed the run lacks is refused)."""
    tmp, _, first, _ = workspace
    raw = yaml.safe_load(first.read_text())
    raw["probe"].update(output_dir=str(tmp_path / "probes"), run_record_dir=str(tmp_path / "rr"))
    c = tmp_path / "c.yaml"
    c.write_text(yaml.safe_dump(raw))  # the YAML says layers 1, 3, 4 and grid 0.001, 0.01, 0.1
    cfg = load_config(c)
    assert main(["fit", "--config", str(c), "--l2-grid", "0.1,1,10", "--layers", "3,4"]) == 0
    assert main(["fit", "--config", str(c), "--l2-grid", "1,10", "--layers", "4", "--seeds", "0", "--run", "fine-l2"]) == 0
    for run in (None, "fine-l2"):
        at = ["--run", run] if run else []
        before = json.loads(Layout.from_config(cfg, run).run_record.read_text())
        capsys.readouterr()
        assert main(["monitor", "--config", str(c), *at, "--split", "val", "--no-progress"]) == 0
        out = capsys.readouterr().err
        assert "probe missing" not in out and "layer 1" not in out
        assert main(["check", "--config", str(c), *at]) == 0, capsys.readouterr().err
        assert main(["errors", "--config", str(c), *at, "-n", "2"]) == 0
        assert main(["report", "--config", str(c), *at]) == 0
        record = json.loads(Layout.from_config(cfg, run).run_record.read_text())
        assert record["config"] == before["config"]  # fit's settings, flags included, never rewritten by the monitor
        assert record["stages"]["fit"] == before["stages"]["fit"]
        assert record["stages"]["monitor:val"]["config"]["probe"]["l2_grid"] == before["config"]["probe"]["l2_grid"]
        rows = list(csv.DictReader(open(Layout.from_config(cfg, run).monitor_csv("val"))))
        fitted = before["config"]["probe"]
        assert {(int(r["layer"]), int(r["seed"])) for r in rows} == {
            (layer, seed) for layer in fitted["layers_to_probe"] for seed in fitted["train_seeds"]}
    assert json.loads(Layout.from_config(cfg).run_record.read_text())["config"]["probe"]["l2_grid"] == [0.1, 1.0, 10.0]
    # flags narrow the run: a part of it passes, a layer or seed it lacks is one line naming what it has
    assert main(["check", "--config", str(c), "--layers", "3"]) == 0
    capsys.readouterr()
    assert main(["check", "--config", str(c), "--layers", "1"]) == 2
    assert "has no probes of layer(s) 1 (its layers: 3, 4)" in capsys.readouterr().err
    assert main(["monitor", "--config", str(c), "--run", "fine-l2", "--layer", "3", "--no-progress"]) == 2
    assert "(its layers: 4)" in capsys.readouterr().err
    assert main(["monitor", "--config", str(c), "--run", "fine-l2", "--seed", "1", "--no-progress"]) == 2
    assert "(its seeds: 0)" in capsys.readouterr().err
