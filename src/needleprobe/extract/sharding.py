"""Sharded extraction under ``torchrun``: which rows each process writes, and the few collectives it needs.

``torchrun --nproc-per-node N -m needleprobe extract --config …`` starts N
processes that each compute the same plan (tokenization and labels are
deterministic), take a contiguous range of each split's batches (balanced by
padded tokens), and write only those rows into their own shard group
``shard-{rank}-of-{world}/{split}`` of the one cache: no two processes ever
write the same Zarr array.  Rows of shard r precede those of shard r+1, so the
shards concatenated in rank order are the single-process rows exactly (each
document is padded to a bucket of its own length, so a row does not depend on
which batch it was in).

Processes only coordinate (decide the cache state, wait for the root group,
wait for every shard): activations never travel between them.  So the process
group is always ``gloo`` on CPU tensors, on GPU machines too, and its timeout is
long (a resumed run may find some shards already done while others have hours
left); a crashed process makes ``torchrun`` stop the others.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..cache.reader import shard_name
from ..cache.writer import SplitPlan
from ..data.tokens import bucket_length
from ..errors import NeedleprobeError

if TYPE_CHECKING:
    from ..cache.writer import CacheWriter
    from .runner import SplitBatches


def shard_ranges(costs: list[int], world: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of ``costs`` for each rank, with sums as even as cuts between items allow."""
    prefix = np.concatenate([[0], np.cumsum(np.asarray(costs, dtype=np.int64))])
    total = int(prefix[-1])
    cuts = [0]
    for k in range(1, world):
        target = total * k / world
        c = int(np.searchsorted(prefix, target))
        if c > 0 and target - prefix[c - 1] < prefix[min(c, len(prefix) - 1)] - target:
            c -= 1
        cuts.append(min(len(costs), max(cuts[-1], c)))
    cuts.append(len(costs))
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def shard_split(plan: SplitPlan, split: "SplitBatches", rank: int, world: int) -> tuple[SplitPlan, "SplitBatches"]:
    """This rank's part of a split: its batches and the plan of their rows (rows [row_start, row_stop) of the split).

    The doc table and the split's stats stay whole, so ``doc_index`` keeps
    pointing into the split's table and every shard describes the same split.
    """
    batches, tdocs = split.batches, split.tdocs
    costs = [len(b) * bucket_length(max(tdocs[i].n_tokens for i in b)) for b in batches]
    b0, b1 = shard_ranges(costs, world)[rank]
    rows = [split.rows_in(b) for b in batches]
    r0, r1 = int(sum(rows[:b0])), int(sum(rows[:b1]))
    shard = {"rank": rank, "world_size": world, "row_start": r0, "row_stop": r1, "batch_start": b0, "batch_stop": b1}
    part = replace(
        plan,
        labels=plan.labels[r0:r1],
        doc_index=plan.doc_index[r0:r1],
        token_index=plan.token_index[r0:r1],
        token_id=plan.token_id[r0:r1],
        char_start=None if plan.char_start is None else plan.char_start[r0:r1],
        char_end=None if plan.char_end is None else plan.char_end[r0:r1],
        shard=shard,
    )
    return part, replace(split, batches=batches[b0:b1])


def announce_shard(con, dist, plan: SplitPlan, split: SplitBatches) -> tuple[SplitPlan, SplitBatches]:
    """This rank's part of a split (:func:`shard_split`), said on the terminal."""
    part, mine = shard_split(plan, split, dist.rank, dist.world)
    s = part.shard
    con.print(
        f"rank {dist.rank}/{dist.world} {plan.name}: batches {s['batch_start']}–{s['batch_stop']} of {len(split.batches)}, "
        f"rows {s['row_start']:,}–{s['row_stop']:,} of {plan.n_rows:,} → {shard_name(dist.rank, dist.world)}/{plan.name}"
    )
    return part, mine


def check_shards(writer: CacheWriter, splits: list[str], world: int) -> None:
    """Before marking a sharded cache complete: every shard of every split is complete."""
    if world == 1:
        return
    root = writer.root
    for r in range(world):
        for name in splits:
            key = f"{shard_name(r, world)}/{name}"
            try:
                done = bool(root[key].attrs.get("complete"))
            except KeyError:
                done = False
            if not done:
                raise NeedleprobeError(f"{writer.path}: shard {key} is not complete; run the same torchrun again to resume")
