"""Reading a cache: a split's rows (also across the shards of a ``torchrun`` extract), the cache and its
fingerprint, ``open_cache``."""

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..config import Config, load_config
from ..errors import NeedleprobeError
from ..io.stores import as_path, is_url, open_group
from .format import FAILURE_ATTR, cache_path, to_float32
from .integrity import Verification, array_location, checksummed, read_ahead, read_rows, verify_chunks


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
        if out.dtype == arr.dtype:  # stored as wanted: read into place
            return arr.read(start, stop, out=out)
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

    def read_ahead(self) -> None:
        """Start the disk reading these rows' chunks in the background (``integrity.read_ahead``)."""
        for part in self.parts:
            read_ahead(part)

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
