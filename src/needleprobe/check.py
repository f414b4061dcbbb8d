"""Quality checks on a fit's results: is every probe above chance, is the metadata complete,
and does the run record match the config and the files on disk?"""

from __future__ import annotations

import csv
import json

from .config import RUNTIME_ONLY, Config
from .fit import output_dir, probe_paths
from .data import file_sha256
from .records import run_record_path

REQUIRED_META = ("selected_l2", "train_stats", "val_stats", "val_metrics")
CHANCE_BAND = 0.02  # |AUROC - 0.5| below this counts as "about chance"


def check(cfg: Config) -> list[str]:
    """Failing items, one line each; empty when everything passes."""
    problems: list[str] = []
    out = output_dir(cfg)
    csv_path = out / "probe_metrics.csv"
    if not csv_path.is_file():
        return [f"{csv_path}: metrics CSV missing (run `needleprobe fit`)"]
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    selected = {(int(r["layer"]), int(r["seed"])): float(r["val_auroc"]) for r in rows if r["selected"] == "1"}
    wanted = [(layer, seed) for layer in cfg.probe.layers_to_probe for seed in cfg.probe.train_seeds]
    for key in wanted:
        if key not in selected:
            problems.append(f"{csv_path}: no selected row for layer {key[0]} seed {key[1]}")
        elif not selected[key] > 0.5:
            problems.append(f"layer {key[0]} seed {key[1]}: val AUROC {selected[key]:.4f} is not above chance (0.5)")
    aurocs = [selected[k] for k in wanted if k in selected]
    if aurocs and all(abs(a - 0.5) < CHANCE_BAND for a in aurocs):
        problems.append(f"every val AUROC is within {CHANCE_BAND} of 0.5: the probes are not learning")
    for layer, seed in wanted:
        pt, js = probe_paths(cfg, layer, seed)
        if not pt.is_file():
            problems.append(f"{pt}: probe weights missing")
        if not js.is_file():
            problems.append(f"{js}: probe metadata missing")
            continue
        meta = json.loads(js.read_text())
        for k in REQUIRED_META:
            if k not in meta:
                problems.append(f"{js}: metadata field {k!r} missing")
        grid = meta.get("config", {}).get("probe", {}).get("l2_grid")
        if grid != cfg.probe.l2_grid:
            problems.append(f"{js}: fitted with L2 grid {grid}, the config has {cfg.probe.l2_grid}")
    rec_path = run_record_path(cfg)
    if not rec_path.is_file():
        problems.append(f"{rec_path}: run record missing")
        return problems
    rec = json.loads(rec_path.read_text())
    recorded = dict(rec.get("config", {}))
    for section, key in RUNTIME_ONLY:
        recorded.get(section, {}).pop(key, None)
    if recorded != cfg.outcome_dict():
        diff = _diff(recorded, cfg.outcome_dict())
        problems.append(f"{rec_path}: config differs from the current config ({'; '.join(diff[:5])})")
    outputs = rec.get("stages", {}).get("fit", {}).get("outputs", {})
    if not outputs:
        problems.append(f"{rec_path}: no fit outputs recorded")
    for path, digest in sorted(outputs.items()):
        try:
            if file_sha256(path) != digest:
                problems.append(f"{path}: content differs from the run record (sha256)")
        except FileNotFoundError:
            problems.append(f"{path}: listed in the run record but missing")
    return problems


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} vs {y!r}")
    return out
