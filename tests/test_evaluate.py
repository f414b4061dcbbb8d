"""Transfer evaluation: saved probes scored on another dataset, as one would compute it by hand."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import yaml
from conftest import probe_files, small_docs, write_config, write_jsonl
from sklearn.metrics import roc_auc_score

from needleprobe import LinearProbe, open_cache
from needleprobe.cli import main
from needleprobe.config import load_config
from needleprobe.data.demo import build_demo_documents
from needleprobe.run.layout import Layout


def _other_dataset() -> list[dict]:
    """The demo's test documents (a third wording of the needles), as another dataset's train, val and test."""
    docs = [d for d in build_demo_documents(0) if d["split"] == "test"][:40]
    for i, d in enumerate(docs):
        d["split"] = ("train", "val", "val", "test")[i % 4]
        d["doc_id"] = "other-" + d["doc_id"]
    return docs


def _config(tmp, name: str, data, **probe):
    raw = yaml.safe_load(write_config(tmp, data, **probe).read_text())
    raw["dataset"]["name"] = name
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """(source config with fitted probes on layers 1, 3; target config, not extracted yet)."""
    tmp = tmp_path_factory.mktemp("transfer")
    source = _config(tmp, "synthetic", write_jsonl(tmp / "a.jsonl", small_docs(12, 8)), layers_to_probe=[1, 3])
    assert main(["train", "--config", str(source), "--no-progress"]) == 0
    target = _config(tmp, "other", write_jsonl(tmp / "b.jsonl", _other_dataset()), layers_to_probe=[1, 3])
    return tmp, source, target


def test_evaluate_equals_the_auroc_computed_by_hand(two, capsys):
    tmp, source, target = two
    assert not Layout.from_config(load_config(target)).cache.exists()
    assert main(["evaluate", "--config", str(target), "--probes", str(source), "--no-progress"]) == 0
    text, err = capsys.readouterr()
    assert "no activation cache for other_v1 yet: extracting it (the val split only" in err
    assert "probes of synthetic_v1 on other_v1" in text
    assert "probes of" not in err and "extracting" not in text  # the table on stdout, messages on stderr
    assert re.search(r"^extract: [\d,]+ tokens in [\d.]+ s → ", err, re.M)  # said under --no-progress too
    partial = open_cache(load_config(target), allow_incomplete=True)
    assert partial.splits == ["val"] and not partial.complete  # the split it scores, no more
    # seeds 0 and 1 gave identical probes (weighted balance): one row per layer, as fit shows them
    assert len(re.findall(r"^\W+[13] │ 0, 1 │", text, re.M)) == 2 and "seeds on one row gave identical probes" in text
    src, tgt = load_config(source), load_config(target)
    out = Layout.from_config(src).run_dir / "transfer" / "other_v1-val"
    rows = list(csv.DictReader(open(out / "eval_metrics.csv")))
    assert {(int(r["layer"]), int(r["seed"])) for r in rows} == {(L, s) for L in (1, 3) for s in src.probe.train_seeds}
    val = open_cache(tgt, allow_incomplete=True).split("val")
    for r in rows:
        d = __import__("torch").load(probe_files(src, int(r["layer"]), int(r["seed"]))[0], weights_only=True)
        logits = val.to_numpy(int(r["layer"])) @ d["weight"].numpy() + d["bias"].item()
        assert float(r["token_auroc"]) == pytest.approx(roc_auc_score(val.labels, logits), abs=1e-6)
        assert float(r["auroc_ci_low"]) <= float(r["token_auroc"]) <= float(r["auroc_ci_high"])
        assert int(r["rows"]) == val.n_rows and int(r["positives"]) == int(val.labels.sum())
    summary = json.loads((out / "eval_metrics.json").read_text())
    assert summary["source"]["dataset"] == "synthetic_v1" and summary["target"]["dataset"] == "other_v1"
    docs = list(csv.DictReader(open(out / "doc_metrics.csv")))
    assert len(docs) == len(rows) * 5 and {d["split"] for d in docs} == {"val"}
    assert summary["document_metrics"][0]["auroc"] == pytest.approx(float(docs[0]["auroc"]))

    # --json: the same numbers as one document on stdout (the token logits are stored: no model run)
    assert main(["evaluate", "--config", str(target), "--probes", str(source), "--no-progress", "--json"]) == 0
    text, err = capsys.readouterr()
    answer = json.loads(text)
    assert answer == {**summary, "output_dir": str(out)}
    assert "already stored (no model run)" in err and f"transfer results in {out}" in err


def test_evaluate_on_the_test_split_scores_every_text_token(two, capsys):
    tmp, source, target = two
    capsys.readouterr()
    assert main(["evaluate", "--config", str(target), "--probes", str(source), "--split", "test", "--layers", "3",
                 "--no-progress"]) == 0
    assert "extracting" not in capsys.readouterr().err  # no cache holds test: nothing is extracted for it
    out = Layout.from_config(load_config(source)).run_dir / "transfer" / "other_v1-test"
    rows = list(csv.DictReader(open(out / "eval_metrics.csv")))
    assert {r["layer"] for r in rows} == {"3"} and all(int(r["rows"]) > 1000 for r in rows)  # every token, not samples
    summary = json.loads((out / "eval_metrics.json").read_text())
    assert summary["token_rows"] == "every text token"


def test_transfer_matrix(two, capsys):
    tmp, source, target = two
    assert main(["fit", "--config", str(target)]) == 2  # evaluate extracted val only
    assert "holds the val split only (extracted for `evaluate`" in capsys.readouterr().err
    assert main(["train", "--config", str(target), "--no-progress"]) == 0  # the extract adds train to it
    assert open_cache(load_config(target)).splits == ["train", "val"]
    assert main(["evaluate", "--matrix", str(source), str(target), "--no-progress"]) == 0
    src, tgt = load_config(source), load_config(target)
    common = Layout.from_config(src).run_dir.parent
    lines = list(csv.reader(open(common / "transfer_matrix_synthetic_v1+other_v1.csv")))
    assert lines[0] == ["layer", "trained_on", "synthetic_v1", "other_v1"]
    table = {(int(r[0]), r[1]): [float(x) for x in r[2:]] for r in lines[1:]}
    assert sorted(table) == [(1, "other_v1"), (1, "synthetic_v1"), (3, "other_v1"), (3, "synthetic_v1")]
    for (layer, trained), aurocs in table.items():
        probes = {s: LinearProbe.load(probe_files(src if trained == "synthetic_v1" else tgt, layer, s)[0])
                  for s in (src if trained == "synthetic_v1" else tgt).probe.train_seeds}
        best = max(probes, key=lambda s: (probes[s].val_auroc_, -s))
        for cfg, got in zip((src, tgt), aurocs):
            val = open_cache(cfg).split("val")
            assert got == pytest.approx(roc_auc_score(val.labels, probes[best].decision_function(val.to_numpy(layer))), abs=1e-12)
    # a dataset's own val is its probe's own val AUROC
    own = LinearProbe.load(probe_files(src, 3, 0)[0]).val_auroc_
    assert table[(3, "synthetic_v1")][0] == pytest.approx(own, abs=1e-6)


def test_evaluate_says_what_truncation_cut_off(two, tmp_path, capsys):
    """The target's documents cut at 64 tokens: evaluate says per split how many documents and needles were truncated,
    and leaves out of the document metrics the needle documents that lost every needle."""
    tmp, source, target = two
    raw = yaml.safe_load(target.read_text())
    raw["dataset"]["name"], raw["model"]["max_length"] = "short", 64
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["evaluate", "--config", str(short), "--probes", str(source), "--split", "test", "--layers", "3",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    summary = json.loads((Layout.from_config(load_config(source)).run_dir / "transfer" / "short_v1-test"
                          / "eval_metrics.json").read_text())
    t = summary["truncation"]
    assert t["truncated_docs"] > 0 and t["needles_lost"] > 0
    assert f"evaluate: 'test': {t['truncated_docs']} document(s) truncated to model.max_length (64 tokens), " \
           f"{t['needles_lost']} needle(s) cut off" in err
    n_docs = {int(r["n_docs"]) for r in summary["document_metrics"]}
    test_docs = [d for d in _other_dataset() if d["split"] == "test"]
    assert len(t["left_out"]) == 3 and n_docs == {len(test_docs) - 3}  # 3 of 5 needle documents lost every needle


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("needleprobe: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_bad_inputs_are_one_line_and_write_nothing(two, tmp_path, capsys):
    tmp, source, target = two
    src = load_config(source)
    transfer = Layout.from_config(src).run_dir / "transfer"
    before = sorted(p.name for p in transfer.iterdir()) if transfer.exists() else []

    # probes of another model
    other_model = tmp_path / "gpt2probes"
    other_model.mkdir()
    for suffix in ("pt", "json"):
        data = probe_files(src, 1, 0)[1 if suffix == "json" else 0].read_bytes()
        if suffix == "json":
            meta = json.loads(data)
            meta["config"]["model"]["name"] = "gpt2"
            data = json.dumps(meta).encode()
        (other_model / f"probe_layer_1_seed_0.{suffix}").write_bytes(data)
    assert main(["evaluate", "--config", str(target), "--probes", str(other_model)]) == 2
    assert "probes of gpt2 · resid_post, the target is embedded:all-MiniLM-L6-v2 · resid_post" in _one_line(capsys)

    # another d_model
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    LinearProbe.from_weights(np.ones(64, np.float32), 0.0, json.loads(probe_files(src, 1, 0)[1].read_text())).save(
        narrow / "probe_layer_1_seed_0")
    assert main(["evaluate", "--config", str(target), "--probes", str(narrow)]) == 2
    assert "reads d_model 64, the target cache has 384" in _one_line(capsys)

    # a layer the target cache does not hold
    raw = yaml.safe_load(target.read_text())
    raw["probe"]["layers_to_probe"] = [1]
    raw["probe"]["cache_dir"] = str(tmp_path / "cache1")
    one_layer = tmp_path / "one_layer.yaml"
    one_layer.write_text(yaml.safe_dump(raw))
    assert main(["evaluate", "--config", str(one_layer), "--probes", str(source), "--no-progress"]) == 2
    assert "probe layer 3 is not in the target cache" in _one_line(capsys)

    # an empty probe directory
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--config", str(target), "--probes", str(tmp_path / "empty")]) == 2
    assert "no probe files" in _one_line(capsys)

    # a target split with one class: only clean documents in test
    docs = _other_dataset()
    for d in docs:
        if d["split"] == "test":
            d["needle_spans"] = []
    clean = write_jsonl(tmp_path / "clean.jsonl", docs)
    raw = yaml.safe_load(target.read_text())
    raw["dataset"]["path"] = str(clean)
    clean_cfg = tmp_path / "clean.yaml"
    clean_cfg.write_text(yaml.safe_dump(raw))
    assert main(["evaluate", "--config", str(clean_cfg), "--probes", str(source), "--split", "test", "--no-progress"]) == 2
    assert "split 'test' has only clean documents; evaluating needs documents with and without needles" in _one_line(capsys)

    # an unknown placeholder
    raw = yaml.safe_load(target.read_text())
    raw["probe"]["output_dir"] = "results/{modle}"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["evaluate", "--config", str(bad), "--probes", str(source)]) == 2
    assert "unknown placeholder {modle}" in _one_line(capsys)

    after = sorted(p.name for p in transfer.iterdir()) if transfer.exists() else []
    assert after == before
