"""Training-step time of every registered method as a ratio to `joint`, same model and batch.

All methods are built in one process from the same seed on the same random batch, per backbone
(tiny and ResNet18, CPU by default). Steps are timed round-robin (one step of each method per
round) so load from other processes hits every method alike; warm-up rounds are not counted and
the median is reported. Each row also counts autograd passes per step (backward + grad calls):
DESIGN.md §6 asks for no more passes than the algorithm needs (MMPareto 3, not 4).
Methods built on unimodal reference runs (ensemble, ume, umt) get fresh unimodal models as
references; the ensembles' "step" is an evaluation (they train nothing: their cost is the
unimodal runs'). Epoch-level work is not timed (PMR's prototype pass, MSLR's accuracy pass,
G-Blending's probes: (M + 1) x probe_epochs epochs per estimation).

Staged methods are timed in each stage kind: MIE in its first stage (audio branch only) and in
its second (visual branch with the flat projection). ResNet18 inputs default to a reduced size
so a CPU run takes a few minutes; `--full-size` uses CREMA-D's ogm-ge shapes.

    .venv/bin/python benchmarks/method_step.py [--batch 4] [--steps 5] [--warmup 2] [--device cpu] [--methods a,b]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mmbench.engine.device import pick_device
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, EpochContext, Method, ModelSpec, StepContext, TrainSpec

SHAPES = {
    "tiny": {"audio": [1, 32, 32], "visual": [2, 3, 32, 32]},
    "resnet18": {"audio": [1, 128, 96], "visual": [1, 3, 112, 112]},
}
FULL = {"audio": [1, 257, 188], "visual": [1, 3, 224, 224]}
CLASSES = 6
PARAMS: dict[str, dict[str, Any]] = {
    "mie": {"epoch_list": [1, 1]},  # a two-epoch schedule to reach stage 2
    "opm": {"warmup_epochs": 0, "p_exe": 1.0},  # time the drop itself
    "gblending": {"probe_epochs": 1},  # the per-epoch probes are not timed; keep the set-up short
    "arl": {"start": 0},  # epoch 1 is past warm-up: gradients scaled
    "reconboost": {"epochs_per_stage": 1, "correct_epochs": 1},  # epoch 2: visual's phase 1 against audio; 3: rectification
}
EPOCHS: dict[str, list[int]] = {"mie": [0, 1], "arl": [1], "reconboost": [2, 3]}  # epochs to time: one per stage kind
FUSION: dict[str, str] = {"mla": "shared", "greedy": "mmtm", "reconboost": "sum"}  # methods on their own head/architecture
EXTRA: list[tuple[str, str]] = [("joint", "mmtm")]  # (method, fusion): an architecture's own cost, e.g. Greedy's MMTM


@dataclass
class Case:
    label: str
    method: Method
    epoch: int
    times: list[float]
    passes: int = 0


def build(name: str, backbone: str, shapes: dict[str, list[int]], device: torch.device,
          params: dict[str, Any] | None = None, fusion: str | None = None) -> Method:
    torch.manual_seed(0)
    cls = METHODS.get(name)
    spec = ModelSpec(backbone, fusion or FUSION.get(name, "concat"), shapes, CLASSES)
    hp = cls.HParams.model_validate(params if params is not None else PARAMS.get(name, {}))
    train = TrainSpec(epochs=2, optimizer={"name": "sgd", "lr": 1e-3, "momentum": 0.9}, scheduler={"name": "none"})
    cls.check(spec, hp)
    cls.check_train(train, hp)
    method = cls(spec, hp, train)
    method.setup(device)
    if method.needs_unimodal_references:  # ensembles / teachers: fresh unimodal models stand in for the runs
        method.attach_references({m: build_reference(m, backbone, shapes, device) for m in method.modalities})
    method.train()
    return method


def build_reference(modality: str, backbone: str, shapes: dict[str, list[int]], device: torch.device) -> Method:
    ref = build("unimodal", backbone, shapes, device, {"modality": modality})
    return ref.eval()


def epoch_ctx(epoch: int, raw: dict[str, torch.Tensor], device: torch.device) -> EpochContext:
    """One-batch loaders, so stage hooks (MIE's covariance pass) can run."""
    def prepare(r: dict[str, torch.Tensor], train: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: v for k, v in r.items() if k != "label"}, r["label"]

    loaders = {k: [raw] for k in ("train", "train_eval", "val", "test")}
    return EpochContext(epoch, 2, 1, device, loaders, prepare)


def count_passes(case: Case, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> int:
    calls = [0]
    real_backward, real_grad = torch.autograd.backward, torch.autograd.grad

    def backward(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        return real_backward(*a, **k)

    def grad(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        return real_grad(*a, **k)

    torch.autograd.backward, torch.autograd.grad = backward, grad  # type: ignore[assignment]
    try:
        case.method.update(inputs, labels, StepContext(case.epoch, 0, 1, 2))
    finally:
        torch.autograd.backward, torch.autograd.grad = real_backward, real_grad  # type: ignore[assignment]
    return calls[0]


def run_backbone(backbone: str, shapes: dict[str, list[int]], args: argparse.Namespace, device: torch.device,
                 console: Console) -> list[Case]:
    g = torch.Generator().manual_seed(1)
    inputs = {m: torch.randn(args.batch, *s, generator=g).to(device) for m, s in shapes.items()}
    labels = torch.randint(0, CLASSES, (args.batch,), generator=g).to(device)
    raw = {**inputs, "label": labels}
    cases: list[Case] = []
    for name in METHODS.names():
        if args.methods and name != "joint" and name not in args.methods.split(","):
            continue
        for epoch in EPOCHS.get(name, [0]):
            try:
                method = build(name, backbone, shapes, device)
            except UserError as e:
                console.print(f"[yellow]skip {name}[/yellow] on {backbone}: {e}")
                break
            label = name if len(EPOCHS.get(name, [0])) == 1 else f"{name} s{epoch + 1} {method_stage(method, epoch)}"
            if hasattr(method, "position"):
                label = f"{name} {method_stage(method, epoch)}"
            method.on_epoch_start(epoch_ctx(epoch, raw, device))
            cases.append(Case(label, method, epoch, []))
    for name, fusion in EXTRA:
        method = build(name, backbone, shapes, device, fusion)
        method.on_epoch_start(epoch_ctx(0, raw, device))
        cases.append(Case(f"{name} ({fusion})", method, 0, []))
    for c in cases:
        c.passes = count_passes(c, inputs, labels)
    for r in range(args.warmup + args.steps):
        for c in cases:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            c.method.update(inputs, labels, StepContext(c.epoch, r, args.warmup + args.steps, 2))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= args.warmup:
                c.times.append(time.perf_counter() - t0)
    return cases


def method_stage(method: Method, epoch: int) -> str:
    position = getattr(method, "position", None)
    if position is not None:  # ReconBoost: (stage, phase, modality)
        stage, phase, m = position(epoch)
        return f"{m} phase {phase}"
    active = getattr(method, "active", None)
    if active is None:
        return f"epoch {epoch}"
    return active(epoch) + ("+P" if epoch > 0 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbones", default="tiny,resnet18")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--full-size", action="store_true", help="ResNet18 on CREMA-D ogm-ge input sizes")
    ap.add_argument("--methods", default="", help="comma-separated methods to time (joint always); default all")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    console = Console()
    for backbone in args.backbones.split(","):
        shapes = FULL if backbone == "resnet18" and args.full_size else SHAPES[backbone]
        cases = run_backbone(backbone, shapes, args, device, console)
        base = statistics.median(next(c.times for c in cases if c.label == "joint"))
        tab = Table(title=f"{backbone} on {device}, batch {args.batch}, inputs {shapes}, median of {args.steps} steps",
                    title_justify="left")
        for col in ("method", "ms/step", "x joint", "autograd passes"):
            tab.add_column(col, justify="left" if col == "method" else "right")
        for c in cases:
            med = statistics.median(c.times)
            tab.add_row(c.label, f"{1000 * med:.1f}", f"{med / base:.2f}", str(c.passes))
        console.print(tab)


if __name__ == "__main__":
    main()
