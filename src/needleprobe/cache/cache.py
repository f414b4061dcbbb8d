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

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..config import Config, load_config
from ..data.documents import Document
from ..errors import NeedleprobeError
from ..io.stores import as_path, is_url, open_group

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


# ---------------------------------------------------------------------------
# chunks: checksums, damage, verification


def array_codecs(fmt: int, compress: bool) -> dict[str, Any]:
    """``create_array`` keywords for an array of a format-``fmt`` cache (zstd for small arrays, none for activations)."""
    comp: list[Any] = [ZstdCodec(level=0, checksum=False)] if compress else []
    if fmt >= 2:
        return {"compressors": [*comp, Crc32cCodec()], "config": {"write_empty_chunks": True}}
    return {"compressors": comp or None}


def writable(arr: zarr.Array) -> zarr.Array:
    """The array set to store every chunk, one equal to the fill value too (so a missing chunk file is damage)."""
    return arr.with_config({"write_empty_chunks": True})


def checksummed(arr: zarr.Array) -> bool:
    return any(isinstance(c, Crc32cCodec) for c in arr.compressors)


def streamed(name: str) -> bool:
    """Arrays filled chunk by chunk behind a commit counter (activations, monitor logits)."""
    return name.startswith("layer_") or name == "logits"


def _must_be_stored(arr: zarr.Array) -> bool:
    """Is a missing chunk file damage?  With checksums (every chunk is stored) always; in a format-1 cache for
    activations and logits, which are never all fill value (a small array's all-zero chunk was not stored there)."""
    return checksummed(arr) or streamed(arr.path.rpartition("/")[2])


DOC_TABLE = ("doc_ids", "doc_n_tokens", "doc_n_needles")


@dataclass(frozen=True)
class ChunkDamage:
    """One damaged chunk: where it is, the rows it holds, and why it is damaged."""

    location: str
    """the array, as a path or URL"""
    group: str
    """its group inside the cache: ``train``, ``shard-1-of-2/val``"""
    name: str
    chunk: int
    start: int
    stop: int
    """rows [start, stop) of the array (entries of the doc table for doc_ids, doc_n_tokens, doc_n_needles)"""
    reason: str

    def __str__(self) -> str:
        unit = "documents" if self.name in DOC_TABLE else "rows"
        return f"{self.location} chunk {self.chunk} ({unit} {self.start}–{self.stop - 1}) is damaged ({self.reason})"

    @property
    def remedy(self) -> str:
        return "run needleprobe extract --repair"


class CacheDamaged(NeedleprobeError):
    """A read met a damaged chunk; the message names it and the remedy, on one line."""

    def __init__(self, damage: ChunkDamage):
        super().__init__(f"{damage}: {damage.remedy}")
        self.damage = damage


def array_location(arr: zarr.Array) -> str:
    """The array's path (local store) or URL (fsspec store), for messages."""
    store = arr.store
    root = getattr(store, "root", None)
    if root is not None:
        return f"{root}/{arr.path}"
    fs, base = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is not None and base is not None:
        proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        return f"{proto}://{base if proto == 'file' else base.lstrip('/')}/{arr.path}"
    return str(arr.store_path)


def _chunk_rows(arr: zarr.Array, k: int) -> tuple[int, int]:
    c = arr.chunks[0]
    return k * c, min(arr.shape[0], (k + 1) * c)


def _chunk_stored(arr: zarr.Array, k: int) -> bool:
    from zarr.core.sync import sync

    key = arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
    return bool(sync(arr.store.exists(f"{arr.path}/{key}" if arr.path else key)))


def _reason(e: Exception) -> str:
    text = (str(e).splitlines() or [""])[0]
    if isinstance(e, ValueError) and "checksum" in text.lower():
        return "checksum mismatch"
    if isinstance(e, OSError):
        return f"cannot be read: {e.strerror or text[:160]}"
    return f"cannot be decoded: {type(e).__name__}: {text[:160]}"


def chunk_problem(arr: zarr.Array, k: int) -> str | None:
    """Why chunk ``k`` of ``arr`` is damaged, or None when it reads back."""
    if _must_be_stored(arr) and not _chunk_stored(arr, k):
        return "chunk file missing"
    a, b = _chunk_rows(arr, k)
    try:
        arr[a:b]
    except Exception as e:  # what a decoder raises on foreign bytes varies (ValueError, RuntimeError, …)
        return _reason(e)
    return None


def damage_of(arr: zarr.Array, k: int, reason: str) -> ChunkDamage:
    group, _, name = arr.path.rpartition("/")
    a, b = _chunk_rows(arr, k)
    return ChunkDamage(array_location(arr), group, name, k, a, b, reason)


def read_rows(arr: zarr.Array, start: int = 0, stop: int | None = None, cols: tuple = (), *,
              check_stored: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """``arr[start:stop, *cols]``, raising :class:`CacheDamaged` (one line: array, chunk, rows) for a damaged chunk.

    Every read of cache arrays goes through here.  A checksum mismatch or
    undecodable bytes show up as an exception from Zarr, which is traced to its
    chunk; a missing chunk file would silently read as fill values, so the
    chunks' files are checked first (one ``exists`` per chunk, ~4 MiB apart), unless
    ``check_stored`` is False (a reader that already checked them, such as a fit's later passes).
    ``out``: an array of the rows' shape and dtype to read into (a streamed fit reuses one: no allocation per read).
    """
    n = arr.shape[0]
    stop = n if stop is None else max(start, min(stop, n))
    key = (slice(start, stop), *cols)
    if stop <= start:
        return arr[key]
    c = arr.chunks[0]
    ks = range(start // c, (stop - 1) // c + 1)
    if check_stored and _must_be_stored(arr):
        for k in ks:
            if not _chunk_stored(arr, k):
                raise CacheDamaged(damage_of(arr, k, "chunk file missing"))
    try:
        if out is None:
            return arr[key]
        from zarr.core.buffer.cpu import NDBuffer

        arr.get_basic_selection(key, out=NDBuffer.from_numpy_array(out))
        return out
    except Exception:
        for k in ks:
            why = chunk_problem(arr, k)
            if why:
                raise CacheDamaged(damage_of(arr, k, why)) from None
        raise


@dataclass
class Verification:
    """What :func:`verify_chunks` found."""

    chunks: int
    damaged: list[ChunkDamage]
    format: int


def verify_chunks(root: zarr.Group, fmt: int) -> Verification:
    """Read every chunk of every array in a cache (``inspect --verify``, ``extract --repair``).

    Groups still being prepared are skipped (an extract rebuilds them), and in
    a group that is not complete only the committed rows of its activations or
    logits are read (the rest is not written yet).
    """
    damaged: list[ChunkDamage] = []
    n = 0
    group_attrs: dict[str, dict[str, Any]] = {}
    for path, node in sorted(root.members(max_depth=None), key=lambda m: m[0]):
        if not isinstance(node, zarr.Array):
            continue
        group, _, name = path.rpartition("/")
        if group.rpartition("/")[2] not in FIT_SPLITS:  # e.g. monitor logits an old version kept here: no reader
            continue
        if group not in group_attrs:
            group_attrs[group] = dict(root[group].attrs) if group else dict(root.attrs)
        attrs = group_attrs[group]
        if not attrs.get("initialized"):
            continue
        rows = node.shape[0]
        if streamed(name) and not attrs.get("complete"):
            rows = min(rows, int(attrs.get("committed_rows", 0)))
        for k in range(-(-rows // node.chunks[0])):
            n += 1
            why = chunk_problem(node, k)
            if why:
                damaged.append(damage_of(node, k, why))
    return Verification(n, damaged, fmt)


# ---------------------------------------------------------------------------
# writing


@dataclass
class SplitPlan:
    """What one split's group will hold, computed before the model runs."""

    name: str
    doc_ids: list[str]
    doc_n_tokens: np.ndarray
    doc_n_needles: np.ndarray
    labels: np.ndarray
    doc_index: np.ndarray
    token_index: np.ndarray
    token_id: np.ndarray
    stats: dict[str, Any]
    doc_digests: list[str] | None = None
    """Per document of the doc table (``doc_digest``): lets a stale cache name the documents that changed."""
    char_start: np.ndarray | None = None
    """int32 [N]: where each row's token starts in its document's text (``TokenizedDoc.offsets``)."""
    char_end: np.ndarray | None = None
    """int32 [N]: where it ends (exclusive), so ``text[char_start:char_end]`` is the token's text."""
    shard: dict[str, Any] | None = None
    """Under torchrun: which rows of the split this process writes (see ``distributed.shard_split``)."""

    @property
    def n_rows(self) -> int:
        return int(self.labels.shape[0])


def small_arrays(plan: SplitPlan) -> dict[str, tuple[np.ndarray, Any]]:
    """The arrays of a split group that come from the plan alone (no model): name → (values, dtype)."""
    return {
        "labels": (plan.labels, "int8"),
        "doc_index": (plan.doc_index, "int32"),
        "token_index": (plan.token_index, "int32"),
        "token_id": (plan.token_id, "int32"),
        **({"char_start": (plan.char_start, "int32"), "char_end": (plan.char_end, "int32")}
           if plan.char_start is not None and plan.char_end is not None else {}),
        "doc_ids": (np.asarray(plan.doc_ids, dtype=str), str),
        "doc_n_tokens": (plan.doc_n_tokens, "int32"),
        "doc_n_needles": (plan.doc_n_needles, "int32"),
        **({"doc_digests": (np.asarray(plan.doc_digests, dtype=str), str)} if plan.doc_digests is not None else {}),
    }


class CacheWriter:
    """Creates or resumes a cache group; one writer per cache (see ``records.FileLock``)."""

    def __init__(self, path: Path, fields: dict[str, Any], metadata: dict[str, Any], world_size: int = 1):
        self.path = as_path(path)
        self.fields = fields
        self.metadata = metadata
        self.world_size = world_size
        self.format = CACHE_FORMAT
        """The cache's storage format: ``CACHE_FORMAT`` for a new cache, the existing one's when resuming."""
        self.root: zarr.Group | None = None
        self.split_parent: zarr.Group | None = None
        """Where split groups go: the root, or this process's ``shard-{r}-of-{W}`` group."""

    def _root_attrs(self) -> dict[str, Any]:
        attrs = {
            "needleprobe_cache_format": self.format,
            "fingerprint": fingerprint(self.fields),
            "fingerprint_fields": self.fields,
            "metadata": self.metadata,
            "splits": [],
            "complete": False,
        }
        if self.world_size > 1:
            attrs["world_size"] = self.world_size
        return attrs

    def open(self) -> None:
        if is_url(self.path):
            # No rename on object stores: the root's zarr.json is one object that holds the fingerprint
            # ("w" also clears what a crashed removal left without a root).
            exists = (self.path / "zarr.json").is_file()
            self.root = open_group(self.path, mode="r+") if exists else open_group(self.path, mode="w", attributes=self._root_attrs())
        elif self.path.exists():
            self.root = open_group(self.path, mode="r+")
        else:
            # Built under a temporary name and renamed, so the real path never holds a group without its fingerprint.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + f".creating-{os.getpid()}")
            if tmp.exists():
                shutil.rmtree(tmp)
            try:
                zarr.open_group(str(tmp), mode="w", attributes=self._root_attrs())
                os.replace(tmp, self.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.root = open_group(self.path, mode="r+")
        self.format = int(self.root.attrs.get("needleprobe_cache_format", 1))

    def record_failure(self, exc: BaseException) -> None:
        """Note on the cache that this extract ended in ``exc`` (best effort: a full disk may refuse even this)."""
        g = self.split_parent if self.split_parent is not None else self.root
        if g is None:
            return
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        try:
            g.attrs[FAILURE_ATTR] = {"error": text, "at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        except Exception:  # noqa: BLE001 - the original error is what the user needs to see
            pass

    def clear_failure(self) -> None:
        """A new extract is running: what the last one ended in no longer describes the cache."""
        g = self.split_parent if self.split_parent is not None else self.root
        if g is not None and FAILURE_ATTR in g.attrs:
            del g.attrs[FAILURE_ATTR]

    def committed(self, split_names: list[str]) -> dict[str, tuple[int, int]]:
        """(committed rows, planned rows) of this process's split groups, as stored now."""
        parent = self.split_parent if self.split_parent is not None else self.root
        out = {}
        for name in split_names:
            try:
                a = parent[name].attrs
            except KeyError:
                continue
            if a.get("initialized"):
                out[name] = (int(a.get("committed_rows", 0)), int(a.get("n_rows", 0)))
        return out

    def prepare_split(self, plan: SplitPlan, layers: list[int], d_model: int, feature_dtype: str) -> tuple[zarr.Group, int]:
        """The split group, created with its label arrays if new; returns it and its committed rows."""
        assert self.root is not None
        parent = self.root if self.split_parent is None else self.split_parent
        if plan.name in parent.group_keys():
            g = parent[plan.name]
            if g.attrs.get("initialized") and g.attrs.get("n_rows") == plan.n_rows and g.attrs.get("shard") == plan.shard:
                return g, int(g.attrs.get("committed_rows", 0))
        g = parent.create_group(plan.name, overwrite=True)
        chunk = chunk_rows_for(d_model, feature_dtype)
        n = plan.n_rows
        for layer in layers:
            g.create_array(
                f"layer_{layer}",
                shape=(n, d_model),
                chunks=(chunk, d_model),
                dtype=STORAGE_DTYPES[feature_dtype],
                fill_value=0,
                attributes={"logical_dtype": feature_dtype, "layer": layer},
                **array_codecs(self.format, compress=False),
            )
        for name, (values, dtype) in small_arrays(plan).items():
            a = g.create_array(
                name, shape=values.shape, chunks=(max(1, min(len(values), 1 << 18)),), dtype=dtype,
                **array_codecs(self.format, compress=True),
            )
            if len(values):
                a[:] = values
        fault_point("split_prepared")
        g.attrs.update(
            {
                "n_rows": n,
                "n_docs": len(plan.doc_ids),
                "chunk_rows": chunk,
                "stats": plan.stats,
                "committed_rows": 0,
                "complete": False,
                "initialized": True,
                **({"shard": plan.shard} if plan.shard is not None else {}),
            }
        )
        return g, 0

    def finish(self, split_names: list[str], extra: dict[str, Any]) -> None:
        assert self.root is not None
        self.root.attrs.update({"splits": split_names, "complete": True, **extra})


class ChunkStream:
    """Buffers rows of several same-length 2-D arrays and writes whole chunks, then advances the commit counter.

    Writes run on one background thread (in order), so the next forward pass
    overlaps the Zarr I/O; at most two flushes are in flight to bound memory.
    The group's attrs hold ``chunk_rows``, ``n_rows`` and ``committed_rows``.
    """

    def __init__(self, group: zarr.Group, names: list[str], start_row: int, executor):
        self.g = group
        self.names = names
        self.chunk = int(group.attrs["chunk_rows"])
        self.n_rows = int(group.attrs["n_rows"])
        assert start_row % self.chunk == 0 or start_row == self.n_rows
        self.flushed = start_row
        self.arrays = {n: writable(group[n]) for n in names}
        self.buf = {n: np.empty((self.chunk, *a.shape[1:]), dtype=a.dtype) for n, a in self.arrays.items()}
        self.fill = 0
        self.executor = executor
        self.pending: list = []
        self.failed = False
        """A write failed (a full disk, say): later chunks are not written, so the counter never passes a hole."""

    def add(self, rows: dict[str, np.ndarray]) -> None:
        n = next(iter(rows.values())).shape[0]
        i = 0
        while i < n:
            take = min(n - i, self.chunk - self.fill)
            for name in self.names:
                self.buf[name][self.fill : self.fill + take] = rows[name][i : i + take]
            self.fill += take
            i += take
            if self.fill == self.chunk:
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        start, n = self.flushed, self.fill
        data = {name: self.buf[name][:n].copy() for name in self.names}
        self.flushed += n
        self.fill = 0
        while len(self.pending) >= 2:
            self.pending.pop(0).result()
        self.pending.append(self.executor.submit(self._write, start, n, data))

    def _write(self, start: int, n: int, data: dict[str, np.ndarray]) -> None:
        if self.failed:
            return
        try:
            for i, name in enumerate(self.names):
                self.arrays[name][start : start + n] = data[name]
                if i == 0:
                    fault_point("chunk_partly_written")
            self.g.attrs["committed_rows"] = start + n
        except BaseException:
            self.failed = True
            raise
        fault_point("chunk_committed")

    def close(self) -> None:
        self._flush()
        for f in self.pending:
            f.result()
        self.pending.clear()
        if self.flushed != self.n_rows:
            raise RuntimeError(f"wrote {self.flushed} rows, planned {self.n_rows}")
        self.g.attrs["complete"] = True
        fault_point("split_complete")


def remove_cache(path: Path) -> None:
    """Delete a cache, renaming it first so a crash never leaves half a tree under the real name."""
    path = as_path(path)
    if not path.exists():
        return
    if is_url(path):  # no rename on object stores: the root's zarr.json first (no longer a cache), then the rest
        (path / "zarr.json").unlink(missing_ok=True)
        path.rmtree()
        return
    trash = path.with_name(path.name + f".deleting-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash)


# ---------------------------------------------------------------------------
# reading


class SplitView:
    """One split of a cache, as arrays."""

    def __init__(self, group: zarr.Group, feature_dtype: str):
        self.group = group
        self.feature_dtype = feature_dtype
        self.attrs = dict(group.attrs)
        self.cache_path: Path | None = None
        """The cache directory (set by ``Cache.split``; for messages)."""

    def activations(self, layer: int) -> "RowArray":
        """The stored rows as read-only array (``shape``, ``dtype``, ``chunks``, ``attrs``, ``[a:b]``): bfloat16 is
        stored as uint16 bits, use :meth:`to_numpy` for float32.  A damaged chunk raises :class:`CacheDamaged`."""
        key = f"layer_{layer}"
        if key not in self.group.array_keys():
            raise NeedleprobeError(f"layer {layer} is not in the cache (cached: {self.layers})")
        return RowArray([self.group[key]])

    @property
    def layers(self) -> list[int]:
        return sorted(int(k.split("_", 1)[1]) for k in self.group.array_keys() if k.startswith("layer_"))

    def to_numpy(self, layer: int, dtype: Any = np.float32, rows: slice | None = None) -> np.ndarray:
        """Activations as a dense array, read in contiguous chunk blocks (Zarr has no memory map)."""
        arr = self.activations(layer)
        start, stop, _ = (rows or slice(None)).indices(arr.shape[0])
        out = np.empty((stop - start, arr.shape[1]), dtype=dtype)
        step = arr.chunks[0] * 16
        for s in range(start, stop, step):
            e = min(stop, s + step)
            out[s - start : e - start] = to_float32(arr[s:e], self.feature_dtype)
        return out

    def _small(self, name: str) -> np.ndarray:
        return read_rows(self.group[name])

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_rows"])

    @property
    def labels(self) -> np.ndarray:
        return self._small("labels")

    @property
    def doc_index(self) -> np.ndarray:
        return self._small("doc_index")

    @property
    def token_index(self) -> np.ndarray:
        return self._small("token_index")

    @property
    def token_id(self) -> np.ndarray:
        return self._small("token_id")

    @property
    def char_start(self) -> np.ndarray:
        """int32 [N]: where each row's token starts in its document's text; ``text[char_start:char_end]`` is the token."""
        return self._char_offsets("char_start")

    @property
    def char_end(self) -> np.ndarray:
        """int32 [N]: where each row's token ends in its document's text (exclusive)."""
        return self._char_offsets("char_end")

    def _char_offsets(self, name: str) -> np.ndarray:
        if name not in self.group.array_keys():
            where = getattr(self, "cache_path", None) or array_location(self.group)
            raise NeedleprobeError(
                f"{where}: this cache has no token character offsets (char_start, char_end: caches written before they "
                "were stored lack them); re-extract it to get them: remove that directory and run `needleprobe extract`"
            )
        return self._small(name)

    @property
    def doc_ids(self) -> list[str]:
        return [str(x) for x in self._small("doc_ids")]

    @property
    def doc_n_tokens(self) -> np.ndarray:
        return self._small("doc_n_tokens")

    @property
    def doc_n_needles(self) -> np.ndarray:
        return self._small("doc_n_needles")

    @property
    def doc_digests(self) -> list[str] | None:
        """Per document, the digest of what made its rows (caches written before they were stored: None)."""
        if "doc_digests" not in self.group.array_keys():
            return None
        return [str(x) for x in self._small("doc_digests")]

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self.attrs.get("stats", {}))


ROW_ARRAYS = ("labels", "doc_index", "token_index", "token_id", "char_start", "char_end")
"""Arrays with one entry per row (sharded: concatenated); the others are the split's doc table."""


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank}-of-{world}"


class RowArray:
    """Read-only rows of one Zarr array, or of several concatenated in order (one per shard).

    Has what readers of a layer array use: ``shape``, ``dtype``, ``chunks``,
    ``attrs``, and ``[start:stop]`` (or ``[start:stop, cols]``) slicing; reads go
    through :func:`read_rows`, so a damaged chunk is named, never read as zeros.
    """

    def __init__(self, parts: list[zarr.Array]):
        self.parts = parts
        self.bounds = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])]).astype(np.int64)
        self.shape = (int(self.bounds[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.chunks = parts[0].chunks
        self.attrs = parts[0].attrs

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"row {key} out of range for {self.shape[0]} rows")
            k = int(np.searchsorted(self.bounds, i, side="right")) - 1
            j = i - int(self.bounds[k])
            return read_rows(self.parts[k], j, j + 1, rest)[0]
        if key is Ellipsis:
            key = slice(None)
        if not isinstance(key, slice):
            raise TypeError("RowArray supports int and slice row indexing")
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise TypeError("RowArray supports slices with step 1")
        stop = max(start, stop)
        out = []
        for k, part in enumerate(self.parts):
            lo, hi = max(start, int(self.bounds[k])), min(stop, int(self.bounds[k + 1]))
            if lo < hi:
                out.append(read_rows(part, lo - int(self.bounds[k]), hi - int(self.bounds[k]), rest))
        if not out:
            return self.parts[0][(slice(0, 0), *rest)]
        return out[0] if len(out) == 1 else np.concatenate(out)


    def read(self, start: int, stop: int, *, check_stored: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) (``read_rows`` on each part; ``check_stored=False`` skips the chunk-file check),
        into ``out[: stop - start]`` when given."""
        got = []
        for k, part in enumerate(self.parts):
            lo, hi = max(start, int(self.bounds[k])), min(stop, int(self.bounds[k + 1]))
            if lo < hi:
                got.append(read_rows(part, lo - int(self.bounds[k]), hi - int(self.bounds[k]), check_stored=check_stored,
                                     out=None if out is None else out[lo - start : hi - start]))
        if out is not None:
            return out[: max(0, stop - start)]
        if not got:
            return self.parts[0][0:0]
        return got[0] if len(got) == 1 else np.concatenate(got)

    def chunk_end(self, row: int) -> int:
        """The row after the stored chunk that holds ``row`` (a chunk never spans two parts)."""
        k = int(np.searchsorted(self.bounds, row, side="right")) - 1
        lo, c = int(self.bounds[k]), int(self.parts[k].chunks[0])
        return min(int(self.bounds[k + 1]), lo + ((row - lo) // c + 1) * c)

    def stored_bytes(self, start: int, stop: int) -> int:
        """Bytes of the stored chunks that reading rows [start, stop) decodes (whole chunks, checksums included)."""
        total = 0
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize
        for k, part in enumerate(self.parts):
            lo, hi = max(start, int(self.bounds[k])), min(stop, int(self.bounds[k + 1]))
            if lo < hi:
                c = part.chunks[0]
                a, b = lo - int(self.bounds[k]), hi - int(self.bounds[k])
                total += ((b - 1) // c - a // c + 1) * (c * row_bytes + (4 if checksummed(part) else 0))
        return total


ShardedArray = RowArray  # its name before unsharded splits used it too


class ShardedSplitView(SplitView):
    """A split written by several processes: its shards' rows, concatenated in rank order."""

    def __init__(self, groups: list[zarr.Group], feature_dtype: str):
        super().__init__(groups[0], feature_dtype)
        self.groups = groups
        attrs = [dict(g.attrs) for g in groups]
        self.attrs = {
            **attrs[0],
            "n_rows": sum(int(a.get("n_rows", 0)) for a in attrs),
            "committed_rows": sum(int(a.get("committed_rows", 0)) for a in attrs),
            "complete": all(bool(a.get("complete")) for a in attrs),
            "shards": [a.get("shard") for a in attrs],
        }
        self.attrs.pop("shard", None)

    def activations(self, layer: int) -> RowArray:
        super().activations(layer)  # the error for a layer that is not cached
        return RowArray([g[f"layer_{layer}"] for g in self.groups])

    def _small(self, name: str) -> np.ndarray:
        if name in ROW_ARRAYS:
            return np.concatenate([read_rows(g[name]) for g in self.groups])
        return read_rows(self.group[name])


class Cache:
    """A finished activation cache (``needleprobe.open_cache``)."""

    def __init__(self, path: Path, root: zarr.Group):
        self.path = path
        self.root = root
        self.attrs = dict(root.attrs)

    @property
    def metadata(self) -> dict[str, Any]:
        return {**self.attrs.get("metadata", {}), "fingerprint": self.fingerprint, "fingerprint_fields": self.fields}

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.attrs["fingerprint_fields"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def format(self) -> int:
        """Storage format (``CACHE_FORMAT``): 1 without checksums, 2 with."""
        return int(self.attrs.get("needleprobe_cache_format", 1))

    @property
    def last_failure(self) -> str | None:
        """"error (at time)" when the last extract ended in an exception (see ``CacheWriter.record_failure``)."""
        found = [("", self.attrs.get(FAILURE_ATTR))]
        if self.world_size > 1:
            for r in range(self.world_size):
                try:
                    found.append((f"rank {r}: ", self.root[shard_name(r, self.world_size)].attrs.get(FAILURE_ATTR)))
                except KeyError:
                    pass
        for prefix, rec in found:
            if rec:
                return f"{prefix}{rec.get('error')} (at {rec.get('at')})"
        return None

    def verify(self) -> Verification:
        """Read every chunk (see :func:`verify_chunks`)."""
        return verify_chunks(self.root, self.format)

    @property
    def splits(self) -> list[str]:
        return list(self.attrs.get("splits", []))

    @property
    def layers(self) -> list[int]:
        return list(self.fields["layers"])

    @property
    def feature_dtype(self) -> str:
        return self.fields["feature_dtype"]

    def split(self, name: str) -> SplitView:
        if name not in self.splits:
            raise NeedleprobeError(f"{self.path}: split {name!r} is not in the cache (has {self.splits})")
        if self.world_size > 1:
            view: SplitView = ShardedSplitView(self.split_groups(name), self.feature_dtype)
        else:
            view = SplitView(self.root[name], self.feature_dtype)
        view.cache_path = self.path  # for messages
        return view

    def tokenizer(self):
        """The tokenizer the cache was built with (its model and revision, from the fingerprint; imports transformers)."""
        from ..config import ModelConfig
        from ..model.hooks import load_tokenizer

        f = self.fields
        return load_tokenizer(ModelConfig(name=f["model_name"], revision=f.get("model_revision"), gguf_file=f.get("gguf_file")))

    @property
    def world_size(self) -> int:
        """Processes that wrote the cache (``torchrun``); 1 for the unsharded layout."""
        return int(self.attrs.get("world_size", 1))

    def split_groups(self, name: str) -> list[zarr.Group]:
        """The Zarr group(s) holding a split's rows: one, or one per shard in rank order (present ones only)."""
        if self.world_size == 1:
            return [self.root[name]] if name in self.root.group_keys() else []
        out = []
        for r in range(self.world_size):
            key = f"{shard_name(r, self.world_size)}/{name}"
            try:
                out.append(self.root[key])
            except KeyError:
                pass
        return out

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, layers={self.layers}, splits={self.splits}, fingerprint={self.fingerprint})"


def open_cache(source: str | os.PathLike | Config, *, allow_incomplete: bool = False) -> Cache:
    """Open a cache from a config file, a loaded :class:`Config`, or the cache directory itself."""
    if isinstance(source, Config):
        path = cache_path(source)
    else:
        p = as_path(source)
        path = cache_path(load_config(p)) if p.suffix in (".yaml", ".yml") and not is_url(p) else p
    if not (path / "zarr.json").is_file():
        raise NeedleprobeError(f"{path}: no activation cache here (run `needleprobe extract` first)")
    root = open_group(path, mode="r")
    if "fingerprint" not in root.attrs:
        raise NeedleprobeError(f"{path}: a Zarr group, but not a needleprobe cache")
    cache = Cache(path, root)
    if not cache.complete and not allow_incomplete:
        from ..io.files import FileLock

        from ..run.layout import lock_beside

        running = FileLock.holder(lock_beside(path))
        if running:
            raise NeedleprobeError(f"{path}: an extract is filling this cache right now ({running}); wait for it to finish")
        failure = cache.last_failure
        if failure:
            raise NeedleprobeError(
                f"{path}: cache is incomplete: the last extract failed with: {failure}; "
                "fix that and run extract again to resume"
            )
        if cache.splits:
            raise NeedleprobeError(f"{path}: cache holds the {', '.join(cache.splits)} split only (extracted for "
                                   "`evaluate`, which needs no other): run `needleprobe extract` to add the rest")
        raise NeedleprobeError(f"{path}: cache is incomplete (an extract was interrupted: run extract again to resume)")
    return cache
