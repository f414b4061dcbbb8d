"""Stage 1: run the model once and stream needle/negative rows into the cache.

The order of work is chosen so that a mistake costs as little as possible:
dataset and config checks, then the cache fingerprint ("up to date" returns
before any model is loaded), then tokenization and labels, then the model.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from .cache import (
    BYTES_PER_VALUE,
    CacheWriter,
    ChunkStream,
    SplitPlan,
    cache_path,
    changed_fields,
    fingerprint,
    fingerprint_fields,
    remove_cache,
    shard_name,
)
from .config import Config
from .data import by_split, file_sha256, load_documents
from .errors import NeedleprobeError
from .hooks import (
    TORCH_DTYPES,
    capture,
    find_blocks,
    load_model,
    load_tokenizer,
    model_inputs,
    model_location,
    resolve_device,
    run_forward,
)
from .records import FileLock, console, human_bytes, progress_bar, versions
from .stores import is_url
from .tokens import TokenizedDoc, apply_caps, bucket_length, plan_batches, select_rows, tokenize_documents

FIT_SPLITS = ("train", "val")


@dataclass
class ExtractResult:
    path: str
    fingerprint: str
    status: str
    """``extracted``, ``resumed`` or ``up to date``."""
    seconds: float = 0.0
    tokens: int = 0
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)


def plan_split(name: str, tdocs: list[TokenizedDoc], order: np.ndarray, cfg: Config) -> tuple[SplitPlan, list[np.ndarray]]:
    """Rows of a split in processing (length-sorted) order, with their labels; and each doc's positions."""
    p = cfg.probe
    per_doc = [select_rows(td, p.negatives_per_doc, p.sampling_seed) for td in tdocs]
    idx = [int(i) for i in order]
    positions = [per_doc[i][0] for i in idx]
    labels = np.concatenate([per_doc[i][1] for i in idx]) if idx else np.zeros(0, np.int8)
    token_index = np.concatenate(positions).astype(np.int32) if idx else np.zeros(0, np.int32)
    doc_index = np.concatenate([np.full(len(per_doc[i][0]), i, np.int32) for i in idx]) if idx else np.zeros(0, np.int32)
    token_id = np.concatenate([tdocs[i].input_ids[per_doc[i][0]] for i in idx]).astype(np.int32) if idx else np.zeros(0, np.int32)
    n_pos = int(labels.sum())
    stats = {
        "docs": len(tdocs),
        "docs_with_needles": sum(1 for td in tdocs if td.doc.needle_spans),
        "tokens": int(sum(td.n_tokens for td in tdocs)),
        "rows": int(labels.size),
        "positives": n_pos,
        "negatives": int(labels.size - n_pos),
        "truncated_docs": sum(1 for td in tdocs if td.truncated),
        "needles_lost_to_truncation": sum(td.needles_lost for td in tdocs),
        "needle_tokens_lost_to_truncation": sum(td.needle_tokens_lost for td in tdocs),
    }
    return SplitPlan(
        name=name,
        doc_ids=[td.doc.doc_id for td in tdocs],
        doc_n_tokens=np.array([td.n_tokens for td in tdocs], np.int32),
        doc_n_needles=np.array([len(td.doc.needle_spans) for td in tdocs], np.int32),
        labels=labels,
        doc_index=doc_index,
        token_index=token_index,
        token_id=token_id,
        stats=stats,
    ), [r for r, _ in per_doc]


def check_layers(layers: list[int], n_layers: int, model_name: str) -> None:
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise NeedleprobeError(
            f"probe.layers_to_probe: layer(s) {bad} out of range: {model_name} has {n_layers} blocks (valid 0..{n_layers - 1})"
        )


def check_positions(tdocs: list[TokenizedDoc], limit: int | None, cfg: Config, data_path) -> None:
    """Refuse documents longer than the model's position table before any forward (it would fail mid-run)."""
    if limit is None or cfg.model.max_length <= limit:
        return
    long = [td for td in tdocs if td.n_tokens > limit]
    if long:
        td = max(long, key=lambda t: t.n_tokens)
        raise NeedleprobeError(
            f"model.max_length {cfg.model.max_length} is more than the {limit} positions of {cfg.model.name}, and document "
            f"{td.doc.doc_id!r} ({data_path}:{td.doc.line}) has {td.n_tokens} tokens: set model.max_length to {limit} or "
            "less (longer documents are then truncated, and what is lost is reported)"
        )


def model_shape(cfg: Config) -> tuple[int | None, int | None]:
    """(block count, position limit) from the model config, read before loading any weights."""
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(model_location(cfg.model), revision=cfg.model.revision)
    except (OSError, ValueError):
        return None, None  # load_model reports the problem with full context
    text = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return getattr(text, "num_hidden_layers", None), (int(limit) if limit else None)


def row_index(batch_rows: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, token position) of every stored row of a batch, for advanced indexing of [B, T, d]."""
    b = np.concatenate([np.full(len(r), i) for i, r in enumerate(batch_rows)]).astype(np.int64)
    t = np.concatenate(batch_rows).astype(np.int64)
    return torch.from_numpy(b).to(device), torch.from_numpy(t).to(device)


def gather_rows(
    acts: dict[int, torch.Tensor], batch_rows: list[np.ndarray], feature_dtype: str
) -> Callable[[], dict[str, np.ndarray]]:
    """Stored rows of a batch per layer, cast to the feature dtype and checked finite.

    Only sampled rows leave the device (a few % of all positions).  On CUDA the
    copy goes to pinned memory without blocking and the caller collects it
    (``finish()``) after launching the next forward, so the GPU never waits for
    the host; on CPU ``finish`` just returns the arrays.
    """
    dev = next(iter(acts.values())).device
    b_idx, t_idx = row_index(batch_rows, dev)
    target = TORCH_DTYPES[feature_dtype]
    rows = {layer: a[b_idx, t_idx].to(target) for layer, a in acts.items()}
    finite = {layer: torch.isfinite(r).all() for layer, r in rows.items()}
    if dev.type == "cuda":
        host = {}
        for layer, r in rows.items():
            host[layer] = torch.empty(r.shape, dtype=r.dtype, pin_memory=True)
            host[layer].copy_(r, non_blocking=True)
        finite = {layer: f.to("cpu", non_blocking=True) for layer, f in finite.items()}
        done = torch.cuda.Event()
        done.record()
        rows = host
    else:
        done = None

    def finish() -> dict[str, np.ndarray]:
        if done is not None:
            done.synchronize()
        out = {}
        for layer, r in rows.items():
            if not bool(finite[layer]):
                hint = " (use feature_dtype: bfloat16 or float32)" if feature_dtype == "float16" else ""
                raise NeedleprobeError(f"layer {layer}: activations are not finite after casting to {feature_dtype}{hint}")
            out[f"layer_{layer}"] = (r.view(torch.uint16) if feature_dtype == "bfloat16" else r).numpy()
        return out

    return finish


def _cache_state(path, fields: dict[str, Any], overwrite: bool) -> tuple[str, Any]:
    """("new" | "stale" | "resume" | "up to date", existing cache or None); refuses a stale cache."""
    from .cache import open_cache

    if not path.exists() or (is_url(path) and not (path / "zarr.json").is_file()):  # remote: leftovers of a removal
        return "new", None
    existing = open_cache(path, allow_incomplete=True)
    diff = changed_fields(existing.fields, fields)
    if diff and not overwrite:
        raise NeedleprobeError(
            f"{path}: cache was built with different settings ({'; '.join(diff)}); "
            "rerun with --overwrite to rebuild it, or set probe.cache_dir elsewhere"
        )
    if diff:
        return "stale", existing
    return ("up to date" if existing.complete else "resume"), existing


def prepare_plans(cfg: Config, tokenizer, docs, data_path) -> dict[str, tuple]:
    """Tokenize, label, cap and batch each fit split; fails before any model is loaded."""
    splits = by_split(docs)
    plans: dict[str, tuple[list[TokenizedDoc], list[np.ndarray], list[np.ndarray], SplitPlan]] = {}
    for name in FIT_SPLITS:
        cap_docs = getattr(cfg.probe, f"max_{name}_docs")
        cap_tok = getattr(cfg.probe, f"max_{name}_tokens")
        tdocs = apply_caps(
            tokenize_documents(tokenizer, splits[name], cfg.model.max_length, cfg.model.chat_template), cap_docs, cap_tok
        )
        if not tdocs:
            raise NeedleprobeError(f"{data_path}: split {name!r} has no documents (after caps)")
        order, batches = plan_batches([td.n_tokens for td in tdocs], cfg.probe.doc_batch_size, cfg.probe.max_batch_tokens)
        plan, rows_of = plan_split(name, tdocs, order, cfg)
        if plan.stats["positives"] == 0:
            raise NeedleprobeError(
                f"{data_path}: split {name!r} has no needle tokens (no document has needle_spans that survive tokenization)"
            )
        plans[name] = (tdocs, rows_of, batches, plan)
    return plans


def extract(cfg: Config, *, overwrite: bool = False, show_progress: bool = True) -> ExtractResult:
    """Fill (or resume, or confirm) the activation cache for ``cfg``.

    Everything that can fail on bad input (dataset, caps, layer range) fails
    before a directory is created; a fresh cache that fails midway (float16
    overflow, say) is removed, while a resumed one keeps its committed rows.
    Launched by ``torchrun`` (WORLD_SIZE > 1), each process writes its shard of
    every split (see :mod:`needleprobe.distributed`).
    """
    from .distributed import Dist

    dist = Dist.from_env()
    try:
        return _extract(cfg, overwrite, show_progress, dist)
    finally:
        dist.close()


def _world_state(state: str, existing, world: int, overwrite: bool) -> str:
    """Refuse to resume a cache started with another number of processes (``--overwrite`` rebuilds it)."""
    if state != "resume":
        return state
    started = int(existing.attrs.get("world_size", 1))
    if started == world:
        return state
    if overwrite:
        return "stale"
    raise NeedleprobeError(
        f"{existing.path}: this interrupted cache was started by {started} process(es), this run has {world}; "
        f"resume it with the same number (torchrun --nproc-per-node {started}, or no torchrun for 1), "
        "or rerun with --overwrite to rebuild it"
    )


def _extract(cfg: Config, overwrite: bool, show_progress: bool, dist) -> ExtractResult:
    t0 = time.perf_counter()
    con = console()
    data_path = cfg.dataset.resolved_path()
    docs = load_documents(data_path, cfg.dataset.val_fraction)
    fields = fingerprint_fields(cfg, file_sha256(data_path))
    path = cache_path(cfg)
    state, existing = _cache_state(path, fields, overwrite)
    state = _world_state(state, existing, dist.world, overwrite)
    if state == "up to date":
        con.print(f"cache up to date: {path} (fingerprint {existing.fingerprint})")
        return ExtractResult(str(path), existing.fingerprint, "up to date")
    if state == "resume":
        fields = existing.fields  # resume exactly what was started (its layer set)
    layers = sorted(fields["layers"])
    tokenizer = load_tokenizer(cfg.model)
    plans = prepare_plans(cfg, tokenizer, docs, data_path)
    n_layers, limit = model_shape(cfg)
    if n_layers is not None:
        check_layers(layers, n_layers, cfg.model.name)
    for tdocs, *_ in plans.values():
        check_positions(tdocs, limit, cfg, data_path)
    device = dist.device(resolve_device(cfg.probe.device))
    show_progress = show_progress and dist.primary  # one bar (rank 0's shard), not one per process

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NeedleprobeError(f"{path.parent}: cannot create the cache directory ({e.strerror})") from None
    # Under torchrun rank 0 holds the lock and decides; the others wait for its decision and follow.
    lock = FileLock(path.with_name(path.name + ".lock"), what=f"extract of {path}") if dist.primary else nullcontext()
    with lock:
        if dist.primary:
            state, existing = _cache_state(path, fields, overwrite)  # again, now that we hold the lock
            state = _world_state(state, existing, dist.world, overwrite)
            if state == "stale":
                con.print(f"[yellow]--overwrite: removing the stale cache {path}")
                remove_cache(path)
        state, found = dist.broadcast((state, existing.fingerprint if state == "up to date" else None))
        if state == "up to date":
            return ExtractResult(str(path), found, "up to date")
        model = load_model(cfg.model, cfg.probe.model_dtype, device)
        blocks = find_blocks(model)
        check_layers(layers, len(blocks), cfg.model.name)
        d_model = int(model.config.get_text_config().hidden_size)

        total_rows = sum(p[3].n_rows for p in plans.values())
        est = total_rows * len(layers) * d_model * BYTES_PER_VALUE[cfg.probe.feature_dtype]
        status = "resumed" if state == "resume" else "extracted"
        con.print(
            f"{'resuming' if state == 'resume' else 'extracting'} into {path}\n  {total_rows:,} rows × {len(layers)} layers × "
            f"d_model {d_model} × {BYTES_PER_VALUE[cfg.probe.feature_dtype]} B = [bold]{human_bytes(est)}[/bold] on disk; "
            f"device {device}, model dtype {cfg.probe.model_dtype}"
        )
        metadata = {
            "model_name": cfg.model.name,
            "model_revision": cfg.model.revision,
            "model_class": type(model).__name__,
            "tokenizer_class": type(tokenizer).__name__,
            "d_model": d_model,
            "n_layers": len(blocks),
            "layers": layers,
            "feature_dtype": cfg.probe.feature_dtype,
            "dataset_sha256": fields["dataset_sha256"],
            "versions": versions(),
        }
        writer = CacheWriter(path, fields, metadata, world_size=dist.world)
        if dist.primary:
            writer.open()  # creates the root group (its fingerprint and world size)
        dist.barrier()
        if not dist.primary:
            writer.open()
        if dist.sharded:
            writer.split_parent = writer.root.require_group(shard_name(dist.rank, dist.world))
        result = ExtractResult(str(path), fingerprint(fields), status)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer") as pool, torch.inference_mode():
                with capture(blocks, layers) as cap:
                    for name, (tdocs, rows_of, batches, plan) in plans.items():
                        if dist.sharded:
                            plan, batches = _shard(con, dist, plan, tdocs, rows_of, batches)
                        group, committed = writer.prepare_split(plan, layers, d_model, cfg.probe.feature_dtype)
                        stream = ChunkStream(group, [f"layer_{layer}" for layer in layers], committed, pool)
                        result.tokens += run_batches(
                            model, cap, name, tdocs, rows_of, batches, stream, committed, pad_id, device,
                            partial(gather_rows, feature_dtype=cfg.probe.feature_dtype), show_progress,
                        )
                        stream.close()
                        result.splits[name] = plan.stats
                        if dist.primary:
                            _report_truncation(con, name, plan.stats)
            result.tokens = dist.total(result.tokens)  # waits for every shard
            if dist.primary:
                _check_shards(writer, list(plans), dist.world)
                writer.finish(list(plans), {})
        except NeedleprobeError:
            if state != "resume" and not dist.sharded:  # sharded: other processes may still write; resume instead
                remove_cache(path)  # nothing half-written under the real name
            raise
    result.seconds = time.perf_counter() - t0
    return result


def _shard(con, dist, plan: SplitPlan, tdocs, rows_of, batches):
    from .distributed import shard_split

    part, mine = shard_split(plan, tdocs, rows_of, batches, dist.rank, dist.world)
    s = part.shard
    con.print(
        f"rank {dist.rank}/{dist.world} {plan.name}: batches {s['batch_start']}–{s['batch_stop']} of {len(batches)}, "
        f"rows {s['row_start']:,}–{s['row_stop']:,} of {plan.n_rows:,} → {shard_name(dist.rank, dist.world)}/{plan.name}"
    )
    return part, mine


def _check_shards(writer: CacheWriter, splits: list[str], world: int) -> None:
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


def run_batches(
    model, cap, name: str, tdocs: list[TokenizedDoc], rows_of: list[np.ndarray], batches: list[np.ndarray],
    stream: ChunkStream, committed: int, pad_id: int, device, to_rows, show_progress: bool,
) -> int:
    """Forward the batches whose rows are not yet committed and stream their rows; returns tokens processed.

    ``to_rows(acts, [positions per doc])`` turns a batch's activations into a
    ``finish()`` that returns the arrays' rows (stored activations for extract,
    probe logits for the monitor); it is called after the next forward is
    launched, so device work and host work overlap.
    Batches before the commit point are skipped whole; the first batch to run
    may already be partly stored, and its stored rows are dropped.
    """
    row, first = 0, len(batches)
    for bi, batch in enumerate(batches):
        n = sum(len(rows_of[i]) for i in batch)
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
            stream.add(rows)
        return 0

    n_docs = sum(len(b) for b in batches)  # all of the split's, or this process's shard of it
    with progress_bar(show_progress) as prog:
        task = prog.add_task(
            name,
            total=sum(tdocs[i].n_tokens for b in batches for i in b),
            completed=sum(tdocs[i].n_tokens for b in batches[:first] for i in b),
            docs=f"{done_docs}/{n_docs}",
        )
        for batch in batches[first:]:
            lens = [tdocs[i].n_tokens for i in batch]
            T = bucket_length(max(lens))
            ids = np.full((len(batch), T), pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), T), dtype=np.int64)
            for j, i in enumerate(batch):
                ids[j, : lens[j]] = tdocs[i].input_ids
                mask[j, : lens[j]] = 1
            inputs = model_inputs(model, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
            finish = to_rows(run_forward(model, cap, inputs), [rows_of[i] for i in batch])
            if pending is not None:  # the previous batch's rows, collected while this forward runs
                skip = store(pending(), skip)
            pending = finish
            tokens += sum(lens)
            done_docs += len(batch)
            prog.update(task, advance=sum(lens), docs=f"{done_docs}/{n_docs}")
        if pending is not None:
            store(pending(), skip)
    return tokens


def _report_truncation(con, name: str, stats: dict[str, Any]) -> None:
    if stats["truncated_docs"]:
        con.print(
            f"[yellow]{name}: {stats['truncated_docs']} document(s) truncated to model.max_length; "
            f"lost {stats['needles_lost_to_truncation']} needle(s), {stats['needle_tokens_lost_to_truncation']} needle token(s)"
        )
