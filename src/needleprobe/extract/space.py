"""What a cache will take on disk, and the refusal to start an extract that cannot fit (before the model loads)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..cache.format import BYTES_PER_VALUE
from ..errors import NeedleprobeError
from ..io.console import human_bytes
from ..io.stores import is_url


ROW_OVERHEAD_BYTES = 21
"""Per row, besides the activations: labels (1 byte), doc_index, token_index, token_id, char_start, char_end (4 each),
before zstd."""


def stored_rows(split_rows: list[int], d_model: int, feature_dtype: str, world: int = 1) -> int:
    """Activation rows a cache of splits of ``split_rows`` rows takes on disk: whole chunks, the last one of each split
    (and of each process's share of it) written full (uncompressed), as Zarr stores an edge chunk."""
    import math

    from ..cache.format import chunk_rows_for

    chunk = chunk_rows_for(d_model, feature_dtype)
    return sum(world * math.ceil(math.ceil(n / world) / chunk) * chunk for n in split_rows)


def cache_bytes(split_rows: list[int], n_layers: int, d_model: int, feature_dtype: str, world: int = 1) -> int:
    """What splits of ``split_rows`` rows take on disk: activations (uncompressed, whole chunks) plus the per-row
    arrays (measured on the demo: the estimate 85.3 MB, the cache 85.4 MB)."""
    padded = stored_rows(split_rows, d_model, feature_dtype, world)
    return padded * n_layers * d_model * BYTES_PER_VALUE[feature_dtype] + sum(split_rows) * ROW_OVERHEAD_BYTES


def free_bytes(path) -> int | None:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing parent); None on a remote store."""
    if is_url(path):
        return None
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_free_space(path, need: int, force: bool) -> None:
    """Refuse, before the model loads, to start an extract that cannot fit (``--force`` tries anyway)."""
    free = free_bytes(path)
    if free is None or need <= free or force:
        return
    raise NeedleprobeError(
        f"{path}: the cache needs {human_bytes(need)} more on disk but only {human_bytes(free)} is free there; "
        "free some space or set probe.cache_dir elsewhere (--force tries anyway)"
    )
