"""Weights are read straight onto the device, in the model dtype."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import needleprobe.model.hooks as hooks
from needleprobe.config import EMBEDDED_MODEL, ModelConfig


def test_cuda_loads_with_a_device_map_in_the_model_dtype(monkeypatch):
    """On CUDA ``from_pretrained`` gets the device (no host copy of the weights) and the dtype; elsewhere the dtype."""
    import transformers

    seen = {}

    class Loaded(torch.nn.Module):
        def to(self, *a, **k):
            seen["to"] = a
            return self

    def spy(where, **kw):
        seen.update(kw)
        return Loaded()

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "accelerate" else real_find_spec(name, *a))
    cuda = torch.device("cuda", 0)
    hooks.load_model(ModelConfig(name="some/model"), "bfloat16", cuda)
    assert seen["dtype"] is torch.bfloat16 and seen["device_map"] == cuda
    assert hooks.placement("float16", torch.device("cpu")) == {"dtype": torch.float16}


def test_cuda_without_accelerate_loads_through_the_host_and_says_so(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    assert hooks.placement("bfloat16", torch.device("cuda", 0)) == {"dtype": torch.bfloat16}
    err = capsys.readouterr().err
    assert "install accelerate" in err and "needleprobe[gpu]" in err and len(err.strip().splitlines()) == 1


def test_a_device_mapped_load_equals_the_plain_one():
    """Where ``accelerate`` is installed: the device-mapped path gives the same weights, dtype and device."""
    pytest.importorskip("accelerate")
    from transformers import AutoModel

    cfg = ModelConfig(name=EMBEDDED_MODEL)
    plain = hooks.load_model(cfg, "bfloat16", torch.device("cpu"))
    mapped = AutoModel.from_pretrained(hooks.model_location(cfg), dtype=torch.bfloat16, device_map=torch.device("cpu"))
    a, b = plain.state_dict(), mapped.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype == torch.bfloat16 for k in a)
