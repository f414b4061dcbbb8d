"""Several activation sites from one forward pass: one cache per site, each what a single-site extract writes,
and the residual-stream identities hold on the cached rows of every family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import small_docs, threads, write_config, write_jsonl
from tiny_models import FAMILIES, make_tiny_model
from transformers import AutoModel

from needleprobe import open_cache
from needleprobe.cli import main
from needleprobe.config import load_config
from needleprobe.extract.extract import extract
from needleprobe.run.layout import Layout
from needleprobe.extract.sites import SITES, site_support

LAYERS = [0, 2]


def _supported(model_dir) -> list[str]:
    support = site_support(AutoModel.from_pretrained(model_dir))
    return [s for s in SITES if support[s] is None]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sites") / "d.jsonl", small_docs(5, 3))


def _rows(cfg, site: str, layer: int, split: str = "train") -> np.ndarray:
    return open_cache(cfg.for_site(site)).split(split).to_numpy(layer).astype(np.float64)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    scale = np.sqrt((b**2).mean(axis=1, keepdims=True)) + 1e-12
    assert (np.abs(a - b) <= 1e-5 * scale).all(), float((np.abs(a - b) / scale).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_identities_hold_on_the_cached_rows(family, data, tmp_path, one_thread):
    model_dir = make_tiny_model(family, tmp_path / "model", n_layers=3)
    sites = _supported(model_dir)
    cfg = load_config(write_config(tmp_path, data, model=str(model_dir), layers_to_probe=LAYERS, max_length=256,
                                   negatives_per_doc=8, activation_site=sites))
    res = extract(cfg, show_progress=False)
    assert sorted(res.sites) == sorted(sites)
    for site in sites:  # one cache per site, each the same rows
        c = open_cache(cfg.for_site(site))
        assert c.fields["activation_site"] == site and c.metadata["activation_site"] == site
        np.testing.assert_array_equal(c.split("train").token_index, open_cache(cfg.for_site(sites[0])).split("train").token_index)
    parallel = "resid_mid" not in sites and "attn_out" in sites  # GPT-NeoX with a parallel residual
    for layer in LAYERS:
        pre, post = _rows(cfg, "resid_pre", layer), _rows(cfg, "resid_post", layer)
        if "attn_out" in sites:
            attn, mlp = _rows(cfg, "attn_out", layer), _rows(cfg, "mlp_out", layer)
            if parallel:
                _close(pre + attn + mlp, post)
            else:
                mid = _rows(cfg, "resid_mid", layer)
                _close(pre + attn, mid)
                _close(mid + mlp, post)
    # resid_pre of block 2 is resid_post of block 1 (output_hidden_states[2], tested in test_extract)
    (tmp_path / "one").mkdir()
    cfg1 = load_config(write_config(tmp_path / "one", data, model=str(model_dir), layers_to_probe=[1], max_length=256,
                                    negatives_per_doc=8))
    extract(cfg1, show_progress=False)
    np.testing.assert_array_equal(_rows(cfg, "resid_pre", 2), open_cache(cfg1).split("train").to_numpy(1).astype(np.float64))


def test_a_multi_site_cache_is_the_single_site_cache_byte_for_byte(data, tmp_path, one_thread):
    model_dir = make_tiny_model("llama", tmp_path / "model", n_layers=3)
    (tmp_path / "multi").mkdir()
    multi = load_config(write_config(tmp_path / "multi", data, model=str(model_dir), layers_to_probe=LAYERS,
                                     activation_site=["resid_post", "resid_mid", "mlp_out"], max_length=256))
    extract(multi, show_progress=False)
    for site in ("resid_post", "resid_mid"):
        (tmp_path / site).mkdir()
        single = load_config(write_config(tmp_path / site, data, model=str(model_dir), layers_to_probe=LAYERS,
                                          activation_site=site, max_length=256))
        extract(single, show_progress=False)
        a, b = Layout.from_config(multi.for_site(site)).cache, Layout.from_config(single).cache
        files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))  # noqa: E731
                              if p.is_file() and p.name != "zarr.json"}
        assert files(a) == files(b) and len(files(a)) > 10, site
        ra, rb = json.loads((a / "zarr.json").read_text()), json.loads((b / "zarr.json").read_text())
        assert ra["attributes"]["fingerprint"] == rb["attributes"]["fingerprint"]


def test_every_stage_works_per_site(tmp_path, capsys):
    """train, check, monitor, report and inspect on a config with two sites of MiniLM: one run per site."""
    data = write_jsonl(tmp_path / "d.jsonl", small_docs(6, 10))  # val with needle and clean documents
    cfg_path = write_config(tmp_path, data, layers_to_probe=[1, 3], activation_site=["resid_post", "resid_mid"])
    with threads(1):
        assert main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "2 sites × 2 layers" in err
    cfg = load_config(cfg_path)
    post, mid = Layout.from_config(cfg.for_site("resid_post")), Layout.from_config(cfg.for_site("resid_mid"))
    assert post.run_dir.name == "t_v1" and mid.run_dir.name == "t_v1-resid_mid"  # resid_post keeps the seed's paths
    assert mid.run_record.name == "t_v1-resid_mid_probe_run_record.json"
    for lay in (post, mid):
        meta = json.loads(lay.probe_files(3, 0)[1].read_text())
        assert meta["activation_site"] == lay.identity.site and meta["config"]["probe"]["activation_site"] == lay.identity.site
    assert main(["check", "--config", str(cfg_path)]) == 0
    assert main(["monitor", "--config", str(cfg_path), "--split", "val", "--layer", "3", "--seed", "0", "--no-progress"]) == 0
    assert mid.monitor_csv("val").is_file() and post.monitor_csv("val").is_file()
    assert main(["report", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().err
    assert post.report.is_file() and mid.report.is_file() and "comparison_" in out  # both sites on one chart
    assert main(["inspect", "--config", str(cfg_path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["sites"]  # several sites: one document, keyed by site
    assert {s: (f["activation_site"], f["path"]) for s, f in facts.items()} == {
        s: (s, str(lay.cache)) for s, lay in (("resid_post", post), ("resid_mid", mid))}
    # evaluate picks the target's site from the probes': resid_mid probes on the resid_mid cache
    assert main(["evaluate", "--config", str(cfg_path), "--probes", str(mid.run_dir), "--layers", "3", "--no-progress"]) == 0
    assert (mid.run_dir / "transfer" / "t_v1-val" / "eval_metrics.csv").is_file()
    # probes of a site read that site: the monitor's logits are resid_mid's, not resid_post's
    from needleprobe import LinearProbe

    probe = LinearProbe.load(mid.probe_files(3, 0)[0])
    x = open_cache(cfg.for_site("resid_mid")).split("val")
    assert probe.decision_function(x.to_numpy(3)).shape == (x.n_rows,)


@pytest.mark.parametrize("family, site, why", [("gpt_neox", "resid_mid", "attention and MLP both read resid_pre"),
                                               ("bert", "attn_out", "post-LN")])
def test_an_unsupported_site_is_one_line_and_writes_nothing(family, site, why, data, tmp_path, capsys):
    model_dir = make_tiny_model(family, tmp_path / "model", n_layers=2)
    if family == "gpt_neox":  # the tiny NeoX is sequential; make it parallel, as the real ones are
        conf = json.loads((model_dir / "config.json").read_text())
        conf["use_parallel_residual"] = True
        (model_dir / "config.json").write_text(json.dumps(conf))
    cfg_path = write_config(tmp_path, data, model=str(model_dir), layers_to_probe=[1], activation_site=["resid_post", site],
                            max_length=256)
    assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("needleprobe: error: ") and f"hook_{site}" in err and why in err, err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("zarr.json"))


@pytest.mark.parametrize("value, message", [("resid_middle", "unknown site 'resid_middle'"),
                                            (["resid_post", "resid_post"], "duplicate sites")])
def test_bad_site_lists_are_config_errors(value, message, data, tmp_path, capsys):
    cfg_path = write_config(tmp_path, data, activation_site=value)
    assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    raw = yaml.safe_load(cfg_path.read_text())
    assert raw["probe"]["activation_site"] == value
    assert not (tmp_path / "cache").exists()


def test_resid_post_through_the_site_hooks_is_todays_cache(data, tmp_path, one_thread):
    """With another site beside it, resid_post rows still equal output_hidden_states[L+1] (what every cache held)."""
    from test_extract import assert_rows_match_model

    cfg_path = write_config(tmp_path, data, layers_to_probe=[1, 5], activation_site=["resid_pre", "resid_post"])
    extract(load_config(cfg_path), show_progress=False)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["probe"]["activation_site"] = "resid_post"  # the same cache, as a single-site config names it
    (tmp_path / "post").mkdir()
    post = tmp_path / "post" / "config.yaml"
    post.write_text(yaml.safe_dump(raw))
    assert assert_rows_match_model(post) > 100


def test_resid_pre_is_the_blocks_input(data, tmp_path, one_thread):
    """resid_pre of block L equals output_hidden_states[L] on the real MiniLM."""
    from needleprobe.model.hooks import model_location

    cfg = load_config(write_config(tmp_path, data, layers_to_probe=[2], activation_site=["resid_pre"]))
    extract(cfg, show_progress=False)
    cache = open_cache(cfg)
    where = model_location(cfg.model)
    from transformers import AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(where), AutoModel.from_pretrained(where).eval()
    texts = {json.loads(line)["doc_id"]: json.loads(line)["text"] for line in open(data)}
    view = cache.split("val")
    x = view.to_numpy(2)
    for di, doc_id in enumerate(view.doc_ids):
        enc = tok(texts[doc_id], return_tensors="pt", truncation=True, max_length=512)
        with torch.inference_mode():
            hs = model(**enc, output_hidden_states=True).hidden_states[2][0]
        rows = np.flatnonzero(view.doc_index == di)
        torch.testing.assert_close(torch.from_numpy(x[rows]), hs[view.token_index[rows]], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_killed_multi_site_extract_resumes_every_cache(data, tmp_path, monkeypatch, capsys):
    """SIGKILL after the third chunk commit (the sites' writers interleave): the rerun resumes both caches to the bytes
    of an uninterrupted two-site extract."""
    import os
    import subprocess
    import sys

    from conftest import ONE_THREAD_ENV

    monkeypatch.setenv("NEEDLEPROBE_CHUNK_ROWS", "64")
    sites = ["resid_mid", "resid_post"]
    cfg_path = write_config(tmp_path, data, layers_to_probe=[1, 4], activation_site=sites)
    env = {**os.environ, "NEEDLEPROBE_CHUNK_ROWS": "64", "HF_HUB_OFFLINE": "1", **ONE_THREAD_ENV,
           "NEEDLEPROBE_FAULT": "chunk_committed:3"}
    killed = subprocess.Popen([sys.executable, "-m", "needleprobe", "extract", "--config", str(cfg_path), "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (tmp_path / "ref").mkdir()  # the reference, while the killed run goes
    ref = load_config(write_config(tmp_path / "ref", data, layers_to_probe=[1, 4], activation_site=sites))
    try:
        with threads(1):
            extract(ref, show_progress=False)
        _, err = killed.communicate(timeout=300)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -9, err
    with threads(1):
        assert main(["extract", "--config", str(cfg_path), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().err
    cfg = load_config(cfg_path)
    for site in sites:
        a, b = Layout.from_config(cfg.for_site(site)).cache, Layout.from_config(ref.for_site(site)).cache
        files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))  # noqa: E731
                              if p.is_file() and p.name != "zarr.json"}
        assert files(a) == files(b), site
