"""What is in an activation cache, and is it still the cache this config would build?

``needleprobe inspect`` prints :func:`cache_summary`; :func:`cache_facts`
returns the same facts as plain data (``inspect --json``, the HTML report's
header and tests use it).  Reading is cheap: only attributes and the small
per-row arrays (labels, doc tables) are read, never the activations;
``inspect --verify`` reads every chunk, to find damaged ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .format import fingerprint, stale_reasons, wanted_fields
from .integrity import CacheDamaged, read_rows
from .reader import Cache, open_cache
from ..config import Config
from ..data.documents import load_documents
from ..io.console import human_bytes

if TYPE_CHECKING:
    from rich.table import Table

SPLIT_ORDER = ("train", "val", "test")


def dir_size(path: Path) -> int:
    """Bytes of every file under ``path`` (symlinks not followed)."""
    from ..io.stores import is_url

    if is_url(path):
        return path.du()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while we walked: an extract or monitor is running
                pass
    return total


def _split_names(cache: Cache) -> list[str]:
    """Finished caches list their splits; an interrupted one is read from its groups."""
    if cache.splits:
        return cache.splits
    return [s for s in SPLIT_ORDER if cache.split_groups(s)]


def _split_facts(cache: Cache, name: str) -> dict[str, Any]:
    groups = cache.split_groups(name)  # one, or one per shard of a torchrun extract
    g = groups[0]
    attrs = dict(g.attrs)
    shard_attrs = [dict(x.attrs) for x in groups]
    ready = [x for x, a in zip(groups, shard_attrs) if a.get("initialized")]  # others are rebuilt by the next extract
    damaged = None
    try:
        labels = [read_rows(x["labels"]) for x in ready]
        n_needles = read_rows(g["doc_n_needles"]) if g in ready else np.zeros(0, np.int32)
    except CacheDamaged as e:  # described, not fatal: inspect is how one looks at a damaged cache
        damaged, labels, n_needles = str(e), [], np.zeros(0, np.int32)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int8)
    stats = dict(attrs.get("stats", {}))
    planned = [a.get("n_rows") for a in shard_attrs]
    return {
        "rows": sum(int(n) for n in planned) if None not in planned else int(labels.size),
        "committed_rows": sum(int(a.get("committed_rows", 0)) for a in shard_attrs),
        "complete": len(groups) == cache.world_size and all(bool(a.get("complete", False)) for a in shard_attrs),
        "positives": int(labels.sum()),
        "negatives": int(labels.size - labels.sum()),
        "docs": int(attrs.get("n_docs", n_needles.size)),
        "docs_with_needles": int((n_needles > 0).sum()),
        "tokens": int(stats.get("tokens", 0)),
        "truncated_docs": int(stats.get("truncated_docs", 0)),
        "damaged": damaged,
    }


def _d_model(cache: Cache, splits: list[str]) -> int | None:
    for s in splits:
        g = cache.split_groups(s)[0]
        for key in sorted(g.array_keys()):
            if key.startswith("layer_"):
                return int(g[key].shape[1])
    return None


def cache_facts(cfg: Config) -> dict[str, Any]:
    """Everything ``inspect`` shows, as JSON-ready data.

    Raises :class:`NeedleprobeError` when there is no cache (the message says
    to run ``extract``).  An interrupted cache is described, not refused, and so
    is a damaged chunk met while reading labels (``damaged``: its message).
    ``matches_config`` is ``None`` when the dataset file is missing (its hash
    cannot be checked); the other fields are still compared.
    """
    cache = open_cache(cfg, allow_incomplete=True)
    data_path = cfg.dataset.resolved_path()
    dataset_found = data_path.is_file()
    cached = cache.fields
    if dataset_found:
        docs = load_documents(data_path, cfg.dataset.val_fraction)
        wanted = wanted_fields(cfg, docs, cached)
        differences = stale_reasons(cache, cfg, docs)
    else:
        differences = [f"dataset: cannot check, {data_path} not found"]
    splits = _split_names(cache)
    split_facts = {s: _split_facts(cache, s) for s in splits}
    return {
        "path": str(cache.path),
        "dataset": cfg.dataset.key,
        "dataset_path": str(data_path),
        "dataset_found": dataset_found,
        "model": cached.get("model_name"),
        "activation_site": cached.get("activation_site"),
        "complete": cache.complete,
        "last_failure": cache.last_failure,
        "format": cache.format,
        "fingerprint": cache.fingerprint,
        "config_fingerprint": fingerprint(wanted) if dataset_found else None,
        "matches_config": (not differences) if dataset_found else None,
        "differences": differences,
        "layers": cache.layers,
        "feature_dtype": cache.feature_dtype,
        "d_model": _d_model(cache, splits),
        "size_bytes": dir_size(cache.path),
        "splits": split_facts,
        "damaged": [x["damaged"] for x in split_facts.values() if x["damaged"]],
    }


def cache_summary(cfg: Config, facts: dict[str, Any] | None = None) -> Table:
    """A two-column rich table of :func:`cache_facts`, for ``needleprobe inspect``."""
    from rich.markup import escape
    from rich.table import Table

    f = facts if facts is not None else cache_facts(cfg)
    t = Table(title=f"activation cache {escape(f['dataset'])}", show_header=False, title_justify="left")
    t.add_column("fact", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("path", escape(f["path"]))
    t.add_row("model", escape(f"{f['model']} · {f['activation_site']}"))
    if f["complete"]:
        state = "complete"
    elif f["last_failure"]:
        state = f"[red]incomplete[/red]: the last extract failed with: {escape(f['last_failure'])} (run `needleprobe extract` to resume)"
    else:
        state = "[yellow]incomplete[/yellow] (run `needleprobe extract` to resume)"
    t.add_row("state", state)
    t.add_row("format", f"{f['format']} ({'crc32c checksum on every chunk' if f['format'] >= 2 else 'no checksums'})")
    t.add_row("fingerprint", f["fingerprint"])
    if f["matches_config"] is True:
        match = "[green]yes[/green]"
    elif f["matches_config"] is None:
        match = "[yellow]unknown[/yellow]: " + escape("; ".join(f["differences"]))
    else:
        match = "[red]no, stale[/red]: " + escape("; ".join(f["differences"]))
    t.add_row("matches config", match)
    t.add_row("layers", ", ".join(str(x) for x in f["layers"]))
    t.add_row("features", f"{f['feature_dtype']} × d_model {f['d_model'] if f['d_model'] is not None else '?'}")
    t.add_row("size on disk", human_bytes(f["size_bytes"]))
    for name, s in f["splits"].items():
        if s["damaged"]:
            t.add_row(name, f"[red]damaged[/red]: {escape(s['damaged'])}")
            continue
        state = "" if s["complete"] else f" [yellow](incomplete: {s['committed_rows']:,}/{s['rows']:,} rows written)[/yellow]"
        t.add_row(
            name,
            f"{s['rows']:,} rows: {s['positives']:,} needle / {s['negatives']:,} negative · "
            f"{s['docs']:,} docs ({s['docs_with_needles']:,} with needles) · {s['tokens']:,} tokens{state}",
        )
    return t


def inspect(cfg: Config, *, verify: bool = False, show: bool = True) -> tuple[dict[str, Any], str | None]:
    """``needleprobe inspect [--verify]``: (the cache's facts, the problem to report or None).

    The table (and with ``verify``, what reading every chunk found) is the command's answer, printed on stdout
    unless ``show`` is False (``--json`` prints the facts instead; ``verify`` adds ``verified``). A damaged chunk is
    returned as a one-line problem, not raised, so the answer is printed before the command exits with status 2.
    """
    from rich.markup import escape

    from ..io.console import results

    out = results()
    facts = cache_facts(cfg)
    if show:
        out.print(cache_summary(cfg, facts))
    if not verify:
        return facts, (facts["damaged"][0] if facts["damaged"] else None)
    cache = open_cache(cfg, allow_incomplete=True)
    v = cache.verify()
    how = "crc32c checksums" if v.format >= 2 else "format 1, no checksums: only missing or undecodable chunks are found"
    facts["verified"] = {"chunks": v.chunks, "format": v.format, "damaged": [str(d) for d in v.damaged],
                         "remedies": sorted({d.remedy for d in v.damaged})}
    if show:
        if not v.damaged:
            out.print(f"[green]all {v.chunks:,} chunks verified[/green] ({how})")
        for d in v.damaged:
            out.print(f"[red]damaged:[/red] {escape(str(d))}")
    if not v.damaged:
        return facts, None
    remedies = "; ".join(facts["verified"]["remedies"])
    return facts, f"{cache.path}: {len(v.damaged)} of {v.chunks:,} chunks are damaged ({how}): {remedies}"
