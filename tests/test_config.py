"""Config: typed, validated, errors that name the file, line and key."""

from __future__ import annotations

import pytest
import yaml

from needleprobe.config import Config, load_config, with_overrides
from needleprobe.errors import NeedleprobeError


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    main = load_config("configs/dataset_main.yaml")
    assert main.model.name == "google/gemma-3-4b-it" and main.probe.layers_to_probe == [8, 16, 24]
    assert main.to_dict() == {**Config().to_dict()}  # the file spells out the defaults
    demo = load_config("configs/demo.yaml")
    assert demo.model.name == "embedded:all-MiniLM-L6-v2"


@pytest.mark.parametrize(
    "text, message",
    [
        ("probe:\n  layers_to_probe: [1]\n  l2_gird: [0.1]\n", r"c.yaml:3: probe.l2_gird: unknown key"),
        ("probe:\n  layers_to_probe: 3\n", r"c.yaml:2: probe.layers_to_probe: expected list of int, got int 3"),
        ("probe:\n  negatives_per_doc: '32'\n", r"probe.negatives_per_doc: expected int, got str"),
        ("probe:\n  class_balance: balanced\n", r"probe.class_balance: expected 'weighted' or 'downsample'"),
        ("probe:\n  model_dtype: fp8\n", r"probe.model_dtype: expected 'float32' or 'bfloat16' or 'float16'"),
        ("probe:\n  l2_grid: [0.1, -1]\n", r"probe.l2_grid: values must be > 0"),
        ("probe:\n  layers_to_probe: []\n", r"probe.layers_to_probe: must list at least one layer"),
        ("dataset:\n  val_fraction: 1.5\n", r"dataset.val_fraction: must be in \[0, 1\)"),
        ("model:\n  chat_template: 'yes'\n", r"model.chat_template: expected bool"),
        ("probe: [1, 2]\n", r"probe: expected a mapping"),
        ("probe:\n  layers_to_probe: [1\n", r"c.yaml:\d+: invalid YAML"),
        ("extra_section: {}\n", r"extra_section: unknown key"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    with pytest.raises(NeedleprobeError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(NeedleprobeError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(_write(tmp_path, yaml.safe_dump({"probe": {"layers_to_probe": [1]}})))
    new = with_overrides(cfg, l2_grid=[1, 2], train_seeds=[5], doc_batch_size=None)
    assert new.probe.l2_grid == [1.0, 2.0] and new.probe.train_seeds == [5]
    assert new.probe.doc_batch_size == cfg.probe.doc_batch_size
    with pytest.raises(NeedleprobeError, match="doc_batch_size: must be positive"):
        with_overrides(cfg, doc_batch_size=0)
