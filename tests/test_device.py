"""Device choice: CUDA picked automatically when present, always as an indexed device."""
from __future__ import annotations

import pytest
import torch

from mmbench.engine.device import pick_device
from mmbench.errors import UserError


def test_cpu_when_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MMBENCH_DEVICE", raising=False)
    assert pick_device(None) == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        pick_device("cuda")


def test_auto_picks_an_indexed_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("MMBENCH_DEVICE", raising=False)
    for req in ("auto", "cuda", None):
        d = pick_device(req)
        assert d.type == "cuda" and d.index == 0  # torch.cuda.set_device rejects a bare 'cuda'
    assert pick_device("cuda:1").index == 1
    with pytest.raises(UserError, match="only 2 GPU"):
        pick_device("cuda:2")
    with pytest.raises(UserError, match="expected auto, cpu"):
        pick_device("tpu")
