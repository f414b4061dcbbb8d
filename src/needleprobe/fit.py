"""Stage 2: train one probe per layer and seed from the cache, never the model.

Per layer the train and val rows are read once, standardised once with train
statistics, and every seed and L2 value is served from that one matrix; the
matrix is released before the next layer, so peak memory is one layer's
train+val rows in float32.

Objective (identical for every solver, see :mod:`needleprobe.solvers`)::

    J(w, b) = (1/n) Σ_i s_i · logloss(y_i, x_i·w + b) + (l2 / 2) · ||w||²

on standardised features, bias unpenalised; ``class_balance: weighted`` sets
s_i = n / (2 n_{y_i}), ``downsample`` keeps all positives and an equal number
of negatives drawn with the training seed (s_i = 1).  Saved weights are mapped
back to raw activations: logit = x·w + b.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .cache import Cache, open_cache, stale_reasons
from .config import Config
from .data import file_sha256
from .errors import NeedleprobeError
from .metrics import binary_metrics, bootstrap_auroc_ci
from .records import FileLock, atomic_write_bytes, atomic_write_json, console, update_run_record
from .solvers import PathResult, fit_l2_path
from .stores import as_path, is_url

CSV_COLUMNS = ("layer", "seed", "l2", "val_auroc", "val_average_precision", "selected")


def output_dir(cfg: Config) -> Path:
    return as_path(cfg.probe.output_dir) / cfg.dataset.key


def probe_paths(cfg: Config, layer: int, seed: int) -> tuple[Path, Path]:
    stem = output_dir(cfg) / f"probe_layer_{layer}_seed_{seed}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def load_probe(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [d_model], bias []) from a ``.pt`` file; logit = x · weight + bias on raw activations."""
    d = torch.load(io.BytesIO(as_path(path).read_bytes()) if is_url(path) else path, weights_only=True)
    return d["weight"], d["bias"]


def verify_cache(cfg: Config, cache: Cache) -> None:
    """Refuse a cache that no longer matches the config or the dataset file (a stale cache is never used)."""
    from .data import load_documents

    data_path = cfg.dataset.resolved_path()
    if not data_path.is_file():
        raise NeedleprobeError(f"{data_path}: dataset not found, so the cache at {cache.path} cannot be verified")
    diff = stale_reasons(cache, cfg, load_documents(data_path, cfg.dataset.val_fraction))
    new = sorted(set(cfg.probe.layers_to_probe) - set(cache.layers))
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


@dataclass
class LayerFit:
    """One layer's fitting context: labels, standardisation, and how to fit and score.

    ``lbfgs`` holds the standardised train matrix in memory (read once, shared by
    every seed and L2 value) and the raw val matrix; ``minibatch`` streams both
    from the cache in contiguous blocks.
    """

    y_train: np.ndarray  # int8 [n_train]
    y_val: np.ndarray  # int8 [n_val]
    val_groups: np.ndarray  # int32 [n_val], document of each row
    mean: np.ndarray  # float64 [d]
    std: np.ndarray  # float64 [d]
    fit_path: Callable[[np.ndarray | None, np.ndarray | None, int], list[PathResult]]
    """(row subset or None, sample weights or None, seed) → one result per grid value"""
    val_scores: Callable[[np.ndarray, np.ndarray], np.ndarray]
    """(raw weights [d, K], raw biases [K]) → val logits [n_val, K]"""


def lbfgs_layer(cache: Cache, layer: int, grid: list[float], device: torch.device) -> LayerFit:
    train, val = cache.split("train"), cache.split("val")
    x = train.to_numpy(layer)
    mean, std = column_moments(x)
    std[std < 1e-12] = 1.0  # constant features carry no signal; avoid dividing by zero
    x -= mean.astype(np.float32)
    x /= std.astype(np.float32)
    x_t = torch.from_numpy(x).to(device)
    y = train.labels
    x_val = val.to_numpy(layer)

    def fit_path(rows, weights, seed):
        xs = x_t if rows is None else x_t[torch.from_numpy(rows).to(device)]
        ys = torch.from_numpy((y if rows is None else y[rows]).astype(np.float32)).to(device)
        sw = None if weights is None else torch.from_numpy(weights).to(device)
        return fit_l2_path(xs, ys, grid, sample_weight=sw)

    return LayerFit(y, val.labels, val.doc_index, mean, std, fit_path, lambda w, b: x_val @ w + b)


def column_moments(x: np.ndarray, block_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation [d] (float64) of rows x [n, d].

    The same numbers as ``x.mean(0, dtype=float64)`` and ``x.std(0, dtype=float64)``
    (two passes, rows summed in order), but through a small float64 block
    instead of an n × d float64 temporary: 2-10x faster on a fresh matrix.
    """
    n, d = x.shape
    buf = np.empty((block_rows + 1, d))  # row 0 carries the running sum, so rows add in order
    total = np.zeros(d)
    for a in range(0, n, block_rows):
        b = min(n, a + block_rows)
        buf[0] = total
        buf[1 : b - a + 1] = x[a:b]
        np.add.reduce(buf[: b - a + 1], axis=0, out=total)
    mean = total / n
    total = np.zeros(d)
    for a in range(0, n, block_rows):
        b = min(n, a + block_rows)
        buf[0] = total
        dev = buf[1 : b - a + 1]
        np.subtract(x[a:b], mean, out=dev)
        np.multiply(dev, dev, out=dev)
        np.add.reduce(buf[: b - a + 1], axis=0, out=total)
    return mean, np.sqrt(total / n)


def minibatch_layer(cache: Cache, layer: int, cfg: Config, device: torch.device) -> LayerFit:
    from .minibatch import fit_minibatch, streaming_moments

    train, val = cache.split("train"), cache.split("val")
    block = train.activations(layer).chunks[0] * 4
    n = train.n_rows
    read = lambda a, b: train.to_numpy(layer, rows=slice(a, b))  # noqa: E731
    mean, std = streaming_moments(read, n, block)
    p = cfg.probe

    def fit_path(rows, weights, seed):
        if rows is not None:
            raise NeedleprobeError("probe.class_balance: downsample needs solver lbfgs (row subsets are not streamed)")
        return fit_minibatch(read, n, block, train.labels, weights, mean, std, p.l2_grid, batch_size=p.batch_size,
                             num_epochs=p.num_epochs, learning_rate=p.learning_rate, seed=seed, device=device)

    def val_scores(w, b):
        out = []
        for a in range(0, val.n_rows, block):
            out.append(val.to_numpy(layer, rows=slice(a, a + block)) @ w + b)
        return np.concatenate(out)

    return LayerFit(train.labels, val.labels, val.doc_index, mean, std, fit_path, val_scores)


def choose_solver(cfg: Config, cache: Cache, layer: int, device: torch.device) -> str:
    """``auto``: lbfgs when one layer's train+val float32 matrices fit in half the free memory."""
    if cfg.probe.solver != "auto":
        return cfg.probe.solver
    d = cache.split("train").activations(layer).shape[1]
    need = (cache.split("train").n_rows + cache.split("val").n_rows) * d * 4
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _available_memory()
    return "lbfgs" if need < 0.5 * free else "minibatch"


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def to_raw(w_std: np.ndarray, b_std: float, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights on standardised features → weights on raw activations."""
    w = w_std.astype(np.float64) / std
    return w.astype(np.float32), float(b_std - np.dot(w, mean))


def score(x_raw: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """Probe logits for raw activation rows [n, d] (what the saved ``.pt`` computes)."""
    return x_raw @ w + np.float32(b)


def _split_stats(split, labels: np.ndarray) -> dict[str, int]:
    s = split.stats
    return {
        "docs": int(s.get("docs", 0)),
        "docs_with_needles": int(s.get("docs_with_needles", 0)),
        "tokens": int(s.get("tokens", 0)),
        "positives": int(labels.sum()),
        "negatives": int(labels.size - labels.sum()),
    }


def _training_rows(y: np.ndarray, class_balance: str, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(row subset or None for all, sample weights or None) for one seed."""
    n = y.size
    n_pos = int(y.sum())
    if class_balance == "weighted":
        w = np.where(y == 1, n / (2.0 * n_pos), n / (2.0 * (n - n_pos))).astype(np.float32)
        return None, w
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([pos, rng.choice(neg, size=min(len(pos), len(neg)), replace=False)]))
    return keep, None


def seed_is_random(cfg: Config, solver: str) -> bool:
    """Whether the seed changes anything: downsampling, or the minibatch solver's shuffles and init."""
    return cfg.probe.class_balance == "downsample" or solver == "minibatch"


@dataclass
class FitResult:
    output_dir: str
    probes: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def fit_devices(dev: torch.device) -> list[torch.device]:
    """Where fit runs: every visible GPU when ``dev`` is plain ``cuda`` and there are several, else ``dev`` alone."""
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [dev]


def fit(cfg: Config, *, device: str | None = None, devices: list[torch.device] | None = None) -> FitResult:
    """Fit every (layer, seed) over the L2 grid and write probes, metrics and the run record.

    With several devices (``devices``, by default every GPU when there are
    more than one) layers are fitted in parallel, one worker thread per
    device; the files written are the same bytes as a one-device run.
    """
    from .hooks import resolve_device

    t_start = time.perf_counter()
    con = console()
    cache = open_cache(cfg)
    verify_cache(cfg, cache)
    missing = [layer for layer in cfg.probe.layers_to_probe if layer not in cache.layers]
    if missing:
        raise NeedleprobeError(f"layers {missing} are not in the cache {cache.path} (cached: {cache.layers})")
    for name in ("train", "val"):
        labels = cache.split(name).labels
        if labels.sum() == 0 or labels.sum() == labels.size:
            raise NeedleprobeError(f"{cache.path}: split {name!r} has only one class; cannot fit or validate a probe")
    dev = resolve_device(device or cfg.probe.device)
    out = output_dir(cfg)
    grid = list(cfg.probe.l2_grid)
    result = FitResult(str(out))
    csv_rows: dict[tuple[int, int], list[dict[str, Any]]] = {}

    workers = list(devices) if devices is not None else fit_devices(dev)
    with FileLock(out / ".lock", what=f"fit into {out}"):
        if len(workers) == 1:
            for layer in sorted(cfg.probe.layers_to_probe):
                t0 = time.perf_counter()
                _fit_layer(cfg, cache, layer, list(cfg.probe.train_seeds), grid, workers[0], result.probes, csv_rows)
                result.timings[f"layer_{layer}"] = round(time.perf_counter() - t0, 3)
        else:
            _fit_parallel(cfg, cache, grid, workers, result, csv_rows)
        csv_path = out / "probe_metrics.csv"
        _write_csv(csv_path, csv_rows)
        result.timings["fit_total"] = round(time.perf_counter() - t_start, 3)
        files = sorted(out.glob("probe_layer_*_seed_*.*")) + [csv_path]
        update_run_record(
            cfg,
            "fit",
            {
                "cache_path": str(cache.path),
                "cache_fingerprint": cache.fingerprint,
                "dataset_sha256": cache.metadata.get("dataset_sha256"),
                "device": str(dev),
                **({"devices": [str(d) for d in workers]} if len(workers) > 1 else {}),
                "timings_s": result.timings,
                "outputs": {str(p): file_sha256(p) for p in files},
            },
        )
    _print_table(con, cfg, result)
    return result


def _fit_layer(
    cfg: Config, cache: Cache, layer: int, seeds: list[int], grid: list[float], dev: torch.device,
    probes: dict[tuple[int, int], dict[str, Any]], csv_rows: dict[tuple[int, int], list[dict[str, Any]]],
) -> None:
    """Fit one layer's probes for ``seeds`` on ``dev``, write their files, and record them in ``probes``/``csv_rows``."""
    solver = choose_solver(cfg, cache, layer, dev)
    data = lbfgs_layer(cache, layer, grid, dev) if solver == "lbfgs" else minibatch_layer(cache, layer, cfg, dev)
    train_stats = _split_stats(cache.split("train"), data.y_train)
    val_stats = _split_stats(cache.split("val"), data.y_val)
    shared: dict[str, Any] | None = None
    for seed in seeds:
        if shared is None or seed_is_random(cfg, solver):
            shared = _fit_one(cfg, data, grid, seed)
            shared["fitted_with_seed"] = seed
            shared["solver"] = solver
        rec = _write_probe(cfg, cache, layer, seed, shared, train_stats, val_stats)
        probes[(layer, seed)] = rec
        csv_rows[(layer, seed)] = [
            {
                "layer": layer,
                "seed": seed,
                "l2": r["l2"],
                "val_auroc": r["val_auroc"],
                "val_average_precision": r["val_average_precision"],
                "selected": int(r["l2"] == rec["selected_l2"]),
            }
            for r in rec["l2_results"]
        ]
    del data


def _fit_parallel(cfg: Config, cache: Cache, grid: list[float], workers: list[torch.device], result: FitResult,
                  csv_rows: dict[tuple[int, int], list[dict[str, Any]]]) -> None:
    """Layers (and, when seeds change the fit and layers are fewer than devices, seeds) on one thread per device.

    Each unit reads its layer itself and runs wholly on the device it took, so
    its probes are the bytes a one-device run writes; results are gathered in
    layer and seed order whatever order the units finish in.
    """
    import queue
    from concurrent.futures import ThreadPoolExecutor

    layers = sorted(cfg.probe.layers_to_probe)
    seeds = list(cfg.probe.train_seeds)
    # whether a seed changes the fit, known before the solver is chosen (``auto`` may pick either)
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
            probes: dict[tuple[int, int], dict[str, Any]] = {}
            rows: dict[tuple[int, int], list[dict[str, Any]]] = {}
            _fit_layer(cfg, cache, layer, unit_seeds, grid, dev, probes, rows)
            return probes, rows, time.perf_counter() - t0
        finally:
            free.put(dev)

    with ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="fit-device") as pool:
        done = list(pool.map(run, units))
    seconds: dict[int, float] = {}
    gathered_probes: dict[tuple[int, int], dict[str, Any]] = {}
    for (layer, _), (probes, rows, t) in zip(units, done):
        gathered_probes.update(probes)
        csv_rows.update(rows)
        seconds[layer] = seconds.get(layer, 0.0) + t
    for layer in layers:
        for seed in seeds:
            result.probes[(layer, seed)] = gathered_probes[(layer, seed)]
        result.timings[f"layer_{layer}"] = round(seconds[layer], 3)


def _fit_one(cfg: Config, data: LayerFit, grid: list[float], seed: int) -> dict[str, Any]:
    rows, weights = _training_rows(data.y_train, cfg.probe.class_balance, seed)
    path = data.fit_path(rows, weights, seed)
    raw = [to_raw(r.weight, r.bias, data.mean, data.std) for r in path]
    scores = data.val_scores(np.stack([w for w, _ in raw], 1), np.array([b for _, b in raw], np.float32))
    l2_results = []
    for k, r in enumerate(path):
        m = binary_metrics(data.y_val, scores[:, k])
        l2_results.append(
            {
                "l2": float(r.l2),
                "val_auroc": m["auroc"],
                "val_average_precision": m["average_precision"],
                "train_objective": float(r.loss),
                "grad_max_abs": float(r.grad_norm),
                "n_iter": int(r.n_iter),
                "converged": bool(r.converged),
            }
        )
    # best val AUROC; ties go to the stronger regularisation
    best = max(range(len(grid)), key=lambda i: (l2_results[i]["val_auroc"], grid[i]))
    w, b = raw[best]
    s = scores[:, best]
    metrics = binary_metrics(data.y_val, s)
    metrics["auroc_ci95"] = list(bootstrap_auroc_ci(data.y_val, s, data.val_groups, n_boot=1000, seed=0))
    return {
        "selected_l2": float(grid[best]),
        "weight": w,
        "bias": b,
        "l2_results": l2_results,
        "val_metrics": metrics,
        "train_rows_used": int(data.y_train.size if rows is None else rows.size),
    }


def _write_probe(cfg, cache, layer, seed, fitted, train_stats, val_stats) -> dict[str, Any]:
    pt, js = probe_paths(cfg, layer, seed)
    buf = io.BytesIO()
    torch.save({"weight": torch.from_numpy(fitted["weight"].copy()), "bias": torch.tensor(fitted["bias"], dtype=torch.float32)}, buf)
    atomic_write_bytes(pt, buf.getvalue())
    meta = {
        "layer": layer,
        "seed": seed,
        "activation_site": cfg.probe.activation_site,
        "selected_l2": fitted["selected_l2"],
        "l2_results": fitted["l2_results"],
        "train_stats": {**train_stats, "rows_used": fitted["train_rows_used"]},
        "val_stats": val_stats,
        "val_metrics": fitted["val_metrics"],
        "solver": fitted["solver"],
        "class_balance": cfg.probe.class_balance,
        "fitted_with_seed": fitted["fitted_with_seed"],
        "seed_dependent": seed_is_random(cfg, fitted["solver"]),
        "probe_applies_to": "raw activations: logit = x @ weight + bias",
        "cache_fingerprint": cache.fingerprint,
        "config": cfg.outcome_dict(),  # without batch size or device: they never change the probe
    }
    atomic_write_json(js, meta)
    return meta


def _write_csv(path: Path, rows: dict[tuple[int, int], list[dict[str, Any]]]) -> None:
    """Rows of this fit, merged with earlier rows of (layer, seed) pairs it did not refit."""
    merged: dict[tuple[int, int], list[dict[str, Any]]] = {}
    if path.is_file():
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                key = (int(r["layer"]), int(r["seed"]))
                if key not in rows:
                    merged.setdefault(key, []).append(r)
    merged.update(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for key in sorted(merged):
        for r in merged[key]:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def _print_table(con, cfg: Config, result: FitResult) -> None:
    from rich.table import Table

    t = Table(title=f"probes on {cfg.dataset.key}: validation metrics of the selected L2")
    for c in ("layer", "seed", "val AUROC", "95% CI (docs)", "AP", "TPR@1%FPR", "L2"):
        t.add_column(c, justify="right")
    for layer in sorted(cfg.probe.layers_to_probe):
        for s in cfg.probe.train_seeds:
            m = result.probes[(layer, s)]
            v = m["val_metrics"]
            lo, hi = v["auroc_ci95"]
            t.add_row(str(layer), str(s), f"{v['auroc']:.4f}", f"{lo:.3f}–{hi:.3f}", f"{v['average_precision']:.3f}",
                      f"{v['tpr_at_1pct_fpr']:.3f}", f"{m['selected_l2']:g}")
    con.print(t)
    con.print(f"probes, metadata and probe_metrics.csv in {result.output_dir}")
