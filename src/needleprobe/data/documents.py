"""The dataset: JSONL documents with needle character spans.

Every line is checked before any model is loaded, so a bad line costs seconds,
not a GPU hour; errors name the file, line and field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import NeedleprobeError

SPLITS = ("train", "val", "test")
FIELDS = ("doc_id", "text", "needle_spans", "split", "metadata")
"""What a line may hold; anything else of the user's own goes under ``metadata`` (kept, never read).
A misspelt field ("spans") is an error rather than a document that silently has no needles."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    needle_spans: tuple[tuple[int, int], ...]
    """Half-open character spans ``[start, end)`` into ``text``."""
    split: str
    line: int
    """1-based line in the JSONL file, for error messages."""


def file_sha256(path: str | Path) -> str:
    from ..io.stores import as_path  # a local path or an fsspec URL

    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stable_hash(text: str) -> int:
    """A 64-bit hash of a string that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def hash_split(doc_id: str, val_fraction: float) -> str:
    """Deterministic train/val assignment for documents without a ``split`` field."""
    return "val" if stable_hash(doc_id) / 2.0**64 < val_fraction else "train"


def _parse_line(raw: str, where: str, lineno: int, val_fraction: float) -> Document:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise NeedleprobeError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise NeedleprobeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        import difflib

        k = unknown[0]
        near = difflib.get_close_matches(k, FIELDS, n=1, cutoff=0.5)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise NeedleprobeError(
            f"{where}: unknown field {k!r} ({hint}a line holds {', '.join(FIELDS)}; put fields of your own under 'metadata')"
        )
    doc_id = obj.get("doc_id")
    if not isinstance(doc_id, str) or not doc_id:
        raise NeedleprobeError(f"{where}: field 'doc_id' must be a non-empty string, got {doc_id!r}")
    if "text" not in obj:
        raise NeedleprobeError(f"{where}: missing field 'text' (doc_id {doc_id!r})")
    text = obj["text"]
    if not isinstance(text, str):
        raise NeedleprobeError(f"{where}: field 'text' must be a string (doc_id {doc_id!r})")
    spans_raw = obj.get("needle_spans", [])
    if not isinstance(spans_raw, list):
        raise NeedleprobeError(f"{where}: field 'needle_spans' must be a list of [start, end] (doc_id {doc_id!r})")
    spans = []
    for i, span in enumerate(spans_raw):
        f = f"{where}: field 'needle_spans[{i}]'"
        if (
            not isinstance(span, (list, tuple))
            or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            raise NeedleprobeError(f"{f} must be [start, end] integers, got {span!r} (doc_id {doc_id!r})")
        s, e = span
        if s > e:
            raise NeedleprobeError(f"{f} is reversed: start {s} > end {e} (doc_id {doc_id!r})")
        if s == e:
            raise NeedleprobeError(f"{f} is empty: start == end == {s} (doc_id {doc_id!r})")
        if s < 0 or e > len(text):
            raise NeedleprobeError(
                f"{f} = [{s}, {e}] is out of range for a text of {len(text)} characters (doc_id {doc_id!r})"
            )
        spans.append((s, e))
    split = obj.get("split")
    if split is None:
        split = hash_split(doc_id, val_fraction)
    elif split not in SPLITS:
        raise NeedleprobeError(f"{where}: field 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    return Document(doc_id, text, tuple(sorted(spans)), split, lineno)


def decode_line(raw: bytes, path, lineno: int) -> str:
    """One line of a text file as UTF-8, or an error naming the file, the line and the byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1].hex()
        raise NeedleprobeError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{bad} at byte {e.start + 1} of the line); save the file as UTF-8"
        ) from None


def read_utf8(path: str | Path) -> str:
    """A whole text file as UTF-8 (a byte-order mark dropped); an error names the line and byte that are not."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
            decode_line(raw, path, lineno)
        raise


def load_documents(path: str | Path, val_fraction: float = 0.2) -> list[Document]:
    """All documents of a JSONL file, validated, in file order."""
    path = Path(path)
    if not path.is_file():
        raise NeedleprobeError(
            f"{path}: dataset not found (write your JSONL there, set dataset.path, or run `needleprobe demo-data` for the demo)"
        )
    docs: list[Document] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            if lineno == 1 and raw_bytes.startswith(b"\xef\xbb\xbf"):
                raw_bytes = raw_bytes[3:]  # a byte-order mark, as files exported on Windows start
            raw = decode_line(raw_bytes, path, lineno)
            if not raw.strip():
                continue
            doc = _parse_line(raw, f"{path}:{lineno}", lineno, val_fraction)
            if doc.doc_id in seen:
                raise NeedleprobeError(
                    f"{path}:{lineno}: field 'doc_id' {doc.doc_id!r} duplicates line {seen[doc.doc_id]}"
                )
            seen[doc.doc_id] = lineno
            docs.append(doc)
    if not docs:
        raise NeedleprobeError(f"{path}: dataset is empty")
    return docs


def by_split(docs: list[Document]) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[d.split].append(d)
    return out
