"""Writing a cache: the plan of a split's rows, the writer that creates or resumes a cache group, the chunk
stream that fills arrays behind a commit counter, and removing a cache."""

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..io.stores import as_path, is_url, open_group
from .format import CACHE_FORMAT, FAILURE_ATTR, STORAGE_DTYPES, chunk_rows_for, fault_point, fingerprint
from .integrity import array_codecs, writable


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
