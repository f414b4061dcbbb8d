"""Extraction fidelity: cached rows are what the model computes, for every supported family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import small_docs, threads, write_config, write_jsonl
from tiny_models import FAMILIES, make_tiny_model
from transformers import AutoModel, AutoTokenizer

from needleprobe import open_cache
from needleprobe.config import load_config
from needleprobe.extract.extract import extract
from needleprobe.extract.sites import capture_sites
from needleprobe.model.hooks import find_blocks, model_location, run_forward


def _hidden_states(model, tok, text: str, max_length: int) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        out = model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}, output_hidden_states=True, use_cache=False)
    return enc["input_ids"][0].tolist(), out.hidden_states


def _final_norm(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("norm", "ln_f", "final_layer_norm"):
        if isinstance(getattr(dec, name, None), torch.nn.Module):
            return getattr(dec, name)
    return None


def assert_rows_match_model(cfg_path: Path, atol: float = 2e-5) -> int:
    """Every stored row equals output_hidden_states[L+1] at (doc, token_index); returns rows checked.

    The last block's resid_post is before the final norm: applying the model's
    final norm to the cached row must give hidden_states[-1].
    """
    cfg = load_config(cfg_path)
    cache = open_cache(cfg)
    where = model_location(cfg.model)
    tok = AutoTokenizer.from_pretrained(where)
    model = AutoModel.from_pretrained(where, dtype=torch.float32).eval()
    n_layers = len(find_blocks(model))
    norm = _final_norm(model)
    texts = {}
    for line in open(cfg.dataset.resolved_path(), encoding="utf-8"):
        d = json.loads(line)
        texts[d["doc_id"]] = d["text"]
    checked = 0
    for split in cache.splits:
        view = cache.split(split)
        doc_ids = view.doc_ids
        doc_index, token_index, token_id = view.doc_index, view.token_index, view.token_id
        acts = {layer: view.to_numpy(layer) for layer in cache.layers}
        for di in np.unique(doc_index):
            rows = np.flatnonzero(doc_index == di)
            ids, hs = _hidden_states(model, tok, texts[doc_ids[di]], cfg.model.max_length)
            assert token_id[rows].tolist() == [ids[t] for t in token_index[rows]]
            for layer in cache.layers:
                got = torch.from_numpy(acts[layer][rows])
                if layer < n_layers - 1 or norm is None:
                    want = hs[layer + 1][0, token_index[rows]]
                else:
                    want = hs[-1][0, token_index[rows]]
                    assert not torch.allclose(got, want, atol=1e-3), "last layer should be before the final norm"
                    with torch.inference_mode():
                        got = norm(got)
                torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
            checked += len(rows)
    return checked


def test_minilm_rows_equal_hidden_states(minilm_run):
    cfg_path, cfg = minilm_run
    assert cfg.probe.layers_to_probe == [1, 5]  # a middle layer and the last (BERT has no final norm)
    assert assert_rows_match_model(cfg_path) > 500


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_rows_equal_hidden_states(family, tmp_path):
    model_dir = make_tiny_model(family, tmp_path / "model", n_layers=3)
    data = write_jsonl(tmp_path / "d.jsonl", small_docs(6, 4))
    cfg_path = write_config(tmp_path, data, model=str(model_dir), layers_to_probe=[0, 2], negatives_per_doc=8, max_length=256)
    extract(load_config(cfg_path), show_progress=False)
    assert assert_rows_match_model(cfg_path) > 100


def test_layer_out_of_range_names_block_count(tmp_path, small_dataset):
    from needleprobe.errors import NeedleprobeError

    cfg_path = write_config(tmp_path, small_dataset, layers_to_probe=[6])
    with pytest.raises(NeedleprobeError, match=r"has 6 blocks \(valid 0..5\)"):
        extract(load_config(cfg_path), show_progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("zarr.json"))


def test_forward_stops_after_highest_probed_block(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "m", n_layers=4)
    model = AutoModel.from_pretrained(model_dir).eval()
    blocks = find_blocks(model)
    calls = [0] * len(blocks)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)]
    norm_calls = []
    handles.append(model.norm.register_forward_hook(lambda *a: norm_calls.append(1)))
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    mask = torch.ones_like(ids)
    with torch.inference_mode(), capture_sites(blocks, [("resid_post", 0), ("resid_post", 1)]) as cap:
        acts = run_forward(model, cap, {"input_ids": ids, "attention_mask": mask})
    assert calls == [1, 1, 0, 0] and not norm_calls
    assert sorted(acts) == [("resid_post", 0), ("resid_post", 1)]
    # hooks are gone and the model still runs in full afterwards
    assert all(len(b._forward_hooks) == 1 for b in blocks)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[2], acts["resid_post", 1], atol=0, rtol=0)
    for h in handles:
        h.remove()


def _all_arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    out = {}
    for split in root.group_keys():
        for name in root[split].array_keys():
            out[f"{split}/{name}"] = root[split][name][:]
    return out


def test_cache_and_probes_identical_for_any_batch_size(tmp_path, small_dataset, one_thread):
    """Same thread configuration, any batch plan: the cache and the probe files are the same bytes."""
    from needleprobe.cli import main

    runs = {}
    for label, flags in {"bs1": ["--doc-batch-size", "1"], "bs4": ["--doc-batch-size", "4"], "tok": ["--max-batch-tokens", "1500"]}.items():
        d = tmp_path / label
        d.mkdir()
        cfg_path = write_config(d, small_dataset, layers_to_probe=[2])
        assert main(["train", "--config", str(cfg_path), "--no-progress", *flags]) == 0
        runs[label] = (open_cache(cfg_path).path, d / "results" / "probes" / "t_v1")
    ref = _all_arrays(runs["bs1"][0])
    assert len(ref) >= 16
    for label in ("bs4", "tok"):
        other = _all_arrays(runs[label][0])
        assert ref.keys() == other.keys()
        for k in ref:
            np.testing.assert_array_equal(ref[k], other[k], err_msg=f"{label}: {k}")
        for f in sorted(runs["bs1"][1].glob("probe_*")) + [runs["bs1"][1] / n for n in ("probe_metrics.csv", "verdict.json")]:
            mine, theirs = f.read_bytes(), (runs[label][1] / f.name).read_bytes()
            if f.name.startswith("probe_") and f.suffix == ".json":  # identical but for the run's own directories
                mine, theirs = (_without_dirs(json.loads(x)) for x in (mine, theirs))
            assert mine == theirs, f"{label}: {f.name}"


ROW_ARRAYS = ("labels", "doc_index", "token_index", "token_id", "doc_ids", "doc_n_tokens", "doc_n_needles")


def test_other_thread_counts_agree_within_the_stated_bound(tmp_path, small_dataset):
    """1 vs 2 intra-op threads: identical rows; activations within 1e-4 of each row's RMS; same L2, AUROC within 1e-4.

    Bit-identity is promised only for one thread configuration, because BLAS
    libraries may split float reductions by thread count; this is the bound
    promised across configurations (the README's determinism contract).
    """
    from needleprobe.cli import main

    runs = {}
    for n in (1, 2):
        d = tmp_path / f"threads{n}"
        d.mkdir()
        cfg_path = write_config(d, small_dataset, layers_to_probe=[2, 5])
        with threads(n):
            assert main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
        runs[n] = (open_cache(cfg_path), d / "results" / "probes" / "t_v1")
    (a, out_a), (b, out_b) = runs[1], runs[2]
    for split in a.splits:
        va, vb = a.split(split), b.split(split)
        for name in ROW_ARRAYS:
            np.testing.assert_array_equal(np.asarray(getattr(va, name)), np.asarray(getattr(vb, name)), err_msg=name)
        for layer in a.layers:
            x, y = va.to_numpy(layer), vb.to_numpy(layer)
            rms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True))
            assert (np.abs(x - y) <= 1e-4 * rms).all(), f"{split}/layer_{layer}: max |diff| {np.abs(x - y).max():.2e}"
    for js in sorted(out_a.glob("probe_*.json")):
        ma, mb = json.loads(js.read_text()), json.loads((out_b / js.name).read_text())
        assert ma["selected_l2"] == mb["selected_l2"], js.name
        for ra, rb in zip(ma["l2_results"], mb["l2_results"]):
            assert abs(ra["val_auroc"] - rb["val_auroc"]) <= 1e-4, (js.name, ra["l2"])


def _without_dirs(meta: dict) -> dict:
    for key in ("cache_dir", "output_dir", "run_record_dir"):
        meta["config"]["probe"].pop(key)
    return meta


def test_chat_template_rows_equal_model_on_rendered_text(tmp_path):
    """With chat_template the model sees the rendered turn (one BOS); rows match that forward, labels the shifted spans."""
    model_dir = make_tiny_model("gemma3_text", tmp_path / "m", n_layers=2)
    docs = small_docs(4, 3)
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg_path = write_config(tmp_path, data, model=str(model_dir), layers_to_probe=[0], chat_template=True, negatives_per_doc=4)
    cfg = load_config(cfg_path)
    extract(cfg, show_progress=False)
    cache = open_cache(cfg)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    by_id = {d["doc_id"]: d for d in docs}
    for split in cache.splits:
        view = cache.split(split)
        x = view.to_numpy(0)
        for di, doc_id in enumerate(view.doc_ids):
            rendered = tok.apply_chat_template([{"role": "user", "content": by_id[doc_id]["text"]}], tokenize=False)
            enc = tok(rendered, add_special_tokens=False, return_tensors="pt")
            assert int((enc["input_ids"] == tok.bos_token_id).sum()) == 1
            with torch.inference_mode():
                hs = model(**enc, output_hidden_states=True).hidden_states[1][0]
            rows = np.flatnonzero(view.doc_index == di)
            torch.testing.assert_close(torch.from_numpy(x[rows]), hs[view.token_index[rows]], atol=2e-5, rtol=1e-4)
            # every needle row overlaps a (shifted) needle span, and every span has needle rows
            start = rendered.index(by_id[doc_id]["text"])
            spans = [(start + s, start + e) for s, e in by_id[doc_id]["needle_spans"]]
            offs = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            pos = view.token_index[rows][view.labels[rows] == 1]
            hits = [[offs[t][0] < e and offs[t][1] > s for s, e in spans] for t in pos]
            assert all(any(h) for h in hits)
            kept = offs[int(view.token_index[rows].max())][1] if len(rows) else 0  # truncation at max_length
            assert all(any(h[k] for h in hits) for k in range(len(spans)) if spans[k][1] <= kept)
            # each row's stored characters are its token's, in the document's own text
            assert_char_offsets_are_the_tokens(view, rows, by_id[doc_id]["text"], np.asarray(offs) - start)


def test_bfloat16_features_are_the_exact_cast_of_float32(tmp_path, small_dataset):
    """bf16 is stored as uint16 bits and widened exactly: equal to casting the float32 rows to bf16."""
    caches = {}
    for dt in ("float32", "bfloat16"):
        d = tmp_path / dt
        d.mkdir()
        cfg = load_config(write_config(d, small_dataset, layers_to_probe=[2], feature_dtype=dt, max_train_docs=6, max_val_docs=4))
        extract(cfg, show_progress=False)
        caches[dt] = open_cache(cfg)
    raw = caches["bfloat16"].split("train").activations(2)
    assert raw.dtype == np.uint16 and raw.attrs["logical_dtype"] == "bfloat16"
    for split in ("train", "val"):
        f32 = torch.from_numpy(caches["float32"].split(split).to_numpy(2))
        bf = caches["bfloat16"].split(split).to_numpy(2)
        np.testing.assert_array_equal(bf, f32.to(torch.bfloat16).float().numpy())


def test_unknown_architecture_is_a_clear_error():
    from needleprobe.errors import NeedleprobeError

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 2)
            self.other = torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3)

    with pytest.raises(NeedleprobeError, match=r"cannot find the transformer blocks of Odd .*stack\[2\], other\[3\]"):
        find_blocks(Odd())


def test_documents_longer_than_the_model_positions_are_refused_before_any_forward(tmp_path, capsys):
    """MiniLM has 512 positions: max_length 2048 and a 600-token document is one line, exit 2, no cache."""
    from needleprobe.cli import main

    docs = small_docs(4, 3)
    docs[1] = dict(docs[1], text=docs[1]["text"] + " more words" * 300)
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg_path = write_config(tmp_path, data, layers_to_probe=[1], max_length=2048)
    assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.max_length 2048 is more than the 512 positions of embedded:all-MiniLM-L6-v2" in err
    assert f"document {docs[1]['doc_id']!r} ({data}:2) has " in err and "tokens: set" in err and "set model.max_length to 512" in err
    assert not list((tmp_path / "cache").rglob("zarr.json")) if (tmp_path / "cache").exists() else True


def test_cache_records_how_it_was_computed(minilm_run):
    import torch

    compute = open_cache(minilm_run[1]).metadata["compute"]
    assert compute["device"] == "cpu" and compute["processes"] == 1 and compute["torch"] == torch.__version__
    assert compute["torch_threads"] >= 1 and compute["mkl_dynamic"] == "FALSE" and compute["cpu_capability"]


def test_the_size_printed_before_extract_is_the_size_on_disk(minilm_run):
    """Zarr writes each split's last chunk whole, so the estimate counts whole chunks: within 10% of the cache on
    disk (the demo: 81.3 MiB printed, 81.4 MiB written); a 1.5-chunk split is not counted as 1.5 chunks."""
    from needleprobe.cache.format import chunk_rows_for
    from needleprobe.extract.space import cache_bytes
    from needleprobe.cache.inspect import dir_size

    cache = open_cache(minilm_run[1])
    rows = [cache.split(s).n_rows for s in cache.splits]
    d_model = int(cache.metadata["d_model"])
    est = cache_bytes(rows, len(cache.layers), d_model, cache.feature_dtype)
    assert abs(est - dir_size(cache.path)) <= 0.1 * dir_size(cache.path), (est, dir_size(cache.path))
    chunk = chunk_rows_for(d_model, "float32")
    assert cache_bytes([chunk + chunk // 2], 1, d_model, "float32") == 2 * chunk * d_model * 4 + (chunk + chunk // 2) * 21


def assert_char_offsets_are_the_tokens(view, rows: np.ndarray, text: str, offsets: np.ndarray) -> None:
    """``text[char_start:char_end]`` of each row is a non-empty part of the text overlapping the tokenizer's own span
    of that token (``offsets`` [T, 2]: the tokenizer's offsets into ``text``)."""
    cs, ce = view.char_start[rows], view.char_end[rows]
    own = offsets[view.token_index[rows]]
    assert ((0 <= cs) & (cs < ce) & (ce <= len(text))).all()
    assert (np.maximum(cs, own[:, 0]) < np.minimum(ce, own[:, 1])).all()
    assert all(text[a:b] for a, b in zip(cs, ce))


def test_char_offsets_without_chat_template_are_the_tokens(minilm_run):
    """Every row of the demo-data cache (WordPiece, no chat template): its characters are the tokenizer's for it;
    the cache's own tokenizer is the one it was built with."""
    _, cfg = minilm_run
    cache = open_cache(cfg)
    tok = cache.tokenizer()
    assert tok.name_or_path == AutoTokenizer.from_pretrained(model_location(cfg.model)).name_or_path
    texts = {json.loads(line)["doc_id"]: json.loads(line)["text"] for line in open(cfg.dataset.resolved_path())}
    n = 0
    for split in cache.splits:
        view = cache.split(split)
        for di, doc_id in enumerate(view.doc_ids):
            enc = tok(texts[doc_id], truncation=True, max_length=cfg.model.max_length, return_offsets_mapping=True)
            rows = np.flatnonzero(view.doc_index == di)
            assert_char_offsets_are_the_tokens(view, rows, texts[doc_id], np.asarray(enc["offset_mapping"]))
            n += rows.size
    assert n == sum(cache.split(s).n_rows for s in cache.splits)


def test_a_cache_without_char_offsets_says_to_re_extract(minilm_run, tmp_path):
    """Caches written before the offsets were stored: one line naming the cache and what to do, not a KeyError."""
    import shutil

    from needleprobe.errors import NeedleprobeError

    _, cfg = minilm_run
    old = tmp_path / "old"
    shutil.copytree(open_cache(cfg).path, old)
    for split in ("train", "val"):
        for name in ("char_start", "char_end"):
            shutil.rmtree(old / split / name)
    view = open_cache(old).split("val")
    assert view.labels.size == view.n_rows  # everything else reads as before
    with pytest.raises(NeedleprobeError, match="re-extract") as e:
        view.char_start
    assert str(old) in str(e.value) and "\n" not in str(e.value)
