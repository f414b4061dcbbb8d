"""A cache's chunks: checksums, damage and its one-line messages, verification, and reading rows that names
any damage (format 2 caches; format 1 caches have no checksums and read as before)."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from ..errors import NeedleprobeError
from .format import FIT_SPLITS


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
    if out is not None and not cols and _plain_chunk_files(arr, out):
        _read_chunk_files(arr, start, stop, out)
        return out
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


def _plain_chunk_files(arr: zarr.Array, out: np.ndarray) -> bool:
    """Can ``out`` be read straight from the chunk files?  Yes for a cache's activations on a local disk: chunks of
    whole rows, each file the rows' raw little-endian bytes and their crc32c (a format-2 cache), read as stored."""
    codecs = getattr(arr.metadata, "codecs", ())
    return (isinstance(arr.store, LocalStore) and len(codecs) == 2 and isinstance(codecs[0], BytesCodec)
            and isinstance(codecs[1], Crc32cCodec) and sys.byteorder == "little"
            and (codecs[0].endian is None or codecs[0].endian.value == "little")
            and tuple(arr.chunks[1:]) == tuple(arr.shape[1:]) and out.dtype == arr.dtype and out.flags.c_contiguous)


def _read_chunk_files(arr: zarr.Array, start: int, stop: int, out: np.ndarray) -> None:
    """Rows [start, stop) into ``out``, each whole chunk read into place and its crc32c checked (what Zarr's codecs
    do, found by Zarr's own chunk key).

    Zarr's reader needs the GIL at every step of every chunk, so beside a busy thread it waits its turn again and
    again: measured on 2 cores, 4 layers of 54,709 × 384 rows took 0.3 s alone and 5.0 s beside a Python loop
    (0.11 s and 1.5 s this way), and ``fit`` reads a layer while another fits.  Damage is named as on Zarr's path.
    """
    import google_crc32c

    c = arr.chunks[0]
    spare = None
    crc = np.empty(1, "<u4")
    for k in range(start // c, (stop - 1) // c + 1):
        a, b = _chunk_rows(arr, k)
        lo, hi = max(a, start), min(b, stop)
        whole = (lo, hi, b - a) == (a, b, c)  # the edge chunk's file is padded to a whole chunk
        if not whole and spare is None:
            spare = np.empty((c, *arr.shape[1:]), arr.dtype)
        buf = out[lo - start : hi - start] if whole else spare
        try:
            with open(_chunk_file(arr, k), "rb", buffering=0) as f:
                n = f.readinto(memoryview(buf).cast("B")) + f.readinto(memoryview(crc).cast("B"))
                longer = bool(f.read(1))
        except FileNotFoundError:
            raise CacheDamaged(damage_of(arr, k, "chunk file missing")) from None
        except OSError as e:
            raise CacheDamaged(damage_of(arr, k, _reason(e))) from None
        if n != buf.nbytes + 4 or longer or google_crc32c.value(buf.reshape(-1).view(np.uint8)) != int(crc[0]):
            raise CacheDamaged(damage_of(arr, k, chunk_problem(arr, k) or "checksum mismatch"))
        if not whole:
            out[lo - start : hi - start] = spare[lo - a : hi - a]


def _chunk_file(arr: zarr.Array, k: int) -> Path:
    """Chunk ``k``'s file of an array on a local disk (named by Zarr's chunk key encoding)."""
    return Path(arr.store.root) / arr.path / arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))


def read_ahead(arr: zarr.Array) -> None:
    """Ask the kernel to start reading the array's chunk files (a local disk; elsewhere nothing): a read soon after
    finds them in memory instead of waiting on the disk."""
    if not isinstance(arr.store, LocalStore) or not hasattr(os, "posix_fadvise"):
        return
    for k in range(-(-arr.shape[0] // arr.chunks[0])):
        try:
            fd = os.open(_chunk_file(arr, k), os.O_RDONLY)
        except OSError:
            continue  # a missing chunk is named when it is read
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


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
