"""Device choice and determinism."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from mmbench.errors import UserError


def pick_device(requested: str | None = None) -> torch.device:
    """`auto` (default): CUDA when present, else CPU. `cuda:N` must exist."""
    req = (requested or os.environ.get("MMBENCH_DEVICE") or "auto").lower()
    if req == "auto":
        req = "cuda" if torch.cuda.is_available() else "cpu"
    if req == "cpu":
        return torch.device("cpu")
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine; use --device cpu or auto")
        dev = torch.device(req)
        if dev.index is None:  # always an indexed device: set_device and device names need one
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) present")
        return dev
    raise UserError(f"--device {requested}: expected auto, cpu, cuda or cuda:N")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, object]:
    """Every generator's state as tensors and plain values (checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, object] = {
        "python": random.getstate(),  # (version, tuple of ints, None or float)
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    """Restore rng_state(); the tensors may have been loaded onto a GPU (map_location), the
    generators take CPU tensors."""
    random.setstate(_tuples(state["python"]))  # type: ignore[arg-type]
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    else:
        np.random.set_state(n)  # type: ignore[arg-type]
    torch.set_rng_state(state["torch"].cpu())  # type: ignore[union-attr]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])  # type: ignore[union-attr]


def _tuples(x: object) -> object:
    """random.setstate wants tuples all the way down."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
