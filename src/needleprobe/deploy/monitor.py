"""A trained probe as a monitor in your own process: load it, score documents, watch generation.

``Monitor.load`` takes what ``needleprobe monitor`` decided (the probe, the aggregation it recommended) and the
threshold it would set at a false-positive rate on the calibration split's clean documents, from a config, a run
directory, or an exported bundle (:mod:`.bundle`, which needs neither the run nor the dataset).  ``score`` runs the
model exactly as ``extract`` and ``monitor`` do (the same tokenisation, chat template, truncation, bucketed
batches and hooks: :func:`needleprobe.extract.runner.forwarding`), so a document's score is the one ``monitor`` stored for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import Config, ModelConfig, MonitorConfig
from ..errors import NeedleprobeError

FPRS = (0.01, 0.05, 0.0)
"""False-positive rates a monitor keeps thresholds for (0: just above the highest clean calibration document)."""
N_TOP = 5
"""Top tokens reported per document."""
EMBEDDING_ROWS = 64
"""Rows of the input embedding whose digest identifies a model's weights (cheap: read without loading the model)."""
_EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def method_of(aggregation: str) -> str:
    """``topk_mean(k=5)`` → ``topk_mean`` (the CSV's labels and the plain names both work)."""
    from ..analysis.aggregation import AGGREGATIONS

    name = aggregation.split("(", 1)[0].strip()
    if name not in AGGREGATIONS:
        raise NeedleprobeError(f"aggregation {aggregation!r}: unknown (aggregations: {', '.join(AGGREGATIONS)})")
    return name


def fpr_key(fpr: float) -> str:
    return "above_clean" if fpr == 0 else f"{fpr:g}"


@dataclass
class ScoredDocument:
    """One document as the monitor sees it."""

    doc_id: str
    score: float
    flagged: bool
    """``score`` strictly above ``threshold``, as ``monitor`` counts a flag."""
    threshold: float
    aggregation: str
    layer: int
    token_logits: np.ndarray
    """float32 [n]: the probe's logit of each text token (template and special tokens are not scored)."""
    offsets: np.ndarray
    """int64 [n, 2]: each token's character span in the text ([-1, -1] for documents given as token ids)."""
    token_ids: np.ndarray
    text: str | None = None
    truncated: bool = False
    """The document was longer than ``model.max_length`` tokens and its end was not scored."""

    def top_tokens(self, n: int = N_TOP) -> list[dict[str, Any]]:
        """The ``n`` highest-scoring tokens: logit, character span and text."""
        order = np.argsort(-self.token_logits, kind="stable")[:n]
        out = []
        for i in order:
            s, e = (int(v) for v in self.offsets[i])
            out.append({"logit": float(self.token_logits[i]), "start": s, "end": e,
                        "text": self.text[s:e] if self.text is not None and s >= 0 else None})
        return out

    def to_dict(self) -> dict[str, Any]:
        """What ``needleprobe scan`` prints for the document."""
        score = self.score if np.isfinite(self.score) else None  # a document without text tokens has no score
        return {"doc_id": self.doc_id, "score": score, "threshold": self.threshold, "flagged": self.flagged,
                "aggregation": self.aggregation, "layer": self.layer, "n_tokens": int(self.token_logits.size),
                "truncated": self.truncated, "top_tokens": self.top_tokens()}


@dataclass
class Monitor:
    """A probe, an aggregation and a calibrated threshold, with the model they read (see the module docstring)."""

    model: ModelConfig
    model_dtype: str
    site: str
    layer: int
    seed: int
    weight: np.ndarray
    """float32 [d_model]: coefficients on raw activations (standardisation folded in)."""
    bias: float
    aggregation: str
    """One of ``analysis.aggregation.AGGREGATIONS``."""
    params: MonitorConfig
    """Its parameters (top_k, window, temperature)."""
    fpr: float
    thresholds: dict[str, dict[str, dict[str, Any]]]
    """aggregation → FPR key (``fpr_key``) → {threshold, calibration_split, n_clean, n_clean_above, fpr_upper95}."""
    architecture: dict[str, Any] = field(default_factory=dict)
    """What a model must have to be the one the probe read: model_type, hidden_size, num_hidden_layers, vocab_size,
    and the digest of its first input-embedding rows where it could be read cheaply."""
    device: str = "auto"
    doc_batch_size: int | None = None
    max_batch_tokens: int | None = None
    card: dict[str, Any] = field(default_factory=dict)
    """Everything else ``export`` writes into ``monitor.json`` (metrics, dataset, versions)."""
    source: str = ""
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)
    _watch: Any = field(default=None, repr=False)

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, source, *, layer: int | None = None, seed: int | None = None, aggregation: str | None = None,
             fpr: float = 0.05, run: str | None = None) -> "Monitor":
        """From a config (file or ``Config``; ``run``: one of its named runs), a run directory, or an exported bundle.

        Unset arguments take what ``needleprobe monitor`` recommended; the threshold is the one set at ``fpr`` on
        the calibration split's clean documents (``fpr=0``: just above the highest of them).
        """
        from . import bundle

        if isinstance(source, Config):
            return cls._from_config(source, run, layer, seed, aggregation, fpr)
        path = Path(source)
        if path.is_dir() and (path / bundle.CARD).is_file():
            return bundle.load_bundle(path, layer=layer, seed=seed, aggregation=aggregation, fpr=fpr)
        if path.is_dir():
            return cls._from_config(_run_dir_config(path), run, layer, seed, aggregation, fpr, run_dir=path)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            from ..config import load_config

            return cls._from_config(load_config(path), run, layer, seed, aggregation, fpr)
        raise NeedleprobeError(f"{path}: not a config, a run directory or a monitor bundle (no such file or directory)")

    @classmethod
    def _from_config(cls, cfg: Config, run: str | None, layer: int | None, seed: int | None, aggregation: str | None,
                     fpr: float, run_dir: Path | None = None) -> "Monitor":
        from ..analysis.logits import ProbeRef
        from ..analysis.run import Run
        from ..data.documents import file_sha256
        from ..run.layout import Layout
        from ..run.record import run_config

        cfg = run_config(cfg, run).single_site("a monitor")
        layout = Layout.from_config(cfg, run)
        if run_dir is not None:
            layout = dataclasses.replace(layout, run_dir=Path(run_dir))
        fitted = Run.of_layout(layout)
        how = f"needleprobe monitor --config {cfg.source or 'CONFIG'}" + (f" --run {run}" if run else "")
        stages = fitted.record().get("stages", {})
        monitored = {k.split(":", 1)[1]: v for k, v in stages.items() if k.startswith("monitor:")}
        if not monitored:
            raise NeedleprobeError(f"{layout.run_dir}: no calibrated threshold yet: run `{how}` first (it sets the "
                                   f"thresholds on the clean {cfg.monitor.calibration_split!r} documents)")
        section = monitored.get(cfg.monitor.split) or next(iter(monitored.values()))
        best = section.get("recommended") or {}
        if (layer is None or seed is None or aggregation is None) and not best:
            raise NeedleprobeError(f"{layout.run_dir}: the monitor made no recommendation (its calibration split needs "
                                   "needle and clean documents); name layer, seed and aggregation")
        layer = int(best["layer"]) if layer is None else int(layer)
        seed = int(best["seed"]) if seed is None else int(seed)
        method = method_of(aggregation or best["aggregation"])
        pt = fitted.probe_path(layer, seed)
        if not pt.is_file():
            raise NeedleprobeError(f"{pt}: probe missing (layer {layer}, seed {seed}; run `needleprobe fit`)")
        probe = fitted.probe(layer, seed)
        ref = ProbeRef(layer, seed, pt, file_sha256(pt))
        thresholds = calibration_thresholds(cfg, layout, ref, how)
        m = cls(model=cfg.model, model_dtype=cfg.probe.model_dtype, site=cfg.probe.activation_site, layer=layer,
                seed=seed, weight=probe.coef_, bias=probe.intercept_, aggregation=method,
                params=cfg.monitor, fpr=float(fpr), thresholds=thresholds, architecture={}, device=cfg.probe.device,
                doc_batch_size=cfg.probe.doc_batch_size, max_batch_tokens=cfg.probe.max_batch_tokens,
                card={"metrics": _metrics(layout, monitored, layer, seed, method, cfg.monitor, probe),
                      "dataset": {"name": cfg.dataset.key, "documents_sha256": _dataset_digest(cfg)},
                      "probe_sha256": ref.sha256},
                source=str(cfg.source or layout.run_dir))
        m.threshold  # noqa: B018  (refuses an FPR the calibration split cannot set, now rather than at scoring)
        return m

    # -- what it decides ---------------------------------------------------------------
    @property
    def calibration(self) -> dict[str, Any]:
        """The threshold at ``fpr`` for ``aggregation`` and how it was set (split, clean documents, bound)."""
        per = self.thresholds.get(self.aggregation, {})
        got = per.get(fpr_key(self.fpr))
        if got is None:
            have = ", ".join(k for k, v in per.items() if v.get("threshold") is not None) or "none"
            raise NeedleprobeError(f"no threshold at FPR {self.fpr:g} for {self.aggregation} (thresholds at: {have})")
        if got.get("threshold") is None:
            raise NeedleprobeError(f"{got.get('note')}; use fpr=0 for the threshold just above the highest clean "
                                   "calibration document")
        return got

    @property
    def threshold(self) -> float:
        return float(self.calibration["threshold"])

    @property
    def label(self) -> str:
        from ..analysis.aggregation import aggregation_label

        return aggregation_label(self.aggregation, self.params)

    def aggregate(self, logits: np.ndarray) -> float:
        from ..analysis.aggregation import aggregate

        return aggregate(logits, self.aggregation, self.params)

    def __repr__(self) -> str:
        return (f"Monitor({self.model.name}, {self.site} layer {self.layer} seed {self.seed}, {self.label}, "
                f"threshold {self.threshold:.4f} at FPR {self.fpr:g})")

    # -- the model -----------------------------------------------------------------------
    def tokenizer(self):
        if "tokenizer" not in self._loaded:
            from ..model.hooks import load_tokenizer

            self._loaded["tokenizer"] = load_tokenizer(self.model)
        return self._loaded["tokenizer"]

    def model_location(self) -> str:
        """Where ``from_pretrained`` reads the probe's model (a hub id or a local directory; a packaged or GGUF model's
        converted directory), e.g. to load it with its LM head for generation."""
        from ..model.hooks import model_location

        return model_location(self.model)

    def load_model(self):
        """The model the probe reads, loaded as ``extract`` loads it (base model, ``model_dtype``, ``device``)."""
        if "model" not in self._loaded:
            from ..io.runtime import resolve_device
            from ..model.hooks import load_model

            self._loaded["model"] = load_model(self.model, self.model_dtype, resolve_device(self.device))
        return self._loaded["model"]

    def check_model(self, model) -> None:
        """Refuse, in one line, a model that is not the one the probe was trained on (architecture, width, depth,
        vocabulary, dtype, and the digest of its first input-embedding rows where known)."""
        import torch

        from ..model.hooks import TORCH_DTYPES

        arch = self.architecture or self._expected_architecture()
        have = model_architecture(model)
        name = self.model.name
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            if arch.get(key) is not None and have.get(key) is not None and arch[key] != have[key]:
                raise NeedleprobeError(f"this model is not the one the probe was trained on ({name}): its {key} is "
                                       f"{have[key]}, the probe's model has {arch[key]}")
        if have.get("hidden_size") is not None and have["hidden_size"] != self.weight.size:
            raise NeedleprobeError(f"this model's width is {have['hidden_size']}, the probe reads {self.weight.size} "
                                   f"features (a probe of another model than {name}?)")
        dtype = next(model.parameters()).dtype
        if dtype != TORCH_DTYPES[self.model_dtype]:
            raise NeedleprobeError(f"the model is in {str(dtype).removeprefix('torch.')}, the probe was trained on "
                                   f"{self.model_dtype} activations of {name}: load it with dtype=torch.{self.model_dtype}")
        want = arch.get("embedding_sha256")
        if want:
            with torch.no_grad():
                got = embedding_digest(model.get_input_embeddings().weight[:EMBEDDING_ROWS])
            if got != want:
                raise NeedleprobeError(f"this model's weights are not those of {name}, which the probe was trained on "
                                       "(its input embeddings differ: another checkpoint or fine-tune)")

    def _expected_architecture(self) -> dict[str, Any]:
        if "architecture" not in self._loaded:
            self._loaded["architecture"] = expected_architecture(self.model)
        return self._loaded["architecture"]

    # -- scoring -------------------------------------------------------------------------
    def score(self, texts: Iterable[str | dict[str, Any]], *, model=None, tokenizer=None) -> list[ScoredDocument]:
        """Score documents: each a string, or a dict with ``text`` (and optional ``doc_id``) or ``input_ids`` (token
        ids scored as given, no chat template; special tokens are not scored).  ``model``/``tokenizer``: ones already
        loaded in this process (checked to be the probe's model); by default the monitor loads them once."""
        from ..data.tokens import tokenize_documents

        items = list(texts) if not isinstance(texts, (str, dict)) else [texts]
        if model is not None:
            self.check_model(model)
        tok = tokenizer if tokenizer is not None else self.tokenizer()
        model = model if model is not None else self.load_model()
        docs, given_ids = _documents(items)
        tdocs = tokenize_documents(tok, [d for d in docs if d.doc_id not in given_ids], self.model.max_length,
                                   self.model.chat_template)
        by_id = {td.doc.doc_id: td for td in tdocs}
        special = set(getattr(tok, "all_special_ids", []) or [])
        for d in docs:
            if d.doc_id in given_ids:
                by_id[d.doc_id] = _id_doc(d, given_ids[d.doc_id], special)
        tdocs = [by_id[d.doc_id] for d in docs]
        logits = self.token_logits(model, tdocs, pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        thr = self.threshold
        out = []
        for td, lg in zip(tdocs, logits):
            rows = np.flatnonzero(td.labelable)
            s = self.aggregate(lg)
            out.append(ScoredDocument(td.doc.doc_id, s, bool(s > thr), thr, self.label, self.layer, lg,
                                      td.offsets[rows], td.input_ids[rows], td.doc.text if td.doc.text else None,
                                      td.truncated))
        return out

    def token_logits(self, model, tdocs, pad_id: int = 0) -> list[np.ndarray]:
        """The probe's logits [n_text_tokens] per tokenized document, from ``monitor``'s batched forward."""
        import torch

        from ..extract.batching import batch_plan
        from ..analysis.logits import logit_rows
        from ..extract.runner import SplitBatches, forwarding, run_batches

        if not tdocs:
            return []
        device = next(model.parameters()).device
        rows_of = [np.flatnonzero(td.labelable).astype(np.int32) for td in tdocs]
        _, batches = batch_plan([td.n_tokens for td in tdocs], self)  # by the probe's batch settings, as extract
        w = torch.from_numpy(np.ascontiguousarray(self.weight, dtype=np.float32))[:, None].to(device)
        b = torch.tensor([self.bias], dtype=torch.float32).to(device)
        sink = _Rows()
        with forwarding(model, [(self.site, self.layer)], pad_id, device) as fwd:
            run_batches(fwd, SplitBatches("score", tdocs, rows_of, batches), sink, 0,
                        partial(logit_rows, weights=[(self.layer, w, b)]), False)
        flat = np.concatenate(sink.rows)[:, 0] if sink.rows else np.zeros(0, np.float32)
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(tdocs)
        at = 0
        for batch in batches:  # rows arrive in processing order
            for i in batch:
                n = len(rows_of[i])
                out[i] = flat[at : at + n].astype(np.float32)
                at += n
        return out

    # -- generation ----------------------------------------------------------------------
    def prompts(self, texts: Iterable[str], *, tokenizer=None) -> dict[str, Any]:
        """Prompts to generate replies to ``texts``, each wrapped as ``extract`` wraps a document (a user turn of the
        chat template, when the probe was trained with it) and followed by the template's generation prompt.
        Left-padded tensors ``input_ids``, ``attention_mask`` for ``generate``, and ``text_mask``: the texts' own
        tokens, the only prompt tokens the probe was trained on (give it to :meth:`watch`)."""
        import torch

        from ..data.documents import Document
        from ..data.tokens import tokenize_documents

        tok = tokenizer if tokenizer is not None else self.tokenizer()
        docs = [Document(f"prompt-{i}", t, (), "test", i + 1) for i, t in enumerate(texts)]
        tdocs = tokenize_documents(tok, docs, self.model.max_length, self.model.chat_template,
                                   add_generation_prompt=self.model.chat_template)
        P = max(td.n_tokens for td in tdocs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(tdocs), P), pad, dtype=torch.long)
        mask = torch.zeros((len(tdocs), P), dtype=torch.long)
        text = torch.zeros((len(tdocs), P), dtype=torch.bool)
        for b, td in enumerate(tdocs):
            ids[b, P - td.n_tokens :] = torch.from_numpy(td.input_ids)
            mask[b, P - td.n_tokens :] = 1
            text[b, P - td.n_tokens :] = torch.from_numpy(td.labelable)
        return {"input_ids": ids, "attention_mask": mask, "text_mask": text}

    def watch(self, model, *, tokenizer=None, text_mask=None):
        """A context manager: score every prompt and generated token of ``model.generate(...)`` from the forward
        passes generation runs anyway (:class:`needleprobe.deploy.watch.Watch`).  ``text_mask`` [batch, prompt
        length] (from :meth:`prompts`): the prompt tokens the aggregate counts; without it, every prompt token but
        the special ones (chat-template text such as a default system prompt then counts too)."""
        from .watch import Watch

        self.check_model(model)
        return Watch(self, model, tokenizer if tokenizer is not None else self.tokenizer(), text_mask)

    def stopping_criteria(self):
        """A ``transformers.StoppingCriteria`` that ends a sequence once its running aggregate crosses the threshold
        (use it inside :meth:`watch`; the watch says which sequences it stopped, and where)."""
        from .watch import monitor_stopping_criteria

        return monitor_stopping_criteria(self)

    def export(self, out: str | Path, overwrite: bool = False) -> Path:
        from .bundle import export_bundle

        return export_bundle(self, out, overwrite=overwrite)


class _Rows:
    def __init__(self):
        self.rows: list[np.ndarray] = []

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self.rows.append(rows["logits"])


def _documents(items: list) -> tuple[list, dict[str, np.ndarray]]:
    """``Document``s of the items (ids ``doc-{i}`` where none is given) and the token ids of those given as ids."""
    from ..data.documents import Document

    docs, ids = [], {}
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise NeedleprobeError(f"document {i}: a string or a dict with 'text' (or 'input_ids'), not "
                                   f"{type(item).__name__}")
        doc_id = str(item.get("doc_id", f"doc-{i}"))
        if "input_ids" in item:
            ids[doc_id] = np.asarray(item["input_ids"], dtype=np.int64).reshape(-1)
            docs.append(Document(doc_id, "", (), "test", i + 1))
            continue
        if not isinstance(item.get("text"), str):
            raise NeedleprobeError(f"document {i} ({doc_id}): field 'text' must be a string")
        docs.append(Document(doc_id, item["text"], (), "test", i + 1))
    if len({d.doc_id for d in docs}) != len(docs):
        raise NeedleprobeError("two documents share a doc_id")
    return docs, ids


def _id_doc(doc, ids: np.ndarray, special: set[int]):
    from ..data.tokens import TokenizedDoc

    lab = ~np.isin(ids, list(special)) if special else np.ones(ids.size, bool)
    return TokenizedDoc(doc, ids, np.full((ids.size, 2), -1, np.int64), lab, np.zeros(ids.size, bool), int(ids.size))


# -- calibration ---------------------------------------------------------------------------
def calibration_thresholds(cfg: Config, layout, ref, how: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Thresholds of every aggregation at :data:`FPRS` from the probe's stored logits on the calibration split, set
    exactly as ``monitor`` sets them (``monitor.calibrated_rates``)."""
    from ..metrics import fpr_upper_bound
    from ..analysis.aggregation import AGGREGATIONS, doc_labels, document_scores
    from ..analysis.calibration import calibrated_rates
    from ..analysis.logits import LogitStore, stored_tokens

    split = cfg.monitor.calibration_split
    cal = stored_tokens(cfg, LogitStore(layout.monitor_store), split, [ref])
    if cal is None or not cal.probes:
        raise NeedleprobeError(f"{layout.run_dir}: no calibration of layer {ref.layer} seed {ref.seed} on {split!r} "
                               f"(or the probe or documents changed since): run `{how} --layer {ref.layer} "
                               f"--seed {ref.seed}` first")
    y = doc_labels(cal)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method in AGGREGATIONS:
        s = document_scores(cal, 0, method, cfg.monitor)
        clean = s[y == 0]
        per = {}
        for fpr in FPRS:
            r = calibrated_rates(clean, s, y, fpr)
            t = r["threshold"]
            per[fpr_key(fpr)] = {
                "fpr": fpr, "threshold": None if t is None else float(t), "calibration_split": split,
                "n_clean": int(clean.size), "n_clean_above": None if t is None else int((clean > t).sum()),
                "fpr_upper95": None if t is None else fpr_upper_bound(int((clean > t).sum()), clean.size),
                "note": r["note"],
            }
        out[method] = per
    return out


def _metrics(layout, monitored: dict[str, dict], layer: int, seed: int, method: str, mon: MonitorConfig,
             probe) -> dict[str, Any]:
    """The probe's validation metrics (token level, from fit) and the monitor's document metrics per split."""
    from ..analysis.aggregation import aggregation_label
    from ..analysis.monitor import read_rows_csv

    out: dict[str, Any] = {"token_val": probe.metadata_.get("val_metrics")}
    label = aggregation_label(method, mon)
    keep = ("auroc", "auroc_ci_low", "auroc_ci_high", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "n_docs", "n_needle_docs")
    for split in monitored:
        path = layout.monitor_csv(split)
        if not path.is_file():
            continue
        for row in read_rows_csv(path):
            if (row["layer"], row["seed"], row["aggregation"]) == (layer, seed, label):
                out[f"documents_{split}"] = {k: row.get(k) for k in keep}
    return out


def _dataset_digest(cfg: Config) -> str | None:
    from ..data.documents import file_sha256

    p = cfg.dataset.resolved_path()
    return file_sha256(p) if p.is_file() else None


def _run_dir_config(path: Path) -> Config:
    """The config a run directory's probes were fitted with (their ``.json``)."""
    from ..analysis.run import Run
    from ..config import config_from_dict

    for meta in Run.at(path).metadata().values():
        if isinstance(meta.get("config"), dict):
            return config_from_dict(meta["config"], source=str(path))
    raise NeedleprobeError(f"{path}: not a run directory (no probe_layer_L_seed_S.json with its config) and not a "
                           "monitor bundle (no monitor.json)")


# -- which model ---------------------------------------------------------------------------
def model_architecture(model_or_config) -> dict[str, Any]:
    """The fields that tell one model from another without reading its weights."""
    cfg = getattr(model_or_config, "config", model_or_config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {"model_type": getattr(text, "model_type", None), "hidden_size": getattr(text, "hidden_size", None),
            "num_hidden_layers": getattr(text, "num_hidden_layers", None),
            "vocab_size": getattr(text, "vocab_size", None)}


def embedding_digest(rows) -> str:
    """sha256 of input-embedding rows as float32 (a bfloat16 file read as float32 gives the same digest)."""
    import torch

    t = rows.detach().to(torch.float32).cpu().contiguous()
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def expected_architecture(model: ModelConfig) -> dict[str, Any]:
    """:func:`model_architecture` of the configured model and, when its weights are local safetensors files, the
    digest of its first input-embedding rows (read alone, without loading the model)."""
    from transformers import AutoConfig

    from ..model.hooks import model_location

    where = model_location(model)
    try:
        arch = model_architecture(AutoConfig.from_pretrained(where, revision=model.revision))
    except (OSError, ValueError):
        return {}
    arch["embedding_sha256"] = _file_embedding_digest(Path(where)) if Path(where).is_dir() else None
    return arch


def _file_embedding_digest(where: Path) -> str | None:
    import torch
    from safetensors import safe_open

    for f in sorted(where.glob("*.safetensors")):
        with contextlib.suppress(Exception), safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith(_EMBEDDING_NAMES):
                    return embedding_digest(st.get_slice(key)[:EMBEDDING_ROWS].to(torch.float32))
    return None

