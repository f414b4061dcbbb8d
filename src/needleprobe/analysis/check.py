"""Quality checks on a run, automated: is every probe above chance, is its metadata complete,
and do the probes, ``probe_metrics.csv`` and the run record describe the same fit?

A run is checked as it was fitted: the layers, seeds, L2 grid, solver and caps
fit was given (flags included) are read from the run record
(``records.run_config``), so nothing is typed twice.  ``--layers`` and
``--seeds`` narrow the check to part of the run; fit's other flags, when given,
must match what the run record holds.
"""

from __future__ import annotations

import csv
import dataclasses
import json

from ..config import RUNTIME_ONLY, Config
from ..data.documents import file_sha256
from ..run.layout import Layout

REQUIRED_META = ("selected_l2", "train_stats", "val_stats", "val_metrics")
CHANCE_BAND = 0.02  # |AUROC - 0.5| below this counts as "about chance"


def check(cfg: Config, run: str | None = None) -> list[str]:
    """Failing items, one line each; empty when everything passes."""
    from ..run.record import run_config
    from .run import Run

    problems: list[str] = []
    cfg = run_config(cfg, run)
    layout = Layout.from_config(cfg, run)
    fitted = Run.of_layout(layout)
    csv_path = layout.metrics_csv
    if not csv_path.is_file():
        return [f"{csv_path}: metrics CSV missing (run `needleprobe fit`)"]
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    selected = {(int(r["layer"]), int(r["seed"])): float(r["val_auroc"]) for r in rows if r["selected"] == "1"}
    wanted = [(layer, seed) for layer in cfg.probe.layers_to_probe for seed in cfg.probe.train_seeds]
    whole = cfg  # the whole run (the flags may narrow ``wanted`` to a part of it)
    if cfg.fitted is not None:
        whole = dataclasses.replace(cfg, probe=dataclasses.replace(
            cfg.probe, layers_to_probe=cfg.fitted["layers_to_probe"], train_seeds=cfg.fitted["train_seeds"]))
    in_run = {(layer, seed) for layer in whole.probe.layers_to_probe for seed in whole.probe.train_seeds}
    for key in wanted:
        if key not in selected:
            problems.append(f"{csv_path}: no selected row for layer {key[0]} seed {key[1]}")
        elif not selected[key] > 0.5:
            problems.append(f"layer {key[0]} seed {key[1]}: val AUROC {selected[key]:.4f} is not above chance (0.5)")
    extra = sorted({k for k in selected if k not in in_run} | {k for k in fitted.metadata() if k not in in_run})
    if extra:
        problems.append(f"{layout.run_dir}: holds probes of (layer, seed) {extra} that "
                        + ("its run record does not list" if cfg.fitted is not None else
                           "this config does not ask for (check with the flags the run was fitted with)"))
    aurocs = [selected[k] for k in wanted if k in selected]
    if aurocs and all(abs(a - 0.5) < CHANCE_BAND for a in aurocs):
        problems.append(f"every val AUROC is within {CHANCE_BAND} of 0.5: the probes are not learning")
    want_cfg = whole.outcome_dict()
    for layer, seed in wanted:
        pt, js = fitted.files(layer, seed)
        if not pt.is_file():
            problems.append(f"{pt}: probe weights missing")
        if not js.is_file():
            problems.append(f"{js}: probe metadata missing")
            continue
        meta = fitted.probe(layer, seed).metadata_ if pt.is_file() else json.loads(js.read_text())
        for k in REQUIRED_META:
            if k not in meta:
                problems.append(f"{js}: metadata field {k!r} missing")
        if "config" in meta and meta["config"] != want_cfg:
            hint = ("the flags given to check are not the ones the run was fitted with" if cfg.fitted is not None
                    else "pass check the flags you gave fit")
            problems.append(f"{js}: fitted with other settings ({'; '.join(_diff(meta['config'], want_cfg)[:4])}); {hint}")
    rec_path = layout.run_record
    if not rec_path.is_file():
        problems.append(f"{rec_path}: run record missing")
        return problems
    rec = json.loads(rec_path.read_text())
    recorded = dict(rec.get("config", {}))
    for section, key in RUNTIME_ONLY:
        recorded.get(section, {}).pop(key, None)
    if recorded != want_cfg:
        diff = _diff(recorded, want_cfg)
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
    on_disk = {str(p) for k in fitted.metadata() for p in fitted.files(*k) if p.is_file()}
    unlisted = sorted(on_disk - set(outputs))
    if unlisted:
        problems.append(f"{rec_path}: probe files on disk that the run record does not list: {', '.join(unlisted[:3])}")
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
