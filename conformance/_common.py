"""Shared by the conformance scripts: optimizer hooks that record a step, and tensor differences."""
from __future__ import annotations

import torch


class Recorder:
    """Grads before each optimizer step; params and buffers after it (hooks, no code changed)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, rename=lambda n: n) -> None:
        self.steps: list[dict[str, dict[str, torch.Tensor]]] = []
        self.model, self.rename = model, rename
        names = {id(p): n for n, p in model.named_parameters()}
        self._grads: dict[str, torch.Tensor] = {}

        def pre(_o, _a, _k):
            self._grads = {rename(names[id(p)]): p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                           if p.grad is not None}

        def post(_o, _a, _k):
            params = {rename(n): p.detach().clone() for n, p in model.named_parameters()}
            bufs = {rename(n): b.detach().clone() for n, b in model.named_buffers() if "num_batches" not in n}
            mom = {rename(names[id(p)]): opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups
                   for p in g["params"] if opt.state.get(p, {}).get("momentum_buffer") is not None}
            state = {rename(n): v.detach().clone() for n, v in model.state_dict().items()}
            self.steps.append({"grad": self._grads, "param": params, "buffer": bufs, "momentum": mom, "state": state})

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float, int]:
    """(max abs diff, max relative diff = |a-b| / max|b| per tensor, tensors compared)."""
    mabs = mrel = 0.0
    n = 0
    for k, vb in b.items():
        if k not in a:
            continue
        d = (a[k].double() - vb.double()).abs().max().item()
        scale = vb.double().abs().max().item()
        mabs, mrel, n = max(mabs, d), max(mrel, d / scale if scale > 0 else d), n + 1
    return mabs, mrel, n
