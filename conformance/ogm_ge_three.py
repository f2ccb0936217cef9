"""Conformance of mmbench's three-modality OGM-GE with the rule it follows: BalanceBenchmark's
`OGMTrainer.training_step` (GeWu-Lab/BalanceBenchmark, `balancemm/trainer/OGM_trainer.py`).

Developer tooling, not part of the package, never run by CI. Usage:

    python conformance/ogm_ge_three.py BALANCEBENCHMARK_CHECKOUT [--steps 3] [--alpha 0.8] [--batch 16]

BALANCEBENCHMARK_CHECKOUT is a work tree or a bare git directory (then HEAD is read). The official
`training_step` is executed unchanged: its source is cut out of OGM_trainer.py by the AST and
compiled on its own, because importing the module drags in lightning and all of balancemm; it runs
with a stand-in `self` (alpha, method 'OGM_GE', window) and a stand-in model that holds mmbench's own
network and exposes what the step reads: `modalitys`, `device`, `named_parameters()`, and after
`model(batch)` the `unimodal_result` dict computed as BalanceBenchmark's `unimodality_calculate`
(concat: W_m phi_m + b / M; 'output': the fused logits). Three modalities (audio, visual and a 1-D
`text`), so the step takes its three-modality branch: scores softmax(cos(logits))[y] over the items a
modality classifies correctly, ratios over (weakest + 1e-5). mmbench runs `ogm_ge` with
`multi_score: balancebench`.

The Gaussian noise of GE draws from different generators on the two sides, so it is zeroed on both
(`Tensor.normal_` and `torch.randn_like` patched to zeros) and the deterministic part g * k is
compared; the noise rule itself (N(0, (std(g) + 1e-8)^2) on every modulated tensor) is the
two-modality code path, bitwise against the official OGM-GE in /work/shared/conformance. Per step,
from identical weights (teacher-forced: the official side gets a copy of mmbench's network before
each step), it prints max abs / rel differences of the gradients per group and mmbench's k and ratios.
"""
from __future__ import annotations

import argparse
import ast
import copy
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn as nn

from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

SHAPES = {"audio": [1, 16, 16], "visual": [2, 3, 16, 16], "text": [8, 16]}
CLASSES = 6


def official_source(checkout: Path) -> tuple[str, str]:
    rel = "balancemm/trainer/OGM_trainer.py"
    if (checkout / rel).is_file():
        return (checkout / rel).read_text(), "work tree"
    out = subprocess.run(["git", "-C", str(checkout), "show", f"HEAD:{rel}"], check=True, capture_output=True, text=True)
    sha = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    return out.stdout, sha.stdout.strip()


def official_training_step(source: str) -> Callable[..., torch.Tensor]:
    """`OGMTrainer.training_step`, compiled alone from the official source (unchanged)."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OGMTrainer")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "training_step")
    mod = ast.Module(body=[fn], type_ignores=[])
    ns: dict[str, Any] = {"torch": torch, "nn": nn}
    exec(compile(mod, "OGM_trainer.py::training_step", "exec"), ns)  # noqa: S102 - developer tooling
    return ns["training_step"]


class StandIn(nn.Module):
    """What the official step reads from BalanceBenchmark's BaseClassifierModel, around mmbench's net."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.modalitys = list(net.modalities)
        self.device = torch.device("cpu")
        self.unimodal_result: dict[str, torch.Tensor] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> None:
        feats = self.net.encode({m: batch[m] for m in self.modalitys})
        fc = self.net.fusion.fc
        out = {"output": fc(torch.cat([feats[m] for m in self.modalitys], 1))}
        start = 0
        for m in self.modalitys:  # unimodality_calculate: weight slice, bias / number of modalities
            d = feats[m].shape[1]
            out[m] = torch.mm(feats[m], torch.transpose(fc.weight[:, start:start + d], 0, 1)) + fc.bias / len(self.modalitys)
            start += d
        self.unimodal_result = out


def groups(named: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for n, g in named.items():
        key = n.split(".")[1] if n.startswith("encoders.") else "head"
        out.setdefault(key, {})[n] = g
    return out


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float, bool]:
    mabs = max(float((a[n] - b[n]).abs().max()) for n in a)  # grads: no graph attached
    ref = max(float(b[n].abs().max()) for n in b)
    return mabs, mabs / ref if ref else 0.0, all(torch.equal(a[n], b[n]) for n in a)


class NoNoise:
    """Zero the GE noise on both sides (official: zeros_like(g).normal_(0, s); mmbench: randn_like(g) * s)."""

    def __enter__(self) -> "NoNoise":
        self.normal, self.randn_like = torch.Tensor.normal_, torch.randn_like
        torch.Tensor.normal_ = lambda t, *a, **k: t.zero_()  # type: ignore[method-assign]
        torch.randn_like = lambda t, *a, **k: torch.zeros_like(t)  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.normal_ = self.normal  # type: ignore[method-assign]
        torch.randn_like = self.randn_like  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score", default="balancebench", help="mmbench's multi_score (probability: shows it differs)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    source, commit = official_source(a.checkout)
    step_fn = official_training_step(source)
    print(f"official: BalanceBenchmark {commit}, balancemm/trainer/OGM_trainer.py::OGMTrainer.training_step")

    torch.manual_seed(a.seed)
    cls = METHODS.get("ogm_ge")
    hp = cls.HParams(alpha=a.alpha, ge=True, modulation_starts=0, modulation_ends=80, multi_score=a.score)
    method = cls(ModelSpec("tiny", "concat", dict(SHAPES), CLASSES), hp,
                 TrainSpec(1, {"name": "sgd", "lr": 0.01, "momentum": 0.9}, {"name": "none"}))
    method.setup(torch.device("cpu"))
    method.train()
    trainer = SimpleNamespace(alpha=a.alpha, method="OGM_GE", modulation_starts=0, modulation_ends=80, current_epoch=0)
    gen = torch.Generator().manual_seed(a.seed + 1)
    worst = 0.0
    for step in range(a.steps):
        batch = {m: torch.randn(a.batch, *s, generator=gen) for m, s in SHAPES.items()}
        labels = torch.randint(0, CLASSES, (a.batch,), generator=gen)
        before = copy.deepcopy(method.state_dict())
        official = StandIn(copy.deepcopy(method.model))
        official.train()
        with NoNoise():
            step_fn(trainer, official, {**batch, "label": labels}, step)
            off = {n.removeprefix("net."): p.grad.clone() for n, p in official.named_parameters()}
            method.optimizer_step = lambda: None  # type: ignore[method-assign]  # keep the weights: compare only
            logs = {k: float(v) for k, v in method.update(batch, labels, StepContext(0, step, a.steps, 1)).items()}
            del method.optimizer_step
        mine = {n: p.grad.clone() for n, p in method.model.named_parameters()}
        print("| step | group / quantity | max abs | max rel | bitwise |\n|---|---|---|---|---|")
        for g, p in groups(mine).items():
            mabs, rel, same = diff(p, groups(off)[g])
            worst = max(worst, rel)
            print(f"| {step} | grads {g} (noise off) | {mabs:.2e} | {rel:.2e} | {same} |")
        for key in ("k", "ratio"):
            print(f"| {step} | {key} (mmbench) | " + ", ".join(f"{m} {float(logs[f'{key}_{m}']):.6g}" for m in SHAPES) + " | | |")
        method.load_state_dict(before)
        method.update(batch, labels, StepContext(0, step, a.steps, 1))  # the real step (with noise), then the next batch
    print(f"\nworst relative gradient difference (noise off): {worst:.2e} -> {'CONFORMS' if worst <= 1e-5 else 'DIFFERS'}")


if __name__ == "__main__":
    main()
