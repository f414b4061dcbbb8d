"""A monitor bundle: a directory a user can publish, and that loads with nothing else of the run.

::

    model.safetensors   weight float32 [d_model], bias float32 [1]: logit = activation @ weight + bias on raw
                        activations (the standardisation the fit used is folded in)
    monitor.json        the card: model (name, revision, GGUF digest, architecture), site, layer, chat template,
                        max_length, aggregation and its parameters, thresholds per FPR with their calibration,
                        metrics, dataset name and digest, needleprobe version, the weights' sha256
    README.md           a model card in Hugging Face's format (YAML header: library_name, base_model, tags)

No pickle anywhere: safetensors and JSON only.  ``Monitor.load(directory)`` reads it; a missing or altered file is
one line naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NeedleprobeError

CARD = "monitor.json"
WEIGHTS = "model.safetensors"
README = "README.md"
FORMAT = "needleprobe-monitor"
FORMAT_VERSION = 1
HUB_NAMES = {"embedded:SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
             "embedded:all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
"""The hub models the packaged ones are (the model card's ``base_model`` names a hub model)."""


def card_of(monitor) -> dict[str, Any]:
    """The ``monitor.json`` of a monitor (without the weights' digest, added once they are written)."""
    from .. import __version__
    from ..model.checkpoints import fingerprint_fields
    from .monitor import expected_architecture

    m = monitor.model
    chat = None
    if m.chat_template:
        chat = getattr(monitor.tokenizer(), "chat_template", None)
    arch = monitor.architecture or expected_architecture(m)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "needleprobe_version": __version__,
        "model": {"name": m.name, "revision": m.revision, "gguf_file": m.gguf_file,
                  "gguf_sha256": fingerprint_fields(m).get("gguf_sha256"), "dtype": monitor.model_dtype,
                  "architecture": arch},
        "site": monitor.site, "layer": monitor.layer, "seed": monitor.seed, "d_model": int(monitor.weight.size),
        "hook_name": f"blocks.{monitor.layer}.hook_{monitor.site}",
        "chat_template": bool(m.chat_template), "chat_template_text": chat, "max_length": m.max_length,
        "aggregation": {"name": monitor.aggregation, "label": monitor.label, "top_k": monitor.params.top_k,
                        "window": monitor.params.window, "temperature": monitor.params.temperature},
        "fpr": monitor.fpr,
        "threshold": monitor.threshold,
        "thresholds": monitor.thresholds,
        "batching": {"doc_batch_size": monitor.doc_batch_size, "max_batch_tokens": monitor.max_batch_tokens},
        "weights": {"file": WEIGHTS, "applies_to": "raw activations: logit = x @ weight + bias"},
        **{k: v for k, v in monitor.card.items() if k in ("metrics", "dataset", "probe_sha256")},
    }


def export_bundle(monitor, out, overwrite: bool = False) -> Path:
    """Write ``monitor``'s bundle to the directory ``out`` (built beside it and renamed: never half-written)."""
    import torch
    from safetensors.torch import save_file

    from ..data.documents import file_sha256

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NeedleprobeError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / CARD).is_file():
        raise NeedleprobeError(f"{out}: a directory with other files; export into a new or empty directory")
    if (out / CARD).is_file() and not overwrite:
        raise NeedleprobeError(f"{out}: holds a monitor bundle already (--overwrite replaces it)")
    card = card_of(monitor)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({"weight": torch.from_numpy(np.ascontiguousarray(monitor.weight, np.float32)),
                   "bias": torch.tensor([monitor.bias], dtype=torch.float32)}, str(tmp / WEIGHTS),
                  metadata={"format": FORMAT, "site": monitor.site, "layer": str(monitor.layer)})
        card["weights"]["sha256"] = file_sha256(tmp / WEIGHTS)
        (tmp / CARD).write_text(json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n")
        (tmp / README).write_text(model_card(card))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_card(card: dict[str, Any]) -> str:
    """README.md with Hugging Face's YAML header."""
    m, agg = card["model"], card["aggregation"]
    base = HUB_NAMES.get(m["name"], m["name"])
    thr = card["thresholds"][agg["name"]]
    rows = "\n".join(
        f"| {'just above the highest clean document' if k == 'above_clean' else f'{float(k):.0%}'} | "
        f"{v['threshold']:.4f} | {v['n_clean_above']} of {v['n_clean']} ({v['calibration_split']}) | "
        f"{v['fpr_upper95']:.1%} |"
        for k, v in thr.items() if v.get("threshold") is not None)
    docs = {k: v for k, v in (card.get("metrics") or {}).items() if k.startswith("documents_")}
    metrics = "\n".join(f"- {k.removeprefix('documents_')}: document AUROC {v.get('auroc'):.3f} "
                        f"({v.get('auroc_ci_low'):.3f}–{v.get('auroc_ci_high'):.3f}), {v.get('n_docs')} documents"
                        for k, v in docs.items() if v.get("auroc") is not None) or "- (no document metrics recorded)"
    ds = card.get("dataset") or {}
    return f"""---
library_name: needleprobe
base_model: {base}
tags:
- needleprobe
- linear-probe
- monitor
- prompt-injection
---

# needleprobe monitor: {base}, {card['hook_name']}

A linear probe on the residual stream of `{m['name']}`{f" (revision {m['revision']})" if m.get('revision') else ""}
at `{card['hook_name']}`, with a document aggregation (`{agg['label']}`) and thresholds calibrated on needle-free
documents. It scores each token of a text; a document (or a generation) is flagged when the aggregate of its token
scores is above the threshold.

- weights: `{WEIGHTS}` (safetensors): `logit = activation @ weight + bias` on raw activations ({card['d_model']}
  features, model dtype {m['dtype']})
- chat template: {'on (each document is a user turn)' if card['chat_template'] else 'off'}; max_length {card['max_length']}
- dataset: {ds.get('name')} (sha256 {str(ds.get('documents_sha256'))[:16]}…)
- needleprobe {card['needleprobe_version']}

## Thresholds ({agg['label']})

| target FPR | threshold | clean calibration documents above it | FPR upper bound (95%) |
|---|---|---|---|
{rows}

## Metrics

{metrics}

## How to load

```python
from needleprobe import Monitor

monitor = Monitor.load("path/to/this/directory")        # fpr=0.05 by default
for doc in monitor.score(["some text", "another text"]):
    print(doc.doc_id, doc.score, doc.flagged)
```

or from the command line: `needleprobe scan --config path/to/this/directory docs.jsonl`.
The model itself is loaded from its name (`{m['name']}`); the bundle holds the probe only.
"""


def load_bundle(path: Path, *, layer=None, seed=None, aggregation=None, fpr: float = 0.05):
    """A :class:`Monitor` from a bundle directory."""
    from safetensors import safe_open

    from ..config import ModelConfig, MonitorConfig
    from ..data.documents import file_sha256
    from .monitor import Monitor, method_of

    for name in (CARD, WEIGHTS):
        if not (path / name).is_file():
            raise NeedleprobeError(f"{path / name}: missing from the monitor bundle (export it again)")
    try:
        card = json.loads((path / CARD).read_text())
    except (OSError, ValueError) as e:
        raise NeedleprobeError(f"{path / CARD}: not valid JSON ({e})") from None
    if card.get("format") != FORMAT:
        raise NeedleprobeError(f"{path / CARD}: not a needleprobe monitor card (format {card.get('format')!r})")
    want = (card.get("weights") or {}).get("sha256")
    if want and file_sha256(path / WEIGHTS) != want:
        raise NeedleprobeError(f"{path / WEIGHTS}: its sha256 is not the one {CARD} records (altered or damaged)")
    for key, given in (("layer", layer), ("seed", seed)):
        if given is not None and int(given) != card[key]:
            raise NeedleprobeError(f"{path}: the bundle holds the probe of {key} {card[key]}, not {given}")
    try:
        with safe_open(str(path / WEIGHTS), framework="np") as st:
            weight, bias = st.get_tensor("weight"), st.get_tensor("bias")
    except Exception as e:  # a truncated or foreign file
        raise NeedleprobeError(f"{path / WEIGHTS}: not a monitor's weights ({type(e).__name__}: {str(e)[:120]})") from None
    m, agg = card["model"], card["aggregation"]
    method = method_of(aggregation or agg["name"])
    if method not in card["thresholds"]:
        raise NeedleprobeError(f"{path / CARD}: no thresholds for {method}")
    model = ModelConfig(name=m["name"], revision=m.get("revision"), gguf_file=m.get("gguf_file"),
                        max_length=int(card["max_length"]), chat_template=bool(card["chat_template"]))
    mon = Monitor(model=model, model_dtype=m["dtype"], site=card["site"], layer=int(card["layer"]),
                  seed=int(card["seed"]), weight=np.asarray(weight, np.float32).reshape(-1),
                  bias=float(np.asarray(bias).reshape(-1)[0]), aggregation=method,
                  params=MonitorConfig(top_k=agg["top_k"], window=agg["window"], temperature=agg["temperature"]),
                  fpr=float(fpr), thresholds=card["thresholds"], architecture=m.get("architecture") or {},
                  doc_batch_size=(card.get("batching") or {}).get("doc_batch_size"),
                  max_batch_tokens=(card.get("batching") or {}).get("max_batch_tokens"),
                  card={k: card.get(k) for k in ("metrics", "dataset", "probe_sha256")}, source=str(path))
    mon.threshold  # noqa: B018  (an FPR the bundle has no threshold for: one line now)
    return mon
