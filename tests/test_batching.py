"""The GPU batch plan: a token budget from free memory, batches in flight, and retries when memory runs out."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import small_docs, write_config, write_jsonl

import needleprobe.extract.runner as runner
from needleprobe.extract.batching import (
    DEFAULT_DOC_BATCH_SIZE,
    MAX_BUDGET,
    MIN_BUDGET,
    ModelDims,
    batch_limits,
    bytes_per_token,
    device_budget,
    token_budget,
)
from needleprobe.config import Config, load_config
from needleprobe.errors import NeedleprobeError
from needleprobe.extract.runner import Forward, SplitBatches, run_batches
from needleprobe.data.tokens import plan_batches

GEMMA_4B = ModelDims(hidden_size=2560, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
                     intermediate_size=10240, vocab_size=262208)
GiB = 1 << 30


def test_token_budget_grows_with_free_memory_and_stays_a_bounded_power_of_two():
    budgets = [token_budget(int(f * GiB), GEMMA_4B, 2, 3, 2048) for f in (0, 2, 4, 8, 16, 32, 64, 128)]
    assert budgets == sorted(budgets)
    assert budgets[0] == MIN_BUDGET and budgets[-1] == MAX_BUDGET
    assert all(b & (b - 1) == 0 for b in budgets)
    # what is promised fits: the budget's estimated peak stays inside the free memory (less the reserve)
    for free in (4 * GiB, 8 * GiB):
        b = token_budget(free, GEMMA_4B, 2, 3, 2048)
        assert b * bytes_per_token(GEMMA_4B, 2, 3, 2048) <= free
    # float32 weights and activations take twice the bytes per token: never a larger budget
    assert token_budget(8 * GiB, GEMMA_4B, 4, 3, 2048) < token_budget(8 * GiB, GEMMA_4B, 2, 3, 2048)


def test_model_dims_read_a_gemma_config_and_estimate_its_weights():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=2560, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                           head_dim=256, intermediate_size=10240, vocab_size=262208)
    assert ModelDims.from_config(cfg) == GEMMA_4B
    assert 7e9 < GEMMA_4B.weight_bytes(2) < 8.6e9  # gemma-3-4b's language model in bf16 (the checkpoint adds vision)


def test_batch_settings_win_over_the_budget_and_cpu_keeps_eight_documents():
    assert batch_limits(None, None) == (DEFAULT_DOC_BATCH_SIZE, None)
    assert batch_limits(None, None, 4096) == (DEFAULT_DOC_BATCH_SIZE, 4096)
    assert batch_limits(16, None, 4096) == (16, None)
    assert batch_limits(None, 2048, 4096) == (DEFAULT_DOC_BATCH_SIZE, 2048)
    probe = Config().probe
    assert probe.doc_batch_size is None and probe.max_batch_tokens is None
    assert device_budget(probe, 512, None, torch.device("cpu"), 1) is None


# -- the batch loop, with a fake model: order of forwards and collections, retries ----------------------------


class _Model(torch.nn.Module):
    def forward(self, input_ids, attention_mask):  # model_inputs reads the signature only
        raise AssertionError("replaced by the fake run_forward")


def _split(lengths: list[int], batch: int) -> SplitBatches:
    rng = np.random.default_rng(0)
    tdocs = [SimpleNamespace(n_tokens=n, input_ids=rng.integers(1, 1000, n), doc=SimpleNamespace(doc_id=f"d{i}"))
             for i, n in enumerate(lengths)]
    rows_of = [np.arange(0, n, 3, dtype=np.int32) for n in lengths]
    _, batches = plan_batches(lengths, batch, None)
    return SplitBatches("train", tdocs, rows_of, batches)


class _Sink:
    def __init__(self):
        self.parts: list[np.ndarray] = []

    def add(self, rows):
        self.parts.append(rows["ids"])

    def rows(self) -> np.ndarray:
        return np.concatenate(self.parts)


def _run(split: SplitBatches, monkeypatch, log: list, max_docs: int | None = None, committed: int = 0):
    """run_batches with a fake forward whose rows are the token ids (it raises out of memory above ``max_docs``)."""

    def fake_forward(model, cap, inputs):
        ids = inputs["input_ids"]
        if max_docs is not None and ids.shape[0] > max_docs:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        log.append(("forward", ids.shape[0]))
        return {"x": ids}

    def to_rows(acts, batch_rows):
        b, t = runner.row_index(batch_rows, torch.device("cpu"))
        rows = acts["x"][b, t].numpy()
        n = len(log)
        return lambda: log.append(("collect", n)) or {"ids": rows}

    monkeypatch.setattr(runner, "run_forward", fake_forward)
    sink = _Sink()
    fwd = Forward(_Model(), SimpleNamespace(outputs={}), 0, torch.device("cpu"))
    tokens = run_batches(fwd, split, sink, committed, to_rows, False)
    return sink.rows(), tokens, fwd


LENGTHS = [40, 41, 42, 43, 44, 45, 46, 47, 20, 21, 22, 23, 9, 10, 11]


def test_rows_are_collected_with_forwards_in_flight_and_in_order(monkeypatch):
    split = _split(LENGTHS, 4)
    log: list = []
    rows, tokens, _ = _run(split, monkeypatch, log)
    assert tokens == sum(LENGTHS)
    expected = np.concatenate([split.tdocs[i].input_ids[split.rows_of[i]] for b in split.batches for i in b])
    np.testing.assert_array_equal(rows, expected)
    forwards = [i for i, e in enumerate(log) if e[0] == "forward"]
    collects = [e[1] for e in log if e[0] == "collect"]
    assert len(collects) == len(forwards) == len(split.batches)
    for k, made in enumerate(collects[: -runner.IN_FLIGHT]):  # batch k is collected once k + IN_FLIGHT is launched
        assert made <= forwards[k + 1] and forwards[k + runner.IN_FLIGHT] < log.index(("collect", made))


def test_out_of_memory_splits_the_batch_and_keeps_later_ones_small(monkeypatch, capsys):
    split = _split(LENGTHS, 8)
    ref, _, _ = _run(split, monkeypatch, [])
    log: list = []
    rows, tokens, fwd = _run(split, monkeypatch, log, max_docs=2)
    np.testing.assert_array_equal(rows, ref)
    assert tokens == sum(LENGTHS)
    assert max(e[1] for e in log if e[0] == "forward") == 2
    assert fwd.max_tokens is not None
    out = "".join(capsys.readouterr())
    assert "out of cpu memory" in out and "retrying" in out and "--max-batch-tokens" in out
    # a resumed split (rows already committed) skips them the same way when its first batch is split
    part, _, _ = _run(split, monkeypatch, [], max_docs=1, committed=7)
    np.testing.assert_array_equal(part, ref[7:])


def test_a_document_too_large_alone_is_a_one_line_error(monkeypatch):
    with pytest.raises(NeedleprobeError, match=r"document 'd7' \(47 tokens\) does not fit in cpu memory even alone") as e:
        _run(_split(LENGTHS, 8), monkeypatch, [], max_docs=0)
    assert "\n" not in str(e.value)


def test_extract_after_out_of_memory_retries_writes_the_same_bytes(tmp_path, monkeypatch, capsys, one_thread):
    """A fake out-of-memory above two documents: the cache equals a run of one document per forward, byte for byte."""
    from test_extract import _all_arrays

    from needleprobe import open_cache
    from needleprobe.extract.extract import extract

    data = write_jsonl(tmp_path / "d.jsonl", small_docs(4, 2))
    caches = {}
    real = runner.run_forward
    for label, batch in (("ref", 1), ("oom", 8)):
        (tmp_path / label).mkdir()
        cfg_path = write_config(tmp_path / label, data, layers_to_probe=[1], doc_batch_size=batch, max_length=64)
        if label == "oom":
            def fake(model, cap, inputs):
                if inputs["input_ids"].shape[0] > 2:
                    raise torch.OutOfMemoryError("CUDA out of memory (fake)")
                return real(model, cap, inputs)

            monkeypatch.setattr(runner, "run_forward", fake)
        assert extract(load_config(cfg_path), show_progress=False).status == "extracted"
        caches[label] = _all_arrays(open_cache(cfg_path).path)
    assert "retrying at most" in "".join(capsys.readouterr())  # the fake really struck
    assert caches["ref"].keys() == caches["oom"].keys() and len(caches["ref"]) >= 8
    for k, v in caches["ref"].items():
        assert v.tobytes() == caches["oom"][k].tobytes(), k


def test_cuda_with_no_batch_setting_gets_the_budget_of_its_free_memory(monkeypatch):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=2560, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                              head_dim=256, intermediate_size=10240, vocab_size=262208)
    model = SimpleNamespace(config=config, parameters=lambda: iter([torch.zeros(1, dtype=torch.bfloat16)]))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GiB)  # 1 GiB of it cached, reusable
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GiB)
    cuda = torch.device("cuda", 0)
    probe = Config().probe
    assert device_budget(probe, 2048, model, cuda, 3) == (token_budget(6 * GiB, GEMMA_4B, 2, 3, 2048), 6 * GiB)
    for set_by_user in ({"doc_batch_size": 16}, {"max_batch_tokens": 4096}):
        assert device_budget(SimpleNamespace(**{"doc_batch_size": None, "max_batch_tokens": None, **set_by_user}),
                             2048, model, cuda, 3) is None
