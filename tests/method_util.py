"""Small builders shared by the method tests: a method on the tiny backbone, hand-made batches,
step and epoch contexts, and a copy of a model's gradients."""
from __future__ import annotations

from typing import Any

import torch

from mmbench.methods.base import METHODS, EpochContext, ModelSpec, StepContext, TrainSpec

SHAPES2 = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}
SHAPES3 = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8], "depth": [1, 8, 8]}
CLASSES = 4


def make(name: str, fusion: str = "concat", shapes: dict[str, list[int]] | None = None, lr: float = 0.01,
         epochs: int = 2, optimizer: dict[str, Any] | None = None, classes: int = CLASSES, seed: int = 0, **hp: Any):
    """A method on the tiny backbone, checked as a run would be, set up on the CPU in train mode
    (SGD with momentum 0.9 at `lr` unless `optimizer` is given)."""
    torch.manual_seed(seed)
    cls = METHODS.get(name)
    spec = ModelSpec(backbone="tiny", fusion=fusion, input_shapes=dict(shapes or SHAPES2), num_classes=classes)
    h = cls.HParams(**hp)
    train = TrainSpec(epochs=epochs, optimizer=optimizer or {"name": "sgd", "lr": lr, "momentum": 0.9},
                      scheduler={"name": "none"})
    cls.check(spec, h)
    cls.check_train(train, h)
    m = cls(spec, h, train)
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(shapes: dict[str, list[int]] | None = None, b: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(b, *s, generator=g) for m, s in (shapes or SHAPES2).items()}
    return inputs, torch.arange(b) % CLASSES


def step_ctx(epoch: int = 0, step: int = 0, epochs: int = 100) -> StepContext:
    return StepContext(epoch=epoch, step=step, steps_per_epoch=10, num_epochs=epochs)


def epoch_ctx(batches: list, epoch: int = 0, epochs: int = 100, val: list | None = None) -> EpochContext:
    """Loaders are plain lists of (inputs, labels): prepare_batch passes them through."""
    loaders = {"train": batches, "train_eval": batches}
    if val is not None:
        loaders["val"] = val
    return EpochContext(epoch=epoch, num_epochs=epochs, steps_per_epoch=len(batches), device=torch.device("cpu"),
                        loaders=loaders, prepare_batch=lambda raw, train: raw)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
