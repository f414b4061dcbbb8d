"""``cache_facts``/``cache_summary`` (``needleprobe inspect``): the counts must be the cache's, and "matches the config" must be right.

A summary that calls a stale cache current (or the other way round) sends
someone to fit on the wrong rows or to rerun a GPU extract for nothing, so
each staleness cause is checked, and so is what must *not* count as one.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest

from conftest import write_jsonl
from pipeline_fixture import build_pipeline, pipeline_docs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One train + monitor(val) in a tmp dir; tests derive altered configs from it and never write into it."""
    tmp = tmp_path_factory.mktemp("summary")
    cfg_path, cfg = build_pipeline(tmp, monitor_split="val")
    return cfg


def _with(cfg, **probe):
    return dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, **probe))


def _with_dataset(cfg, path):
    return dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, path=str(path)))


def test_facts_are_the_cache_contents(run):
    from needleprobe.cache.reader import open_cache
    from needleprobe.cache.inspect import cache_facts

    cfg = run
    f = cache_facts(cfg)
    cache = open_cache(cfg)
    assert f["matches_config"] is True and f["differences"] == []
    assert f["fingerprint"] == cache.fingerprint == f["config_fingerprint"]
    assert f["complete"] and f["layers"] == [1, 3] and f["feature_dtype"] == "float32" and f["d_model"] == 384
    assert f["size_bytes"] == sum(p.stat().st_size for p in Path(f["path"]).rglob("*") if p.is_file()) > 0
    docs = pipeline_docs()
    for split in ("train", "val"):
        s, view = f["splits"][split], cache.split(split)
        labels = view.labels
        assert (s["rows"], s["positives"], s["negatives"]) == (labels.size, int(labels.sum()), int((labels == 0).sum()))
        mine = [d for d in docs if d["split"] == split]
        assert s["docs"] == len(mine) and s["docs_with_needles"] == sum(1 for d in mine if d["needle_spans"])
        assert s["complete"] and s["committed_rows"] == s["rows"]
    assert "monitor" not in f  # the monitor's results belong to a run, not to the cache


def test_training_settings_and_layer_subsets_do_not_make_it_stale(run):
    """L2 grid, seeds, balance and probing fewer cached layers never change the rows: still a match."""
    from needleprobe.cache.inspect import cache_facts

    cfg = _with(run, l2_grid=[1.0], train_seeds=[7], class_balance="downsample", layers_to_probe=[3], doc_batch_size=1)
    f = cache_facts(cfg)
    assert f["matches_config"] is True, f["differences"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"negatives_per_doc": 3}, "negatives_per_doc"),
        ({"sampling_seed": 5}, "sampling_seed"),
        ({"layers_to_probe": [1, 2]}, "layers"),
        ({"feature_dtype": "bfloat16"}, "feature_dtype"),
        ({"max_val_docs": 2}, "max_val_docs"),
    ],
)
def test_row_changing_settings_are_stale_and_named(run, change, field):
    from needleprobe.cache.inspect import cache_facts

    f = cache_facts(_with(run, **change))
    assert f["matches_config"] is False
    assert [d for d in f["differences"] if d.startswith(f"{field}:")], f["differences"]


def test_edited_dataset_is_stale_and_missing_dataset_is_unknown(run, tmp_path):
    from needleprobe.cache.inspect import cache_facts

    docs = pipeline_docs()
    docs[0] = {**docs[0], "text": docs[0]["text"] + " (edited)"}
    f = cache_facts(_with_dataset(run, write_jsonl(tmp_path / "edited.jsonl", docs)))
    assert f["matches_config"] is False and any(d.startswith("train documents changed: 1 edited:") for d in f["differences"])

    f = cache_facts(_with_dataset(run, tmp_path / "gone.jsonl"))
    assert f["matches_config"] is None and f["config_fingerprint"] is None
    assert "not found" in f["differences"][0]


def test_summary_table_renders_the_verdict(run):
    from rich.console import Console

    from needleprobe.cache.inspect import cache_summary

    def render(cfg) -> str:
        con = Console(file=io.StringIO(), width=200, color_system=None)
        con.print(cache_summary(cfg))
        return con.file.getvalue()

    ok = render(run)
    assert "matches config" in ok and "yes" in ok
    assert "d_model 384" in ok and "train" in ok and "val" in ok
    stale = render(_with(run, negatives_per_doc=3))
    assert "no, stale" in stale and "negatives_per_doc: 16 -> 3" in stale


def test_no_cache_is_a_one_line_error(run, tmp_path):
    from needleprobe.errors import NeedleprobeError
    from needleprobe.cache.inspect import cache_facts

    with pytest.raises(NeedleprobeError, match="needleprobe extract"):
        cache_facts(_with(run, cache_dir=str(tmp_path / "nothing")))
