"""Stage 2: train one probe per layer and seed from the cache, never the model.

Per layer the train and val rows are read once, standardised once with train
statistics, and every seed and L2 value is served from that one matrix; the
matrix is released before the next layer, so peak memory is one layer's
train+val rows in float32.  When they do not fit the memory budget
(``probe.fit_memory``), or under ``torchrun``, the same exact solver reads them
from the cache block by block or splits them over the processes
(:mod:`needleprobe.fit.streaming`); which one, and why, is said per layer.  What a
probe is, and the objective every solver minimises, live in
:mod:`needleprobe.fit.probe`.

A fit writes one consistent run into its run directory (``layout.Layout``):
every probe file, ``probe_metrics.csv`` and the run record describe the same
fit.  So a fit refuses to leave behind probes of layers or seeds it does not
rewrite (fit them too, fit into a named run with ``--run``, or replace the run
with ``--overwrite``), refuses directories holding another model's, site's or
dataset's outputs, and says when a probe it replaces had a better val AUROC.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..cache.format import stale_reasons
from ..cache.reader import Cache, open_cache
from ..config import Config
from ..data.documents import file_sha256
from ..errors import NeedleprobeError
from ..run.layout import Layout
from .probe import FitData, LinearProbe, column_moments_of_blocks, feature_scale, fit_grid, to_raw
from ..io.console import console, human_bytes, results
from ..io.files import FileLock, atomic_write_bytes, atomic_write_json
from ..run.record import update_run_record
from .plan import Budget, LayerShape, SolverChoice, choose, fit_budget
from .streaming import streamed_fit_data

AUROC_NOISE = 1e-4
"""How far one fit's val AUROC may move with the thread count, CPU or BLAS build (README "Determinism"): a re-fit
says a probe got worse only when its val AUROC dropped by more than this."""
CSV_COLUMNS = ("layer", "seed", "l2", "val_auroc", "val_average_precision", "selected", "train_auroc",
               "train_average_precision")


def verify_cache(cfg: Config, cache: Cache) -> None:
    """Refuse a cache that no longer matches the config or the dataset file (a stale cache is never used)."""
    from ..data.documents import load_documents

    data_path = cfg.dataset.resolved_path()
    if not data_path.is_file():
        raise NeedleprobeError(f"{data_path}: dataset not found, so the cache at {cache.path} cannot be verified")
    diff = stale_reasons(cache, cfg, load_documents(data_path, cfg.dataset.val_fraction))
    new = sorted(set(cfg.probe.layers_to_probe) - set(cache.layers))
    depth = int(cache.metadata.get("n_layers") or 0)
    beyond = [layer for layer in new if depth and layer >= depth]
    if beyond:  # no advice to extract a layer the model does not have
        raise NeedleprobeError(
            f"layer(s) {', '.join(map(str, beyond))} out of range: {cfg.model.name} has {depth} blocks (layers 0 to "
            f"{depth - 1}); the cache at {cache.path} holds layers {', '.join(map(str, cache.layers))}"
        )
    if new and all(d.startswith("layers:") for d in diff):
        held = ", ".join(str(x) for x in cache.layers)
        everything = ",".join(str(x) for x in sorted(set(cache.layers) | set(new)))
        raise NeedleprobeError(
            f"{cache.path}: layer(s) {', '.join(map(str, new))} not cached (the cache holds layers {held}); fit cached "
            f"layers only (--layers {held.replace(', ', ',')}), or cache them all with `needleprobe extract --layers "
            f"{everything} --overwrite` (the model runs once more; every layer is kept)"
        )
    if diff:
        raise NeedleprobeError(
            f"{cache.path}: cache is stale for this config ({'; '.join(diff)}); run `needleprobe extract` "
            "(with --overwrite) to rebuild it"
        )


def lbfgs_layer(cache: Cache, layer: int, grid: list[float], device: torch.device) -> FitData:
    """The in-memory form: one layer's train rows standardised in place, val rows raw."""
    train, val = cache.split("train"), cache.split("val")
    return FitData.from_arrays(train.to_numpy(layer), train.labels, val.to_numpy(layer), val.labels, val.doc_index,
                               grid, device, copy=False)


def minibatch_layer(cache: Cache, layer: int, cfg: Config, device: torch.device) -> FitData:
    from .minibatch import AdamSettings, BlockRows, fit_minibatch
    from .plan import MOMENT_BLOCK_ROWS

    train, val = cache.split("train"), cache.split("val")
    block = train.activations(layer).chunks[0] * 4
    n = train.n_rows
    read = lambda a, b: train.to_numpy(layer, rows=slice(a, b))  # noqa: E731
    # the one standardiser (two passes, as in memory and out of core)
    mean, std = column_moments_of_blocks(lambda: (read(a, min(n, a + block)) for a in range(0, n, block)), n,
                                         int(train.activations(layer).shape[1]), MOMENT_BLOCK_ROWS)
    std = feature_scale(mean, std)
    p = cfg.probe

    def fit_path(rows, weights, seed):
        if rows is not None:
            raise NeedleprobeError("probe.class_balance: downsample needs solver lbfgs (row subsets are not streamed)")
        return fit_minibatch(BlockRows(read, n, block, mean, std), train.labels, weights, p.l2_grid,
                             AdamSettings(p.batch_size, p.num_epochs, p.learning_rate), seed=seed, device=device)

    def val_scores(w, b):
        out = []
        for a in range(0, val.n_rows, block):
            out.append(val.to_numpy(layer, rows=slice(a, a + block)) @ w + b)
        return np.concatenate(out)

    def train_scores(rows, w_std, b_std):
        raw = [to_raw(w_std[:, k], float(b_std[k]), mean, std) for k in range(w_std.shape[1])]
        w, b = np.stack([x for x, _ in raw], 1), np.array([y for _, y in raw], np.float32)
        return np.concatenate([read(a, a + block) @ w + b for a in range(0, n, block)])

    return FitData(train.labels, val.labels, val.doc_index, mean, std, fit_path, val_scores, solver="minibatch",
                   train_scores=train_scores)


def choose_solver(cfg: Config, cache: Cache, layer: int, device: torch.device, budget: Budget | None = None,
                  comm=None) -> SolverChoice:
    """Exact L-BFGS in memory, out of core or across processes (``plan.choose``), or ``minibatch`` by name.

    ``auto`` and ``lbfgs`` never fall back to an approximate solver: a layer
    whose rows exceed the budget (``probe.fit_memory``) is streamed from the cache.
    """
    budget = budget or fit_budget(cfg.probe.fit_memory, device)
    return choose(cfg.probe.solver, cache, layer, device, budget, comm, columns=len(set(cfg.probe.l2_grid)))


def _split_stats(split, labels: np.ndarray) -> dict[str, int]:
    s = split.stats
    return {
        "docs": int(s.get("docs", 0)),
        "docs_with_needles": int(s.get("docs_with_needles", 0)),
        "tokens": int(s.get("tokens", 0)),
        "positives": int(labels.sum()),
        "negatives": int(labels.size - labels.sum()),
    }


def seed_is_random(cfg: Config, solver: str) -> bool:
    """Whether the seed changes anything: downsampling, or the minibatch solver's shuffles and init."""
    return cfg.probe.class_balance == "downsample" or solver == "minibatch"


@dataclass
class FitScale:
    """How one fit command scales: the memory budget per device, the processes it runs in, what streamed fits read."""

    budget: Budget
    comm: Any = None
    """``distributed.FitComm`` under torchrun, else None"""
    io: dict[int, dict[str, Any]] = field(default_factory=dict)
    """layer → passes over its train rows, bytes read, timings (streamed fits; for the run record)"""
    modes: dict[int, str] = field(default_factory=dict)
    """layer → how it was fitted (``plan.SolverChoice.solver``; for the run record)"""
    reading: Any = field(default_factory=threading.Lock)
    """Held while a layer's rows are read into memory: layers fitted side by side read one at a time, so the
    first starts fitting while the next is read (read together, through Zarr's reader, both waited on the GIL
    and neither started for 0.6-0.8 s, against ~0.3 s for one layer alone)."""

    @property
    def primary(self) -> bool:
        """The process that writes files and talks (rank 0, or the only one)."""
        return self.comm is None or self.comm.dist.primary

    def share(self, n: int) -> "FitScale":
        """The budget of one of ``n`` workers side by side on one device."""
        if n <= 1:
            return self
        return FitScale(Budget(self.budget.bytes // n, f"{self.budget.source}, shared by {n} layers side by side"),
                        self.comm, self.io, self.modes, self.reading)


@dataclass
class FitResult:
    output_dir: str
    probes: dict[tuple[int, int], LinearProbe] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    replaced_better: list[str] = field(default_factory=list)
    """Probes this fit replaced that had a higher val AUROC (said on the terminal)."""
    val_scores: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    """(layer, seed) → val logits [n_val] of the selected L2 (for the verdict; not written)."""
    verdict: dict[str, Any] = field(default_factory=dict)


def fit_devices(dev: torch.device, cfg: Config | None = None, cache: Cache | None = None,
                budget: Budget | None = None) -> list[torch.device]:
    """Where fit runs, one worker thread each: every visible GPU when ``dev`` is plain ``cuda`` and there are several;
    on CPU, one worker per core (layers fit side by side, each on one thread) as far as the budget holds their rows.

    A CPU fit runs every product on one thread (``runtime.fit_settings``): at this size a second thread barely
    helps one product, while two layers side by side use both cores (measured: the demo fit of 4 layers 20%
    faster with two workers on two cores); the probes are the same bytes either way.
    """
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if dev.type != "cpu" or cfg is None or cache is None:
        return [dev]
    layers = cfg.probe.layers_to_probe
    budget = budget or fit_budget(cfg.probe.fit_memory, dev)
    need = max(LayerShape.of(cache, layer, len(set(cfg.probe.l2_grid))).in_memory_bytes() for layer in layers)
    n = min(len(layers), os.cpu_count() or 1, max(1, budget.bytes // max(need, 1)))
    return [dev] * max(1, n)


def _refuse_partial_run(layout: Layout, cfg: Config, before: dict[tuple[int, int], dict[str, Any]]) -> None:
    """A fit that would leave probes it does not rewrite would mix two runs in one directory: refuse, saying the ways out."""
    wanted = {(layer, seed) for layer in cfg.probe.layers_to_probe for seed in cfg.probe.train_seeds}
    left = sorted(set(before) - wanted)
    if not left:
        return
    layers = sorted({layer for layer, _ in left})
    seeds = sorted({seed for _, seed in left})
    all_layers = ",".join(str(x) for x in sorted(set(cfg.probe.layers_to_probe) | {layer for layer, _ in before}))
    all_seeds = ",".join(str(x) for x in sorted(set(cfg.probe.train_seeds) | {seed for _, seed in before}))
    raise NeedleprobeError(
        f"{layout.run_dir}: holds probes of layer(s) {', '.join(map(str, layers))} (seed(s) {', '.join(map(str, seeds))}) "
        f"that this fit would not rewrite, so the directory would mix two runs; fit them too (--layers {all_layers} "
        f"--seeds {all_seeds}), fit into a run of its own beside this one (--run NAME), or replace the run (--overwrite)"
    )


def fit(cfg: Config, *, run: str | None = None, overwrite: bool = False, device: str | None = None,
        devices: list[torch.device] | None = None) -> FitResult:
    """Fit every (layer, seed) over the L2 grid and write probes, metrics and the run record.

    With several devices (``devices``, by default every GPU when there are
    more than one) layers are fitted in parallel, one worker thread per
    device; the files written are the same bytes as a one-device run.
    Launched by ``torchrun`` (WORLD_SIZE > 1), every process fits its share of
    the rows of every layer together with the others, and rank 0 writes the files.
    """
    from ..io.processes import Dist

    dist = Dist.from_env()
    try:
        return _fit(cfg, run, overwrite, device, devices, dist)
    finally:
        dist.close()


def _fit(cfg: Config, run: str | None, overwrite: bool, device: str | None, devices: list[torch.device] | None,
         dist) -> FitResult:
    from ..io.runtime import resolve_device
    from .comm import FitComm
    from ..io.runtime import fit_settings

    t_start = time.perf_counter()
    con = console()
    layout = Layout.from_config(cfg, run)
    cache = _fittable_cache(cfg)
    dev = dist.device(resolve_device(device or cfg.probe.device))
    layout.refuse_foreign("fit", overwrite)
    out = layout.run_dir
    grid = list(cfg.probe.l2_grid)
    result = FitResult(str(out))
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.sharded else 1
    scale = FitScale(fit_budget(cfg.probe.fit_memory, dev, local_procs), FitComm(dist, dev) if dist.sharded else None)
    if dist.sharded:
        workers = [dev]
    else:
        workers = list(devices) if devices is not None else fit_devices(dev, cfg, cache, scale.budget)
    lock = FileLock(layout.lock, what=f"fit into {out}") if dist.primary else contextlib.nullcontext()
    with lock:
        before = layout.probe_metadata()
        if not overwrite:
            _refuse_partial_run(layout, cfg, before)
        dist.barrier()  # every process checked the run directory before rank 0 writes into it
        ahead = threading.Thread(target=_read_ahead, args=(cfg, cache, scale.budget), name="read-ahead", daemon=True)
        if not dist.sharded:
            ahead.start()
        with fit_settings(cpu=all(d.type == "cpu" for d in workers)):
            if len(workers) == 1:
                for layer in sorted(cfg.probe.layers_to_probe):
                    t0 = time.perf_counter()
                    probes, scores = _fit_layer(cfg, cache, layout, layer, list(cfg.probe.train_seeds), grid,
                                                workers[0], scale)
                    result.probes.update(probes)
                    result.val_scores.update(scores)
                    result.timings[f"layer_{layer}"] = round(time.perf_counter() - t0, 3)
            else:
                _fit_parallel(cfg, cache, layout, grid, workers, result, scale.share(len(workers)))
        if ahead.is_alive():
            ahead.join()
        if not dist.primary:
            return result
        for key in sorted(set(before) - set(result.probes)):  # --overwrite: the run is this fit, whole
            for path in layout.probe_files(*key):
                path.unlink(missing_ok=True)
        result.replaced_better = _lowered(before, result.probes)
        _write_csv(layout.metrics_csv, result.probes)
        from .verdict import build_verdict

        val = cache.split("val")
        result.verdict = build_verdict(result.probes, result.val_scores, val.labels, val.doc_index)
        atomic_write_json(layout.verdict, result.verdict)
        result.timings["fit_total"] = round(time.perf_counter() - t_start, 3)
        files = [p for key in sorted(result.probes) for p in layout.probe_files(*key)] + [layout.metrics_csv, layout.verdict]
        update_run_record(
            layout,
            cfg,
            "fit",
            {
                "cache_path": str(cache.path),
                "cache_fingerprint": cache.fingerprint,
                "dataset_sha256": cache.metadata.get("dataset_sha256"),
                "device": str(dev),
                **({"devices": [str(d) for d in workers]} if len(workers) > 1 else {}),
                **({"processes": dist.world} if dist.sharded else {}),
                "fit_memory": {"bytes": scale.budget.bytes, "source": scale.budget.source},
                "solvers": {str(k): v for k, v in sorted(scale.modes.items())},
                **({"streaming": {str(k): v for k, v in sorted(scale.io.items())}} if scale.io else {}),
                "timings_s": result.timings,
                "outputs": {str(p): file_sha256(p) for p in files},
            },
            drop=("monitor",),  # the monitor's section described the probes this fit replaced
        )
    _print_table(con, cfg, result)
    return result


def _read_ahead(cfg: Config, cache: Cache, budget: Budget) -> None:
    """Have the disk read the layers' rows in the background, in fit order and as far as the budget holds them in
    memory: a layer fitted after the first then waits on memory, not on the disk (a cache read a while ago, or on a
    slow disk; on this project's 2-core machine the kernel drops pages unused for a minute)."""
    held = 0
    for layer in sorted(cfg.probe.layers_to_probe):
        held += LayerShape.of(cache, layer, len(set(cfg.probe.l2_grid))).in_memory_bytes()
        if held > budget.bytes:
            return
        for split in ("train", "val"):
            cache.split(split).activations(layer).read_ahead()


def _fittable_cache(cfg: Config) -> Cache:
    """The config's cache, verified, holding every layer to probe and both classes in train and val."""
    cache = open_cache(cfg)
    verify_cache(cfg, cache)
    missing = [layer for layer in cfg.probe.layers_to_probe if layer not in cache.layers]
    if missing:
        raise NeedleprobeError(f"layers {missing} are not in the cache {cache.path} (cached: {cache.layers})")
    for name in ("train", "val"):
        labels = cache.split(name).labels
        if labels.sum() == 0 or labels.sum() == labels.size:
            raise NeedleprobeError(f"{cache.path}: split {name!r} has only one class; cannot fit or validate a probe")
    return cache


def _lowered(before: dict[tuple[int, int], dict[str, Any]], after: dict[tuple[int, int], LinearProbe]) -> list[str]:
    """One line per replaced probe whose val AUROC was higher than its replacement's by more than ``AUROC_NOISE``."""
    out = []
    for key, probe in sorted(after.items()):
        old = before.get(key, {})
        a, b = old.get("val_metrics", {}).get("auroc"), probe.val_auroc_
        if a is not None and b is not None and a - b > AUROC_NOISE:
            same = "" if old.get("cache_fingerprint") == probe.metadata_.get("cache_fingerprint") else " (on another cache)"
            out.append(f"layer {key[0]} seed {key[1]}: val AUROC {a:.4f} → {b:.4f} ({b - a:+.1e}; L2 "
                       f"{old.get('selected_l2'):g} → {probe.selected_l2_:g}){same}")
    return out


def _fit_layer(cfg: Config, cache: Cache, layout: Layout, layer: int, seeds: list[int], grid: list[float],
               dev: torch.device, scale: FitScale | None = None
               ) -> tuple[dict[tuple[int, int], LinearProbe], dict[tuple[int, int], np.ndarray]]:
    """Fit one layer's probes for ``seeds`` on ``dev`` and save them (rank 0 saves, under torchrun); returns them
    and their val logits [n_val]."""
    scale = scale or FitScale(fit_budget(cfg.probe.fit_memory, dev))
    choice = choose_solver(cfg, cache, layer, dev, scale.budget, scale.comm)
    # the probe's file names the method; how its rows were laid out (in memory, out of core, processes) depends on
    # the memory free at the time, so it goes to the run record, never into the probe's bytes
    solver = "minibatch" if choice.solver == "minibatch" else "lbfgs"
    scale.modes[layer] = choice.solver
    if scale.primary:
        console().print(f"layer {layer}: {choice.why}")
    t0 = time.perf_counter()
    if solver == "minibatch":
        data = minibatch_layer(cache, layer, cfg, dev)
    elif choice.streamed:
        data = streamed_fit_data(cache, layer, grid, dev, choice, scale.comm)
    else:
        with scale.reading:
            data = lbfgs_layer(cache, layer, grid, dev)
    train_stats = _split_stats(cache.split("train"), data.y_train)
    val_stats = _split_stats(cache.split("val"), data.y_val)
    shared: dict[str, Any] | None = None
    probes, scores = {}, {}
    for seed in seeds:
        if shared is None or seed_is_random(cfg, solver):
            shared = fit_grid(data, grid, cfg.probe.class_balance, seed)
            shared["fitted_with_seed"] = seed
        meta = {
            "layer": layer,
            "seed": seed,
            "activation_site": cfg.probe.activation_site,
            "selected_l2": shared["selected_l2"],
            "l2_results": shared["l2_results"],
            "train_stats": {**train_stats, "rows_used": shared["train_rows_used"]},
            "val_stats": val_stats,
            "val_metrics": shared["val_metrics"],
            "train_metrics": shared["train_metrics"],
            "solver": solver,
            "class_balance": cfg.probe.class_balance,
            "fitted_with_seed": shared["fitted_with_seed"],
            "seed_dependent": seed_is_random(cfg, solver),
            "probe_applies_to": "raw activations: logit = x @ weight + bias",
            "cache_fingerprint": cache.fingerprint,
            "config": cfg.outcome_dict(),  # without batch size or device: they never change the probe
        }
        probe = LinearProbe.from_weights(shared["weight"], shared["bias"], meta)
        if scale.primary:
            probe.save(layout.probe_stem(layer, seed))
        probes[(layer, seed)] = probe
        scores[(layer, seed)] = shared["val_scores"]
    if data.io is not None:
        _report_io(layer, data.io, time.perf_counter() - t0, choice, scale)
    del data
    return probes, scores


def _report_io(layer: int, io, seconds: float, choice: SolverChoice, scale: FitScale) -> None:
    """What a streamed fit read: on the terminal, and (all processes summed) into the run record."""
    rec = {**io.as_dict(), **io.timings(), "seconds": round(seconds, 3), "solver": choice.solver}
    if choice.plan is not None:
        rec.update(held_rows=choice.plan.held_rows, block_rows=choice.plan.block_rows)
    if scale.comm is not None:  # bytes over every process; passes are the same on each
        total = scale.comm.allsum(np.array([io.bytes_read, io.pass_bytes], dtype=np.int64))
        rec.update(bytes_read=int(total[0]), bytes_per_pass=int(total[1]), processes=scale.comm.dist.world)
    scale.io[layer] = rec
    if scale.primary:
        per = f" ({human_bytes(rec['bytes_per_pass'])} per pass)" if rec["bytes_per_pass"] else " (every row held)"
        console().print(f"layer {layer}: {rec['passes']:,} passes over the train rows, {human_bytes(rec['bytes_read'])} "
                        f"read{per} in {seconds:.1f} s; reading took {io.read_seconds:.1f} s on the prefetch thread, "
                        f"the solver waited {io.wait_seconds:.1f} s for it")


def _fit_parallel(cfg: Config, cache: Cache, layout: Layout, grid: list[float], workers: list[torch.device],
                  result: FitResult, scale: FitScale | None = None) -> None:
    """Layers (and, when seeds change the fit and layers are fewer than devices, seeds) on one thread per device.

    Each unit reads its layer itself and runs wholly on the device it took, so
    its probes are the bytes a one-device run writes; results are gathered in
    layer and seed order whatever order the units finish in.
    """
    import queue
    from concurrent.futures import ThreadPoolExecutor

    layers = sorted(cfg.probe.layers_to_probe)
    seeds = list(cfg.probe.train_seeds)
    # whether a seed changes the fit, known before the solver is chosen
    random_seeds = cfg.probe.class_balance == "downsample" or cfg.probe.solver == "minibatch"
    if random_seeds and len(layers) < len(workers):
        units = [(layer, [seed]) for layer in layers for seed in seeds]
    else:
        units = [(layer, seeds) for layer in layers]
    free: queue.Queue = queue.Queue()
    for d in workers:
        free.put(d)

    def run(unit):
        layer, unit_seeds = unit
        dev = free.get()
        try:
            t0 = time.perf_counter()
            return _fit_layer(cfg, cache, layout, layer, unit_seeds, grid, dev, scale), time.perf_counter() - t0
        finally:
            free.put(dev)

    with ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="fit-device") as pool:
        done = list(pool.map(run, units))
    seconds: dict[int, float] = {}
    gathered: dict[tuple[int, int], LinearProbe] = {}
    for (layer, _), ((probes, scores), t) in zip(units, done):
        gathered.update(probes)
        result.val_scores.update(scores)
        seconds[layer] = seconds.get(layer, 0.0) + t
    for layer in layers:
        for seed in seeds:
            result.probes[(layer, seed)] = gathered[(layer, seed)]
        result.timings[f"layer_{layer}"] = round(seconds[layer], 3)


def _write_csv(path, probes: dict[tuple[int, int], LinearProbe]) -> None:
    """One row per (layer, seed, l2) of this fit: the run's whole table."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for (layer, seed), probe in sorted(probes.items()):
        for r in probe.metadata_["l2_results"]:
            row = {"layer": layer, "seed": seed, "l2": r["l2"], "val_auroc": r["val_auroc"],
                   "val_average_precision": r["val_average_precision"], "selected": int(r["l2"] == probe.selected_l2_),
                   "train_auroc": r.get("train_auroc"), "train_average_precision": r.get("train_average_precision")}
            w.writerow({k: (repr(v) if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def _print_table(con, cfg: Config, result: FitResult) -> None:
    """One row per layer and seed (seeds that gave identical probes share a row), then the verdict."""
    from rich.markup import escape
    from rich.table import Table

    from .verdict import SAME_SEEDS, one_row_per_probe

    rows = one_row_per_probe(result.probes)
    t = Table(title=f"probes on {cfg.dataset.key}: validation metrics of the selected L2",
              caption=SAME_SEEDS if any(len(g) > 1 for g in rows.values()) else None)
    for c in ("layer", "seed", "val AUROC", "95% CI (docs)", "AP", "TPR at 1% FPR", "train AUROC", "L2"):
        t.add_column(c, justify="right", no_wrap=c in ("seed", "95% CI (docs)"))  # the others fold to fit 80 columns
    for (layer, seed), group in rows.items():
        m = result.probes[(layer, seed)].metadata_
        v, tr = m["val_metrics"], m.get("train_metrics") or {}
        lo, hi = v["auroc_ci95"]
        seeds = ", ".join(map(str, group))
        t.add_row(str(layer), seeds, f"{v['auroc']:.4f}", f"{lo:.3f}–{hi:.3f}", f"{v['average_precision']:.3f}",
                  f"{v['tpr_at_1pct_fpr']:.3f}", f"{tr['auroc']:.4f}" if tr.get("auroc") is not None else "–",
                  f"{m['selected_l2']:g}")
    out = results()  # the table and the verdict are the answer: stdout; the rest are messages
    out.print(t)
    for line in result.verdict.get("summary", []):
        out.print(("[yellow]" if line.startswith("warning:") else "") + escape(f"verdict: {line}"))
    for line in result.replaced_better:
        con.print(f"[yellow]replaced by a probe with lower val AUROC: {line}")
    con.print(f"probes, metadata, probe_metrics.csv and verdict.json in {result.output_dir}")
