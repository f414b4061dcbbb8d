"""``needleprobe scan``: documents in (JSON lines or plain text lines), one JSON line per document out.

Lines are read and scored batch by batch and each batch's answers are flushed, so ``scan`` works at the end of a
pipe.  A line that is not a document is reported on stderr with its number and skipped; the rest are scored.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Iterator

from ..errors import NeedleprobeError


def read_documents(stream: IO[bytes], where: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, document or None, problem or None) per non-blank line.  A line starting with ``{`` is a JSON
    document (``text``, optional ``doc_id``; other fields are ignored), any other line is a document's text."""
    for n, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff").rstrip("\r\n")
        except UnicodeDecodeError as e:
            yield n, None, f"{where}:{n}: not valid UTF-8 (byte 0x{raw[e.start:e.start + 1].hex()}); line skipped"
            continue
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            yield n, {"doc_id": f"line-{n}", "text": line}, None
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, None, f"{where}:{n}: invalid JSON ({e.msg} at column {e.colno}); line skipped"
            continue
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            yield n, None, f"{where}:{n}: field 'text' must be a string; line skipped"
            continue
        doc_id = obj.get("doc_id", f"line-{n}")
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
            yield n, None, f"{where}:{n}: field 'doc_id' must be a string; line skipped"
            continue
        yield n, {"doc_id": str(doc_id), "text": text}, None


def scan(monitor, stream: IO[bytes], where: str, out: IO[str] | None = None, err: IO[str] | None = None,
         batch_size: int = 16) -> tuple[int, int, int]:
    """Score every document of ``stream``; returns (documents scored, flagged, bad lines).  ``out``/``err``: stdout
    and stderr by default."""
    out, err = out or sys.stdout, err or sys.stderr
    scored = flagged = bad = 0
    batch: list[dict] = []

    def flush() -> None:
        nonlocal scored, flagged
        if not batch:
            return
        for res in monitor.score(batch):
            out.write(json.dumps(res.to_dict(), ensure_ascii=False) + "\n")
            scored += 1
            flagged += res.flagged
        out.flush()
        batch.clear()

    seen: set[str] = set()
    for n, doc, problem in read_documents(stream, where):
        if doc is not None and doc["doc_id"] in seen:
            doc, problem = None, f"{where}:{n}: doc_id {doc['doc_id']!r} repeats an earlier line; line skipped"
        if problem:
            print(f"needleprobe scan: {problem}", file=err, flush=True)
            bad += 1
            continue
        seen.add(doc["doc_id"])
        batch.append(doc)
        if len(batch) >= batch_size:
            flush()
    flush()
    return scored, flagged, bad


def open_input(path: str | None):
    """The input stream and its name for messages (``-`` or none: stdin)."""
    if path in (None, "-"):
        return sys.stdin.buffer, "<stdin>"
    try:
        return open(path, "rb"), path
    except OSError as e:
        raise NeedleprobeError(f"{path}: cannot read ({e.strerror})") from None
