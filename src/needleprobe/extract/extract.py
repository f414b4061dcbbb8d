"""Stage 1: run the model once and stream needle/negative rows into the cache.

The order of work is chosen so that a mistake costs as little as possible:
dataset and config checks, then the cache fingerprint ("up to date" returns
before any model is loaded), then tokenization and labels, then the free disk
space against the size the cache will take, then the model.

``--repair`` reads every chunk of a finished (or resumable) cache and rewrites
only the damaged ones: the small arrays from the plan, the activations by
re-running just the batches whose rows the damaged chunks hold.
"""

from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
import contextlib
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from .batching import batch_plan, budget_message, device_budget
from ..cache.format import BYTES_PER_VALUE, FIT_SPLITS, cache_path, doc_digest, fingerprint, fingerprint_fields, stale_reasons
from ..cache.reader import shard_name
from ..cache.writer import CacheWriter, ChunkStream, SplitPlan, remove_cache
from ..config import Config
from ..data.documents import by_split, file_sha256, load_documents
from ..errors import NeedleprobeError
from ..model.hooks import (
    TORCH_DTYPES,
    check_layers,
    check_positions,
    find_blocks,
    load_model,
    load_tokenizer,
    model_shape,
)
from ..io.console import console, human_bytes
from ..io.files import FileLock
from ..run.layout import lock_beside
from ..run.record import versions
from .repair import ModelRun, repair_chunks
from .sharding import announce_shard, check_shards
from .space import ROW_OVERHEAD_BYTES, cache_bytes, check_free_space, free_bytes, stored_rows
from .runner import SplitBatches, forwarding, host_later, row_index, run_batches
from ..io.runtime import resolve_device
from ..io.stores import is_url
from ..cache.inspect import dir_size
from ..data.tokens import TokenizedDoc, apply_caps, select_rows, tokenize_documents


@dataclass
class ExtractResult:
    path: str
    fingerprint: str
    status: str
    """``extracted``, ``resumed``, ``repaired`` or ``up to date``."""
    seconds: float = 0.0
    tokens: int = 0
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)
    """The damaged chunks ``--repair`` rewrote, as messages."""
    sites: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Activation site → (its cache, its fingerprint): one cache per site, all filled by one forward pass."""


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
    chars = np.concatenate([tdocs[i].offsets[per_doc[i][0]] for i in idx]).astype(np.int32) if idx else np.zeros((0, 2), np.int32)
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
        doc_digests=[doc_digest(td.doc) for td in tdocs],
        char_start=chars[:, 0].copy(),
        char_end=chars[:, 1].copy(),
    ), [r for r, _ in per_doc]


def gather_rows(
    acts: dict[tuple[str, int], torch.Tensor], batch_rows: list[np.ndarray], feature_dtype: str
) -> Callable[[], dict[tuple[str, int], np.ndarray]]:
    """Stored rows of a batch per (site, layer), cast to the feature dtype and checked finite.

    Only sampled rows leave the device (a few % of all positions).  On CUDA the
    copy goes to pinned memory without blocking and the caller collects it
    (``finish()``) once later forwards are queued, so the GPU never waits for
    the host; on CPU ``finish`` just returns the arrays.
    """
    dev = next(iter(acts.values())).device
    b_idx, t_idx = row_index(batch_rows, dev)
    target = TORCH_DTYPES[feature_dtype]
    rows = {layer: a[b_idx, t_idx].to(target) for layer, a in acts.items()}
    rows["finite"] = torch.stack([torch.isfinite(r).all() for r in rows.values()])  # one check copied, not one per layer
    collect = host_later(rows)

    def finish() -> dict[str, np.ndarray]:
        host = dict(collect())
        finite = host.pop("finite")
        out = {}
        for ok, (key, r) in zip(finite.tolist(), host.items()):
            if not ok:
                hint = " (use feature_dtype: bfloat16 or float32)" if feature_dtype == "float16" else ""
                site, layer = key
                raise NeedleprobeError(
                    f"{site} of layer {layer}: activations are not finite after casting to {feature_dtype}{hint}"
                )
            out[key] = (r.view(torch.uint16) if feature_dtype == "bfloat16" else r).numpy()
        return out

    return finish


def _cache_state(path, cfg: Config, docs, overwrite: bool) -> tuple[str, Any]:
    """("new" | "stale" | "resume" | "up to date", existing cache or None); refuses a stale cache."""
    from ..cache.reader import open_cache

    if not path.exists() or (is_url(path) and not (path / "zarr.json").is_file()):  # remote: leftovers of a removal
        return "new", None
    existing = open_cache(path, allow_incomplete=True)
    diff = stale_reasons(existing, cfg, docs)
    if diff and not overwrite:
        raise NeedleprobeError(
            f"{path}: cache was built with different settings ({'; '.join(diff)}); "
            "rerun with --overwrite to rebuild it, or set probe.cache_dir elsewhere"
        )
    if diff:
        return "stale", existing
    return ("up to date" if existing.complete else "resume"), existing


@dataclass
class SplitWork:
    """One split of an extract: what to run (``batches``) and what its group holds (``plan``)."""

    batches: SplitBatches
    plan: SplitPlan


def prepare_plans(cfg: Config, tokenizer, docs, data_path, names: tuple[str, ...] = FIT_SPLITS) -> dict[str, SplitWork]:
    """Tokenize, label, cap and batch each fit split (of ``names``); fails before any model is loaded."""
    splits = by_split(docs)
    plans: dict[str, SplitWork] = {}
    for name in names:
        cap_docs = getattr(cfg.probe, f"max_{name}_docs")
        cap_tok = getattr(cfg.probe, f"max_{name}_tokens")
        tdocs = apply_caps(
            tokenize_documents(tokenizer, splits[name], cfg.model.max_length, cfg.model.chat_template), cap_docs, cap_tok
        )
        if not tdocs:
            raise NeedleprobeError(f"{data_path}: split {name!r} has no documents (after caps)")
        order, batches = batch_plan([td.n_tokens for td in tdocs], cfg.probe)
        plan, rows_of = plan_split(name, tdocs, order, cfg)
        if plan.stats["positives"] == 0:
            raise NeedleprobeError(
                f"{data_path}: split {name!r} has no needle tokens (no document has needle_spans that survive tokenization)"
            )
        plans[name] = SplitWork(SplitBatches(name, tdocs, rows_of, batches), plan)
    return plans


def extract(
    cfg: Config, *, overwrite: bool = False, show_progress: bool = True, repair: bool = False, force: bool = False,
    splits: tuple[str, ...] = FIT_SPLITS,
) -> ExtractResult:
    """Fill (or resume, or confirm, or repair) the activation cache for ``cfg``.

    Everything that can fail on bad input (dataset, caps, layer range, too
    little free disk space unless ``force``) fails before a directory is
    created; a fresh cache that fails midway on a user error (float16
    overflow, say) is removed, while a resumed one keeps its committed rows.  A
    full disk keeps the committed rows and says so (run again to resume); any
    other exception is recorded on the cache (``Cache.last_failure``).
    ``repair`` rewrites the chunks that fail their checksum, or are missing,
    recomputing only what they hold (see :func:`repair_chunks`).
    Launched by ``torchrun`` (WORLD_SIZE > 1), each process writes its shard of
    every split (see :mod:`needleprobe.extract.sharding`).
    ``splits``: some of the cache's splits only (what ``evaluate`` scores): the cache then lists those as written
    and stays incomplete, and a later full extract resumes it with the others.
    """
    from ..io.processes import Dist, launched_world

    if tuple(splits) != FIT_SPLITS and (repair or launched_world()[1] > 1):
        raise NeedleprobeError("extracting some splits only runs in one process, without --repair")
    if repair and launched_world()[1] > 1:
        raise NeedleprobeError(
            "extract --repair runs in one process and repairs every shard: run it without torchrun"
        )
    dist = Dist.from_env()
    try:
        return _extract(cfg, overwrite, show_progress, dist, repair=repair, force=force, splits=tuple(splits))
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


@dataclass
class SiteJob:
    """One activation site of an extract: its own cache, fingerprint, state and writer."""

    site: str
    cfg: Config
    """The config for this site alone (``Config.for_site``)."""
    path: Any
    fields: dict[str, Any]
    state: str
    """``new``, ``stale``, ``resume`` or ``up to date``."""
    existing: Any = None
    writer: CacheWriter | None = None

    @property
    def layers(self) -> list[int]:
        return sorted(self.fields["layers"])


def _jobs(cfg: Config, docs, overwrite: bool, world: int) -> list[SiteJob]:
    jobs = []
    for site in cfg.probe.sites:
        scfg = cfg.for_site(site)
        path = cache_path(scfg)
        state, existing = _cache_state(path, scfg, docs, overwrite)
        state = _world_state(state, existing, world, overwrite)
        fields = existing.fields if state in ("resume", "up to date") else fingerprint_fields(scfg, docs)
        jobs.append(SiteJob(site, scfg, path, fields, state, existing))  # resume exactly what was started
    return jobs


class _SiteStreams:
    """Takes a split's rows from ``runner.run_batches`` and hands each site's to its ChunkStream.

    The run starts at the smallest commit point over the sites; each site
    drops the rows it had already committed, so a kill between two sites'
    flushes resumes every cache to the same bytes.
    """

    def __init__(self, streams: dict[str, tuple[ChunkStream, list[int], int]], start: int):
        self.streams = streams  # site → (stream, layers, committed rows)
        self.pos = start

    def add(self, rows: dict[tuple[str, int], np.ndarray]) -> None:
        n = next(iter(rows.values())).shape[0]
        for site, (stream, layers, committed) in self.streams.items():
            skip = max(0, min(n, committed - self.pos))
            if skip < n:
                stream.add({f"layer_{layer}": rows[(site, layer)][skip:] for layer in layers})
        self.pos += n


# Long (~100 lines) on purpose: one ordered sequence whose order is the contract (every check before the model
# loads, decisions under the locks, writers, the split streams, then commit or a failure recorded on the cache).
def _extract(cfg: Config, overwrite: bool, show_progress: bool, dist, repair: bool = False, force: bool = False,
             splits: tuple[str, ...] = FIT_SPLITS) -> ExtractResult:
    t0 = time.perf_counter()
    con = console()
    data_path = cfg.dataset.resolved_path()
    docs = load_documents(data_path, cfg.dataset.val_fraction)
    jobs = _jobs(cfg, docs, overwrite, dist.world)
    if repair:
        for job in jobs:
            if job.state in ("new", "stale"):
                con.print(f"--repair: no cache with these settings at {job.path} yet, nothing to repair: extracting")
        repair = any(job.state in ("resume", "up to date") for job in jobs)
    if all(job.state == "up to date" for job in jobs) and not repair:
        for job in jobs:
            con.print(f"cache up to date: {job.path} (fingerprint {job.existing.fingerprint})")
        return _result(jobs, "up to date")
    tokenizer = load_tokenizer(cfg.model)
    plans = prepare_plans(cfg, tokenizer, docs, data_path, splits)
    legacy = {job.site for job in jobs if "documents" not in job.fields}  # caches from before per-document digests
    split_rows = _preflight(cfg, jobs, plans, data_path, dist.world, force)
    device = dist.device(resolve_device(cfg.probe.device))
    show_progress = show_progress and dist.primary  # one bar (rank 0's shard), not one per process

    for job in jobs:
        try:
            job.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NeedleprobeError(f"{job.path.parent}: cannot create the cache directory ({e.strerror})") from None
    # Under torchrun rank 0 holds the locks and decides; the others wait for its decision and follow.
    with contextlib.ExitStack() as locks:
        _decide(locks, con, jobs, docs, overwrite, dist)
        if all(job.state == "up to date" for job in jobs) and not repair:
            return _result(jobs, "up to date")
        model_parts = _model_loader(cfg, device, jobs)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        repaired: list[str] = []
        tokens = 0
        if repair:
            repaired, tokens = _repair_all(con, jobs, plans, ModelRun(model_parts, pad_id, device, show_progress), legacy)
            if all(job.state == "up to date" for job in jobs):
                status = "repaired" if repaired else "up to date"
                res = _result(jobs, status, time.perf_counter() - t0, tokens)
                res.repaired = repaired
                return res
        work_jobs = [job for job in jobs if job.state != "up to date"]
        model, blocks, d_model = model_parts()
        _auto_plan(con, cfg, plans, model, device, sum(len(job.layers) for job in work_jobs), dist)
        status = "resumed" if any(job.state == "resume" for job in work_jobs) else "extracted"
        _announce(con, cfg, work_jobs, split_rows, d_model, device, dist.world, status)
        for job in work_jobs:
            job.writer = CacheWriter(job.path, job.fields, _cache_metadata(cfg, job, (model, blocks, d_model), tokenizer,
                                                                           data_path, device, dist.world),
                                     world_size=dist.world)
        result = _result(jobs, status, tokens=tokens)
        result.repaired = repaired
        current = None
        try:
            for job in work_jobs:
                current = job
                if dist.primary:
                    job.writer.open()  # creates the root group (its fingerprint and world size)
            dist.barrier()
            for job in work_jobs:
                current = job
                if not dist.primary:
                    job.writer.open()
                if dist.sharded:
                    job.writer.split_parent = job.writer.root.require_group(shard_name(dist.rank, dist.world))
                job.writer.clear_failure()
            current = None
            requests = [(job.site, layer) for job in work_jobs for layer in job.layers]
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer") as pool:
                with forwarding(model, requests, pad_id, device) as fwd:
                    for name, work in plans.items():
                        plan, split = work.plan, work.batches
                        if dist.sharded:
                            plan, split = announce_shard(con, dist, plan, split)
                        streams = {}
                        for job in work_jobs:
                            job_plan = replace(plan, doc_digests=None) if job.site in legacy else plan
                            group, committed = job.writer.prepare_split(job_plan, job.layers, d_model, cfg.probe.feature_dtype)
                            names = [f"layer_{layer}" for layer in job.layers]
                            streams[job.site] = (ChunkStream(group, names, committed, pool), job.layers, committed)
                        start = min(c for _, _, c in streams.values())
                        result.tokens += run_batches(
                            fwd, split, _SiteStreams(streams, start), start,
                            partial(gather_rows, feature_dtype=cfg.probe.feature_dtype), show_progress,
                        )
                        for stream, _, _ in streams.values():
                            stream.close()
                        result.splits[name] = plan.stats
                        if dist.primary:
                            _report_truncation(con, name, plan.stats)
            result.tokens = dist.total(result.tokens)  # waits for every shard
            if dist.primary:
                _finish_caches(work_jobs, plans, dist.world)
        except Exception as e:  # a bug, or a failing device: keep the committed rows, and say on the cache what happened
            _on_failure(e, work_jobs, plans, dist, current)
            raise
    result.seconds = time.perf_counter() - t0
    return result


def _preflight(cfg: Config, jobs: list[SiteJob], plans: dict[str, SplitWork], data_path, world: int,
               force: bool) -> list[int]:
    """Every check that needs no model, before anything is written: layers, sites, positions, free disk space.
    Returns each split's row count."""
    from .sites import check_model_sites

    n_layers, d_model_cfg, limit = model_shape(cfg)
    for job in jobs:
        if n_layers is not None:
            check_layers(job.layers, n_layers, cfg.model.name)
    check_model_sites(cfg, [(job.site, layer) for job in jobs for layer in job.layers])  # before anything is written
    for work in plans.values():
        check_positions(work.batches.tdocs, limit, cfg, data_path)
    split_rows = [w.plan.n_rows for w in plans.values()]
    if d_model_cfg is not None:
        need = 0
        for job in jobs:
            if job.state != "up to date":
                present = dir_size(job.path) if job.existing is not None and not is_url(job.path) else 0  # resumed rows stay
                need += cache_bytes(split_rows, len(job.layers), d_model_cfg, cfg.probe.feature_dtype, world) - present
        check_free_space(jobs[0].path, need, force)
    return split_rows


def _decide(locks: contextlib.ExitStack, con, jobs: list[SiteJob], docs, overwrite: bool, dist) -> None:
    """Under torchrun rank 0 takes the locks and decides each cache's state again; the others follow its decision."""
    if dist.primary:
        for job in sorted(jobs, key=lambda j: str(j.path)):
            locks.enter_context(FileLock(lock_beside(job.path), what=f"extract of {job.path}"))
        for job in jobs:  # again, now that we hold the locks
            job.state, job.existing = _cache_state(job.path, job.cfg, docs, overwrite)
            job.state = _world_state(job.state, job.existing, dist.world, overwrite)
            if job.state == "stale":
                con.print(f"[yellow]--overwrite: removing the stale cache {job.path}")
                remove_cache(job.path)
    decided = dist.broadcast([(j.state, j.existing.fingerprint if j.state == "up to date" else None) for j in jobs])
    for job, (state, _) in zip(jobs, decided):
        job.state = state


def _model_loader(cfg: Config, device, jobs: list[SiteJob]) -> Callable[[], tuple[Any, Any, int]]:
    """``() -> (model, blocks, d_model)``, loaded on first use (a repair of small arrays needs no model)."""
    loaded: dict[str, Any] = {}

    def model_parts():
        if not loaded:
            model = load_model(cfg.model, cfg.probe.model_dtype, device)
            blocks = find_blocks(model)
            for job in jobs:
                check_layers(job.layers, len(blocks), cfg.model.name)
            loaded.update(model=model, blocks=blocks, d_model=int(model.config.get_text_config().hidden_size))
        return loaded["model"], loaded["blocks"], loaded["d_model"]

    return model_parts


def _repair_all(con, jobs: list[SiteJob], plans: dict[str, SplitWork], run: ModelRun, legacy: set[str]
                ) -> tuple[list[str], int]:
    """``--repair`` on every cache that exists: (chunks repaired, tokens through the model)."""
    repaired: list[str] = []
    tokens = 0
    for job in jobs:
        if job.state not in ("resume", "up to date"):
            continue
        done, n = repair_chunks(con, job, plans, run, legacy=job.site in legacy)
        repaired += done
        tokens += n
    return repaired, tokens


def _announce(con, cfg: Config, work_jobs: list[SiteJob], split_rows: list[int], d_model: int, device, world: int,
              status: str) -> None:
    """One line before the model runs: what will be written where, its size on disk and the free space."""
    free = free_bytes(work_jobs[0].path)
    n_sites = len(work_jobs)
    est = sum(cache_bytes(split_rows, len(job.layers), d_model, cfg.probe.feature_dtype, world) for job in work_jobs)
    padded = stored_rows(split_rows, d_model, cfg.probe.feature_dtype, world)
    into = ", ".join(str(job.path) for job in work_jobs)
    con.print(
        f"{'resuming' if status == 'resumed' else 'extracting'} into {into}\n  {sum(split_rows):,} rows ({padded:,} "
        f"in whole chunks) × {'' if n_sites == 1 else f'{n_sites} sites × '}{len(work_jobs[0].layers)} layers × "
        f"d_model {d_model} × {BYTES_PER_VALUE[cfg.probe.feature_dtype]} B, + {ROW_OVERHEAD_BYTES} B of labels "
        f"and indices per row = [bold]{human_bytes(est)}[/bold] on disk"
        f"{'' if free is None else f' ({human_bytes(free)} free)'}; "
        f"device {device}, model dtype {cfg.probe.model_dtype}"
    )


def _cache_metadata(cfg: Config, job: SiteJob, parts: tuple[Any, Any, int], tokenizer, data_path, device,
                    world: int) -> dict[str, Any]:
    """What a site's cache records about the model, the data and the machine that wrote it."""
    model, blocks, d_model = parts
    return {
        "model_name": cfg.model.name,
        "model_revision": cfg.model.revision,
        "model_class": type(model).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "d_model": d_model,
        "n_layers": len(blocks),
        "layers": job.layers,
        "activation_site": job.site,
        "feature_dtype": cfg.probe.feature_dtype,
        "dataset_sha256": file_sha256(data_path),
        "versions": versions(),
        "compute": compute_settings(device, world),
    }


def _finish_caches(work_jobs: list[SiteJob], plans: dict[str, SplitWork], world: int) -> None:
    """Mark each cache complete when every split is written (every shard, under torchrun), else list what is."""
    for job in work_jobs:
        check_shards(job.writer, list(plans), world)
        have = job.writer.committed(list(FIT_SPLITS))  # split → (committed rows, rows)
        done = [n for n in FIT_SPLITS if n in plans or (n in have and have[n][0] == have[n][1])]
        if set(done) == set(FIT_SPLITS):
            job.writer.finish(list(FIT_SPLITS), {})
        else:  # some splits only: listed as written, the cache left for a full extract to resume
            job.writer.root.attrs["splits"] = done


def _on_failure(e: Exception, work_jobs: list[SiteJob], plans: dict[str, SplitWork], dist, current) -> None:
    """Before the error propagates: nothing half-written under the real name (a new cache is removed), else the
    failure recorded on the cache; a full disk becomes one line that says what is kept."""
    if isinstance(e, NeedleprobeError):
        for job in work_jobs:
            if job.state != "resume" and not dist.sharded:  # sharded: others may still write; resume instead
                remove_cache(job.path)  # nothing half-written under the real name
            elif job.writer is not None and job.writer.root is not None:
                job.writer.record_failure(e)
        return
    for job in work_jobs:
        if job.writer is not None and job.writer.root is not None:
            job.writer.record_failure(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        job = current or next((j for j in work_jobs if j.writer.root is not None), work_jobs[0])
        raise NeedleprobeError(_disk_full(job.path, job.writer, plans, e)) from None


def _auto_plan(con, cfg: Config, plans: dict[str, SplitWork], model, device, n_captured: int, dist) -> None:
    """With no batch size set, on CUDA: batches of the token budget free memory allows (rank 0's under torchrun,
    so that every process shards the same plan).  The row order, hence the cache, does not change."""
    found = dist.broadcast(device_budget(cfg.probe, cfg.model.max_length, model, device, n_captured))
    if found is None:
        return
    budget, free = found
    for work in plans.values():
        split = work.batches
        split.batches = batch_plan([td.n_tokens for td in split.tdocs], cfg.probe, budget)[1]
    if dist.primary:
        con.print(budget_message(budget, free, device))


def _result(jobs: list[SiteJob], status: str, seconds: float = 0.0, tokens: int = 0) -> ExtractResult:
    """The extract's result: the first site's cache, with every site's (path, fingerprint) in ``sites``."""
    fps = {j.site: (j.existing.fingerprint if j.state == "up to date" and j.existing is not None else fingerprint(j.fields))
           for j in jobs}
    res = ExtractResult(str(jobs[0].path), fps[jobs[0].site], status, seconds, tokens)
    res.sites = {j.site: (str(j.path), fps[j.site]) for j in jobs}
    return res


def compute_settings(device: torch.device, world: int) -> dict[str, Any]:
    """How the activations were computed: bit-identity across runs holds for equal settings (README, "Determinism")."""
    out: dict[str, Any] = {"device": str(device), "processes": world, "torch": torch.__version__}
    if device.type == "cpu":
        out.update(torch_threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   mkl_dynamic=os.environ.get("MKL_DYNAMIC"))
    elif device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device))
    return out


def _disk_full(path, writer: CacheWriter, plans: dict[str, SplitWork], e: OSError) -> str:
    """One line for a full disk: what is kept (committed rows) and that running again resumes."""
    if writer.root is None:
        return f"{path}: disk full ({e.strerror}) before the cache was created; nothing was written: free some space and run extract again"
    kept = writer.committed(list(plans))
    done = sum(c for c, _ in kept.values())
    parts = ", ".join(f"{name} {kept.get(name, (0, 0))[0]:,}/{kept[name][1] if name in kept else plans[name].plan.n_rows:,}"
                      for name in plans)
    return (
        f"{path}: disk full ({e.strerror}); the {done:,} rows committed so far are kept ({parts}): "
        "free some space and run extract again to resume"
    )


def _report_truncation(con, name: str, stats: dict[str, Any]) -> None:
    if stats["truncated_docs"]:
        con.print(
            f"[yellow]{name}: {stats['truncated_docs']} document(s) truncated to model.max_length; "
            f"lost {stats['needles_lost_to_truncation']} needle(s), {stats['needle_tokens_lost_to_truncation']} needle token(s)"
        )
