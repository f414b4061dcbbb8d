"""The batched forward over planned batches, shared by extract and the monitor.

A split is run as its plan says (documents in a fixed, length-sorted order,
each padded to a bucket of its own length), so a row never depends on its
batch.  Each batch's rows are collected after the next forward is launched,
so device work and host work overlap; a sink (a ``cache.ChunkStream``, or an
in-memory one for a repair) takes them in row order.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from ..errors import NeedleprobeError
from ..model.hooks import find_blocks, model_inputs, run_forward
from ..io.console import console, progress_bar
from ..data.tokens import TokenizedDoc, bucket_length


@dataclass
class SplitBatches:
    """A split ready to run: its tokenized documents, the positions each keeps, and the forwards' order."""

    name: str
    tdocs: list[TokenizedDoc]
    rows_of: list[np.ndarray]
    """Per document (file order): the token positions whose rows are kept, ascending (int32)."""
    batches: list[np.ndarray]
    """Document indices of each forward, in processing order (rows follow this order)."""

    def rows_in(self, batch: np.ndarray) -> int:
        return sum(len(self.rows_of[i]) for i in batch)

    def tokens_in(self, batches: list[np.ndarray]) -> int:
        return sum(self.tdocs[i].n_tokens for b in batches for i in b)


@dataclass
class Forward:
    """A loaded model inside a ``capture`` (its hooks), and how to feed it."""

    model: Any
    cap: Any
    pad_id: int
    device: torch.device
    max_tokens: int | None = None
    """Padded tokens per forward after the device ran out of memory (kept for later batches and splits)."""


@contextmanager
def forwarding(model, requests: list[tuple[str, int]], pad_id: int, device: torch.device) -> Iterator[Forward]:
    """The one way documents reach the model (extract, its repair, the monitor, ``Monitor.score``): no autograd,
    hooks on the requested (site, layer) pairs for the duration, and a :class:`Forward` for :func:`run_batches`."""
    from .sites import capture_sites

    with torch.inference_mode(), capture_sites(find_blocks(model), requests) as cap:
        yield Forward(model, cap, pad_id, device)


IN_FLIGHT = 2
"""Batches launched whose rows are not yet collected: the device always has the next forward queued while
the host copies, checks and stores the rows of an earlier one."""


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; to CUDA through pinned memory without blocking (a pageable copy waits for the
    device to finish all queued work, so the next forward could not be queued behind the running one)."""
    t = torch.from_numpy(array)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_later(tensors: dict) -> Callable[[], dict]:
    """Device tensors copied to the host without waiting: ``collect()`` returns the host tensors once copied.

    On CUDA the copies go to pinned memory behind the queued work and only
    ``collect`` waits (for them alone); elsewhere ``collect`` copies (MPS) or
    returns them as they are (CPU).
    """
    first = next(iter(tensors.values()), None)
    if first is None or first.device.type != "cuda":
        return lambda: {key: t.cpu() for key, t in tensors.items()}
    host = {}
    for key, t in tensors.items():
        host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host[key].copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def collect() -> dict:
        done.synchronize()
        return host

    return collect


class RowSink(Protocol):
    def add(self, rows: dict[str, np.ndarray]) -> None: ...


ToRows = Callable[[dict, list[np.ndarray]], Callable[[], dict[str, np.ndarray]]]
"""(activations of a batch, kept positions per document) → ``finish()`` returning the batch's rows per array."""


def row_index(batch_rows: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, token position) of every stored row of a batch, for advanced indexing of [B, T, d]."""
    b = np.concatenate([np.full(len(r), i) for i, r in enumerate(batch_rows)]).astype(np.int64)
    t = np.concatenate(batch_rows).astype(np.int64)
    return to_device(b, device), to_device(t, device)


def run_batches(fwd: Forward, split: SplitBatches, sink: RowSink, committed: int, to_rows: ToRows,
                show_progress: bool, label: str | None = None) -> int:
    """Forward the batches whose rows are not yet committed and stream their rows; returns tokens processed.

    ``to_rows(acts, [positions per doc])`` turns a batch's activations into a
    ``finish()`` that returns the arrays' rows (stored activations for extract,
    probe logits for the monitor); ``finish`` is called once :data:`IN_FLIGHT`
    later forwards are launched, so device work and host work overlap.
    Batches before the commit point are skipped whole; the first batch to run
    may already be partly stored, and its stored rows are dropped.

    A forward that runs out of device memory is split in two and retried (one
    line says so), and later forwards stay under half its padded tokens: rows
    do not depend on their batch, so the stored bytes are those of an
    unsplit run.
    """
    batches, tdocs = split.batches, split.tdocs
    row, first = 0, len(batches)
    for bi, batch in enumerate(batches):
        n = split.rows_in(batch)
        if row + n > committed:
            first = bi
            break
        row += n
    skip = committed - row
    done_docs = sum(len(b) for b in batches[:first])
    tokens = 0
    pending: deque[Callable[[], dict[str, np.ndarray]]] = deque()

    def store(rows: dict[str, np.ndarray]) -> None:
        nonlocal skip
        n = next(iter(rows.values())).shape[0]
        drop = min(skip, n)
        if drop:
            rows = {k: r[drop:] for k, r in rows.items()}
            skip -= drop
        if n > drop:
            sink.add(rows)

    n_docs = sum(len(b) for b in batches)  # all of the split's, or this process's shard of it
    todo = deque(batches[first:])
    with progress_bar(show_progress) as prog:
        task = prog.add_task(
            label or split.name,
            total=split.tokens_in(batches),
            completed=split.tokens_in(batches[:first]),
            docs=f"{done_docs}/{n_docs}",
        )
        while todo:
            batch = todo.popleft()
            lens = [tdocs[i].n_tokens for i in batch]
            T = bucket_length(max(lens))
            if fwd.max_tokens is not None and len(batch) > 1 and len(batch) * T > fwd.max_tokens:
                k = max(1, fwd.max_tokens // T)
                todo.extendleft(reversed([batch[j : j + k] for j in range(0, len(batch), k)]))
                continue
            finish = _forward(fwd, split, batch, lens, T, to_rows)
            if finish is None:  # out of memory: split in two, in order
                half = (len(batch) + 1) // 2
                todo.extendleft([batch[half:], batch[:half]])
                continue
            pending.append(finish)
            while len(pending) > IN_FLIGHT:  # an earlier batch's rows, collected while later forwards run
                store(pending.popleft()())
            tokens += sum(lens)
            done_docs += len(batch)
            prog.update(task, advance=sum(lens), docs=f"{done_docs}/{n_docs}")
        while pending:
            store(pending.popleft()())
    return tokens


def _forward(fwd: Forward, split: SplitBatches, batch: np.ndarray, lens: list[int], T: int, to_rows: ToRows):
    """Launch one batch's forward and gather; None when the device ran out of memory (and ``fwd.max_tokens`` halved)."""
    tdocs = split.tdocs
    ids = np.full((len(batch), T), fwd.pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), T), dtype=np.int64)
    for j, i in enumerate(batch):
        ids[j, : lens[j]] = tdocs[i].input_ids
        mask[j, : lens[j]] = 1
    try:
        inputs = model_inputs(fwd.model, to_device(ids, fwd.device), to_device(mask, fwd.device))
        return to_rows(run_forward(fwd.model, fwd.cap, inputs), [split.rows_of[i] for i in batch])
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError (any device) since torch 2.5
        pass  # handled outside the except clause: its traceback holds the failed forward's tensors
    inputs = None
    fwd.cap.outputs.clear()
    if fwd.device.type == "cuda":
        torch.cuda.empty_cache()
    if len(batch) == 1:
        td = tdocs[batch[0]]
        raise NeedleprobeError(
            f"document {td.doc.doc_id!r} ({td.n_tokens:,} tokens) does not fit in {fwd.device} memory even alone: "
            "lower model.max_length, or free memory on the device"
        )
    fwd.max_tokens = max(T, (len(batch) // 2) * T)
    console().print(
        f"[yellow]out of {fwd.device} memory on a forward of {len(batch)} × {T} padded tokens: retrying at most "
        f"{fwd.max_tokens:,} per forward (--max-batch-tokens sets it)"
    )
    return None
