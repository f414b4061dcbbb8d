"""A small end-to-end run (extract, fit, optionally monitor) in a tmp dir, for tests that read its outputs.

Each test module builds its own (module-scoped) so modules stay independent
and can run alone; sizes are chosen to keep one build well under 30 s on two
CPU cores while the val split still has needle and clean documents.
"""

from __future__ import annotations

from pathlib import Path

from conftest import small_docs, write_config, write_jsonl

# A clean val document whose id and text would break an unescaped page.
HOSTILE_DOC = {
    "doc_id": 'evil<&>"doc',
    "text": "Plain text with markup: <script>alert('x')</script> & <b>bold</b> \"quoted\" tail.",
    "needle_spans": [],
    "split": "val",
}


def pipeline_docs() -> list[dict]:
    return small_docs(n_train=12, n_val=16) + [HOSTILE_DOC]


def build_pipeline(tmp: Path, *, monitor_split: str | None = "val", **probe):
    """(config path, Config) after ``needleprobe train`` and, unless None, the monitor on ``monitor_split``."""
    from needleprobe.cli import main
    from needleprobe.config import load_config

    data = write_jsonl(tmp / "data.jsonl", pipeline_docs())
    cfg_path = write_config(tmp, data, **probe)
    assert main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
    cfg = load_config(cfg_path)
    if monitor_split is not None:
        from needleprobe.analysis.monitor import monitor

        monitor(cfg, split=monitor_split, show_progress=False)
    return cfg_path, cfg
