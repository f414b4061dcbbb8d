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
from needleprobe.run.layout import Layout
from needleprobe.analysis.aggregation import AGGREGATIONS, aggregate, document_metrics, recommend
from needleprobe.analysis.logits import LogitStore, MonitorTokens, probe_refs, stored_tokens
from needleprobe.analysis.monitor import monitor
from needleprobe.fit.probe import LinearProbe
from needleprobe.analysis.run import Run


def _tokens(cfg, split: str, layers=None, seeds=None):
    """The stored token logits of the run's probes on ``split`` (no model run)."""
    layout = Layout.from_config(cfg)
    refs = probe_refs(Run.of_layout(layout), layers or cfg.probe.layers_to_probe, seeds or cfg.probe.train_seeds)
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

    from needleprobe.model.hooks import model_location

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
        # calibrated on val's own clean documents: one, too few to measure 1% or 5% FPR, so no number, a note
        assert (r["calibration_split"], r["n_calibration_clean_docs"]) == ("val", str(int((~y).sum())))
        assert int((~y).sum()) < 20 and r["threshold_5pct_fpr"] == r["tpr_at_5pct_fpr"] == r["tp_at_5pct_fpr"] == ""
        assert "5% FPR needs at least 20 clean calibration documents" in r["note"]
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
    import needleprobe.model.hooks as hooks

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
    from needleprobe.data.documents import file_sha256

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
def test_killed_monitor_resumes(minilm_run, tmp_path, monkeypatch, capsys):
    from needleprobe import open_cache

    cfg_path, cfg = minilm_run
    env = {**os.environ, "NEEDLEPROBE_CHUNK_ROWS": "128", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "needleprobe", "monitor", "--config", str(cfg_path), "--split", "train", "--layer", "1",
            "--seed", "0", "--no-progress"]
    assert main([*argv[3:6], "--split", "val", *argv[8:]]) == 0  # the thresholds' val logits first: the kill is in train's
    killed = subprocess.run(argv, env={**env, "NEEDLEPROBE_FAULT": "chunk_committed:3"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    import zarr

    g = zarr.open_group(str(Layout.from_config(cfg).monitor_store), mode="r")["train"]
    (pg,) = [g[k] for k in g.group_keys() if k.startswith("pass-")]
    assert not pg.attrs["complete"] and pg.attrs["committed_rows"] == 3 * 128
    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", "128")  # the resume and the rerun run here
    capsys.readouterr()
    assert main(argv[3:]) == 0
    assert "on 'train' already stored (no model run)" not in capsys.readouterr().err
    assert main(argv[3:]) == 0
    assert "on 'train' already stored (no model run)" in capsys.readouterr().err
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


def _one_token_docs(scores: np.ndarray, needles: np.ndarray) -> MonitorTokens:
    """Documents of one token each (every aggregation is that token's logit), one probe."""
    n = len(scores)
    return MonitorTokens([f"d{i}" for i in range(n)], needles.astype(np.int32), [{"layer": 3, "seed": 0, "sha256": "x"}],
                         [np.array([[v]], np.float32) for v in scores], [np.array([k > 0], np.int8) for k in needles],
                         [np.zeros(1, np.int32)] * n, [np.ones(1, np.int32)] * n)


@pytest.mark.parametrize("n_clean_val", [150, 30])
def test_thresholds_from_val_clean_documents_applied_to_test_by_hand(n_clean_val):
    """TPR at 1% and 5% FPR on test, recomputed by hand: the threshold lets at most ⌊fpr·C⌋ of val's C clean document
    scores above it; test documents strictly above it are flagged. Fewer than 1/fpr clean val documents: empty, a note."""
    rng = np.random.default_rng(n_clean_val)
    val_y = np.r_[np.zeros(n_clean_val), np.ones(40)].astype(int)
    test_y = np.r_[np.zeros(60), np.ones(50)].astype(int)
    val_s = np.round(rng.normal(size=val_y.size) + 2.5 * val_y, 2).astype(np.float32)  # ties, as logits have
    test_s = np.round(rng.normal(size=test_y.size) + 2.0 * test_y, 2).astype(np.float32)
    val, test = _one_token_docs(val_s, val_y), _one_token_docs(test_s, test_y)
    rows, _ = document_metrics(test, MonitorConfig(), "test", n_boot=50, calibration=val, calibration_split="val")
    assert len(rows) == len(AGGREGATIONS)
    clean = np.sort(val_s[val_y == 0].astype(np.float64))[::-1]  # highest first
    for r in rows:
        assert (r["split"], r["calibration_split"], r["n_calibration_clean_docs"]) == ("test", "val", n_clean_val)
        for fpr, name in ((0.01, "1pct"), (0.05, "5pct")):
            if n_clean_val < round(1 / fpr):
                assert r[f"threshold_{name}_fpr"] is r[f"tpr_at_{name}_fpr"] is r[f"tp_at_{name}_fpr"] is None
                assert f"{fpr:.0%} FPR needs at least {round(1 / fpr)} clean calibration documents, there are 30" in r["note"]
                continue
            allowed = int(fpr * n_clean_val)  # documents allowed above the threshold
            t = clean[allowed]  # the (allowed+1)-th highest: any lower value has allowed+1 documents above it
            assert (clean > t).sum() <= allowed < (clean >= t).sum()
            assert r[f"threshold_{name}_fpr"] == t
            tp, fp = int((test_s[test_y == 1] > t).sum()), int((test_s[test_y == 0] > t).sum())
            assert (r[f"tp_at_{name}_fpr"], r[f"fp_at_{name}_fpr"]) == (tp, fp)
            assert r[f"tpr_at_{name}_fpr"] == tp / 50 and r[f"observed_fpr_at_{name}_fpr"] == fp / 60
    # the recommendation is chosen on val (one probe here, so the first aggregation of the tie) and reports test
    best = recommend(rows)
    assert best["aggregation"] == "mean" and best["split"] == "test"


def test_monitor_of_another_split_calibrates_on_val_and_stores_both(monitored, tmp_path, capsys):
    """`monitor --split train`: val's stored logits set the thresholds (the model runs for train only), the CSV says so,
    the unresolvable FPRs are a warning, and the recommendation is val's best AUROC reported on train."""
    import shutil

    from needleprobe.analysis.aggregation import document_scores

    cfg_path, cfg, _ = monitored
    raw = yaml.safe_load(cfg_path.read_text())
    raw["probe"].update(output_dir=str(tmp_path / "probes"), run_record_dir=str(tmp_path / "rr"))
    new_path = tmp_path / "c.yaml"
    new_path.write_text(yaml.safe_dump(raw))
    new = load_config(new_path)
    shutil.copytree(Layout.from_config(cfg).run_dir, Layout.from_config(new).run_dir)  # probes and val's logits
    capsys.readouterr()
    res = monitor(new, split="train", layers=[1], show_progress=False)  # layer 1: the forward stops early
    out, err = capsys.readouterr()  # the table and the recommendation on stdout, the rest on stderr
    assert "token logits of 2 probe(s) on 'val' already stored (no model run)" in err
    assert re.search(r"scoring \d+ train documents with [12] probe\(s\)", err)  # 1 when the resume test scored one
    val, train = _tokens(new, "val", [1]), _tokens(new, "train", [1])  # both stored in the run
    n_clean = int((val.doc_n_needles == 0).sum())
    rows = list(csv.DictReader(open(res["csv"])))
    assert rows and all((r["split"], r["calibration_split"], r["n_calibration_clean_docs"]) == ("train", "val", str(n_clean))
                        for r in rows)
    assert all(r["tpr_at_1pct_fpr"] == r["threshold_1pct_fpr"] == "" for r in rows)
    assert f"warning: no TPR at 1% FPR: 'val' has {n_clean} clean documents" in err
    y_val = (val.doc_n_needles > 0).astype(int)
    from sklearn.metrics import roc_auc_score

    want = max(((roc_auc_score(y_val, document_scores(val, j, m, new.monitor)), -AGGREGATIONS.index(m), -p["seed"], j, m)
                for j, p in enumerate(val.probes) for m in AGGREGATIONS))
    best = res["recommended"]
    assert best["calibration_auroc"] == pytest.approx(want[0], abs=1e-12)
    assert (best["seed"], best["aggregation"].split("(")[0]) == (val.probes[want[3]]["seed"], want[4])
    y_train = (train.doc_n_needles > 0).astype(int)
    s = document_scores(train, want[3], want[4], new.monitor)
    assert best["auroc"] == pytest.approx(roc_auc_score(y_train, s), abs=1e-12)
    assert f"recommended: layer 1 seeds 0, 1 (identical probes), {best['aggregation']}" in out and "recommended" not in err
    assert "document monitor on 'train'" in out and "warning" not in out
    record = json.loads(Layout.from_config(new).run_record.read_text())
    assert record["stages"]["monitor:train"]["calibration_split"] == "val"


def test_identical_seeds_share_a_row_of_the_table_and_the_recommendation(monitored, capsys):
    """Seeds that gave identical probes (weighted balance, exact solver) are shown once, as `fit` shows them."""
    cfg_path, cfg, _ = monitored
    capsys.readouterr()
    assert main(["monitor", "--config", str(cfg_path), "--split", "val", "--no-progress"]) == 0
    text = "".join(capsys.readouterr())
    rows = [line for line in text.splitlines() if re.match(r"^\W+[15] │ ", line)]
    assert len(rows) == 2 * len(AGGREGATIONS), text  # one row per layer and aggregation, not per seed
    assert all(re.match(r"^\W+[15] │ 0, 1 │", line) for line in rows)
    assert "seeds on one row gave identical probes" in text
    assert re.search(r"recommended: layer [15] seeds 0, 1 \(identical probes\)", text)
    # the CSV keeps a row per probe file
    assert len(list(csv.DictReader(open(Layout.from_config(cfg).monitor_csv("val"))))) == 4 * len(AGGREGATIONS)


def test_a_small_calibration_set_still_gives_an_operating_point_with_an_honest_fpr(capsys):
    """9 clean val documents cannot set a 1% or 5% threshold: the recommendation deploys the threshold just above the
    highest clean val score, with its exact binomial upper bound on the FPR and how many clean documents 5% needs."""
    from scipy.stats import binom

    from needleprobe.metrics import clean_docs_to_bound, fpr_upper_bound
    from needleprobe.analysis.calibration import operating_point
    from needleprobe.analysis.monitor import _print

    rng = np.random.default_rng(3)
    val_y, test_y = np.r_[np.zeros(9), np.ones(6)].astype(int), np.r_[np.zeros(12), np.ones(10)].astype(int)
    val_s = np.round(rng.normal(size=val_y.size) + 3.0 * val_y, 2).astype(np.float32)
    test_s = np.round(rng.normal(size=test_y.size) + 2.0 * test_y, 2).astype(np.float32)
    rows, _ = document_metrics(_one_token_docs(test_s, test_y), MonitorConfig(), "test", n_boot=50,
                               calibration=_one_token_docs(val_s, val_y), calibration_split="val")
    best = recommend(rows)
    assert best["threshold_1pct_fpr"] is best["threshold_5pct_fpr"] is None  # too few to set either
    op = operating_point(best)
    top = float(val_s[val_y == 0].max())
    assert op["target_fpr"] is None and op["threshold"] == top
    assert (op["tp"], op["fp"]) == (int((test_s[test_y == 1] > top).sum()), int((test_s[test_y == 0] > top).sum()))
    assert op["fpr_upper95"] == pytest.approx(1 - 0.05 ** (1 / 9), rel=1e-9)  # 0 of 9: the exact bound (≈ 3/9)
    capsys.readouterr()
    _print(rows, "test", best)
    text = "".join(capsys.readouterr())
    line = next(x for x in text.splitlines() if x.startswith("recommended:"))
    assert f"threshold {top:.3f}" in line and f"flags {op['tp']}/10 needle documents and {op['fp']}/12 clean" in line
    assert "at most 28% at 95% confidence" in line and "Clopper–Pearson" in line
    assert "needs at least 20 clean documents to set its threshold, and 59 with none above it" in line
    # the bound: the rate at which seeing k or fewer of n flagged has probability 5%
    for k, n in ((0, 9), (1, 150), (3, 40)):
        assert binom.cdf(k, n, fpr_upper_bound(k, n)) == pytest.approx(0.05, abs=1e-9)
    assert fpr_upper_bound(0, clean_docs_to_bound(0.05)) <= 0.05 < fpr_upper_bound(0, clean_docs_to_bound(0.05) - 1)
    # with enough clean documents, the 5% threshold, and its bound from the clean documents above it
    rows, _ = document_metrics(_one_token_docs(test_s, test_y), MonitorConfig(), "test", n_boot=50,
                               calibration=_one_token_docs(np.r_[val_s, rng.normal(size=40)], np.r_[val_y, np.zeros(40, int)]),
                               calibration_split="val")
    op = operating_point(recommend(rows))
    assert op["target_fpr"] == 0.05 and op["fpr_upper95"] == pytest.approx(fpr_upper_bound(2, 49))


def test_truncation_is_said_and_a_document_that_lost_every_needle_is_left_out(monitored, tmp_path, capsys):
    """With model.max_length 24 some needles fall beyond the cut: the monitor says how many documents and needles were
    truncated, and a needle document none of whose needle tokens the model saw is neither a needle nor a clean one."""
    import shutil

    from sklearn.metrics import roc_auc_score

    from needleprobe.data.documents import by_split, load_documents
    from needleprobe.model.hooks import load_tokenizer
    from needleprobe.data.tokens import tokenize_documents

    cfg_path, cfg, _ = monitored
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model"]["max_length"] = 24
    raw["probe"].update(output_dir=str(tmp_path / "probes"), run_record_dir=str(tmp_path / "rr"))
    new_path = tmp_path / "c.yaml"
    new_path.write_text(yaml.safe_dump(raw))
    new = load_config(new_path)
    shutil.copytree(Layout.from_config(cfg).run_dir, Layout.from_config(new).run_dir, ignore=shutil.ignore_patterns("monitor"))
    docs = by_split(load_documents(new.dataset.resolved_path()))["val"]
    tdocs = tokenize_documents(load_tokenizer(new.model), docs, 24, False)  # by hand: which needles the model sees
    cut = [td for td in tdocs if td.truncated]
    gone = {td.doc.doc_id for td in tdocs if td.doc.needle_spans and not td.positive.any()}
    kept_needle = {td.doc.doc_id for td in tdocs if td.positive.any()}
    assert gone and kept_needle, "the fixture should cut every needle of some documents and not of others"
    capsys.readouterr()
    res = monitor(new, split="val", layers=[1], seeds=[0], show_progress=False)
    err = "".join(capsys.readouterr())
    lost = sum(td.needles_lost for td in tdocs)
    assert f"monitor: 'val': {len(cut)} document(s) truncated to model.max_length (24 tokens), {lost} needle(s) cut off; " \
           f"{len(gone)} needle document(s) lost every needle and are left out of the document metrics" in err
    scores = [json.loads(line) for line in open(res["scores"])]
    assert {s["doc_id"] for s in scores} == {d.doc_id for d in docs} - gone
    assert {s["doc_id"] for s in scores if s["n_needles"] > 0} == kept_needle
    rows = list(csv.DictReader(open(res["csv"])))
    y = np.array([s["n_needles"] > 0 for s in scores])
    for r in rows:
        assert (int(r["n_docs"]), int(r["n_needle_docs"])) == (len(docs) - len(gone), len(kept_needle))
        s = np.array([d["scores"]["layer_1_seed_0"][r["aggregation"].split("(")[0]] for d in scores])
        assert float(r["auroc"]) == pytest.approx(roc_auc_score(y, s))
    record = json.loads(Layout.from_config(new).run_record.read_text())
    assert sorted(record["stages"]["monitor:val"]["truncation"]["val"]["left_out"]) == sorted(gone)


def test_an_empty_split_is_refused_before_any_model_runs(monitored, tmp_path, monkeypatch, capsys):
    """The small dataset has no test documents: `monitor --split test` is refused before the model or the tokenizer
    is loaded, even for the calibration split's logits (none stored in this copy)."""
    import shutil

    import needleprobe.model.hooks as hooks

    cfg_path, cfg, _ = monitored
    raw = yaml.safe_load(cfg_path.read_text())
    raw["probe"].update(output_dir=str(tmp_path / "probes"), run_record_dir=str(tmp_path / "rr"))
    new_path = tmp_path / "c.yaml"
    new_path.write_text(yaml.safe_dump(raw))
    shutil.copytree(Layout.from_config(cfg).run_dir, Layout.from_config(load_config(new_path)).run_dir,
                    ignore=shutil.ignore_patterns("monitor"))

    def boom(*a, **k):
        raise AssertionError("nothing may be loaded before the split is refused")

    monkeypatch.setattr(hooks, "load_model", boom)
    monkeypatch.setattr(hooks, "load_tokenizer", boom)
    capsys.readouterr()
    assert main(["monitor", "--config", str(new_path), "--split", "test", "--no-progress"]) == 2
    assert "split 'test' has no documents; the monitor's document AUROC needs" in capsys.readouterr().err


def test_monitor_table_fits_80_columns(monitored, monkeypatch, capsys):
    """At COLUMNS=80 nothing is cut: every aggregation name, AUROC with its CI and TPR with its counts is whole on
    stdout, four-digit counts included; the recommendation follows the table there."""
    from needleprobe.io import console as records
    from needleprobe.metrics import fpr_upper_bound
    from needleprobe.analysis.monitor import _print

    _, _, res = monitored
    rows = [dict(r) for r in res["metrics"]]
    for i, r in enumerate(rows):  # a large split's counts (this one has too few clean documents for any TPR)
        r.update(n_docs=3000, n_needle_docs=1500, n_calibration_clean_docs=2500)
        for name, tp, fp in (("1pct", 1000 + i, 15), ("5pct", 1400 + i, 75)):
            r.update({f"tpr_at_{name}_fpr": tp / 1500, f"tp_at_{name}_fpr": tp, f"fp_at_{name}_fpr": fp,
                      f"threshold_{name}_fpr": 1.5, f"observed_fpr_at_{name}_fpr": fp / 1500,
                      f"fpr_upper95_at_{name}_fpr": fpr_upper_bound(fp, 2500)})
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(records, "_RESULTS", None)  # made anew, as a process would at COLUMNS=80
    capsys.readouterr()
    _print(rows, "val", recommend(rows))
    out, err = capsys.readouterr()
    table = [x for x in out.splitlines() if x[:1] in "┏┃┡│└"]
    assert len(table) >= 2 * len(rows) and max(len(x) for x in table) <= 80 and "…" not in out
    cells = [[c.strip() for c in x.strip("│").split("│")] for x in table if x.startswith("│")]
    for r, (first, second) in zip(rows, zip(cells[::2], cells[1::2])):  # each row: two lines
        assert first == [str(r["layer"]), str(r["seed"]), r["aggregation"], f"{r['auroc']:.3f}",
                         f"{r['tpr_at_1pct_fpr']:.2f}", f"{r['tpr_at_5pct_fpr']:.2f}"]
        assert second == ["", "", "", f"{r['auroc_ci_low']:.3f}–{r['auroc_ci_high']:.3f}",
                          f"{r['tp_at_1pct_fpr']}, FP 15", f"{r['tp_at_5pct_fpr']}, FP 75"]
    assert "needle documents flagged of 1500" in " ".join(out.split()) and "of 1500)" in " ".join(out.split())
    assert out.splitlines()[-1].startswith("recommended: ") and err == ""
