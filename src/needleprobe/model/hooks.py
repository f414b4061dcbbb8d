"""Loading a model and reading its residual stream with forward hooks.

``resid_post`` of block L is that block's output (TransformerLens'
``blocks.{L}.hook_resid_post``).  For L below the last block it equals
``output_hidden_states[L + 1]``; for the last block it is the output before
the final norm, which HF's ``hidden_states[-1]`` is not.

The forward is stopped by an exception from the hook of the highest probed
block: no later block, no final norm, no LM head runs.  Hooks live only inside
``sites.capture_sites``, so no state outlives a forward pass.  Other sites
(``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out``): :mod:`needleprobe.extract.sites`.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import TYPE_CHECKING

import torch

from ..config import Config, ModelConfig
from ..errors import NeedleprobeError

if TYPE_CHECKING:
    from ..data.tokens import TokenizedDoc

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Attribute paths to the block list, tried on ``get_decoder()`` and on the model.
_BLOCK_PATHS = ("layers", "h", "encoder.layer", "gpt_neox.layers", "language_model.layers", "model.layers", "transformer.h")


def model_location(cfg: ModelConfig) -> str:
    """A local directory or hub id for ``from_pretrained`` (packaged models and GGUF files: :mod:`.checkpoints`)."""
    from .checkpoints import location

    return location(cfg)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    where = model_location(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise _load_error(cfg, "tokenizer", e) from None
    tok.padding_side = "right"
    return tok


def placement(dtype: str, device: torch.device) -> dict:
    """``from_pretrained``'s dtype and, on CUDA, ``device_map``: the weights are read straight onto the device in
    the model dtype, never through host memory as a whole (which needs ``accelerate``; without it they are moved
    after loading, as on CPU)."""
    import importlib.util

    kw: dict = {"dtype": TORCH_DTYPES[dtype]}
    if device.type == "cuda":
        if importlib.util.find_spec("accelerate") is not None:
            kw["device_map"] = device
        else:
            from ..io.console import console

            console().print("[yellow]loading the weights on the host, then moving them to the GPU: install accelerate "
                            "(pip install \"needleprobe\\[gpu]\") to read them straight onto the GPU")
    return kw


def load_model(cfg: ModelConfig, dtype: str, device: torch.device):
    """The base model (``AutoModel``: no LM head is ever built or run), on ``device`` in ``dtype``, eval mode."""
    from transformers import AutoModel

    where = model_location(cfg)
    try:
        model = AutoModel.from_pretrained(where, revision=cfg.revision, **placement(dtype, device))
    except (OSError, ValueError) as e:
        raise _load_error(cfg, "model", e) from None
    return model.to(device).eval()  # a no-op where device_map placed it


def check_layers(layers: list[int], n_layers: int, model_name: str) -> None:
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise NeedleprobeError(
            f"probe.layers_to_probe: layer(s) {bad} out of range: {model_name} has {n_layers} blocks (valid 0..{n_layers - 1})"
        )


def check_positions(tdocs: list[TokenizedDoc], limit: int | None, cfg: Config, data_path) -> None:
    """Refuse documents longer than the model's position table before any forward (it would fail mid-run)."""
    if limit is None or cfg.model.max_length <= limit:
        return
    long = [td for td in tdocs if td.n_tokens > limit]
    if long:
        td = max(long, key=lambda t: t.n_tokens)
        raise NeedleprobeError(
            f"model.max_length {cfg.model.max_length} is more than the {limit} positions of {cfg.model.name}, and document "
            f"{td.doc.doc_id!r} ({data_path}:{td.doc.line}) has {td.n_tokens} tokens: set model.max_length to {limit} or "
            "less (longer documents are then truncated, and what is lost is reported)"
        )


def model_shape(cfg: Config) -> tuple[int | None, int | None, int | None]:
    """(block count, d_model, position limit) from the model config, read before loading any weights; None where unknown."""
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(model_location(cfg.model), revision=cfg.model.revision)
    except (OSError, ValueError):
        return None, None, None  # load_model reports the problem with full context
    text = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None), (int(limit) if limit else None)


def _load_error(cfg: ModelConfig, what: str, e: Exception) -> NeedleprobeError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    hint = (
        "it is not in the local HF cache and HF_HUB_OFFLINE is set"
        if offline
        else "not a local directory, and the hub could not provide it (network, auth, or a wrong name)"
    )
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return NeedleprobeError(f"model.name {cfg.name!r}: cannot load the {what}: {hint} ({first[:200]})")


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks, found generically.

    ``get_decoder()`` covers decoder families (Gemma-3 multimodal returns its
    language model); the attribute paths cover GPT-2, NeoX and BERT.  As a last
    resort, a single ``ModuleList`` whose length is the configured layer count.
    """
    roots = []
    if hasattr(model, "get_decoder"):
        try:
            dec = model.get_decoder()
        except Exception:  # some models raise NotImplementedError
            dec = None
        if dec is not None:
            roots.append(dec)
    roots.append(model)
    for root in roots:
        for path in _BLOCK_PATHS:
            blocks = _get_path(root, path)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
                return blocks
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    n = getattr(text_cfg, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    matching = [m for _, m in lists if n is not None and len(m) == n]
    if len(matching) == 1:
        return matching[0]
    found = ", ".join(f"{name}[{len(m)}]" for name, m in lists) or "no ModuleList at all"
    raise NeedleprobeError(
        f"cannot find the transformer blocks of {type(model).__name__} "
        f"(num_hidden_layers={n}; module lists found: {found})"
    )


class _StopForward(Exception):
    """Raised by the hook of the highest probed block to end the forward pass."""


def run_forward(model, cap, inputs: dict[str, torch.Tensor]) -> dict:
    """One forward inside ``sites.capture_sites``: (site, layer) → activations."""
    cap.outputs.clear()
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass
    missing = [k for k in cap.expected if k not in cap.outputs]
    if missing:  # a hooked module never ran: a layout that does not match the model
        raise RuntimeError(f"the forward did not reach the hooks of {missing}")
    return dict(cap.outputs)


@functools.lru_cache(maxsize=None)
def _forward_params(model_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_type.forward).parameters)


def model_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs for a right-padded batch.

    Explicit ``position_ids`` (0..len-1 per row) keep absolute-position models
    (GPT-2) correct; right padding then leaves every real position identical to
    an unpadded run.  Models whose forward takes no ``position_ids`` (BERT's
    default is the same arange) get none.
    """
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    params = _forward_params(type(model))
    if "position_ids" in params:
        inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros_like(input_ids)
    return inputs
