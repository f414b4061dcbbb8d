"""Exact probes at any size: a layer's rows read from the cache block by block, or split over processes.

``needleprobe fit`` holds one layer's train and val rows in memory when they fit
the memory budget (``probe.fit_memory``, ``--fit-memory``; by default half the
free memory of the fit's device).  When they do not, or under ``torchrun``, it
runs the *same* L-BFGS (:mod:`needleprobe.fit.lbfgs`: warm starts, the strict
gradient test recomputed from scratch, the O(n) line search on z and q = Xp)
with ``X`` served by :class:`LayerRows`:

* **Out of core.** As many standardised rows as the budget allows stay in
  memory (on the GPU when the fit runs there); the rest are read from the cache
  at every pass over the data, in blocks, by a background thread that reads the
  next block while the solver computes on the current one (two reused buffers).
  Every iteration reads ``X`` twice (``X @ p`` and ``X^T r``), so a fit makes
  about twice as many passes as it has iterations; :class:`IOStats` counts them
  and the bytes read.
* **Across processes.** Under ``torchrun`` every rank takes a contiguous share of
  the rows (its own shard of a sharded cache), in memory or out of core, and
  the solver all-reduces its sums over rows (``distributed.FitComm``): one
  optimisation, the same iterates on every rank.  Standardisation statistics
  are summed over all shards, and every rank gathers all val scores, so AUROC
  and the L2 choice are the one-process ones; rank 0 writes the files.

The float32 products are the in-memory ones (the solver groups rows by
:func:`~needleprobe.fit.rows.group_rows`; blocks, held rows and shares start on group
boundaries), so out of core on CPU a probe is the in-memory probe bit for bit,
and across processes the only difference is the order in which float64
partial sums are added (see ``tests/test_streaming.py``).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..cache.format import to_float32
from ..cache.reader import Cache, SplitView
from ..errors import NeedleprobeError
from .probe import FitData, column_moments_of_blocks, feature_scale
from .lbfgs import fit_l2_path
from .plan import MOMENT_BLOCK_ROWS, LayerShape, SolverChoice, stream_plan
from .rows import group_rows

@dataclass
class IOStats:
    """What a streamed fit read: passes over the train rows, bytes, and the rows it held at once."""

    passes: int = 0
    """full passes of the solver over the fit's train rows (``X @ p`` and ``X^T r`` are one each)"""
    bytes_read: int = 0
    """bytes of stored chunks read from the cache (train and val, standardisation statistics included)"""
    pass_bytes: int = 0
    """of which one solver pass reads (the rows not held in memory)"""
    read_seconds: float = 0.0
    """time the reader spent reading and converting blocks (on its own thread)"""
    wait_seconds: float = 0.0
    """time the solver waited for a block: reading that computing did not hide"""
    rows_held: int = 0
    peak_rows_held: int = 0
    """float32 rows held at once: rows kept in memory plus block buffers"""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def hold(self, rows: int) -> None:
        with self.lock:
            self.rows_held += rows
            self.peak_rows_held = max(self.peak_rows_held, self.rows_held)

    def release(self, rows: int) -> None:
        with self.lock:
            self.rows_held -= rows

    def add_read(self, nbytes: int, seconds: float) -> None:
        with self.lock:
            self.bytes_read += nbytes
            self.read_seconds += seconds

    def as_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "bytes_read": self.bytes_read, "bytes_per_pass": self.pass_bytes,
                "peak_rows_held": self.peak_rows_held}

    def timings(self) -> dict[str, float]:
        return {"read_s": round(self.read_seconds, 3), "wait_s": round(self.wait_seconds, 3)}


def _return_freed_memory() -> None:
    """Hand memory freed in every malloc arena back to the OS (glibc), so the next phase starts from what is live.

    Freed blocks stay in the arena of the thread that freed them (Zarr's reader
    threads each have one): without this, each phase's peak would stay resident.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class LayerRows:
    """One layer's rows for one fit: ``solvers.RowSource`` over rows [start, stop) of a split (or their sorted
    subset ``index``), standardised with (mean32, std32) when given.

    The first ``held_rows`` rows are read once and kept (on ``device``); the rest
    are read at every pass, ``block_rows`` at a time, into two reused buffers by a
    background thread that reads the next block while the current one is used.
    A Zarr call reads at most ``piece_rows`` rows (whole chunks, fetched together).
    """

    def __init__(self, view: SplitView, layer: int, start: int, stop: int, *, block_rows: int, piece_rows: int,
                 # 13 parameters: which rows, then keyword-only layout (plan), standardiser and device; each caller
                 # (statistics, fit, scores, tests) sets a different subset
                 index: np.ndarray | None = None, mean32: np.ndarray | None = None, std32: np.ndarray | None = None,
                 held_rows: int = 0, device: torch.device | str = "cpu", stats: IOStats | None = None,
                 check_stored: bool = True):
        self.arr = view.activations(layer)
        self.feature_dtype = view.feature_dtype
        self.start, self.stop = start, stop
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.n = (stop - start) if self.index is None else int(self.index.size)
        self.d = int(self.arr.shape[1])
        self.device = torch.device(device)
        self.block_rows, self.piece_rows = int(block_rows), int(piece_rows)
        self.mean32, self.std32 = mean32, std32
        self.stats = stats if stats is not None else IOStats()
        self.held_rows = min(int(held_rows), self.n)
        self.held: torch.Tensor | None = None
        self._buffers: list[np.ndarray] = []
        self._device_buffer: torch.Tensor | None = None
        self._holding = 0
        self._tail: tuple[int, np.ndarray] | None = None
        """(first row, stored rows): the rest of the chunk the last read ended in, for the next read"""
        c = int(self.arr.chunks[0])
        self._fetched = np.empty((self.piece_rows + c, self.d), dtype=self.arr.dtype)  # (``LayerShape.read_bytes``)
        self._tail_buffer = np.empty((c, self.d), dtype=self.arr.dtype)
        self.check_stored = check_stored
        """look for deleted chunk files before each read (``cache.read_rows``); a fit's later passes skip it"""
        if self.held_rows:
            self._hold(self.held_rows)
            host = np.empty((self.held_rows, self.d), dtype=np.float32)
            if self.device.type == "cpu":
                for a in range(0, self.held_rows, self.block_rows):
                    self._fill(host[a : a + self.block_rows], a, min(self.held_rows, a + self.block_rows))
                self.held = torch.from_numpy(host)
            else:  # filled block by block on the device: the host holds one block at a time
                del host
                self.held = torch.empty(self.held_rows, self.d, dtype=torch.float32, device=self.device)
                for a, block in self._stream(0, self.held_rows):
                    self.held[a : a + block.shape[0]].copy_(torch.from_numpy(block))
        self.pass_bytes = self._pass_bytes()
        """bytes of stored chunks one pass reads (the rows not held; each chunk once)"""

    # -- reading ---------------------------------------------------------------------
    def _hold(self, rows: int) -> None:
        self._holding += rows
        self.stats.hold(rows)

    def close(self) -> None:
        """Release the held rows and the buffers (their count leaves ``IOStats.rows_held``)."""
        self.held, self._buffers, self._device_buffer, self._tail = None, [], None, None
        self._fetched = self._tail_buffer = None
        self.stats.release(self._holding)
        self._holding = 0
        _return_freed_memory()

    def _runs(self, r0: int, r1: int) -> Iterator[tuple[int, int, int, int, np.ndarray | None]]:
        """(first row, last row + 1, raw start, raw stop, rows of the raw range or None) per Zarr read."""
        if self.index is None:  # cut at multiples of piece_rows of the split: whole chunks per read
            a, end = self.start + r0, self.start + r1
            while a < end:
                b = min(end, (a // self.piece_rows + 1) * self.piece_rows)
                yield a - self.start, b - self.start, a, b, None
                a = b
            return
        idx = self.index[r0:r1]
        piece = idx // self.piece_rows
        cuts = np.flatnonzero(np.diff(piece)) + 1
        for i, j in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [idx.size]])):
            yield r0 + int(i), r0 + int(j), int(idx[i]), int(idx[j - 1]) + 1, idx[i:j]

    def _span(self, raw0: int, raw1: int, tail: tuple[int, int] | None):
        """How reading stored rows [raw0, raw1) goes when rows ``tail`` (first, end) are kept from the last read:
        (rows taken from the tail, (first, end) rows to fetch or None, the rows to keep after it or None).

        A fetch that ends inside a chunk runs to the chunk's end (Zarr decodes it whole anyway) and keeps the rest,
        where the next block starts: blocks that do not end on a chunk boundary would otherwise fetch and decode
        that chunk twice per pass, and an object store bills every fetch."""
        take = 0
        if tail is not None and tail[0] <= raw0 < tail[1]:
            take = min(raw1, tail[1]) - raw0
            if raw1 <= tail[1]:
                return take, None, (raw1, tail[1]) if raw1 < tail[1] else None
            raw0 = tail[1]
        end = self.arr.chunk_end(raw1 - 1)
        return take, (raw0, end), (raw1, end) if end > raw1 else None

    def _read(self, raw0: int, raw1: int) -> tuple[list[tuple[int, np.ndarray]], int]:
        """Stored rows [raw0, raw1) as consecutive (first row, rows) pieces, and the stored bytes fetched (``_span``).

        Fetches go into one reused buffer (a new multi-MiB array per read costs page faults that outweigh the
        read); the pieces are valid until the next call."""
        kept = self._tail
        take, fetch, tail = self._span(raw0, raw1, None if kept is None else (kept[0], kept[0] + len(kept[1])))
        pieces, nbytes = [], 0
        if take:
            if fetch is not None and kept[1].base is self._fetched:  # the fetch below overwrites it: move it first
                moved = self._tail_buffer[: len(kept[1])]
                moved[...] = kept[1]
                kept = (kept[0], moved)
            pieces.append((raw0, kept[1][raw0 - kept[0] : raw0 - kept[0] + take]))
        source = kept
        if fetch is not None:
            lo, hi = fetch
            rows = self.arr.read(lo, hi, check_stored=self.check_stored, out=self._fetched[: hi - lo])
            nbytes = self.arr.stored_bytes(lo, hi)
            pieces.append((lo, rows[: raw1 - lo]))
            source = (lo, rows)
        self._tail = None if tail is None else (tail[0], source[1][tail[0] - source[0] :])
        return pieces, nbytes

    def _pass_bytes(self) -> int:
        """Bytes of stored chunks one pass fetches: ``_read``'s fetches for the rows not held, from an empty tail."""
        total, tail = 0, None
        for a in range(self.held_rows, self.n, self.block_rows):
            for _, _, raw0, raw1, _ in self._runs(a, min(self.n, a + self.block_rows)):
                _, fetch, tail = self._span(raw0, raw1, tail)
                if fetch is not None:
                    total += self.arr.stored_bytes(*fetch)
        return total

    def _fill(self, dst: np.ndarray, r0: int, r1: int) -> None:
        """Rows [r0, r1) (converted to float32, standardised) into dst[: r1 - r0]."""
        t0 = time.perf_counter()
        nbytes = 0
        for a, _, raw0, raw1, sel in self._runs(r0, r1):
            pieces, fetched = self._read(raw0, raw1)
            nbytes += fetched
            o = a - r0
            for first, rows in pieces:
                part = rows if sel is None else rows[sel[(sel >= first) & (sel < first + len(rows))] - first]
                to_float32(part, self.feature_dtype, out=dst[o : o + len(part)])
                o += len(part)
            del pieces
        out = dst[: r1 - r0]
        if self.mean32 is not None:  # as FitData.from_arrays: x -= mean; x /= std (float32)
            out -= self.mean32
            out /= self.std32
        self.stats.add_read(nbytes, time.perf_counter() - t0)

    def _stream(self, r0: int, r1: int) -> Iterator[tuple[int, np.ndarray]]:
        """Rows [r0, r1) as (first row, float32 block) host arrays, the next block read ahead on a thread."""
        starts = list(range(r0, r1, self.block_rows))
        if not starts:
            return
        self._tail = None  # every pass reads the same chunks (``pass_bytes``)
        if not self._buffers:
            k = 1 if self.n <= self.block_rows else 2
            self._buffers = [np.empty((self.block_rows, self.d), dtype=np.float32) for _ in range(k)]
            self._hold(k * self.block_rows)
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for buf in self._buffers:
            free.put(buf)
        stop = threading.Event()

        def work() -> None:
            try:
                for a in starts:
                    buf = free.get()
                    if stop.is_set() or buf is None:
                        return
                    b = min(r1, a + self.block_rows)
                    self._fill(buf, a, b)
                    ready.put((a, buf[: b - a], buf))
            except BaseException as e:  # noqa: BLE001 - raised on the solver's thread
                ready.put(e)

        thread = threading.Thread(target=work, name="needleprobe-prefetch", daemon=True)
        thread.start()
        try:
            for _ in starts:
                t0 = time.perf_counter()
                item = ready.get()
                self.stats.wait_seconds += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                a, block, buf = item
                yield a, block
                free.put(buf)
        finally:
            stop.set()
            free.put(None)
            thread.join()

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """One pass over all rows as (first row, float32 host block); held rows come from memory."""
        if self.held is not None:
            host = self.held.cpu().numpy() if self.device.type != "cpu" else self.held.numpy()
            for a in range(0, self.held_rows, self.block_rows):
                yield a, host[a : a + self.block_rows]
        yield from self._stream(self.held_rows, self.n)

    # -- solvers.RowSource -------------------------------------------------------------
    def groups(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """One pass: (first row, X_g [size, d] on the device), held rows first, then the streamed ones."""
        if self.block_rows % size or (self.held_rows % size and self.held_rows != self.n):
            raise ValueError(f"blocks of {self.block_rows} rows and {self.held_rows} held rows are not groups of {size}")
        if self.held is not None:
            for a in range(0, self.held_rows, size):
                yield a, self.held[a : a + size]
        for a0, block in self._stream(self.held_rows, self.n):
            if self.device.type == "cpu":
                dev_block = torch.from_numpy(block)
            else:
                if self._device_buffer is None:
                    self._device_buffer = torch.empty(self.block_rows, self.d, dtype=torch.float32, device=self.device)
                dev_block = self._device_buffer[: block.shape[0]]
                dev_block.copy_(torch.from_numpy(block))
            for a in range(0, block.shape[0], size):
                yield a0 + a, dev_block[a : a + size]
        self.stats.passes += 1


# ---------------------------------------------------------------------------
# the streamed forms of FitData


def streamed_fit_data(cache: Cache, layer: int, grid: Sequence[float], device: torch.device, choice: SolverChoice,
                      comm=None) -> FitData:
    """One layer's :class:`FitData` served by :class:`LayerRows` (out of core, across processes, or both).

    Labels and val documents are whole on every process (small); train and val
    rows are this process's range (``choice``).  The statistics are streamed
    with :func:`probe.column_moments_of_blocks` (all-reduced across processes)
    and val scores are gathered, so every process holds the same ``FitData``
    numbers as one process would.
    """
    layer_fit = _StreamedLayer(cache, layer, grid, device, choice, comm)
    val = cache.split("val")
    return FitData(layer_fit.y_train, val.labels, val.doc_index, layer_fit.mean, layer_fit.std, layer_fit.fit_path,
                   layer_fit.val_scores, solver=choice.solver, train_scores=layer_fit.train_scores, io=layer_fit.stats)


class _StreamedLayer:
    """The steps of a streamed :class:`FitData`: the statistics (read once, here), then per fit a row source."""

    def __init__(self, cache: Cache, layer: int, grid: Sequence[float], device: torch.device, choice: SolverChoice,
                 comm=None):
        assert choice.plan is not None
        self.cache, self.layer, self.grid, self.device, self.choice, self.comm = cache, layer, grid, device, choice, comm
        self.train, self.val = cache.split("train"), cache.split("val")
        self.plan = choice.plan
        (self.t0, self.t1), (self.v0, self.v1) = choice.train_range, choice.val_range
        self.stats = IOStats()
        self.n_train = self.train.n_rows
        self.host_plan = dict(block_rows=self.plan.block_rows, piece_rows=self.plan.piece_rows, stats=self.stats)
        self.mean, self.std = self._moments()
        self.mean32, self.std32 = self.mean.astype(np.float32), self.std.astype(np.float32)
        self.y_train = self.train.labels

    def _moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Standardisation statistics over every train row (all processes), one streamed pass."""
        comm = self.comm
        moments_rows = LayerRows(self.train, self.layer, self.t0, self.t1, **self.host_plan)
        try:
            mean, std = column_moments_of_blocks(lambda: (b for _, b in moments_rows.blocks()), self.n_train,
                                                 moments_rows.d, MOMENT_BLOCK_ROWS,
                                                 None if comm is None else comm.allsum)
        finally:
            moments_rows.close()
        return mean, feature_scale(mean, std)

    def local_rows(self, rows: np.ndarray | None) -> tuple[int, int, np.ndarray | None, int]:
        """(lo, hi, index, n_fit): this process's train rows of a fit on all rows or on the subset ``rows``."""
        if rows is None:
            return self.t0, self.t1, None, self.n_train
        # a row subset (downsample): this process's part of it, on group boundaries of the subset
        from .comm import row_shares

        comm = self.comm
        n_fit = int(rows.size)
        group = group_rows(n_fit, self.device.type == "cuda")
        if comm is None:
            a, b = 0, n_fit
        else:
            cuts = [int(np.searchsorted(rows, x)) for x in _range_cuts(self.choice, self.n_train, comm)]
            a, b = row_shares(n_fit, comm.dist.world, group, cuts)[comm.dist.rank]
        return 0, self.n_train, rows[a:b], n_fit

    def source(self, rows: np.ndarray | None, held: bool = True) -> LayerRows:
        lo, hi, index, n_fit = self.local_rows(rows)
        group = group_rows(n_fit, self.device.type == "cuda")
        local = (hi - lo) if index is None else index.size
        choice, plan = self.choice, self.plan
        sub_plan = plan if index is None else stream_plan(
            LayerShape.of(self.cache, self.layer, len(set(self.grid))), local, group,
            choice.budget.bytes if choice.budget else 0, hold_all=plan.held_rows >= self.t1 - self.t0, subset=True)
        return LayerRows(self.train, self.layer, lo, hi, index=index, mean32=self.mean32, std32=self.std32,
                         block_rows=sub_plan.block_rows, piece_rows=sub_plan.piece_rows,
                         held_rows=sub_plan.held_rows if held else 0, device=self.device, stats=self.stats,
                         check_stored=False)

    def fit_path(self, rows: np.ndarray | None, weights: np.ndarray | None, seed: int):
        src = self.source(rows)
        self.stats.pass_bytes = src.pass_bytes
        try:
            pick = slice(src.start, src.stop) if src.index is None else src.index
            y = torch.from_numpy(self.y_train[pick].astype(np.float32)).to(self.device)
            sw = None if weights is None else torch.from_numpy(np.ascontiguousarray(weights[pick])).to(self.device)
            out = fit_l2_path(src, y, list(self.grid), sample_weight=sw, comm=self.comm)
        finally:
            src.close()
        if self.comm is not None and not self.comm.same_everywhere(np.stack([r.weight for r in out])):
            raise NeedleprobeError("the processes of a distributed fit ended with different weights (a bug: "
                                   "please report it with the command line)")
        return out

    def train_scores(self, rows: np.ndarray | None, w_std: np.ndarray, b_std: np.ndarray) -> np.ndarray:
        """Logits of the train rows the fit used (one more pass, read block by block; every process's gathered)."""
        return self._scores(self.source(rows, held=False), w_std, b_std)

    def val_scores(self, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._scores(LayerRows(self.val, self.layer, self.v0, self.v1, **self.host_plan), w, b)

    def _scores(self, rows: LayerRows, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        try:
            out = np.empty((rows.n, w.shape[1]), dtype=np.float32)
            for a, block in rows.blocks():  # numpy's BLAS, as the in-memory form scores on CPU (rows alike in any block)
                out[a : a + block.shape[0]] = block @ w + b
        finally:
            rows.close()
        return out if self.comm is None else self.comm.gather_rows(out)


def _range_cuts(choice: SolverChoice, n_train: int, comm) -> list[int]:
    """Every rank's train range boundaries [0, s_1, …, n] (from each rank's own range)."""
    starts = comm.gather_rows(np.array([choice.train_range[0]], dtype=np.int64))
    return [int(x) for x in starts] + [n_train]
