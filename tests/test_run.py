"""``Run``: the one reader of a run directory (its probes, the best probe, its record)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import run_dir

from needleprobe import NeedleprobeError, load_probes
from needleprobe.analysis.run import Run


def test_best_probe_is_the_verdicts(minilm_run):
    _, cfg = minilm_run
    run = Run.of(cfg)
    verdict = json.loads(run.layout.verdict.read_text())
    assert run.best() == (verdict["best"]["layer"], verdict["best"]["seed"])
    for layer in cfg.probe.layers_to_probe:  # each layer's best seed: the highest val AUROC, ties to the lowest seed
        aurocs = {s: run.probe(layer, s).val_auroc_ for s in cfg.probe.train_seeds}
        top = max(aurocs.values())
        assert run.best(layer) == (layer, min(s for s, a in aurocs.items() if a == top))
    with pytest.raises(NeedleprobeError, match="no probe of layer 4"):
        run.best(4)


def test_probes_from_a_config_and_from_a_bare_directory_are_the_same(minilm_run, tmp_path):
    cfg_path, cfg = minilm_run
    by_run = Run.of(cfg).probes()
    assert sorted(by_run) == sorted((la, s) for la in cfg.probe.layers_to_probe for s in cfg.probe.train_seeds)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir(cfg), copy)
    (copy / "probe_layer_x_seed_0.pt").write_bytes(b"")  # not a probe name: ignored, never parsed as one
    bare = Run.at(copy)
    assert bare.record() == {} and Run.of(cfg).record()["stages"]["fit"]
    for key, probe in load_probes(copy).items():
        np.testing.assert_array_equal(probe.coef_, by_run[key].coef_)
        assert bare.probe_path(*key).parent == copy
    assert list(load_probes(cfg_path)) == list(by_run)


def test_an_unreadable_metadata_file_counts_as_auroc_zero(minilm_run, tmp_path):
    _, cfg = minilm_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir(cfg), copy)
    best = Run.at(copy).best()
    (copy / f"probe_layer_{best[0]}_seed_{best[1]}.json").write_text("{not json")
    run = Run.at(copy)
    assert run.metadata()[best] == {} and run.val_aurocs()[best] == 0.0
    assert run.best() != best
