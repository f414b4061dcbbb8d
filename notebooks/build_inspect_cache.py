"""Writes notebooks/inspect_cache.ipynb from the cells below, executed, with its outputs.

Run after `make demo` (it reads the demo's cache and probes):
``python notebooks/build_inspect_cache.py``.  The notebook is generated, not
hand-edited: edit the cells here and rerun.  It is executed from
``notebooks/``, where Jupyter starts a kernel for it, and stored with its
outputs (the plot included), so it reads without running on a code host.
tests/test_notebook.py checks that the stored cells are these and executes
them from ``notebooks/`` on a fresh pipeline.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# Inspect an activation cache

Opens the Zarr cache written by `needleprobe extract`, looks at the rows it holds,
projects one layer's activations to 2-D, and checks that a saved probe reproduces
its recorded validation AUROC from the cache alone.

Open it where it lies (Jupyter starts its kernel in `notebooks/`) or from the repository root: the first cell
finds the project directory, whose `configs/`, `cache/` and `results/` the config's paths name. Set
`NEEDLEPROBE_CONFIG` to inspect another config. The plot needs matplotlib (`make install` installs it, or
`pip install -e ".[notebook]"`)."""),
    ("code", """import os
from pathlib import Path

# a config's relative paths (dataset, cache, results) are the project directory's: work from there
given = os.environ.get("NEEDLEPROBE_CONFIG")
CONFIG = str(Path(given).resolve()) if given else "configs/demo.yaml"  # the YAML that built the cache
ROOT = next((d for d in [Path.cwd(), *Path.cwd().parents] if (d / "configs" / "demo.yaml").is_file()), Path.cwd())
os.chdir(ROOT)
LAYER = None  # None: the layer of the best fitted probe (by val AUROC), else the first cached layer
SEED = None  # None: that probe's seed, else the first of probe.train_seeds
N_ROWS_SHOWN = 6"""),
    ("code", """import json

import numpy as np

import needleprobe
from needleprobe.config import load_config

from needleprobe.cache.inspect import cache_facts

cfg = load_config(CONFIG)
cache = needleprobe.open_cache(CONFIG)
print(cache)
facts = cache_facts(cfg)
f = cache.fields
print(f"model {f['model_name']} · site {f['activation_site']} · {f['feature_dtype']} × d_model {facts['d_model']}")
print("matches the config:", facts["matches_config"], "; ".join(facts["differences"]))"""),
    ("md", "## Rows per split\n\nNeedle tokens are the positives; negatives are a per-document sample of the other text tokens."),
    ("code", """for name in cache.splits:
    sp = cache.split(name)
    y = sp.labels
    n_needles = sp.doc_n_needles
    print(f"{name:>5}: {sp.n_rows:6d} rows = {int(y.sum()):6d} needle + {int((y == 0).sum()):6d} negative"
          f" | {len(n_needles)} docs, {int((n_needles > 0).sum())} with needles")"""),
    ("md", "## What a few rows are\n\nThe token of a few needle and negative rows (the cache stores token ids), decoded with the model's tokenizer."),
    ("code", """from needleprobe.model.hooks import load_tokenizer

tok = load_tokenizer(cfg.model)
val = cache.split("val")
labels, doc_index, token_id = val.labels, val.doc_index, val.token_id
doc_ids = val.doc_ids
rng = np.random.default_rng(0)
shown = np.concatenate([
    rng.choice(np.flatnonzero(labels == 1), size=min(N_ROWS_SHOWN // 2, int((labels == 1).sum())), replace=False),
    rng.choice(np.flatnonzero(labels == 0), size=min(N_ROWS_SHOWN // 2, int((labels == 0).sum())), replace=False),
])
for r in shown:
    kind = "NEEDLE  " if labels[r] else "negative"
    print(f"{kind} row {r:5d}  doc {doc_ids[doc_index[r]]:<18} position {int(val.token_index[r]):4d}  "
          f"token {tok.convert_ids_to_tokens(int(token_id[r]))!r:<16} -> {tok.decode([int(token_id[r])])!r}")"""),
    ("md", """## 2-D projection of one layer

PCA (numpy SVD) of the val activations. If needle and negative tokens separate in the first two
components, even a linear probe has an easy job."""),
    ("code", """from needleprobe import NeedleprobeError, load_probes

try:
    probes = load_probes(cfg)  # (layer, seed) -> LinearProbe, from the config's run directory
except NeedleprobeError:
    probes = {}

if LAYER is None:
    fitted = {k: p.val_auroc_ for k, p in probes.items() if p.val_auroc_ is not None}
    LAYER, best_seed = max(fitted, key=fitted.get) if fitted else (cache.layers[0], None)
    SEED = best_seed if SEED is None else SEED
if SEED is None:
    SEED = cfg.probe.train_seeds[0]
x = val.to_numpy(LAYER)
xc = x - x.mean(axis=0)
_, sv, vt = np.linalg.svd(xc, full_matrices=False)
proj = xc @ vt[:2].T
explained = sv[:2] ** 2 / (sv**2).sum()
print(f"layer {LAYER}: {x.shape[0]} rows x d_model {x.shape[1]}; PC1 {explained[0]:.1%}, PC2 {explained[1]:.1%} of variance")
for value, name in ((1, "needle"), (0, "negative")):
    m, sd = proj[labels == value].mean(axis=0), proj[labels == value].std(axis=0)
    print(f"  {name:>8} mean (PC1, PC2) = ({m[0]:+8.3f}, {m[1]:+8.3f})   std = ({sd[0]:.3f}, {sd[1]:.3f})")"""),
    ("code", """try:
    import matplotlib.pyplot as plt
except ImportError:  # the notebook extra: the class means above say the same in numbers
    print('matplotlib not installed: no scatter plot (make install, or pip install -e ".[notebook]")')
else:
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=72)
    for value, name, color in ((0, "negative", "#4e79a7"), (1, "needle", "#e15759")):
        ax.scatter(*proj[labels == value].T, s=6, alpha=0.5, label=name, color=color)
    ax.set_xlabel("PC1"); ax.set_ylabel("PC2"); ax.set_title(f"val activations, layer {LAYER}"); ax.legend()
    plt.show()"""),
    ("md", """## A saved probe, scored from the cache

`probe.decision_function(x)` is `x @ probe.coef_ + probe.intercept_` on raw activations (the `.pt`
file's `weight` and `bias`). The AUROC must equal the one `needleprobe fit` recorded in the
probe's JSON: same rows, same weights."""),
    ("code", """from sklearn.metrics import roc_auc_score

probe = probes[(LAYER, SEED)]
logits = probe.decision_function(x)
reproduced = roc_auc_score(labels, logits)
recorded = probe.val_auroc_
print(f"probe layer {LAYER} seed {SEED}: reproduced val AUROC {reproduced:.6f}, JSON val_metrics.auroc {recorded:.6f}")
assert abs(reproduced - recorded) < 1e-6, "the probe no longer matches this cache: refit with `needleprobe fit`\""""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook(
        cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS],
        metadata={
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
    )
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives identical bytes
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 180) -> nbformat.NotebookNode:
    """Run every cell in a kernel started in ``cwd`` (where Jupyter starts one for this file); outputs kept, no
    timings (so rerunning changes only what the data changes)."""
    import nbclient

    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main() -> Path:
    path = Path(__file__).with_name("inspect_cache.ipynb")
    nb = execute(build(), path.parent)
    for cell in nb.cells:  # the kernel's own warnings on stderr (tqdm, transport) are not the notebook's output
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    nbformat.validate(nb)
    path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(main())
