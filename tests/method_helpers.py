"""Builders the balancing-method tests share: a small model on tiny encoders, plain SGD with lr 1
(the update is exactly minus the gradient the step wrote), and seeded fake batches; two or three
modalities."""
from __future__ import annotations

import torch

import method_util

from mmbench.methods.base import Method, StepContext

TWO = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}
THREE = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8], "depth": [1, 8, 8]}
PLAIN_SGD = {"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}


def make(name: str, fusion: str = "concat", shapes: dict | None = None, classes: int = 4, epochs: int = 1,
         seed: int = 0, **hp: object) -> Method:
    """method_util.make with plain SGD at lr 1 (the update is exactly minus the gradient)."""
    return method_util.make(name, fusion, shapes or TWO, epochs=epochs, optimizer=dict(PLAIN_SGD), classes=classes,
                            seed=seed, **hp)


def batch(shapes: dict | None = None, b: int = 12, classes: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = shapes or TWO
    return {k: torch.randn(b, *v, generator=g) for k, v in s.items()}, torch.randint(0, classes, (b,), generator=g)


def ctx(epoch: int = 0, step: int = 0) -> StepContext:
    return StepContext(epoch=epoch, step=step, steps_per_epoch=1, num_epochs=max(epoch + 1, 1))


def params(m: Method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.model.named_parameters()}
