"""Fit: probes reproduce their metrics, agree with scikit-learn, and never need the model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from conftest import probe_files as probe_paths
from conftest import run_dir as output_dir

from needleprobe import open_cache
from needleprobe.analysis.check import check
from needleprobe.fit.probe import LinearProbe, column_moments


def _meta(cfg, layer, seed, run=None):
    return json.loads(probe_paths(cfg, layer, seed, run)[1].read_text())


def load_probe(pt):
    d = torch.load(pt, weights_only=True)
    return d["weight"], d["bias"]


def test_saved_probe_reproduces_reported_auroc(minilm_run):
    _, cfg = minilm_run
    val = open_cache(cfg).split("val")
    for layer in cfg.probe.layers_to_probe:
        for seed in cfg.probe.train_seeds:
            w, b = load_probe(probe_paths(cfg, layer, seed)[0])
            assert w.dtype == torch.float32 and w.shape == (384,) and b.shape == ()
            logits = torch.from_numpy(val.to_numpy(layer)) @ w + b
            meta = _meta(cfg, layer, seed)
            assert roc_auc_score(val.labels, logits.numpy()) == pytest.approx(meta["val_metrics"]["auroc"], abs=1e-6)
            lo, hi = meta["val_metrics"]["auroc_ci95"]
            assert lo <= meta["val_metrics"]["auroc"] <= hi and hi - lo < 0.3
            for k in ("selected_l2", "train_stats", "val_stats", "val_metrics", "l2_results", "cache_fingerprint", "config"):
                assert k in meta
            assert meta["train_stats"]["positives"] == int(open_cache(cfg).split("train").labels.sum())


def test_metrics_csv_matches_json_and_selection(minilm_run):
    _, cfg = minilm_run
    rows = list(csv.DictReader(open(output_dir(cfg) / "probe_metrics.csv")))
    assert list(rows[0]) == ["layer", "seed", "l2", "val_auroc", "val_average_precision", "selected", "train_auroc",
                             "train_average_precision"]
    assert len(rows) == len(cfg.probe.layers_to_probe) * len(cfg.probe.train_seeds) * len(cfg.probe.l2_grid)
    for layer in cfg.probe.layers_to_probe:
        for seed in cfg.probe.train_seeds:
            mine = [r for r in rows if int(r["layer"]) == layer and int(r["seed"]) == seed]
            best = max(mine, key=lambda r: (float(r["val_auroc"]), float(r["l2"])))
            assert [r["selected"] for r in mine].count("1") == 1 and best["selected"] == "1"
            meta = _meta(cfg, layer, seed)
            assert float(best["l2"]) == meta["selected_l2"]
            assert float(best["val_auroc"]) == pytest.approx(meta["val_metrics"]["auroc"], abs=1e-9)
            for r, res in zip(mine, meta["l2_results"]):  # the CSV's train columns are the JSON's numbers
                assert (float(r["train_auroc"]), float(r["train_average_precision"])) == (
                    res["train_auroc"], res["train_average_precision"])
            assert meta["train_metrics"]["auroc"] == float(best["train_auroc"])


def test_every_grid_value_matches_sklearn(minilm_run):
    """Same standardised data, C = 1/(l2·n), balanced weights: |ΔAUROC| ≤ 1e-3 and the same selected L2."""
    _, cfg = minilm_run
    cache = open_cache(cfg)
    tr, va = cache.split("train"), cache.split("val")
    layer = cfg.probe.layers_to_probe[0]
    x, y = tr.to_numpy(layer).astype(np.float64), tr.labels
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-12] = 1
    xs = (x - mean) / std
    xv = (va.to_numpy(layer) - mean) / std
    n, n_pos = len(y), int(y.sum())
    sw = np.where(y == 1, n / (2 * n_pos), n / (2 * (n - n_pos)))
    meta = _meta(cfg, layer, cfg.probe.train_seeds[0])
    ours = {r["l2"]: r["val_auroc"] for r in meta["l2_results"]}
    ref = {}
    for l2 in cfg.probe.l2_grid:
        clf = LogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=10000).fit(xs, y, sample_weight=sw)
        ref[l2] = roc_auc_score(va.labels, clf.decision_function(xv))
        assert abs(ref[l2] - ours[l2]) <= 1e-3, (l2, ref[l2], ours[l2])
    assert max(ref, key=lambda k: (ref[k], k)) == meta["selected_l2"]


def test_seeds_without_randomness_are_fitted_once(minilm_run):
    _, cfg = minilm_run
    a, b = (probe_paths(cfg, 1, s)[0].read_bytes() for s in cfg.probe.train_seeds)
    assert a == b
    assert _meta(cfg, 1, cfg.probe.train_seeds[1])["fitted_with_seed"] == cfg.probe.train_seeds[0]


def test_refit_with_new_grid_works_without_transformers(minilm_run, tmp_path):
    """Fit reads only the cache: with transformers made unimportable, a new grid still fits (into a named run)."""
    cfg_path, cfg = minilm_run
    before = {p.name: p.read_bytes() for p in output_dir(cfg).iterdir() if p.is_file()}
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from needleprobe.cli import main\n"
        f"rc = main(['fit', '--config', {str(cfg_path)!r}, '--l2-grid', '0.05,0.5', '--layers', '5', '--seeds', '0',"
        " '--run', 'newgrid'])\n"
        "assert 'transformers' not in sys.modules or sys.modules['transformers'] is None\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = _meta(cfg, 5, 0, "newgrid")
    assert [x["l2"] for x in meta["l2_results"]] == [0.05, 0.5]
    rows = list(csv.DictReader(open(output_dir(cfg, "newgrid") / "probe_metrics.csv")))
    assert {(r["layer"], r["seed"]) for r in rows} == {("5", "0")} and {float(r["l2"]) for r in rows} == {0.05, 0.5}
    # the default run is untouched
    assert {p.name: p.read_bytes() for p in output_dir(cfg).iterdir() if p.is_file()} == before


def test_check_passes_and_catches_tampering(minilm_run):
    cfg_path, cfg = minilm_run
    assert check(cfg) == []
    pt = probe_paths(cfg, 1, 0)[0]
    original = pt.read_bytes()
    try:
        pt.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        problems = check(cfg)
        assert any("differs from the run record" in p for p in problems)
    finally:
        pt.write_bytes(original)
    assert check(cfg) == []


def test_demo_end_to_end_learns(tmp_path):
    """The demo data's val needles use other words than train's: AUROC well above chance means generalisation."""
    from conftest import write_config

    from needleprobe.cli import main
    from needleprobe.data.demo import write_demo_dataset

    data = write_demo_dataset(tmp_path / "demo.jsonl")
    cfg_path = write_config(tmp_path, data, layers_to_probe=[3], max_train_docs=120, max_val_docs=40, train_seeds=[0])
    assert main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
    from needleprobe.config import load_config

    meta = _meta(load_config(cfg_path), 3, 0)
    assert meta["val_metrics"]["auroc"] > 0.9
    assert main(["check", "--config", str(cfg_path)]) == 0


def test_minibatch_streams_blocks_and_approaches_lbfgs(small_dataset, tmp_path, monkeypatch):
    """The minibatch solver never reads a whole split, is deterministic per seed, and lands near the exact fit."""
    from conftest import write_config

    from needleprobe.cache.reader import SplitView
    from needleprobe.cli import main
    from needleprobe.config import load_config

    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", "64")  # many small chunks, so streaming is visible
    exact_path = write_config(tmp_path, small_dataset, layers_to_probe=[1], train_seeds=[0], solver="lbfgs")
    assert main(["train", "--config", str(exact_path), "--no-progress"]) == 0
    exact = _meta(load_config(exact_path), 1, 0)
    mb_dir = tmp_path / "mb"
    mb_dir.mkdir()
    mb_path = write_config(mb_dir, small_dataset, layers_to_probe=[1], train_seeds=[0, 1], solver="minibatch",
                           num_epochs=30, learning_rate=0.003, batch_size=256, cache_dir=str(tmp_path / "cache"))
    reads = []
    real = SplitView.to_numpy

    def spy(self, layer, dtype=np.float32, rows=None):
        out = real(self, layer, dtype, rows)
        reads.append((out.shape[0], self.n_rows))
        return out

    monkeypatch.setattr(SplitView, "to_numpy", spy)
    assert main(["fit", "--config", str(mb_path)]) == 0
    assert reads and max(n for n, _ in reads) <= 4 * 64 < min(total for _, total in reads)
    mb = load_config(mb_path)
    metas = [_meta(mb, 1, s) for s in mb.probe.train_seeds]
    assert metas[0]["solver"] == "minibatch" and metas[0]["seed_dependent"]
    assert probe_paths(mb, 1, 0)[0].read_bytes() != probe_paths(mb, 1, 1)[0].read_bytes()
    for m in metas:
        assert abs(m["val_metrics"]["auroc"] - exact["val_metrics"]["auroc"]) < 0.02
        # lbfgs is the optimum of the same objective: minibatch cannot beat it (beyond float noise)
        for r_mb, r_ex in zip(m["l2_results"], exact["l2_results"]):
            assert r_mb["train_objective"] >= r_ex["train_objective"] - 1e-6
    first = probe_paths(mb, 1, 0)[0].read_bytes()
    assert main(["fit", "--config", str(mb_path), "--seeds", "0", "--run", "again"]) == 0
    assert probe_paths(mb, 1, 0, "again")[0].read_bytes() == first


def test_minibatch_standardises_with_the_in_memory_statistics_to_the_bit(small_dataset, tmp_path, monkeypatch):
    """One standardiser: the minibatch solver's streamed mean and scale are the in-memory fit's, bit for bit."""
    from conftest import write_config

    from needleprobe.cache.reader import open_cache
    from needleprobe.cli import main
    from needleprobe.config import load_config
    from needleprobe.fit.fit import lbfgs_layer, minibatch_layer

    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", "64")  # blocks of 4 chunks: many blocks, so the sums are streamed
    path = write_config(tmp_path, small_dataset, layers_to_probe=[1], train_seeds=[0])
    assert main(["extract", "--config", str(path), "--no-progress"]) == 0
    cfg = load_config(path)
    cache = open_cache(cfg)
    assert cache.split("train").n_rows > 4 * 64
    streamed = minibatch_layer(cache, 1, cfg, torch.device("cpu"))
    in_memory = lbfgs_layer(cache, 1, list(cfg.probe.l2_grid), torch.device("cpu"))
    np.testing.assert_array_equal(streamed.mean, in_memory.mean)
    np.testing.assert_array_equal(streamed.std, in_memory.std)


@pytest.mark.parametrize("n", [1, 1023, 1024, 5000])
def test_column_moments_equal_numpy_to_the_bit(n):
    """Blockwise, yet numpy's own two-pass numbers: probes stay the same bytes."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 37)) * rng.uniform(0.1, 50, 37) + rng.normal(size=37) * 20).astype(np.float32)
    x[:, 3] = 7.25  # a constant feature
    mean, std = column_moments(x)
    np.testing.assert_array_equal(mean, x.mean(0, dtype=np.float64))
    np.testing.assert_array_equal(std, x.std(0, dtype=np.float64))


def test_fit_command_starts_without_heavy_imports():
    """What runs before ``fit`` works imports neither scikit-learn (nor scipy) nor transformers, nor
    torch.distributed before torch itself is needed."""
    code = (
        "import sys\n"
        "import needleprobe.cli\n"
        "early = [m for m in ('sklearn', 'scipy', 'torch.distributed', 'transformers') if m in sys.modules]\n"
        "import needleprobe.fit.fit, needleprobe.metrics, needleprobe.fit.comm\n"
        "late = [m for m in ('sklearn', 'scipy', 'transformers') if m in sys.modules]\n"
        "print(early, late)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] []"


@pytest.mark.parametrize("balance", ["weighted", "downsample"])
def test_train_auroc_of_every_grid_value_is_sklearns_on_the_rows_used(minilm_run, balance):
    """Train AUROC and AP per L2 value: scikit-learn's on the train rows the fit used (all of them with balanced
    weights, whose AUROC equals the unweighted one; the drawn 1:1 subset with downsample), within 1e-9."""
    from sklearn.metrics import average_precision_score

    from needleprobe.fit.probe import FitData, fit_grid
    from needleprobe.io.runtime import fit_settings

    _, cfg = minilm_run
    cache = open_cache(cfg)
    tr, va = cache.split("train"), cache.split("val")
    layer, grid = 1, cfg.probe.l2_grid
    x, y = tr.to_numpy(layer), tr.labels
    with fit_settings():
        data = FitData.from_arrays(x, y, va.to_numpy(layer), va.labels, va.doc_index, grid)
        out = fit_grid(data, grid, balance, seed=3)
    n_pos = int(y.sum())
    y_used, scores = out["train_labels"], out["train_scores"]
    if balance == "weighted":
        np.testing.assert_array_equal(y_used, y)
        # the CLI's fit wrote the same numbers
        assert out["l2_results"] == _meta(cfg, layer, 0)["l2_results"]
    else:  # every positive and as many negatives
        assert int(y_used.sum()) == n_pos and y_used.size == 2 * n_pos < y.size
    assert out["train_rows_used"] == y_used.size and scores.shape == (y_used.size, len(grid))
    sw = np.where(y_used == 1, y_used.size / (2 * n_pos), y_used.size / (2 * (y_used.size - n_pos)))
    for k, r in enumerate(out["l2_results"]):
        assert abs(r["train_auroc"] - roc_auc_score(y_used, scores[:, k])) <= 1e-9
        assert abs(r["train_auroc"] - roc_auc_score(y_used, scores[:, k], sample_weight=sw)) <= 1e-9
        assert abs(r["train_average_precision"] - average_precision_score(y_used, scores[:, k])) <= 1e-9
    # the scores are the saved probe on those rows' raw activations
    best = grid.index(out["selected_l2"])
    if balance == "downsample":
        from needleprobe.fit.probe import training_rows

        x = x[training_rows(y, balance, 3)[0]]
    np.testing.assert_allclose(scores[:, best], x.astype(np.float64) @ out["weight"] + out["bias"], atol=2e-3, rtol=1e-4)
    assert out["train_metrics"]["auroc"] == out["l2_results"][best]["train_auroc"]


def test_fit_says_its_verdict_and_writes_it(minilm_run, capsys):
    """After a fit: the best layer, its paired margin over the runner-up, train AUROC, identical seeds once; the same
    in verdict.json, whose difference is the JSONs' val AUROCs' and whose CI is the paired bootstrap's."""
    from needleprobe.cli import main
    from needleprobe.run.layout import Layout
    from needleprobe.metrics import paired_bootstrap_auroc_diff

    cfg_path, cfg = minilm_run
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg_path), "--run", "verdict"]) == 0
    out, err = capsys.readouterr()
    layout = Layout.from_config(cfg, "verdict")
    v = json.loads(layout.verdict.read_text())
    metas = {(layer, s): _meta(cfg, layer, s, "verdict") for layer in (1, 5) for s in (0, 1)}
    best = max((1, 5), key=lambda layer: metas[(layer, 0)]["val_metrics"]["auroc"])
    other = 6 - best
    assert (v["best"]["layer"], v["runner_up"]["layer"]) == (best, other)
    a, b = (metas[(layer, 0)]["val_metrics"]["auroc"] for layer in (best, other))
    d = v["difference"]
    assert d["auroc_difference"] == pytest.approx(a - b, abs=1e-12)
    val = open_cache(cfg).split("val")
    scores = [LinearProbe.load(probe_paths(cfg, layer, 0, "verdict")[0]).decision_function(val.to_numpy(layer))
              for layer in (best, other)]
    ref = paired_bootstrap_auroc_diff(val.labels, *scores, val.doc_index, n_boot=1000, seed=0)
    assert d["ci95"] == pytest.approx([ref["ci_low"], ref["ci_high"]], abs=1e-3)  # fit's own scores vs re-scored
    assert d["distinguishable"] == (d["ci95"][0] > 0)
    assert v["best"]["train_auroc"] == metas[(best, 0)]["train_metrics"]["auroc"]
    assert all(layer["seeds_identical"] == [[0, 1]] for layer in v["layers"])
    lines = [x for x in out.splitlines() if x.startswith("verdict: ")]  # the table and verdict are the answer: stdout
    assert [x[len("verdict: "):] for x in lines] == v["summary"]
    assert lines[0].startswith(f"verdict: best layer: {best} (seed 0, val AUROC {a:.4f}")
    assert "seeds on one row gave identical probes" in out and "seeds 0, 1 gave identical probes" in out
    assert "0.9" in out and "…" not in out  # no cell cut at 80 columns
    assert "verdict:" not in err and f"verdict.json in {layout.run_dir}" in err  # messages: stderr
    record = json.loads(layout.run_record.read_text())
    assert str(layout.verdict) in record["stages"]["fit"]["outputs"]


def test_l2_at_the_edge_of_the_grid_is_flagged_only_when_it_beats_its_neighbour():
    from needleprobe.fit.verdict import l2_at_edge

    def probe(selected, aurocs):
        res = [{"l2": l2, "val_auroc": a} for l2, a in zip((0.01, 0.1, 1.0), aurocs)]
        return LinearProbe.from_weights(np.zeros(2, np.float32), 0.0, {"selected_l2": selected, "l2_results": res})

    assert l2_at_edge(probe(1.0, (0.8, 0.85, 0.9))) == {"l2": 1.0, "edge": "largest", "wider_grid": "0.01,0.1,1,10"}
    assert l2_at_edge(probe(0.01, (0.9, 0.85, 0.8))) == {"l2": 0.01, "edge": "smallest", "wider_grid": "0.001,0.01,0.1,1"}
    assert l2_at_edge(probe(1.0, (0.8, 0.9, 0.9))) is None  # a flat end: the tie went to the stronger L2
    assert l2_at_edge(probe(0.1, (0.8, 0.9, 0.85))) is None
