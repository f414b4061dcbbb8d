"""How many tokens one forward pass takes: the default batch plan on a GPU.

On CUDA, with neither ``probe.doc_batch_size`` nor ``probe.max_batch_tokens``
set, a forward holds as many padded tokens as the device memory left after the
weights allows (:func:`token_budget`): one GPU's batches are then as large as
it can take, which a fixed document count is not (short documents waste the
device, long ones may not fit).  On CPU and MPS the default stays
:data:`DEFAULT_DOC_BATCH_SIZE` documents.  Rows never depend on the plan
(``tokens.bucket_length``), so the choice changes speed only; a forward that
still runs out of memory is split and retried (``runner.run_batches``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_DOC_BATCH_SIZE = 8
"""Documents per forward when nothing is set and the device is not CUDA."""
MIN_BUDGET = 1024
MAX_BUDGET = 65536
"""Padded tokens per forward, at most: beyond this a GPU is already busy, and bigger batches only hold more memory."""
SAFETY = 2.0
"""Estimated bytes per token × this: temporaries the estimate leaves out, allocator fragmentation."""
RESERVE_BYTES = 1 << 30
"""Kept free besides the batch (CUDA context growth, cuBLAS workspaces)."""


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a transformer that set the memory of one token's forward (from its HF config)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        """From a HF config (its text config for multimodal models); sizes a config leaves out are estimated."""
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        d = int(getattr(c, "hidden_size", None) or getattr(c, "n_embd"))
        heads = int(getattr(c, "num_attention_heads", None) or getattr(c, "n_head", 1))
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or d // heads)
        inter = int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d)
        layers = int(getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 1))
        return cls(d, layers, heads, kv, head_dim, inter, int(getattr(c, "vocab_size", 0) or 0))

    def weight_bytes(self, dtype_bytes: int) -> int:
        """The weights' size, roughly (embeddings, attention and a gated MLP per block; norms and biases left out)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        return dtype_bytes * (self.vocab_size * self.hidden_size + self.num_layers * (attn + mlp))


def bytes_per_token(dims: ModelDims, dtype_bytes: int, n_captured: int, max_length: int, in_flight: int = 2) -> int:
    """Device bytes one token of a batch holds at the peak of a block, its captured activations included.

    Inference keeps no activations between blocks, so the peak is one block's:
    a few copies of the residual stream, queries/keys/values (twice, for the
    rotary embedding), the gated MLP's three intermediates, and the boolean
    attention masks (a row of ``max_length`` each, full and sliding).  SDPA and
    flash attention never hold the scores; eager attention would, and a
    forward that runs out of memory is split and retried.  Each captured
    (site, layer) stays until its rows are gathered, for every batch in flight.
    """
    d = dims.hidden_size
    qkv = dims.head_dim * (dims.num_heads + 2 * dims.num_kv_heads)
    block = dtype_bytes * (6 * d + 2 * qkv + dims.num_heads * dims.head_dim + 3 * dims.intermediate_size)
    masks = 2 * max_length
    captured = in_flight * n_captured * d * dtype_bytes
    return int(SAFETY * (block + masks + captured))


def token_budget(free_bytes: int, dims: ModelDims, dtype_bytes: int, n_captured: int, max_length: int,
                 in_flight: int = 2) -> int:
    """Padded tokens per forward for ``free_bytes`` of device memory left after the weights are loaded.

    A power of two (so that small changes in free memory do not change the
    plan), between :data:`MIN_BUDGET` and :data:`MAX_BUDGET`.
    """
    usable = max(0, free_bytes - RESERVE_BYTES)
    fit = usable // bytes_per_token(dims, dtype_bytes, n_captured, max_length, in_flight)
    budget = MIN_BUDGET
    while budget * 2 <= min(fit, MAX_BUDGET):
        budget *= 2
    return budget


def batch_limits(doc_batch_size: int | None, max_batch_tokens: int | None,
                 budget: int | None = None) -> tuple[int, int | None]:
    """``plan_batches``' (documents, padded tokens) per forward from the settings; ``budget`` fills an unset pair."""
    if max_batch_tokens is not None:
        return doc_batch_size or DEFAULT_DOC_BATCH_SIZE, max_batch_tokens
    if doc_batch_size is not None:
        return doc_batch_size, None
    return DEFAULT_DOC_BATCH_SIZE, budget


def batch_plan(lengths: list[int], probe, budget: int | None = None):
    """The batch plan of documents of ``lengths`` tokens, (row order, batches): by ``probe.doc_batch_size`` /
    ``max_batch_tokens``, else by a device's token ``budget`` (:func:`device_budget`), else the CPU default.  The
    order depends on the lengths alone, so a plan re-made with a budget keeps every row where it was."""
    from ..data.tokens import plan_batches

    return plan_batches(lengths, *batch_limits(probe.doc_batch_size, probe.max_batch_tokens, budget))


def device_budget(probe, max_length: int, model, device, n_captured: int) -> tuple[int, int] | None:
    """(token budget, free bytes) for a model already on a CUDA device when ``probe`` sets no batch size; else None."""
    import torch

    if device.type != "cuda" or probe.doc_batch_size is not None or probe.max_batch_tokens is not None:
        return None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by this process: reusable
    dims = ModelDims.from_config(model.config)
    dtype_bytes = torch.empty(0, dtype=next(model.parameters()).dtype).element_size()
    return token_budget(free, dims, dtype_bytes, n_captured, max_length), free


def budget_message(budget: int, free: int, device) -> str:
    from ..io.console import human_bytes

    return (f"batch plan: up to {budget:,} padded tokens per forward ({human_bytes(free)} free on {device} after the "
            "weights; --max-batch-tokens or --doc-batch-size to choose)")
