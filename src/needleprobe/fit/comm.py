"""Fitting across ``torchrun`` processes: each rank's rows and the solver's sums and gathers.

Each process fits on a contiguous share of the train rows (its own shard of the
cache when the cache was written by as many processes); the sums over rows are
all-reduced, so every rank holds the same iterates (``lbfgs.Comm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..io.processes import Dist

if TYPE_CHECKING:
    import torch


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
    """The sums and gathers of a fit split over ``torchrun`` processes (``lbfgs.Comm``).

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
