"""Layout: every path a run reads or writes, from the config alone; placeholders keep runs of several models apart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from needleprobe.config import load_config
from needleprobe.errors import NeedleprobeError
from needleprobe.layout import Layout, RunIdentity, model_dir_name, model_slug


def _cfg(**probe):
    cfg = load_config("configs/demo.yaml")
    return dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, **probe))


def test_default_paths_are_the_documented_ones():
    lay = Layout.from_config(_cfg())
    assert lay.cache == Path("cache/activations/needles_demo_v1/embedded--all-MiniLM-L6-v2/resid_post")
    assert lay.run_dir == Path("results/probes/needles_demo_v1")
    assert lay.probe_files(3, 1) == (Path("results/probes/needles_demo_v1/probe_layer_3_seed_1.pt"),
                                     Path("results/probes/needles_demo_v1/probe_layer_3_seed_1.json"))
    assert lay.metrics_csv == Path("results/probes/needles_demo_v1/probe_metrics.csv")
    assert lay.run_record == Path("results/run_records/needles_demo_v1_probe_run_record.json")
    assert lay.monitor_csv("test") == Path("results/probes/needles_demo_v1/monitor/monitor_metrics_test.csv")


def test_placeholders_and_named_runs():
    lay = Layout.from_config(_cfg(output_dir="results/probes/{model}/{site}", run_record_dir="rr/{model}"), run="wide-l2")
    assert lay.run_dir == Path("results/probes/embedded--all-MiniLM-L6-v2/resid_post/needles_demo_v1-wide-l2")
    assert lay.run_record == Path("rr/embedded--all-MiniLM-L6-v2/needles_demo_v1-wide-l2_probe_run_record.json")
    named = Layout.from_config(_cfg(output_dir="out/{dataset}/{model}"))
    assert named.run_dir == Path("out/needles_demo_v1/embedded--all-MiniLM-L6-v2")  # {dataset} given: not appended again
    remote = Layout.from_config(_cfg(output_dir="memory://bucket/{model}"))
    assert str(remote.run_dir) == "memory://bucket/embedded--all-MiniLM-L6-v2/needles_demo_v1"


@pytest.mark.parametrize("template", ["results/{modle}", "results/{model", "results/{0}"])
def test_unknown_or_malformed_placeholder_names_the_key(tmp_path, template):
    p = tmp_path / "c.yaml"
    p.write_text(f"probe:\n  output_dir: '{template}'\n")
    with pytest.raises(NeedleprobeError, match=r"c.yaml:2: probe.output_dir: (unknown|malformed) placeholder"):
        load_config(p)


@pytest.mark.parametrize("run", ["", "a/b", ".hidden", " x"])
def test_bad_run_names(run):
    with pytest.raises(NeedleprobeError, match="a run name is"):
        Layout.from_config(_cfg(), run=run)


def test_model_slugs():
    assert model_slug("google/gemma-3-4b-it") == "google--gemma-3-4b-it"
    assert model_slug("embedded:all-MiniLM-L6-v2") == "embedded--all-MiniLM-L6-v2"


def test_a_gguf_file_names_its_own_model():
    """Two GGUF files of one directory (two quantisations) get two caches and two identities."""
    assert model_dir_name("models/smol", "SmolLM2-135M-Instruct.Q4_1.gguf") == "models--smol--SmolLM2-135M-Instruct.Q4_1"  # not a directory here: a hub id
    assert model_dir_name("embedded:SmolLM2-135M-Instruct", None) == "embedded--SmolLM2-135M-Instruct"
    cfg = _cfg()
    q4, q8 = (dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="models/smol", gguf_file=f))
              for f in ("s.Q4_1.gguf", "s.Q8_0.gguf"))
    assert Layout.from_config(q4).cache != Layout.from_config(q8).cache
    assert RunIdentity.from_config(q4) != RunIdentity.from_config(q8)
    assert RunIdentity.from_config_dict(q4.to_dict()) == RunIdentity.from_config(q4)
    assert RunIdentity.from_config(q4).describe() == "models/smol (s.Q4_1.gguf) · resid_post · needles_demo_v1"


def test_identity_round_trips_through_a_recorded_config():
    cfg = _cfg()
    ident = RunIdentity.from_config(cfg)
    assert RunIdentity.from_config_dict(cfg.to_dict()) == ident
    assert RunIdentity.from_config_dict({"no": "config"}) is None
    assert ident.describe() == "embedded:all-MiniLM-L6-v2 · resid_post · needles_demo_v1"
