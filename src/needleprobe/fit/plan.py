"""The memory plan of a fit: in memory, out of core or across processes, from the layer's shape and the budget.

Pure arithmetic over :class:`LayerShape` (rows, width, stored dtype, chunking,
grid size), the budget and the world size: what a fit holds at once (rows,
block buffers, the solver's vectors and L-BFGS history, Zarr's reads), and so
which form fits.  :mod:`needleprobe.fit.streaming` serves the rows the plan
chose; the numbers below are measured there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cache.reader import Cache, SplitView
from ..errors import NeedleprobeError
from ..io.console import human_bytes
from .lbfgs import MEMORY
from .rows import group_rows

SOLVER_ROW_BYTES = 48
SOLVER_COLUMN_ROW_BYTES = 112
"""Vectors over rows the solver holds at once, per train row: 48 B (labels, weights) plus 112 B per L2 value
(z, q, residuals and the line search's trials in float64; the final check scores every L2 value at once).
Measured: a 60,000 × 768 layer with 5 L2 values peaked at ~560 B per row beyond the rows and buffers."""
BLOCK_BYTES = 32 << 20
"""Float32 rows per streamed block, at most (two such buffers): large reads, few Python calls."""
MAX_PIECE_CHUNKS = 16
"""Cache chunks read by one Zarr call, at most (Zarr fetches a call's chunks concurrently: an object store wants that)."""
MOMENT_BLOCK_ROWS = 256
"""Rows per float64 block of the streamed standardisation statistics (their sums do not depend on it)."""


# ---------------------------------------------------------------------------
# the memory budget and the choice of solver


@dataclass(frozen=True)
class Budget:
    """How much memory a fit may hold on its device, and where that number came from."""

    bytes: int
    source: str

    def __str__(self) -> str:
        return f"{human_bytes(self.bytes)} ({self.source})"


def available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def fit_budget(fit_memory: str | None, device: torch.device, processes_here: int = 1) -> Budget:
    """``probe.fit_memory`` when set, else half the free memory of ``device`` (host memory shared by this host's
    ``torchrun`` processes; a GPU's own)."""
    from ..config import parse_bytes

    if fit_memory is not None:
        return Budget(parse_bytes(fit_memory), "--fit-memory / probe.fit_memory")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return Budget(int(0.5 * free), f"half the free memory of {device}")
    free = available_host_memory()
    if processes_here > 1:
        return Budget(int(0.5 * free / processes_here),
                      f"half the free host memory shared by {processes_here} processes")
    return Budget(int(0.5 * free), "half the free host memory")


def zarr_reader_threads() -> int:
    """Threads Zarr reads chunk files on (its ``threading.max_workers``, else asyncio's default pool size)."""
    import os

    import zarr

    n = zarr.config.get("threading.max_workers", None)
    return int(n) if n else min(32, (os.cpu_count() or 1) + 4)


@dataclass(frozen=True)
class LayerShape:
    """What the memory arithmetic needs to know about one layer of a cache."""

    n_train: int
    n_val: int
    d: int
    itemsize: int
    """bytes per stored value (2 for bfloat16 and float16, 4 for float32)"""
    chunk_rows: int
    columns: int = 5
    """distinct L2 values of the grid (the solver's vectors over rows grow with them)"""

    @classmethod
    def of(cls, cache: Cache, layer: int, columns: int = 5) -> "LayerShape":
        arr = cache.split("train").activations(layer)
        return cls(int(arr.shape[0]), int(cache.split("val").n_rows), int(arr.shape[1]),
                   int(np.dtype(arr.dtype).itemsize), int(arr.chunks[0]), columns)

    def history_bytes(self) -> int:
        """L-BFGS pairs (S, Y) and their products (S^T Y, Y^T Y), float64."""
        return 2 * MEMORY * (self.d + 1 + MEMORY) * 8

    def read_bytes(self, rows: int, subset: bool = False) -> int:
        """What reading ``rows`` rows at a time holds: the stored chunks and the decoded rows (and the copy of a
        row subset), two chunks more (a read runs to the end of its last chunk, and the rest of that chunk is
        kept for the next read), plus a chunk kept by each of Zarr's reader threads (freed memory that their own
        malloc arenas keep for the next read: measured 32 MB for 4 MiB chunks and 6 threads)."""
        c = self.chunk_rows
        kept = min(zarr_reader_threads(), -(-rows // c) + 1)  # threads a read of ``rows`` rows keeps busy
        return ((3 if subset else 2) * rows + (kept + 2) * c) * self.d * self.itemsize

    def fixed_bytes(self, n_rows: int) -> int:
        """Held whatever the layout: solver vectors, L-BFGS history, the statistics' float64 block."""
        return (n_rows * (SOLVER_ROW_BYTES + SOLVER_COLUMN_ROW_BYTES * self.columns) + self.history_bytes()
                + (MOMENT_BLOCK_ROWS + 1) * self.d * 8)

    def in_memory_bytes(self) -> int:
        """One process, every train and val row in float32 (``FitData.from_arrays``), read 16 chunks at a time."""
        rows = self.n_train + self.n_val
        return (rows * self.d * 4 + self.fixed_bytes(self.n_train)
                + self.read_bytes(min(max(self.n_train, self.n_val), 16 * self.chunk_rows)))


@dataclass(frozen=True)
class StreamPlan:
    """How a process lays its rows out in the budget: rows held, block and Zarr-read sizes (rows)."""

    held_rows: int
    block_rows: int
    piece_rows: int
    group: int
    subset: bool = False

    def bytes(self, shape: LayerShape, n_rows: int) -> int:
        return (shape.fixed_bytes(n_rows) + (self.held_rows + 2 * self.block_rows) * shape.d * 4
                + shape.read_bytes(self.piece_rows, self.subset))


def stream_plan(shape: LayerShape, n_rows: int, group: int, budget: int, hold_all: bool = False,
                subset: bool = False) -> StreamPlan:
    """The largest ``held_rows`` (multiple of ``group``) that fits ``budget`` beside two blocks of at most
    ``BLOCK_BYTES``; ``hold_all`` asks for every row held (a process's share in memory); ``subset``: the rows
    are a subset (downsample) picked from what is read.

    Raises :class:`NeedleprobeError` when not even two blocks of one group fit.
    """
    c = shape.chunk_rows

    def piece(block: int) -> int:
        return c * max(1, min(MAX_PIECE_CHUNKS, block // c))

    block = max(group, (BLOCK_BYTES // (4 * shape.d)) // group * group)
    block = min(block, max(group, -(-n_rows // group) * group))  # never more than the rows, rounded up
    while block > group and StreamPlan(0, block, piece(block), group, subset).bytes(shape, n_rows) > budget:
        block = max(group, block // 2 // group * group)
    plan = StreamPlan(0, block, piece(block), group, subset)
    need = plan.bytes(shape, n_rows)
    if need > budget:
        raise NeedleprobeError(
            f"a fit memory of {human_bytes(budget)} cannot hold even two blocks of {block:,} rows of this layer "
            f"beside the solver's {human_bytes(shape.fixed_bytes(n_rows))} for {n_rows:,} rows: it needs at least "
            f"{human_bytes(need)} (raise --fit-memory / probe.fit_memory, or split the rows over processes with torchrun)"
        )
    spare = budget - need
    held = min(n_rows, spare // (4 * shape.d) // group * group)
    if hold_all or held >= n_rows:
        held = n_rows
    return StreamPlan(held, block, plan.piece_rows, group, subset)


@dataclass
class SolverChoice:
    """Which solver fits a layer, why (said on the terminal), and how this process lays its rows out."""

    solver: str
    """``lbfgs``, ``lbfgs-out-of-core``, ``lbfgs-distributed``, ``lbfgs-distributed-out-of-core`` or ``minibatch``"""
    why: str
    budget: Budget | None = None
    plan: StreamPlan | None = None
    """None: the in-memory form (one process) or minibatch"""
    train_range: tuple[int, int] = (0, 0)
    val_range: tuple[int, int] = (0, 0)

    @property
    def streamed(self) -> bool:
        return self.plan is not None


def choose(solver: str, cache: Cache, layer: int, device: torch.device, budget: Budget, comm=None,
           columns: int = 5) -> SolverChoice:
    """In memory, out of core or across processes, from the rows, the budget, the processes (see module doc) and
    the grid's ``columns`` (distinct L2 values)."""
    shape = LayerShape.of(cache, layer, columns)
    rows = human_bytes((shape.n_train + shape.n_val) * shape.d * 4)
    if solver == "minibatch":
        if comm is not None:
            raise NeedleprobeError("solver minibatch runs in one process: run fit without torchrun, or use lbfgs")
        return SolverChoice("minibatch", "asked for by name (approximate: Adam on minibatches)")
    group = group_rows(shape.n_train, device.type == "cuda")
    if comm is None:
        need = shape.in_memory_bytes()
        if need <= budget.bytes:
            return SolverChoice("lbfgs", f"exact L-BFGS in memory: train + val rows ({rows} in float32) and the "
                                f"solver ({human_bytes(need)} in all) fit the budget of {budget}", budget)
        plan = stream_plan(shape, shape.n_train, group, budget.bytes)
        return SolverChoice(
            "lbfgs-out-of-core",
            f"exact L-BFGS out of core: train + val rows ({rows} in float32; {human_bytes(need)} with the solver) "
            f"exceed the budget of {budget}; {plan.held_rows:,} of {shape.n_train:,} train rows held in memory, the "
            f"rest read from the cache at every pass in {plan.block_rows:,}-row blocks, one block read ahead",
            budget, plan, (0, shape.n_train), (0, shape.n_val))
    dist = comm.dist
    train, val = cache.split("train"), cache.split("val")
    train_bounds = _shard_bounds(train, cache, dist.world)
    val_bounds = _shard_bounds(val, cache, dist.world)
    from .comm import row_shares

    t0, t1 = row_shares(shape.n_train, dist.world, group, train_bounds)[dist.rank]
    v0, v1 = row_shares(shape.n_val, dist.world, 1, val_bounds)[dist.rank]
    try:
        plan, refused = stream_plan(shape, t1 - t0, group, budget.bytes), None
    except NeedleprobeError as e:
        plan, refused = None, NeedleprobeError(f"rank {dist.rank}: {e}")
    if comm.any(refused is not None):  # every process stops with a message, none waits on the others' sums
        raise refused or NeedleprobeError(
            f"rank {dist.rank}: another process's share of the train rows does not fit the budget of {budget}; its "
            "own message says what it needs: raise --fit-memory / probe.fit_memory, or run more processes")
    held_all = plan.held_rows >= t1 - t0
    out_of_core = comm.any(not held_all)
    own = "each its shard of the cache" if train_bounds is not None else "each a contiguous share"
    mine = (f"rank {dist.rank}: train rows {t0:,}–{t1:,} ({plan.held_rows:,} held"
            f"{'' if held_all else f', the rest read in {plan.block_rows:,}-row blocks'}), val rows {v0:,}–{v1:,}")
    return SolverChoice(
        "lbfgs-distributed-out-of-core" if out_of_core else "lbfgs-distributed",
        f"exact L-BFGS across {dist.world} processes ({own}; sums over rows all-reduced), "
        f"{'out of core on at least one' if out_of_core else 'every share in memory'} (budget {budget}); {mine}",
        budget, plan, (t0, t1), (v0, v1))


def _shard_bounds(view: SplitView, cache: Cache, world: int) -> list[int] | None:
    """Row boundaries of a split's shards when the cache was written by ``world`` processes, else None."""
    if cache.world_size != world or world == 1:
        return None
    return [int(x) for x in view.activations(cache.layers[0]).bounds]
