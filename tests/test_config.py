"""Config: typed, validated, errors that name the file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from needleprobe.config import DEFAULT_L2_GRID, Config, load_config, with_overrides
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
    chat = load_config("configs/demo_chat.yaml")  # make demo's: the chat model with its template, the default grid
    assert chat.model.name == "embedded:SmolLM2-135M-Instruct" and chat.model.chat_template
    assert chat.probe.l2_grid == list(DEFAULT_L2_GRID) == Config().probe.l2_grid


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
        ("model:\n  name: 'embedded:SmolLM2-135M-Instruct'\n  gguf_file: x.gguf\n",
         r"c.yaml:3: model.gguf_file: embedded:SmolLM2-135M-Instruct is a packaged model .*leave model.gguf_file unset"),
        ("model:\n  gguf_file: ' '\n", r"c.yaml:2: model.gguf_file: must not be empty"),
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


def test_empty_config_file_is_named_as_such(tmp_path):
    with pytest.raises(NeedleprobeError, match=r"c.yaml: config file is empty"):
        load_config(_write(tmp_path, "# nothing here yet\n"))


@pytest.mark.parametrize("lines", [1, 3])
def test_dataset_passed_as_config_is_recognised(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text('{"doc_id": "a", "text": "hi", "needle_spans": []}\n' * lines)
    with pytest.raises(NeedleprobeError, match=r"d.jsonl: this is a dataset \(JSON lines\), not a config"):
        load_config(p)


def test_missing_default_config_says_it_is_the_default(tmp_path, monkeypatch, capsys):
    from needleprobe.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit"]) == 2
    assert "no --config given, and the default config file is not here" in capsys.readouterr().err


def test_relative_dataset_path_is_read_beside_the_config(tmp_path, monkeypatch):
    (tmp_path / "proj" / "configs").mkdir(parents=True)
    (tmp_path / "proj" / "configs" / "d.jsonl").write_text("{}")
    cfg_path = tmp_path / "proj" / "configs" / "c.yaml"
    cfg_path.write_text("dataset:\n  path: d.jsonl\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("proj/configs/c.yaml")
    assert cfg.dataset.resolved_path().resolve() == (tmp_path / "proj" / "configs" / "d.jsonl").resolve()
    assert "config_dir" not in cfg.to_dict()["dataset"]
    # a path that only exists relative to the working directory still works, as it did before
    (tmp_path / "data.jsonl").write_text("{}")
    cfg_path.write_text("dataset:\n  path: data.jsonl\n")
    assert load_config("proj/configs/c.yaml").dataset.resolved_path() == Path("data.jsonl")
    # config_dir is not a key users can set
    cfg_path.write_text("dataset:\n  config_dir: x\n")
    with pytest.raises(NeedleprobeError, match="dataset.config_dir: unknown key"):
        load_config(cfg_path)


def test_a_config_saved_in_another_encoding_names_the_line_and_byte(tmp_path):
    """A Windows-1252 file: the same one-line error as a dataset's, with the line and the byte."""
    p = tmp_path / "c.yaml"
    p.write_bytes("# needle probes\ndataset:\n  name: caf\u00e9\n".encode("cp1252"))
    with pytest.raises(NeedleprobeError, match=r"c.yaml:3: not valid UTF-8 \(byte 0xe9 at byte 12 of the line\); "
                                               r"save the file as UTF-8$"):
        load_config(p)
    p.write_bytes(b"\xef\xbb\xbf" + "dataset:\n  name: caf\u00e9\n".encode())  # UTF-8 with a byte-order mark reads
    assert load_config(p).dataset.name == "caf\u00e9"
