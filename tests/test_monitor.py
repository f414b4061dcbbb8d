"""The document monitor: token logits are the probe applied to the model, aggregations are right,
re-aggregation never runs the model, and an interrupted monitor resumes."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import probe_files

from needleprobe.cli import main
from needleprobe.config import MonitorConfig, load_config
from needleprobe.layout import Layout
from needleprobe.monitor import AGGREGATIONS, LogitStore, aggregate, monitor, probe_refs, stored_tokens
from needleprobe.probe import LinearProbe


def _tokens(cfg, split: str, layers=None, seeds=None):
    """The stored token logits of the run's probes on ``split`` (no model run)."""
    layout = Layout.from_config(cfg)
    refs = probe_refs(layout, layers or cfg.probe.layers_to_probe, seeds or cfg.probe.train_seeds)
    return stored_tokens(cfg, LogitStore(layout.monitor_store), split, refs)


def test_aggregations_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=57)
    mon = MonitorConfig(top_k=4, window=10, temperature=2.0)
    assert aggregate(x, "mean", mon) == pytest.approx(x.mean())
    assert aggregate(x, "max", mon) == pytest.approx(x.max())
    assert aggregate(x, "topk_mean", mon) == pytest.approx(np.sort(x)[-4:].mean())
    assert aggregate(x, "rolling_max", mon) == pytest.approx(max(x[i : i + 10].mean() for i in range(48)))
    p = np.exp(x / 2.0) / np.exp(x / 2.0).sum()
    assert aggregate(x, "softmax_mean", mon) == pytest.approx((p * x).sum())
    # limits: a hot softmax is the mean, a cold one the max; short documents use what they have
    assert aggregate(x, "softmax_mean", MonitorConfig(temperature=1e6)) == pytest.approx(x.mean(), abs=1e-4)
    assert aggregate(x, "softmax_mean", MonitorConfig(temperature=1e-3)) == pytest.approx(x.max(), abs=1e-6)
    assert aggregate(x[:3], "rolling_max", mon) == pytest.approx(x[:3].mean())
    assert aggregate(x[:3], "topk_mean", mon) == pytest.approx(x[:3].mean())


@pytest.fixture(scope="module")
def monitored(minilm_run):
    cfg_path, cfg = minilm_run
    res = monitor(cfg, split="val", show_progress=False)
    return cfg_path, cfg, res


def test_token_logits_are_the_probe_on_the_model(monitored):
    from transformers import AutoModel, AutoTokenizer

    from needleprobe.hooks import model_location

    cfg_path, cfg, _ = monitored
    tokens = _tokens(cfg, "val")
    where = model_location(cfg.model)
    tok, model = AutoTokenizer.from_pretrained(where), AutoModel.from_pretrained(where).eval()
    texts = {json.loads(line)["doc_id"]: json.loads(line)["text"] for line in open(cfg.dataset.resolved_path())}
    j = [i for i, p in enumerate(tokens.probes) if p["layer"] == 1 and p["seed"] == 0][0]
    probe = LinearProbe.load(probe_files(cfg, 1, 0)[0])
    w, b = torch.from_numpy(probe.coef_), torch.tensor(probe.intercept_)
    for d in range(3):
        enc = tok(texts[tokens.doc_ids[d]], return_tensors="pt", truncation=True, max_length=cfg.model.max_length)
        with torch.inference_mode():
            hs = model(**enc, output_hidden_states=True).hidden_states[2][0]
        positions = tokens.token_index[d]
        assert positions.tolist() == list(range(1, enc["input_ids"].shape[1] - 1))  # every text token, no CLS/SEP
        torch.testing.assert_close(torch.from_numpy(tokens.logits[d][:, j]), hs[positions] @ w + b, atol=1e-4, rtol=1e-4)


def test_outputs_and_thresholds(monitored):
    cfg_path, cfg, res = monitored
    rows = list(csv.DictReader(open(res["csv"])))
    n_probes = len(cfg.probe.layers_to_probe) * len(cfg.probe.train_seeds)
    assert len(rows) == n_probes * len(AGGREGATIONS)
    scores = [json.loads(line) for line in open(res["scores"])]
    y = np.array([s["n_needles"] > 0 for s in scores])
    for r in rows:
        key = f"layer_{r['layer']}_seed_{r['seed']}"
        method = r["aggregation"].split("(")[0]
        s = np.array([d["scores"][key][method] for d in scores])
        from sklearn.metrics import roc_auc_score

        assert float(r["auroc"]) == pytest.approx(roc_auc_score(y, s))
        assert float(r["auroc_ci_low"]) <= float(r["auroc"]) <= float(r["auroc_ci_high"])
        t = float(r["threshold_5pct_fpr"])
        assert (s[~y] > t).mean() <= 0.05
        assert float(r["tpr_at_5pct_fpr"]) == pytest.approx((s[y] > t).mean())
    best = max(float(r["auroc"]) for r in rows)
    assert best > 0.8
    assert {r["split"] for r in rows} == {"val"} and res["csv"].endswith("monitor_metrics_val.csv")
    record = json.loads(open(os.path.join(cfg.probe.run_record_dir, "t_v1_probe_run_record.json")).read())
    assert record["stages"]["monitor:val"]["split"] == "val"
    layout = Layout.from_config(cfg)
    assert not layout.lock.exists()  # held only while the monitor runs
    # token logits live in the run's own store: the activation cache is write-once after extract
    assert (layout.monitor_store / "val").is_dir()
    assert "monitor" not in [p.name for p in layout.cache.iterdir()]


def test_reaggregation_never_runs_the_model(monitored, monkeypatch, tmp_path):
    cfg_path, cfg, res = monitored
    import needleprobe.hooks as hooks

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded to re-aggregate")

    monkeypatch.setattr(hooks, "load_model", boom)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["monitor"] = {"top_k": 2, "window": 5, "temperature": 0.5, "split": "val"}
    new_cfg = tmp_path / "c.yaml"
    new_cfg.write_text(yaml.safe_dump(raw))
    assert main(["monitor", "--config", str(new_cfg), "--no-progress"]) == 0
    labels = {r["aggregation"] for r in csv.DictReader(open(Layout.from_config(load_config(new_cfg)).monitor_csv("val")))}
    assert {"topk_mean(k=2)", "rolling_max(w=5)", "softmax_mean(T=0.5)"} <= labels
    # a subset of the probes already scored: the stored logits, no model either
    assert main(["monitor", "--config", str(new_cfg), "--layer", "5", "--seed", "1", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(Layout.from_config(load_config(new_cfg)).monitor_csv("val"))))
    assert {(r["layer"], r["seed"]) for r in rows} == {("5", "1")}


def test_refit_probe_is_scored_again_and_its_old_logits_dropped(monitored, tmp_path, capsys):
    """Stored logits belong to a probe file (sha256): a refit probe is rescored, the others are read back."""
    import shutil

    import zarr

    cfg_path, cfg, _ = monitored
    raw = yaml.safe_load(cfg_path.read_text())
    raw["probe"]["output_dir"] = str(tmp_path / "probes")
    new_path = tmp_path / "c.yaml"
    new_path.write_text(yaml.safe_dump(raw))
    new = load_config(new_path)
    shutil.copytree(Layout.from_config(cfg).run_dir, Layout.from_config(new).run_dir)
    capsys.readouterr()
    assert main(["monitor", "--config", str(new_path), "--split", "val", "--no-progress"]) == 0
    assert "already stored (no model run)" in capsys.readouterr().err  # an identical copy is still current
    pt, _ = probe_files(new, 5, 1)
    d = torch.load(pt, weights_only=True)
    torch.save({"weight": d["weight"] * 2, "bias": d["bias"]}, pt)
    assert main(["monitor", "--config", str(new_path), "--split", "val", "--no-progress"]) == 0
    assert re.search(r"scoring \d+ val documents with 1 probe\(s\)", capsys.readouterr().err)  # only the refit one
    from needleprobe.data import file_sha256

    g = zarr.open_group(str(Layout.from_config(new).monitor_store), mode="r")["val"]
    assert (5, 1, file_sha256(pt)) in LogitStore.stored(g)
    assert main(["monitor", "--config", str(new_path), "--split", "val", "--no-progress"]) == 0
    assert "already stored (no model run)" in capsys.readouterr().err
    # once no probe of a model run is current any more, its logits are dropped
    for layer in (1, 5):
        for seed in (0, 1):
            p, _ = probe_files(new, layer, seed)
            d = torch.load(p, weights_only=True)
            torch.save({"weight": d["weight"] * 3, "bias": d["bias"]}, p)
    assert main(["monitor", "--config", str(new_path), "--split", "val", "--no-progress"]) == 0
    g = zarr.open_group(str(Layout.from_config(new).monitor_store), mode="r")["val"]
    assert len([k for k in g.group_keys() if k.startswith("pass-")]) == 1


@pytest.mark.slow
def test_killed_monitor_resumes(minilm_run, tmp_path):
    from needleprobe import open_cache

    cfg_path, cfg = minilm_run
    env = {**os.environ, "NEEDLEPROBE_CHUNK_ROWS": "128", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "needleprobe", "monitor", "--config", str(cfg_path), "--split", "train", "--layer", "1",
            "--seed", "0", "--no-progress"]
    killed = subprocess.run(argv, env={**env, "NEEDLEPROBE_FAULT": "chunk_committed:3"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    import zarr

    g = zarr.open_group(str(Layout.from_config(cfg).monitor_store), mode="r")["train"]
    (pg,) = [g[k] for k in g.group_keys() if k.startswith("pass-")]
    assert not pg.attrs["complete"] and pg.attrs["committed_rows"] == 3 * 128
    again = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    fresh = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert "already stored (no model run)" in fresh.stderr
    # the resumed logits equal a direct computation from the cached activations of the same tokens
    tokens = _tokens(cfg, "train", [1], [0])
    train = open_cache(cfg).split("train")
    x, di, ti = train.to_numpy(1), train.doc_index, train.token_index
    probe = LinearProbe.load(probe_files(cfg, 1, 0)[0])
    for d in range(0, len(tokens.doc_ids), 5):
        rows = np.flatnonzero(di == d)
        pos = {int(t): i for i, t in enumerate(tokens.token_index[d])}
        got = tokens.logits[d][[pos[int(t)] for t in ti[rows]], 0]
        np.testing.assert_allclose(got, probe.decision_function(x[rows]), atol=1e-4, rtol=1e-4)
