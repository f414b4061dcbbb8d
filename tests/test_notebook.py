"""notebooks/inspect_cache.ipynb runs where a user opens it, reproduces a probe's recorded AUROC, and is stored with
its outputs (the plot included), so it reads without running.

Notebooks rot silently when the API they call changes; executing it here
(against a tmp pipeline, via NEEDLEPROBE_CONFIG) from ``notebooks/``, where
Jupyter starts its kernel, turns that into a test failure.  The committed
cells must be exactly what its builder script writes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from pipeline_fixture import build_pipeline

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "inspect_cache.ipynb"


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    """extract + fit only: the notebook reads the cache and the probes, not the monitor."""
    cfg_path, _ = build_pipeline(tmp_path_factory.mktemp("notebook"), monitor_split=None)
    return cfg_path


def _builder():
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        import build_inspect_cache
    finally:
        sys.path.pop(0)
    return build_inspect_cache


def test_committed_notebook_is_generated_and_stored_with_its_outputs():
    on_disk = nbformat.read(NOTEBOOK, as_version=4)
    built = _builder().build()
    assert [(c.cell_type, c.source, c.get("id")) for c in on_disk.cells] == [
        (c.cell_type, c.source, c.get("id")) for c in built.cells], "notebook is stale: run python notebooks/build_inspect_cache.py"
    code = [c for c in on_disk.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # run top to bottom, once
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})], "the stored notebook has no plot"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "matches the config: True" in text and re.search(r"reproduced val AUROC ([\d.]+), JSON val_metrics.auroc \1", text)


@pytest.mark.slow
def test_notebook_executes_and_reproduces_auroc(config_path, monkeypatch):
    from conftest import probe_files as probe_paths

    from needleprobe.config import load_config

    import needleprobe

    monkeypatch.setenv("NEEDLEPROBE_CONFIG", str(config_path))  # the kernel inherits this environment
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    src = str(Path(needleprobe.__file__).resolve().parents[1])  # the kernel imports the needleprobe under test
    monkeypatch.setenv("PYTHONPATH", src + ((":" + os.environ["PYTHONPATH"]) if os.environ.get("PYTHONPATH") else ""))
    pytest.importorskip("matplotlib")
    nb = _builder().execute(_builder().build(), NOTEBOOK.parent)  # from notebooks/, as Jupyter opens it

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert str(Path(config_path).parent / "cache") in text  # it opened the tmp cache, not the demo one
    assert "matches the config: True" in text
    m = re.search(r"probe layer (\d+) seed (\d+): reproduced val AUROC ([\d.]+), JSON val_metrics.auroc ([\d.]+)", text)
    assert m, text[-2000:]
    layer, seed, reproduced, shown = int(m[1]), int(m[2]), float(m[3]), float(m[4])
    cfg = load_config(config_path)
    recorded = json.loads(probe_paths(cfg, layer, seed)[1].read_text())["val_metrics"]["auroc"]
    assert shown == pytest.approx(recorded, abs=5e-7) and reproduced == pytest.approx(recorded, abs=5e-7)
    # LAYER=None picks the best layer by the probes' val AUROC
    auroc = {(L, s): json.loads(probe_paths(cfg, L, s)[1].read_text())["val_metrics"]["auroc"]
             for L in cfg.probe.layers_to_probe for s in cfg.probe.train_seeds}
    assert auroc[(layer, seed)] == max(auroc.values())
    assert "needle mean (PC1, PC2)" in text and "negative mean (PC1, PC2)" in text
    assert [o for o in outputs if "image/png" in o.get("data", {})], "no plot"
