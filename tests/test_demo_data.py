"""Tests for the offline demo dataset (needleprobe.data.demo).

The properties checked here are the ones the probe experiments rely on:
reproducibility, exact needle spans, sensible split sizes, and val/test needles
that share no content words with train needles (so val AUROC measures
generalisation rather than word matching).
"""

from __future__ import annotations

import json
import re

import pytest

from needleprobe.data.demo import build_demo_documents, needle_pool, write_demo_dataset

SPLITS = ("train", "val", "test")
# Function words the test tolerates in several families; defined here on purpose,
# independent of the module, so a widened module stop-list cannot hide overlap.
TEST_STOPWORDS = {
    "your", "that", "this", "with", "from", "into", "then", "them", "they", "what",
    "have", "will", "were", "been", "every", "their", "there", "here", "these",
    "those", "only", "just", "must", "about", "over", "also", "when",
}


@pytest.fixture(scope="module")
def docs():
    return build_demo_documents(seed=0)


def _needles(doc):
    return [doc["text"][s:e] for s, e in doc["needle_spans"]]


def _content_words(text):
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4} - TEST_STOPWORDS


def test_write_is_deterministic_and_seed_sensitive(tmp_path):
    a = write_demo_dataset(tmp_path / "a" / "demo.jsonl", seed=0)
    b = write_demo_dataset(tmp_path / "b" / "nested" / "demo.jsonl", seed=0)
    c = write_demo_dataset(tmp_path / "c.jsonl", seed=1)
    assert a == tmp_path / "a" / "demo.jsonl"
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # Atomic write leaves no temp files behind.
    assert sorted(p.name for p in a.parent.iterdir()) == ["demo.jsonl"]


def test_overwrite_existing_file(tmp_path):
    p = tmp_path / "demo.jsonl"
    p.write_text("stale\n")
    write_demo_dataset(p, seed=0)
    assert not p.read_text(encoding="utf-8").startswith("stale")


def test_jsonl_parses_and_matches_builder(tmp_path, docs):
    p = write_demo_dataset(tmp_path / "demo.jsonl", seed=0)
    lines = p.read_text(encoding="utf-8").splitlines()
    parsed = [json.loads(line) for line in lines]
    assert parsed == docs
    for d in parsed:
        assert set(d) == {"doc_id", "text", "needle_spans", "split"}


def test_split_order_counts_and_ids(docs):
    splits = [d["split"] for d in docs]
    # Train, then val, then test: the sequence only ever moves forward.
    order = [SPLITS.index(s) for s in splits]
    assert order == sorted(order)
    counts = {s: splits.count(s) for s in SPLITS}
    assert 250 <= counts["train"] <= 350
    assert 40 <= counts["val"] <= 80 and 40 <= counts["test"] <= 80
    ids = [d["doc_id"] for d in docs]
    assert len(set(ids)) == len(ids)
    for d in docs:
        assert re.fullmatch(rf"demo-{d['split']}-\d{{4}}", d["doc_id"])


@pytest.mark.parametrize("split", SPLITS)
def test_clean_fraction_and_needle_counts(docs, split):
    sub = [d for d in docs if d["split"] == split]
    clean = sum(not d["needle_spans"] for d in sub) / len(sub)
    assert 0.25 <= clean <= 0.45
    n = [len(d["needle_spans"]) for d in sub]
    assert set(n) <= {0, 1, 2}
    assert n.count(1) > n.count(2) > 0


def test_spans_are_exact_needle_sentences(docs):
    pools = {s: set(needle_pool(s)) for s in SPLITS}
    every_needle = set().union(*pools.values())
    for d in docs:
        text, spans = d["text"], d["needle_spans"]
        prev_end = 0
        for s, e in spans:
            assert isinstance(s, int) and isinstance(e, int)
            assert prev_end <= s < e <= len(text), "spans in range, ordered, disjoint"
            prev_end = e
            needle = text[s:e]
            assert needle == needle.strip()
            assert needle in pools[d["split"]], "needle comes from its own split's family"
            # Own sentence: starts a sentence and is followed by a boundary.
            assert s == 0 or (text[s - 1].isspace() and text[:s].rstrip()[-1] in ".!?")
            assert e == len(text) or text[e].isspace()
            assert needle[-1] in ".!?" and needle[0].isupper()
            assert text.count(needle) == 1
        # No needle text anywhere outside the recorded spans.
        masked = text
        for s, e in sorted(spans, reverse=True):
            masked = masked[:s] + masked[e:]
        assert not any(n in masked for n in every_needle)


def test_train_needle_words_disjoint_from_val_test(docs):
    """Computed from the generated docs, not the module's template lists."""
    words = {s: set() for s in SPLITS}
    distinct = {s: set() for s in SPLITS}
    for d in docs:
        for n in _needles(d):
            words[d["split"]] |= _content_words(n)
            distinct[d["split"]].add(n)
    assert words["train"] & words["val"] == set()
    assert words["train"] & words["test"] == set()
    assert words["val"] & words["test"] == set()
    # Enough variety that a probe cannot memorise a handful of strings.
    assert len(distinct["train"]) >= 40
    assert len(distinct["val"]) >= 20 and len(distinct["test"]) >= 20


def test_lengths_and_prose(docs):
    for d in docs:
        text = d["text"]
        assert 400 <= len(text) <= 1800
        assert text == text.strip()
        assert "  " not in text and "\t" not in text and "\n\n\n" not in text
        for bad in (">>>", "::="):
            assert bad not in text
    mean = sum(len(d["text"]) for d in docs) / len(docs)
    assert 600 <= mean <= 1300
