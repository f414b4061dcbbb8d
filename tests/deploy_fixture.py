"""A run on a tiny random Llama (a causal model, so generation can be watched), monitored on val.

Module-scoped builds share it: extract + fit + monitor take a few seconds.  The val split has enough clean
documents (≥ 20) for a threshold at 5% FPR.
"""

from __future__ import annotations

from pathlib import Path

from conftest import small_docs, write_config, write_jsonl
from tiny_models import make_tiny_model


def build_llama_run(tmp: Path, *, chat_template: bool = True, monitor_split: str | None = "val"):
    """(config path, Config, model directory) after train (+ monitor on ``monitor_split``)."""
    from needleprobe.cli import main
    from needleprobe.config import load_config

    model_dir = make_tiny_model("llama", tmp / "tiny-llama", n_layers=3)
    data = write_jsonl(tmp / "data.jsonl", small_docs(n_train=16, n_val=60))
    cfg_path = write_config(tmp, data, model=str(model_dir), layers_to_probe=[1, 2], train_seeds=[0],
                            chat_template=chat_template, max_length=512, l2_grid=[0.01, 0.1])
    assert main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
    if monitor_split is not None:
        assert main(["monitor", "--config", str(cfg_path), "--split", monitor_split, "--no-progress"]) == 0
    return cfg_path, load_config(cfg_path), model_dir
