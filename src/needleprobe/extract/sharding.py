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

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache.cache import SplitPlan
from ..errors import NeedleprobeError
from ..data.tokens import bucket_length

if TYPE_CHECKING:  # torch is imported where it is used: every command asks is_primary() before it needs torch
    from .runner import SplitBatches
    import torch

DEFAULT_TIMEOUT_S = 7 * 24 * 3600


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the ``torchrun`` environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise NeedleprobeError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise NeedleprobeError(f"RANK {rank} is not in a world of WORLD_SIZE {world}")
    return rank, world, local


def is_primary() -> bool:
    """Rank 0, or a process not launched by torchrun: the one that fits, records and reports."""
    return launched_world()[0] == 0


@dataclass
class Dist:
    """This process's place in the run; every method is a no-op for a world of one."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Dist":
        rank, world, local = launched_world()
        d = cls(rank, world, local)
        if world > 1:
            import torch.distributed as td

            if not td.is_available():
                raise NeedleprobeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if not td.is_initialized():
                timeout = timedelta(seconds=float(os.environ.get("NEEDLEPROBE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
                td.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
                d.initialized = True
        return d

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as td

            td.destroy_process_group()
            self.initialized = False

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local process (``cuda:LOCAL_RANK``); CPU and MPS as they are."""
        if not self.sharded or device.type != "cuda":
            return device
        import torch

        n = torch.cuda.device_count()
        dev = torch.device("cuda", self.local_rank % n)
        torch.cuda.set_device(dev)
        return dev

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as td

            td.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.sharded:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def total(self, n: int) -> int:
        """Sum of ``n`` over ranks (also a barrier)."""
        if not self.sharded:
            return n
        import torch
        import torch.distributed as td

        t = torch.tensor([n], dtype=torch.int64)
        td.all_reduce(t)
        return int(t.item())


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


# ---------------------------------------------------------------------------
# fitting across processes


def group_aligned(x: int, group: int) -> int:
    """``x`` rounded to the nearest multiple of ``group`` (ties up)."""
    return ((x + group // 2) // group) * group


def row_shares(n: int, world: int, group: int, bounds: list[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges of ``n`` rows for each rank, every start on a multiple of ``group``.

    ``bounds`` (the ``world + 1`` row boundaries of a cache's own shards) puts each
    rank on its shard, moved to the nearest group boundary; without them the rows
    are cut into ``world`` near-equal parts.  A fit's float32 sums over groups of
    rows are then the one-process groups (``solvers.group_rows``).
    """
    cuts = list(bounds) if bounds is not None else [n * r // world for r in range(world + 1)]
    starts = [0] + [min(n, max(0, group_aligned(int(c), group))) for c in cuts[1:-1]] + [n]
    for r in range(1, len(starts)):
        starts[r] = max(starts[r], starts[r - 1])
    return [(starts[r], starts[r + 1]) for r in range(world)]


class FitComm:
    """The sums and gathers of a fit split over ``torchrun`` processes (``solvers.Comm``).

    On CPU the ``gloo`` group of :class:`Dist`; with one GPU per process an
    ``nccl`` group (made by every rank together) for tensors on the GPU.  All-reduce
    gives every rank the same bits, so every rank takes the solver's decisions alike.
    """

    def __init__(self, dist: Dist, device: "torch.device"):
        import torch.distributed as td

        self.dist = dist
        self.device = device
        self.group = None
        if device.type == "cuda" and td.is_nccl_available():
            self.group = td.new_group(backend="nccl")

    def sum_(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch.distributed as td

        if self.group is not None and t.is_cuda:
            td.all_reduce(t, group=self.group)
            return t
        host = t.cpu() if t.device.type != "cpu" else t
        td.all_reduce(host)
        if host is not t:
            t.copy_(host)
        return t

    def cat(self, t: "torch.Tensor") -> "torch.Tensor":
        """Every rank's ``t`` [m_r, ...] concatenated in rank order, on every rank (``solvers.Comm``)."""
        import torch

        host = t.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.gather_rows(host)).to(t.device)

    def allsum(self, a: np.ndarray) -> np.ndarray:
        """A numpy array summed over ranks (float64 stays float64)."""
        import torch

        return self.sum_(torch.from_numpy(np.ascontiguousarray(a)).clone()).numpy()

    def any(self, flag: bool) -> bool:
        return bool(self.allsum(np.array([int(flag)], dtype=np.int64))[0])

    def gather_rows(self, part: np.ndarray) -> np.ndarray:
        """Every rank's ``part`` [n_r, ...] concatenated in rank order, on every rank."""
        import torch
        import torch.distributed as td

        sizes = [int(x) for x in self._all_gather_1d(np.array([part.shape[0]], dtype=np.int64))]
        top = max(sizes)
        padded = np.zeros((top, *part.shape[1:]), dtype=part.dtype)
        padded[: part.shape[0]] = part
        out = [torch.empty_like(torch.from_numpy(padded)) for _ in range(self.dist.world)]
        td.all_gather(out, torch.from_numpy(padded))
        return np.concatenate([o.numpy()[:s] for o, s in zip(out, sizes)])

    def _all_gather_1d(self, a: np.ndarray) -> np.ndarray:
        import torch
        import torch.distributed as td

        out = [torch.empty_like(torch.from_numpy(a)) for _ in range(self.dist.world)]
        td.all_gather(out, torch.from_numpy(a))
        return np.concatenate([o.numpy() for o in out])

    def same_everywhere(self, a: np.ndarray) -> bool:
        """Whether every rank holds these bits (rank 0's broadcast compared on each, the answer shared)."""
        import torch
        import torch.distributed as td

        t = torch.from_numpy(np.ascontiguousarray(a)).clone()
        td.broadcast(t, src=0)
        return not self.any(not np.array_equal(t.numpy(), a))
