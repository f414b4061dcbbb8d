"""Dataset loading: every bad line is an error naming file, line and field."""

from __future__ import annotations

import json

import pytest

from needleprobe.data.documents import hash_split, load_documents
from needleprobe.errors import NeedleprobeError

GOOD = {"doc_id": "a", "text": "hello needle world", "needle_spans": [[6, 12]], "split": "train"}


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return p


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r"d.jsonl:2: invalid JSON"),
        ({"doc_id": "b", "needle_spans": []}, r"d.jsonl:2: missing field 'text'"),
        ({"doc_id": "b", "text": "abc", "needle_spans": [[2, 1]]}, r"d.jsonl:2: field 'needle_spans\[0\]' is reversed"),
        ({"doc_id": "b", "text": "abc", "needle_spans": [[1, 1]]}, r"d.jsonl:2: field 'needle_spans\[0\]' is empty"),
        ({"doc_id": "b", "text": "abc", "needle_spans": [[1, 9]]}, r"d.jsonl:2: field 'needle_spans\[0\]' = \[1, 9\] is out of range"),
        ({"doc_id": "b", "text": "abc", "needle_spans": [[0, "2"]]}, r"needle_spans\[0\]' must be \[start, end\] integers"),
        ({"doc_id": "a", "text": "abc"}, r"d.jsonl:2: field 'doc_id' 'a' duplicates line 1"),
        ({"doc_id": 7, "text": "abc"}, r"d.jsonl:2: field 'doc_id' must be a non-empty string"),
        ({"doc_id": "b", "text": "abc", "split": "dev"}, r"d.jsonl:2: field 'split' must be one of"),
        ("[1, 2]", r"d.jsonl:2: expected a JSON object"),
        ({"doc_id": "b", "text": "abc", "spans": [[0, 1]]}, r"d.jsonl:2: unknown field 'spans' \(did you mean 'needle_spans'\?"),
        ({"doc_id": "b", "text": "abc", "source": "web"}, r"d.jsonl:2: unknown field 'source' .*under 'metadata'"),
    ],
)
def test_bad_lines(tmp_path, bad, message):
    with pytest.raises(NeedleprobeError, match=message):
        load_documents(_write(tmp_path, [GOOD, bad]))


def test_empty_and_missing(tmp_path):
    with pytest.raises(NeedleprobeError, match="dataset is empty"):
        load_documents(_write(tmp_path, ["", "  "]))
    with pytest.raises(NeedleprobeError, match="dataset not found"):
        load_documents(tmp_path / "missing.jsonl")


def test_split_from_hash_is_deterministic_and_near_fraction(tmp_path):
    docs = [{"doc_id": f"d{i}", "text": "x"} for i in range(4000)]
    loaded = load_documents(_write(tmp_path, docs), val_fraction=0.25)
    share = sum(d.split == "val" for d in loaded) / len(loaded)
    assert 0.22 < share < 0.28
    assert all(d.split == hash_split(d.doc_id, 0.25) for d in loaded)
    assert load_documents(_write(tmp_path, docs), val_fraction=0.25) == loaded


def test_metadata_field_is_kept_out_of_the_way(tmp_path):
    docs = load_documents(_write(tmp_path, [dict(GOOD, metadata={"source": "web", "score": 3})]))
    assert docs[0].needle_spans == ((6, 12),)


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"doc_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(NeedleprobeError, match=r"d.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte 29 of the line\)"):
        load_documents(p)


def test_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(dict(GOOD, doc_id="b")).encode() + b"\r\n")
    assert [d.doc_id for d in load_documents(p)] == ["a", "b"]
