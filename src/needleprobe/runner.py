"""The batched forward over planned batches, shared by extract and the monitor.

A split is run as its plan says (documents in a fixed, length-sorted order,
each padded to a bucket of its own length), so a row never depends on its
batch.  Each batch's rows are collected after the next forward is launched,
so device work and host work overlap; a sink (a ``cache.ChunkStream``, or an
in-memory one for a repair) takes them in row order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch

from .hooks import model_inputs, run_forward
from .records import progress_bar
from .tokens import TokenizedDoc, bucket_length


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


class RowSink(Protocol):
    def add(self, rows: dict[str, np.ndarray]) -> None: ...


ToRows = Callable[[dict, list[np.ndarray]], Callable[[], dict[str, np.ndarray]]]
"""(activations of a batch, kept positions per document) → ``finish()`` returning the batch's rows per array."""


def row_index(batch_rows: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, token position) of every stored row of a batch, for advanced indexing of [B, T, d]."""
    b = np.concatenate([np.full(len(r), i) for i, r in enumerate(batch_rows)]).astype(np.int64)
    t = np.concatenate(batch_rows).astype(np.int64)
    return torch.from_numpy(b).to(device), torch.from_numpy(t).to(device)


def run_batches(fwd: Forward, split: SplitBatches, sink: RowSink, committed: int, to_rows: ToRows,
                show_progress: bool, label: str | None = None) -> int:
    """Forward the batches whose rows are not yet committed and stream their rows; returns tokens processed.

    ``to_rows(acts, [positions per doc])`` turns a batch's activations into a
    ``finish()`` that returns the arrays' rows (stored activations for extract,
    probe logits for the monitor); it is called after the next forward is
    launched, so device work and host work overlap.
    Batches before the commit point are skipped whole; the first batch to run
    may already be partly stored, and its stored rows are dropped.
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
    pending = None

    def store(rows: dict[str, np.ndarray], skip: int) -> int:
        if skip:
            rows = {k: r[skip:] for k, r in rows.items()}
        if next(iter(rows.values())).shape[0]:
            sink.add(rows)
        return 0

    n_docs = sum(len(b) for b in batches)  # all of the split's, or this process's shard of it
    with progress_bar(show_progress) as prog:
        task = prog.add_task(
            label or split.name,
            total=split.tokens_in(batches),
            completed=split.tokens_in(batches[:first]),
            docs=f"{done_docs}/{n_docs}",
        )
        for batch in batches[first:]:
            lens = [tdocs[i].n_tokens for i in batch]
            T = bucket_length(max(lens))
            ids = np.full((len(batch), T), fwd.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), T), dtype=np.int64)
            for j, i in enumerate(batch):
                ids[j, : lens[j]] = tdocs[i].input_ids
                mask[j, : lens[j]] = 1
            inputs = model_inputs(fwd.model, torch.from_numpy(ids).to(fwd.device), torch.from_numpy(mask).to(fwd.device))
            finish = to_rows(run_forward(fwd.model, fwd.cap, inputs), [split.rows_of[i] for i in batch])
            if pending is not None:  # the previous batch's rows, collected while this forward runs
                skip = store(pending(), skip)
            pending = finish
            tokens += sum(lens)
            done_docs += len(batch)
            prog.update(task, advance=sum(lens), docs=f"{done_docs}/{n_docs}")
        if pending is not None:
            store(pending(), skip)
    return tokens
