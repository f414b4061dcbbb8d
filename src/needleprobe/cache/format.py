"""The activation cache: one Zarr v3 group per (dataset, model, site).

Layout (a contract read by fit, the monitor and notebooks)::

    {cache_dir}/{name}_{version}/{model_slug}/{activation_site}/   zarr group, attrs: metadata, fingerprint,
                                                                   needleprobe_cache_format (below)
        train/ val/                                                split groups, attrs: counts, commit state
            layer_{L}     [N, d_model]  float32 | float16 | uint16 (bfloat16 bits)
            labels        [N] int8      1 = needle token, 0 = sampled negative
            doc_index     [N] int32     row of the split's doc table
            token_index   [N] int32     position in the model input (BOS included)
            token_id      [N] int32
            char_start, char_end [N] int32  the token's characters in its document's text (caches since offsets were
                                          stored; ``SplitView.char_start`` names older ones)
            doc_ids       [D] str       the split's doc table (file order)
            doc_n_tokens  [D] int32     model input length after truncation
            doc_n_needles [D] int32     needle spans in the document
        shard-{r}-of-{W}/train/ shard-{r}-of-{W}/val/              instead of train/ val/ when W processes wrote it
                                                                   (``torchrun``, root attr world_size = W): the same
                                                                   arrays, rank r's rows only (attr ``shard``), doc
                                                                   table and stats of the whole split

Format 2 (``CACHE_FORMAT``): every chunk of every array ends in a crc32c
checksum (Zarr's ``crc32c`` codec, after zstd for the small arrays) and every
chunk is stored, even one equal to the fill value.  So a chunk whose bytes
changed, that was emptied or whose file is gone is *damage*, and every read
through this module (:func:`read_rows`) names it (array, chunk, rows) as a
one-line :class:`CacheDamaged`; :func:`verify_chunks` reads them all
(``needleprobe inspect --verify``) and ``needleprobe extract --repair``
rewrites only the damaged chunks.  Format 1 (before checksums) has the same
rows and stays readable; there only a chunk that cannot be decoded or a missing
activation chunk is found.

An extract that fails with an exception records it in the root's (or, under
``torchrun``, the shard group's) attrs as ``last_extract_failure`` (error and
time), so an incomplete cache says "the last extract failed with …" rather
than "interrupted"; the next extract clears it.

Rows are known before the model runs (labels depend only on tokens), so every
array is created at its final shape and the layer arrays are filled in whole
chunks.  ``committed_rows`` advances only after the chunk data is written (and
never past a chunk whose write failed): a killed run resumes from it and
rewrites the same bytes, so nothing past the counter is ever trusted.

A sharded cache (see :mod:`needleprobe.extract.sharding`) reads exactly like an
unsharded one: :meth:`Cache.split` concatenates the shards in rank order, which
is the single-process row order.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import Config
from ..data.documents import Document
from ..errors import NeedleprobeError

if TYPE_CHECKING:
    from .reader import Cache


CACHE_FORMAT = 2
"""The storage format this code writes (root attr ``needleprobe_cache_format``, also a fingerprint field).

1: chunks without checksums.  2: a crc32c checksum ends every chunk, and every chunk is stored.
"""
SAME_ROWS_FORMATS = (1, 2)
"""Formats that hold exactly the rows this code writes: read, resumed and repaired as they are, never "stale".
A code change that alters cached values (padding, labelling) bumps ``CACHE_FORMAT`` and restarts this tuple
at the new number, so older caches read as stale."""
FAILURE_ATTR = "last_extract_failure"
TARGET_CHUNK_BYTES = 4 << 20
STORAGE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}


_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Crash-test hook: ``NEEDLEPROBE_FAULT=name:k`` SIGKILLs this process at the k-th pass here.

    The resume tests use it to kill an extract at exact moments (mid-flush,
    between splits); unset, it costs one dictionary lookup per chunk.
    """
    spec = os.environ.get("NEEDLEPROBE_FAULT")
    if not spec:
        return
    only = os.environ.get("NEEDLEPROBE_FAULT_RANK")  # under torchrun: kill just this rank
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    point, _, k = spec.partition(":")
    if point == name:
        _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
        if _FAULT_HITS[name] == int(k or 1):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def cache_path(cfg: Config) -> Path:
    """Where this config's cache lives (``layout.Layout.cache``)."""
    from ..run.layout import Layout

    return Layout.from_config(cfg).cache


FIT_SPLITS = ("train", "val")
"""The splits a cache holds (``test`` is for the monitor and never cached)."""


def doc_digest(doc: Document) -> str:
    """What makes a document's rows: its id, text and needle spans (not its line or extra metadata)."""
    key = json.dumps([doc.doc_id, doc.text, [list(s) for s in doc.needle_spans]], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def documents_digest(docs: list[Document]) -> str:
    """One digest for a list of documents, in order (what a split's rows are made from)."""
    return hashlib.sha256("".join(doc_digest(d) for d in docs).encode()).hexdigest()[:16]


def split_documents(cfg: Config, docs: list[Document]) -> dict[str, list[Document]]:
    """The documents each cached split draws from: the split's documents in file order, after ``max_*_docs``.

    (``max_*_tokens`` keeps a prefix of these; which one depends on the tokenizer, so
    a change anywhere in this list counts, a conservative choice.)
    """
    out = {}
    for name in FIT_SPLITS:
        split = [d for d in docs if d.split == name]
        cap = getattr(cfg.probe, f"max_{name}_docs")
        out[name] = split[:cap] if cap is not None else split
    return out


def fingerprint_fields(cfg: Config, docs: list[Document]) -> dict[str, Any]:
    """Everything that determines the cached rows, and nothing else.

    Training settings (L2 grid, seeds, solver, balance) are absent on purpose:
    changing them must never invalidate a cache.  The dataset counts through
    the documents of each cached split (``documents``), so editing a test
    document, or a line's ``metadata``, leaves the cache valid.
    """
    from ..model.checkpoints import fingerprint_fields as model_fields

    p, m = cfg.probe, cfg.model
    by_split = split_documents(cfg, docs)
    return {
        "cache_format": CACHE_FORMAT,
        "documents": {name: documents_digest(split) for name, split in by_split.items()},
        "dataset": cfg.dataset.key,
        "model_name": m.name,
        "model_revision": m.revision,
        "tokenizer": f"{m.name}@{m.revision or 'default'}",
        "model_dtype": p.model_dtype,
        "max_length": m.max_length,
        "chat_template": m.chat_template,
        "activation_site": p.activation_site,
        "layers": sorted(p.layers_to_probe),
        "negatives_per_doc": p.negatives_per_doc,
        "sampling_seed": p.sampling_seed,
        "max_train_docs": p.max_train_docs,
        "max_val_docs": p.max_val_docs,
        "max_train_tokens": p.max_train_tokens,
        "max_val_tokens": p.max_val_tokens,
        "feature_dtype": p.feature_dtype,
        **model_fields(m),  # a GGUF file's digest
    }


def wanted_fields(cfg: Config, docs: list[Document], cached: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields this config and dataset give, in the style of ``cached``.

    Caches written before per-split digests record the whole file's sha256 and
    ``val_fraction`` instead of ``documents``; they are compared that way.
    """
    fields = fingerprint_fields(cfg, docs)
    if cached is not None and "dataset_sha256" in cached and "documents" not in cached:
        from ..data.documents import file_sha256

        del fields["documents"]
        fields["dataset_sha256"] = file_sha256(cfg.dataset.resolved_path())
        fields["val_fraction"] = cfg.dataset.val_fraction
    return fields


def stale_reasons(cache: "Cache", cfg: Config, docs: list[Document]) -> list[str]:
    """Why a cache does not hold this config's rows, one item per reason; changed documents by name."""
    wanted = wanted_fields(cfg, docs, cache.fields)
    diff = [d for d in changed_fields(cache.fields, wanted) if not d.startswith("documents:")]
    a, b = cache.fields.get("documents"), wanted.get("documents")
    if a is not None and b is not None and a != b:
        diff[:0] = _document_changes(cache, split_documents(cfg, docs), [s for s in FIT_SPLITS if a.get(s) != b.get(s)])
    return diff


def _document_changes(cache: "Cache", by_split: dict[str, list[Document]], splits: list[str]) -> list[str]:
    """For each changed split: which documents were edited, added or removed (from the digests the cache stores)."""
    out = []
    for name in splits:
        docs = by_split[name]
        try:
            view = cache.split(name) if name in cache.splits else None
            stored = dict(zip(view.doc_ids, view.doc_digests)) if view is not None else None
        except (KeyError, NeedleprobeError):
            stored = None
        if not stored:
            out.append(f"{name}: documents changed")
            continue
        now = {d.doc_id: d for d in docs}
        edited = [d for d in docs if d.doc_id in stored and stored[d.doc_id] != doc_digest(d)]
        added = [d for d in docs if d.doc_id not in stored]
        removed = [i for i in stored if i not in now]
        parts = []
        for what, items in (("edited", [f"{d.doc_id!r} (line {d.line})" for d in edited]),
                            ("added", [f"{d.doc_id!r} (line {d.line})" for d in added]),
                            ("removed", [repr(i) for i in removed])):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
        if not parts:  # only documents the token caps left out changed (they decide where the cap falls)
            parts.append("documents after the cached ones changed (they count for max_" + name + "_tokens)")
        out.append(f"{name} documents changed: {'; '.join(parts)}")
    return out


def fingerprint(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def changed_fields(cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Fields whose change would alter the rows; asking for a subset of cached layers is no change,
    nor is another storage format with the same rows (``SAME_ROWS_FORMATS``)."""
    out = []
    for k in sorted(set(cached) | set(wanted)):
        a, b = cached.get(k), wanted.get(k)
        if k == "layers" and a is not None and b is not None and set(b) <= set(a):
            continue
        if k == "cache_format" and a in SAME_ROWS_FORMATS and b in SAME_ROWS_FORMATS:
            continue
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def chunk_rows_for(d_model: int, feature_dtype: str) -> int:
    """Rows per chunk: a power of two near 4 MiB of full-width rows (fast to read whole).

    ``NEEDLEPROBE_CHUNK_ROWS`` overrides it (tests use small chunks to get many of them).
    """
    if os.environ.get("NEEDLEPROBE_CHUNK_ROWS"):
        return int(os.environ["NEEDLEPROBE_CHUNK_ROWS"])
    rows = max(1, TARGET_CHUNK_BYTES // (d_model * BYTES_PER_VALUE[feature_dtype]))
    return max(64, 1 << (rows.bit_length() - 1))


def to_float32(raw: np.ndarray, feature_dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values → float32; bfloat16 bits are widened exactly. ``out``: a float32 array to fill instead of a new
    one (streamed fits convert into buffers they reuse)."""
    if out is not None:
        if feature_dtype == "bfloat16":
            np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(out, raw)
        return out
    if feature_dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)
