"""Activation sites inside a block, read with forward hooks in one forward pass.

Names follow TransformerLens (``blocks.{L}.hook_{site}``); per block L and
token position:

- ``resid_pre``: the block's input (``output_hidden_states[L]``).
- ``attn_out``: what the attention sublayer adds to the stream (after the
  output projection and, in Gemma 2/3, after the post-attention norm).
- ``resid_mid``: the stream between the two sublayers, ``resid_pre + attn_out``.
- ``mlp_out``: what the MLP sublayer adds (after Gemma's post-feedforward norm).
- ``resid_post``: the block's output (``resid_mid + mlp_out``).

Each site is a tensor the model itself computes, a module's output (forward
hook) or first input (forward pre-hook); no site is recomputed.  Which module
holds it is a table keyed by the block's class name (:data:`LAYOUTS`), not a
guess from attribute names, which mislead: ``post_attention_layernorm`` is the
MLP's input norm in Llama but normalises the attention output in Gemma and
OLMo-2.  A block class outside the table has only ``resid_pre`` and
``resid_post`` (its input and output).

Refused, with one line saying why:

- ``resid_mid`` of a GPT-NeoX block with ``use_parallel_residual``: attention
  and MLP both read ``resid_pre``; ``resid_post = resid_pre + attn_out + mlp_out``.
- ``attn_out`` and ``mlp_out`` of BERT (post-LN): the sublayer's output is
  LayerNorm'd together with the stream, so no vector is "added" to it.
  BERT's ``resid_mid`` is supported: it is ``BertAttention``'s output, the
  LayerNorm'd stream that the MLP reads and that its residual add carries,
  the same kind of tensor as BERT's ``resid_pre`` and ``resid_post`` (the
  block's input and output).  TransformerLens' ``HookedEncoder`` names the
  pre-LN sums ``hook_resid_mid``/``hook_resid_post`` instead; ours are its
  ``ln1.hook_normalized`` and ``hook_normalized_resid_post``.
"""

from __future__ import annotations

import contextlib
import numbers
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

import torch

from ..errors import NeedleprobeError
from ..model.hooks import _StopForward, find_blocks

from ..config import SITES  # noqa: E402  (every site name, TransformerLens' ``hook_{site}`` without the prefix)

# The order in which a forward reaches the sites of one block (in every layout
# below); the early stop raises after the last requested one.
_EXECUTION_ORDER = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


@dataclass(frozen=True)
class Tap:
    """Where a site is read: ``module`` (a path under the block, "" for the block) and which tensor."""

    module: str
    tensor: Literal["input", "output"]
    """``input``: the first tensor argument (pre-hook); ``output``: the output, its first element if a tuple."""


_BLOCK_IO = {"resid_pre": Tap("", "input"), "resid_post": Tap("", "output")}

_PRE_NORM = {  # Llama, Qwen2/3, Mistral: post_attention_layernorm is the MLP's input norm
    "attn_out": Tap("self_attn", "output"),
    "resid_mid": Tap("post_attention_layernorm", "input"),
    "mlp_out": Tap("mlp", "output"),
}
_SANDWICH = {  # Gemma 2/3: each sublayer's output is normed before the residual add
    "attn_out": Tap("post_attention_layernorm", "output"),
    "resid_mid": Tap("pre_feedforward_layernorm", "input"),
    "mlp_out": Tap("post_feedforward_layernorm", "output"),
}
_GPT2 = {"attn_out": Tap("attn", "output"), "resid_mid": Tap("ln_2", "input"), "mlp_out": Tap("mlp", "output")}
_NEOX = {  # the dropouts' outputs are the tensors added to the stream
    "attn_out": Tap("post_attention_dropout", "output"),
    "resid_mid": Tap("post_attention_layernorm", "input"),
    "mlp_out": Tap("post_mlp_dropout", "output"),
}
# Refusals are the rest of a line that starts "{site} is not defined for {block class}".
_NEOX_PARALLEL = {
    **_NEOX,
    "resid_mid": " with use_parallel_residual: attention and MLP both read resid_pre and are added together, "
    "so no stream lies between them (resid_post = resid_pre + attn_out + mlp_out)",
}
_POST_LN = {  # BERT: resid_mid is BertAttention's output, LayerNorm(resid_pre + dense(attention))
    "resid_mid": Tap("attention", "output"),
    "attn_out": ", a post-LN block: the attention output is LayerNorm'd together with the stream, "
    "so no vector is what attention adds to it (resid_mid != resid_pre + attn_out)",
    "mlp_out": ", a post-LN block: the MLP output is LayerNorm'd together with the stream, "
    "so no vector is what the MLP adds to it (resid_post != resid_mid + mlp_out)",
}

LAYOUTS: dict[str, dict[str, Tap | str]] = {
    "LlamaDecoderLayer": _PRE_NORM,
    "MistralDecoderLayer": _PRE_NORM,
    "Qwen2DecoderLayer": _PRE_NORM,
    "Qwen3DecoderLayer": _PRE_NORM,
    "Gemma2DecoderLayer": _SANDWICH,
    "Gemma3DecoderLayer": _SANDWICH,
    "GPT2Block": _GPT2,
    "GPTNeoXLayer": _NEOX,
    "BertLayer": _POST_LN,
}
"""Block class name → site → :class:`Tap`, or why the site does not exist there."""


def block_sites(block: torch.nn.Module) -> dict[str, Tap | str]:
    """Site → where ``block`` holds it, or the one-line reason it does not (for every name in :data:`SITES`)."""
    name = type(block).__name__
    layout = LAYOUTS.get(name)
    if name == "GPTNeoXLayer" and getattr(block, "use_parallel_residual", False):
        layout = _NEOX_PARALLEL
    if layout is None:
        known = ", ".join(sorted(LAYOUTS))
        layout = dict.fromkeys(SITES, f": needleprobe does not know where its sublayers write (known blocks: {known})")
    out = {}
    for site in SITES:
        where = _BLOCK_IO.get(site) or layout[site]
        out[site] = where if isinstance(where, Tap) else f"{site} is not defined for {name}{where}"
    return out


def _blocks_of(model_or_blocks) -> torch.nn.ModuleList:
    return model_or_blocks if isinstance(model_or_blocks, torch.nn.ModuleList) else find_blocks(model_or_blocks)


def site_support(model_or_blocks) -> dict[str, str | None]:
    """Site → ``None`` where every block of the model has it, else the one-line reason it is refused."""
    blocks = _blocks_of(model_or_blocks)
    support: dict[str, str | None] = dict.fromkeys(SITES)
    for block in blocks:
        for site, where in block_sites(block).items():
            if isinstance(where, str) and support[site] is None:
                support[site] = where
    return support


def parse_hook_name(name: str) -> tuple[str, int]:
    """``blocks.3.hook_resid_mid`` → ``("resid_mid", 3)``, for users who think in TransformerLens names."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", name.strip())
    if not m or m.group(2) not in SITES:
        raise NeedleprobeError(f"{name!r} is not a site name like 'blocks.3.hook_resid_mid' (sites: {', '.join(SITES)})")
    return m.group(2), int(m.group(1))


def check_requests(model_or_blocks, requests: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """Validate (site, layer) pairs against a model; returns them in the order a forward reaches them.

    Unknown site names, duplicates, layers out of range and sites the block
    does not have are each a :class:`NeedleprobeError` of one line.
    """
    blocks = _blocks_of(model_or_blocks)
    n = len(blocks)
    seen: set[tuple[str, int]] = set()
    for req in requests:
        if not (isinstance(req, tuple) and len(req) == 2):
            raise NeedleprobeError(f"a site request is a (site, layer) pair, not {req!r}")
        site, layer = req
        if site not in SITES:
            raise NeedleprobeError(f"unknown activation site {site!r} (sites: {', '.join(SITES)})")
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < n:
            raise NeedleprobeError(f"{site} at layer {layer!r}: the model has {n} blocks (valid 0..{n - 1})")
        req = (site, layer := int(layer))
        if req in seen:
            raise NeedleprobeError(f"{site} at layer {layer} is requested twice")
        seen.add(req)
        here = block_sites(blocks[layer])
        if isinstance(here[site], str):
            has = ", ".join(s for s in SITES if isinstance(here[s], Tap))
            raise NeedleprobeError(f"blocks.{layer}.hook_{site}: {here[site]} (sites of this block: {has})")
    if not seen:
        raise NeedleprobeError("no activation site requested")
    return tuple(sorted(seen, key=lambda r: (r[1], _EXECUTION_ORDER.index(r[0]))))


@dataclass
class SiteCapture:
    requests: tuple[tuple[str, int], ...]
    """The (site, layer) pairs hooked, in the order a forward reaches them."""
    outputs: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    """(site, layer) → [batch, seq, d_model] activations of the last forward, detached."""

    @property
    def expected(self) -> tuple[tuple[str, int], ...]:
        return self.requests


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def capture_sites(
    blocks: torch.nn.ModuleList, requests: Iterable[tuple[str, int]], stop_early: bool = True
) -> Iterator[SiteCapture]:
    """Hook every requested (site, layer); use with :func:`needleprobe.model.hooks.run_forward`.

    All sites come from one forward.  With ``stop_early`` the forward ends
    right after the last requested tensor is computed (no later module runs).
    Hooks live only inside the ``with``.
    """
    cap = SiteCapture(check_requests(blocks, requests))
    last = cap.requests[-1]
    handles = []

    def store(key: tuple[str, int], t: torch.Tensor) -> None:
        cap.outputs[key] = t.detach()
        if stop_early and key == last:
            raise _StopForward

    def make_hook(key: tuple[str, int], tensor: str):
        if tensor == "input":
            return lambda module, args, kwargs: store(key, _first_tensor(args, kwargs))
        return lambda module, args, output: store(key, output[0] if isinstance(output, tuple) else output)

    try:
        for site, layer in cap.requests:
            tap = block_sites(blocks[layer])[site]
            try:
                mod = blocks[layer].get_submodule(tap.module)
            except AttributeError:
                raise NeedleprobeError(
                    f"blocks.{layer}.hook_{site}: {type(blocks[layer]).__name__} has no submodule {tap.module!r} "
                    "(a transformers version needleprobe does not know?)"
                ) from None
            hook = make_hook((site, layer), tap.tensor)
            if tap.tensor == "input":
                handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(hook))
        yield cap
    finally:
        for h in handles:
            h.remove()


def check_model_sites(cfg, requests: Iterable[tuple[str, int]]) -> None:
    """Check (site, layer) requests against the model's block classes before any weight is loaded.

    The model is built on the meta device from its config (no weights, no
    memory), so an unsupported site/family pair is one line before anything is
    written.  Skipped, silently, when the config cannot be read here (loading
    the model reports that problem with full context).
    """
    requests = list(requests)
    if all(site == "resid_post" for site, _ in requests):
        return  # every block has an output
    from transformers import AutoConfig, AutoModel

    from ..model.hooks import model_location

    try:
        mc = AutoConfig.from_pretrained(model_location(cfg.model), revision=cfg.model.revision)
        with torch.device("meta"):
            model = AutoModel.from_config(mc)
    except (OSError, ValueError):
        return
    check_requests(model, requests)
