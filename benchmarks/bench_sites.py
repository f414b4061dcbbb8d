#!/usr/bin/env python
"""Capture overhead of several activation sites vs resid_post alone, in the same forward.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sites.py [--reps 15] [--threads 1] [--device cpu]

Per model, one batch of 8 documents x 256 tokens (random ids, no padding),
probed at two layers (the last block among them, so both runs do the same
blocks); each repetition times, back to back and in rotating order:

(a) today     one forward hook per block, its output kept (resid_post only: what
              needleprobe captured before activation sites; ``resid_post_hooks`` here)
(b) post      ``sites.capture_sites`` with resid_post at the same layers
(c) all       ``sites.capture_sites`` with every site the model has at those layers

Reported: median ms per forward, and the median of each repetition's own
ratio c/a and b/a (wall time; process CPU time as a cross-check on a shared
machine).  Models: the embedded MiniLM (BERT: 3 sites), a random Llama of
MiniLM's size (hidden 384, 6 blocks: 5 sites) and the tests' tiny Llama
(hidden 64), where the fixed cost of a hook weighs most.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models

import torch  # noqa: E402

from needleprobe.config import EMBEDDED_MODEL, ModelConfig  # noqa: E402
from needleprobe.model.hooks import _StopForward, find_blocks, load_model, model_inputs, run_forward  # noqa: E402
from needleprobe.extract.sites import SITES, capture_sites, site_support  # noqa: E402


@contextlib.contextmanager
def resid_post_hooks(blocks, layers: list[int]):
    """The baseline: a forward hook on each block in ``layers`` keeping its output, the forward stopped after the
    highest (``run_forward`` reads ``outputs`` and ``expected``)."""
    cap = types.SimpleNamespace(outputs={}, expected=tuple(layers))
    top = max(layers)

    def make_hook(layer: int):
        def hook(module, args, output):
            cap.outputs[layer] = (output[0] if isinstance(output, tuple) else output).detach()
            if layer == top:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def models(device: torch.device):
    import transformers as tf
    from tiny_models import make_tiny_model

    yield "MiniLM-L6 (BERT, d=384)", load_model(ModelConfig(name=EMBEDDED_MODEL), "float32", device), [2, 5]
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512)
    yield "Llama d=384, 6 blocks", tf.LlamaModel(cfg).to(device).eval(), [2, 5]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tf.AutoModel.from_pretrained(make_tiny_model("llama", Path(tmp), n_layers=3)).to(device).eval()
    yield "tiny Llama d=64, 3 blocks", tiny, [1, 2]


def timed(model, ctx, inputs, device) -> tuple[float, float]:
    with torch.inference_mode(), ctx as cap:
        if device.type == "cuda":
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        run_forward(model, cap, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1: a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, {args.docs} docs x {args.tokens} tokens, {args.reps} reps")
    print(f"{'model':28} {'layers':8} {'sites':5} {'today ms':>9} {'post ms':>8} {'all ms':>7} {'all/today':>10} {'post/today':>11} {'all/today cpu':>14}")
    for name, model, layers in models(device):
        blocks = find_blocks(model)
        sites = [s for s, why in site_support(model).items() if why is None]
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(min(1000, vocab // 2), min(vocab, 30000), (args.docs, args.tokens), generator=g).to(device)
        inputs = model_inputs(model, ids, torch.ones_like(ids))
        cases = {
            "today": lambda: resid_post_hooks(blocks, layers),
            "post": lambda: capture_sites(blocks, [("resid_post", layer) for layer in layers]),
            "all": lambda: capture_sites(blocks, [(s, layer) for layer in layers for s in sites]),
        }
        for make in cases.values():  # warm-up
            timed(model, make(), inputs, device)
        wall = {k: [] for k in cases}
        cpu = {k: [] for k in cases}
        order = list(cases)
        for rep in range(args.reps):
            for k in order[rep % 3:] + order[: rep % 3]:
                w, c = timed(model, cases[k](), inputs, device)
                wall[k].append(w)
                cpu[k].append(c)
        ratio = lambda d, k: statistics.median(x / y for x, y in zip(d[k], d["today"]))  # noqa: E731
        med = {k: 1000 * statistics.median(v) for k, v in wall.items()}
        print(f"{name:28} {str(layers):8} {len(sites):5} {med['today']:9.1f} {med['post']:8.1f} {med['all']:7.1f} "
              f"{ratio(wall, 'all'):10.3f} {ratio(wall, 'post'):11.3f} {ratio(cpu, 'all'):14.3f}")
    print(f"sites: {', '.join(SITES)} (MiniLM/BERT has resid_pre, resid_mid, resid_post)")


if __name__ == "__main__":
    main()
