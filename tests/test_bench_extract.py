"""The extraction benchmark measures on the device it is asked for: every tensor it hands a model is there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_docs, write_jsonl

from needleprobe.config import EMBEDDED_MODEL

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_extract.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_extract", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        del sys.modules[spec.name]


def test_every_model_input_is_on_the_benchmark_device(bench, tmp_path, monkeypatch):
    """``--device cuda`` once crashed in the naive warm-up ("index is on cpu"): its inputs stayed on the CPU.

    The "meta" device stands in for a GPU on a CPU-only machine: a tensor left
    on the CPU shows up as ``cpu``.  Meta tensors hold no data, so each model's
    forward is replaced by a spy that records the devices of what it is given.
    """
    data = write_jsonl(tmp_path / "d.jsonl", small_docs(5, 3))
    case = bench.Case("minilm-L2", "MiniLM-L6 (BERT)", EMBEDDED_MODEL, [2], 6, 512, False, data, "minilm")
    tdocs, tok = bench.tokenized_splits(case)
    meta = torch.device("meta")
    naive = bench.Naive(case, tdocs, meta, "float32")
    fwd = bench.Forward(case, tdocs, tok.pad_token_id, meta, "float32")
    seen: list[dict[str, torch.device]] = []

    def spy(*args, **kwargs):
        assert not args, "inputs are passed by name"
        seen.append({k: v.device for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    for model in (naive.model, fwd.model):
        assert {p.device for p in model.parameters()} == {meta}
        monkeypatch.setattr(model, "forward", spy)
    # the spy runs no block, so no hook fires: skip run_forward's check that every hooked block was reached
    monkeypatch.setattr(bench, "run_forward", lambda model, cap, inputs: model(**inputs, use_cache=False) or {})

    naive.warm_up()
    naive.run()
    fwd.warm_up(case.layers)
    fwd.run(case.layers, 8)
    fwd.run(case.layers, 16)

    n_docs = sum(len(v) for v in tdocs.values())
    n_batches = len(fwd.plan(8)[0]) * 2 + len(fwd.plan(16)[0])
    assert len(seen) == 1 + n_docs + n_batches
    assert all("input_ids" in call and "attention_mask" in call for call in seen)
    off = [call for call in seen if set(call.values()) != {meta}]
    assert not off, f"{len(off)} forward(s) got tensors off the benchmark's device, first: {off[0]}"


def test_gemma_shaped_case_has_gemma_special_ids_and_documents_of_600_to_1800_tokens(bench, tmp_path):
    from transformers import AutoTokenizer

    bench.gemma_like_tokenizer(tmp_path, bench.synthetic_words())
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert {name: tok.convert_tokens_to_ids(name) for name in bench.GEMMA_SPECIAL_IDS} == bench.GEMMA_SPECIAL_IDS
    docs = bench.synthetic_documents(tmp_path, 6, 3)
    lengths = [len(ids) for ids in tok([d["text"] for d in docs])["input_ids"]]
    assert all(540 <= n <= 1980 for n in lengths), lengths  # 600–1,800 drawn, ±10% from the words' mean length
    for split in ("train", "val"):
        spans = [(d["text"], s) for d in docs if d["split"] == split for s in d["needle_spans"]]
        assert spans and all(text[s:e] == bench.NEEDLE for text, (s, e) in spans)
