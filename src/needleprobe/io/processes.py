"""This process's place in a ``torchrun`` run: rank, world, the ``gloo`` group, its device.

Shared by the stages that run across processes (extract writes shards, fit splits
rows); neither the sharding of a cache nor the sums of a fit live here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import NeedleprobeError

if TYPE_CHECKING:  # torch is imported where it is used: every command asks is_primary() before it needs torch
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
