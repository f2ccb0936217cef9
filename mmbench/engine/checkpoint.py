"""Atomic checkpoint files: written to a temporary name and renamed, so a kill mid-write leaves
the previous checkpoint intact."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path, device: torch.device | str = "cpu") -> Any:
    return torch.load(path, map_location=device, weights_only=False)
