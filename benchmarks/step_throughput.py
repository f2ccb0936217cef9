"""Training-step throughput (samples/s) of `joint` with the tiny and ResNet18 backbones.

Same process, same synthetic batch per backbone; warm-up steps are not counted and the median
of the timed steps is reported. Input sizes follow the real protocols for ResNet18 (CREMA-D
ogm-ge: audio 1x257x188, one 224x224 frame) and the synthetic default for tiny.

    python benchmarks/step_throughput.py [--steps 5] [--batch 16] [--device auto]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from mmbench.engine.device import pick_device
from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

SHAPES = {
    "tiny": {"audio": [1, 24, 24], "visual": [2, 3, 24, 24]},
    "resnet18": {"audio": [1, 257, 188], "visual": [1, 3, 224, 224]},
}


def step_times(method_name: str, backbone: str, batch: int, steps: int, warmup: int, device: torch.device,
               params: dict | None = None) -> list[float]:
    torch.manual_seed(0)
    spec = ModelSpec(backbone, "concat", SHAPES[backbone], num_classes=6)
    cls = METHODS.get(method_name)
    hp = cls.HParams.model_validate(params or {})
    train = TrainSpec(epochs=10, optimizer={"name": "sgd", "lr": 1e-3, "momentum": 0.9}, scheduler={"name": "none"})
    method = cls(spec, hp, train)
    method.setup(device)
    method.train()
    inputs = {m: torch.randn(batch, *s, device=device) for m, s in SHAPES[backbone].items()}
    labels = torch.randint(0, 6, (batch,), device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        method.update(inputs, labels, StepContext(epoch=0, step=i, steps_per_epoch=warmup + steps, num_epochs=10))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbones", default="tiny,resnet18")
    args = ap.parse_args()
    device = pick_device(args.device)
    tab = Table(title=f"joint training step, batch {args.batch}, {device} ({torch.get_num_threads()} threads)")
    for c in ("backbone", "median step (ms)", "samples/s"):
        tab.add_column(c, justify="right")
    for bb in args.backbones.split(","):
        t = statistics.median(step_times("joint", bb, args.batch, args.steps, args.warmup, device))
        tab.add_row(bb, f"{1000 * t:.1f}", f"{args.batch / t:.1f}")
    Console().print(tab)


if __name__ == "__main__":
    main()
