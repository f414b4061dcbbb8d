"""``extract --repair``: verify every chunk of a cache and rewrite only the damaged ones.

The small arrays come from the plan, the activations from re-running just the
batches whose rows the damaged chunks hold (a row never depends on its batch,
so they are the first extract's bits).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..cache.integrity import ChunkDamage, chunk_problem, verify_chunks, writable
from ..cache.reader import ROW_ARRAYS
from ..cache.writer import small_arrays
from ..errors import NeedleprobeError
from ..io.stores import open_group
from .runner import SplitBatches, forwarding, run_batches

if TYPE_CHECKING:
    from .extract import SiteJob, SplitWork


class _RowSink:
    """Takes a split's rows [start, stop) from ``runner.run_batches`` (the role of a ChunkStream), in memory."""

    def __init__(self, start: int, stop: int):
        self.pos, self.stop = start, stop
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, rows: dict[str, np.ndarray]) -> None:
        n = next(iter(rows.values())).shape[0]
        take = max(0, min(n, self.stop - self.pos))
        for name, r in rows.items():
            self.parts.setdefault(name, []).append(r[:take])
        self.pos += n

    def rows(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(p) for name, p in self.parts.items()}


@dataclass
class ModelRun:
    """How this extract runs the model: loaded on first use (``parts()`` → model, blocks, d_model), its pad id,
    device and progress bars."""

    parts: Callable[[], tuple[Any, Any, int]]
    pad_id: int
    device: Any
    show_progress: bool


def repair_chunks(con, job: SiteJob, plans: dict[str, SplitWork], run: ModelRun, legacy: bool = False
                  ) -> tuple[list[str], int]:
    """Verify every chunk of ``job``'s cache and rewrite the damaged ones; returns (what was repaired, tokens run
    through the model).

    Small arrays come from the plan (no model).  A damaged activation chunk
    covers rows [a, b) of its split (shards add their ``row_start``); only the
    batches holding those rows run, and the rows are bit-identical to the first
    extract's because a row never depends on its batch.  Undamaged chunks are
    never written.
    """
    from rich.markup import escape

    root = open_group(job.path, mode="r+")
    v = verify_chunks(root, job.existing.format)
    if not v.damaged:
        con.print(f"--repair: all {v.chunks:,} chunks verified, nothing to repair")
        return [], 0
    con.print(f"--repair: {len(v.damaged)} of {v.chunks:,} chunks damaged")
    done: list[str] = []
    todo: dict[str, list[tuple[int, int, Any, ChunkDamage]]] = {}  # split → (split rows [g0, g1), array, damage)
    for d in v.damaged:
        con.print(f"  {escape(str(d))}", soft_wrap=True)
        split = d.group.rpartition("/")[2]
        if split not in plans:
            raise NeedleprobeError(f"{d}: cannot repair it, {split!r} is not a split this config extracts")
        group = root[d.group]
        shard = group.attrs.get("shard")
        offset = int(shard["row_start"]) if shard else 0
        arr = writable(group[d.name])
        if d.name.startswith("layer_"):
            todo.setdefault(split, []).append((offset + d.start, offset + d.stop, arr, d))
            continue
        small = small_arrays(replace(plans[split].plan, doc_digests=None) if legacy else plans[split].plan)
        if d.name not in small:
            raise NeedleprobeError(f"{d}: cannot repair it (needleprobe does not write {d.name!r})")
        values = small[d.name][0]
        if d.name in ROW_ARRAYS:
            values = values[offset : offset + arr.shape[0]]
        if len(values) != arr.shape[0]:
            raise NeedleprobeError(f"{d}: cannot repair it: the plan has {len(values)} entries, the array {arr.shape[0]}")
        arr[d.start : d.stop] = values[d.start : d.stop]
        done.append(str(d))
    tokens = _rerun_batches(job, plans, run, todo, done) if todo else 0
    for d in v.damaged:  # read back what was rewritten
        if chunk_problem(root[d.group][d.name], d.chunk):
            raise NeedleprobeError(f"{d}: still damaged after the repair (is the disk failing?)")
    con.print(f"--repair: repaired {len(done)} chunk(s){f', {tokens:,} tokens through the model' if tokens else ''}")
    return done, tokens


def _rerun_batches(job: SiteJob, plans: dict[str, SplitWork], run: ModelRun,
                   todo: dict[str, list[tuple[int, int, Any, ChunkDamage]]], done: list[str]) -> int:
    """Rewrite damaged activation chunks by running only the batches that hold their rows; returns tokens run."""
    cfg, layers, site = job.cfg, job.layers, job.site
    model_parts, pad_id, device, show_progress = run.parts, run.pad_id, run.device, run.show_progress
    tokens = 0
    model, blocks, _ = model_parts()

    from .extract import gather_rows  # looked up at call time: the extract module owns it

    gather = partial(gather_rows, feature_dtype=cfg.probe.feature_dtype)

    def to_rows(acts, batch_rows):  # rows named as the site group's arrays (layer_{L})
        finish = gather(acts, batch_rows)
        return lambda: {f"layer_{layer}": r for (_, layer), r in finish().items()}

    with forwarding(model, [(site, layer) for layer in layers], pad_id, device) as fwd:
        for split, items in todo.items():
            work = plans[split].batches
            batches = work.batches
            sizes = np.array([work.rows_in(b) for b in batches], dtype=np.int64)
            ends = np.cumsum(sizes)
            starts = ends - sizes
            for g0, g1, group_items in _merged(items):
                b0 = int(np.searchsorted(ends, g0, side="right"))  # first batch ending after g0
                b1 = int(np.searchsorted(starts, g1, side="left"))  # first batch starting at or after g1
                sink = _RowSink(g0, g1)
                part = SplitBatches(split, work.tdocs, work.rows_of, batches[b0:b1])
                tokens += run_batches(fwd, part, sink, int(g0 - starts[b0]), to_rows, show_progress,
                                      label=f"{split} (repair)")
                rows = sink.rows()
                for a, b, arr, d in group_items:
                    arr[d.start : d.stop] = rows[d.name][a - g0 : b - g0]
                    done.append(str(d))
    return tokens


def _merged(items: list[tuple[int, int, Any, ChunkDamage]]):
    """Overlapping or adjacent row ranges merged: (g0, g1, the items inside), so each batch runs once."""
    items = sorted(items, key=lambda x: (x[0], x[1]))
    group: list = []
    g0 = g1 = None
    for it in items:
        if group and it[0] <= g1:
            g1 = max(g1, it[1])
            group.append(it)
            continue
        if group:
            yield g0, g1, group
        g0, g1, group = it[0], it[1], [it]
    if group:
        yield g0, g1, group
