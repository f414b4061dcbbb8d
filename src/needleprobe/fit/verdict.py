"""Is my probe any good?  What a fit concludes, in a few lines and in ``verdict.json``.

A table of AUROCs per layer and seed invites the wrong questions ("layer 3
beats layer 5 by 0.003, so layer 3 it is").  The verdict answers the right
ones from numbers the fit already has:

- which layer is best (its best seed: the highest val AUROC; ties go to the
  layer with the better seed mean, then to the earlier layer);
- whether it is really better than the runner-up layer: both probes score
  the same val rows, so a paired bootstrap over val documents
  (:func:`metrics.paired_bootstrap_auroc_diff`) gives a CI of the difference
  that excludes 0 only when the val set actually separates them;
- how far train AUROC is above val AUROC (memorised rows);
- whether the chosen L2 sits at an edge of the grid while beating its
  neighbour, in which case the best value may lie beyond it;
- which seeds gave identical probes (``class_balance: weighted`` with the
  exact solver has no randomness), so they are shown once.

Everything here is computed from probes and val scores; nothing is re-read
or re-fitted.  ``verdict.json`` is written next to the probes (``Layout.verdict``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .probe import LinearProbe

N_BOOT = 1000


def best_seed_per_layer(aurocs: dict[tuple[int, int], float]) -> dict[int, int]:
    """layer → the seed with the highest val AUROC (ties: the lowest seed); ``aurocs``: (layer, seed) → val AUROC."""
    out: dict[int, int] = {}
    for (layer, seed), a in sorted(aurocs.items()):
        cur = out.get(layer)
        if cur is None or a > aurocs[(layer, cur)]:
            out[layer] = seed
    return out


def ranked_layers(aurocs: dict[tuple[int, int], float]) -> list[tuple[int, int]]:
    """(layer, its best seed), best layer first: val AUROC, then the layer's seed mean, then the earlier layer."""
    best = best_seed_per_layer(aurocs)
    mean = {layer: float(np.mean([a for (lay, _), a in aurocs.items() if lay == layer])) for layer in best}
    return sorted(best.items(), key=lambda ls: (-aurocs[ls], -mean[ls[0]], ls[0]))


def val_aurocs(probes: dict[tuple[int, int], LinearProbe]) -> dict[tuple[int, int], float]:
    return {k: float(p.val_auroc_ if p.val_auroc_ is not None else 0.0) for k, p in probes.items()}


def identical_seeds(probes: dict[tuple[int, int], LinearProbe]) -> dict[int, list[list[int]]]:
    """layer → groups of seeds whose probes are the same numbers (weights and bias), each group ascending."""
    out: dict[int, list[list[int]]] = {}
    for (layer, seed), p in sorted(probes.items()):
        groups = out.setdefault(layer, [])
        for g in groups:
            q = probes[(layer, g[0])]
            if q.intercept_ == p.intercept_ and np.array_equal(q.coef_, p.coef_):
                g.append(seed)
                break
        else:
            groups.append([seed])
    return out


SAME_SEEDS = "seeds on one row gave identical probes"
"""The caption of a table that shows identical seeds once (``one_row_per_probe``)."""


def one_row_per_probe(probes: dict[tuple[int, int], LinearProbe]) -> dict[tuple[int, int], list[int]]:
    """(layer, first seed) of each distinct probe → the seeds that gave it (``identical_seeds``), in layer and seed
    order: every table and note shows a probe once, its seeds joined ("0, 1, 2")."""
    return {(layer, g[0]): g for layer, groups in sorted(identical_seeds(probes).items()) for g in groups}


def l2_at_edge(probe: LinearProbe) -> dict[str, Any] | None:
    """When the selected L2 is the grid's smallest or largest value and strictly beats its neighbour: where, and a grid
    one decade wider on that side (ties at the edge are a flat path, not a hint)."""
    res = sorted(probe.metadata_.get("l2_results", []), key=lambda r: r["l2"])
    if len(res) < 2:
        return None
    sel = probe.selected_l2_
    grid = [r["l2"] for r in res]
    for edge, i, j, wider in (("largest", -1, -2, grid + [grid[-1] * 10]), ("smallest", 0, 1, [grid[0] / 10] + grid)):
        if sel == grid[i] and res[i]["val_auroc"] > res[j]["val_auroc"]:
            return {"l2": sel, "edge": edge, "wider_grid": ",".join(f"{v:g}" for v in wider)}
    return None


def build_verdict(probes: dict[tuple[int, int], LinearProbe], val_scores: dict[tuple[int, int], np.ndarray],
                  y_val: np.ndarray, val_groups: np.ndarray) -> dict[str, Any]:
    """The verdict of one fit (the content of ``verdict.json``).

    ``val_scores``: (layer, seed) → the probe's val logits [n_val] (the selected L2's, as fit scored them);
    ``y_val`` [n_val] and ``val_groups`` [n_val] (document of each row) are the cache's val rows.
    """
    from ..metrics import paired_bootstrap_auroc_diff

    ranked = ranked_layers(val_aurocs(probes))
    same = identical_seeds(probes)
    layers = []
    for layer, seed in sorted(ranked):
        p = probes[(layer, seed)]
        vm, tm = p.metadata_.get("val_metrics", {}), p.metadata_.get("train_metrics") or {}
        groups = same[layer]
        layers.append({
            "layer": layer,
            "seed": seed,
            "val_auroc": vm.get("auroc"),
            "val_auroc_ci95": vm.get("auroc_ci95"),
            "train_auroc": tm.get("auroc"),
            "selected_l2": p.selected_l2_,
            "l2_at_grid_edge": l2_at_edge(p),
            "seeds_identical": [g for g in groups if len(g) > 1],
        })
    by_layer = {d["layer"]: d for d in layers}
    best_layer, best_seed = ranked[0]
    out: dict[str, Any] = {
        "best": by_layer[best_layer],
        "runner_up": None,
        "difference": None,
        "layers": layers,
        "val_documents": int(np.unique(val_groups).size),
    }
    if len(ranked) > 1:
        second, second_seed = ranked[1]
        out["runner_up"] = by_layer[second]
        diff: dict[str, Any] = {"best_layer": best_layer, "runner_up_layer": second,
                                "method": f"paired bootstrap over val documents ({N_BOOT} resamples, both probes on each)"}
        try:
            d = paired_bootstrap_auroc_diff(y_val, val_scores[(best_layer, best_seed)], val_scores[(second, second_seed)],
                                            val_groups, n_boot=N_BOOT, seed=0)
        except ValueError as e:  # too few documents with both classes
            diff["note"] = str(e)
        else:
            diff.update({"auroc_difference": d["difference"], "ci95": [d["ci_low"], d["ci_high"]],
                         "share_of_resamples_best_higher": d["share_a_better"], "resamples": d["n_boot"],
                         "distinguishable": bool(d["ci_low"] > 0)})
        out["difference"] = diff
    out["summary"] = verdict_lines(out)
    return out


def _seeds(g: list[int]) -> str:
    return ", ".join(map(str, g))


def verdict_lines(v: dict[str, Any]) -> list[str]:
    """The verdict as a few plain sentences (the terminal after ``fit``, and the report)."""
    b = v["best"]
    ci = b.get("val_auroc_ci95")
    lines = [f"best layer: {b['layer']} (seed {b['seed']}, val AUROC {b['val_auroc']:.4f}"
             + (f", 95% CI {ci[0]:.4f}–{ci[1]:.4f} over {v['val_documents']} val documents" if ci else "") + ")"]
    d, r = v.get("difference"), v.get("runner_up")
    if d is not None and r is not None:
        if "auroc_difference" in d:
            lo, hi = d["ci95"]
            span = f"{d['auroc_difference']:+.4f} (paired 95% CI {lo:+.4f} to {hi:+.4f})"
            if d["distinguishable"]:
                lines.append(f"it beats the runner-up, layer {r['layer']} (val AUROC {r['val_auroc']:.4f}), by {span}")
            else:
                lines.append(f"it is not distinguishable from the runner-up, layer {r['layer']} (val AUROC "
                             f"{r['val_auroc']:.4f}): difference {span} includes 0 on these val documents")
        else:
            lines.append(f"no paired comparison with layer {r['layer']}: {d['note']}")
    if b.get("train_auroc") is not None:
        gap = b["train_auroc"] - b["val_auroc"]
        lines.append(f"train AUROC {b['train_auroc']:.4f} on the rows it was fitted on ({gap:+.4f} against val)")
    for layer in v["layers"]:
        e = layer.get("l2_at_grid_edge")
        if e:
            lines.append(f"warning: layer {layer['layer']}: the selected L2 {e['l2']:g} is the {e['edge']} in the grid "
                         f"and beats its neighbour, so a better one may lie beyond; widen the grid (--l2-grid "
                         f"{e['wider_grid']})")
    same = sorted({tuple(g) for layer in v["layers"] for g in layer["seeds_identical"]})
    if same:
        lines.append(f"seeds {' / '.join(_seeds(list(g)) for g in same)} gave identical probes (nothing in this fit is "
                     "random)")
    return lines
