"""MBSD conformance: BalanceBenchmark's `MBSDTrainer.training_step` (GeWu-Lab/BalanceBenchmark,
balancemm/trainer/MBSD_trainer.py) against mmbench's `mbsd` step, identical weights and batches.

    python conformance/mbsd.py /path/to/BalanceBenchmark [--steps 3] [--batch 8] [--modalities 2|3] [--optimizer adamw|sgd]

The official `training_step` runs unchanged, with the trainer's own state (modulation window, epoch) on a stand-in `self`, on mmbench's model behind BalanceBenchmark's model interface
(`common.BBModel`, ResNet18 encoders, concat head), followed by the optimizer step its
`optimizer.step(closure)` performs (AdamW, lr 1e-3, wd 0.01: BalanceBenchmark's defaults; `--optimizer sgd`:
SGD lr 1e-3, momentum 0.9, which does not amplify rounding differences as Adam does).
"""
from __future__ import annotations

import argparse
import copy
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BB_COMMIT, BBModel, diff, fake_batches, grad_recorder, load_bb_trainer, report, state_of  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo")
    ap.add_argument("--commit", default=BB_COMMIT)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--modalities", type=int, default=2, choices=[2, 3])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    off = load_bb_trainer(a.repo, "MBSD_trainer.py", a.commit)

    from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec
    shapes = {"audio": [1, 64, 48], "visual": [1, 3, 64, 64]}
    if a.modalities == 3:
        shapes["depth"] = [1, 64, 48]
    cls = METHODS.get("mbsd")
    opt = ({"name": "adamw", "lr": 1e-3, "weight_decay": 0.01} if a.optimizer == "adamw"
           else {"name": "sgd", "lr": 1e-3, "momentum": 0.9})
    torch.manual_seed(a.seed)
    ours = cls(ModelSpec("resnet18", "concat", shapes, 6), cls.HParams(), TrainSpec(1, opt, {"name": "none"}))
    official = BBModel(copy.deepcopy(ours.model))
    ours.setup(torch.device("cpu"))
    ours.train()
    official.train()
    off_opt = (torch.optim.AdamW(official.inner.parameters(), lr=1e-3, weight_decay=0.01) if a.optimizer == "adamw"
               else torch.optim.SGD(official.inner.parameters(), lr=1e-3, momentum=0.9))
    off_grads = grad_recorder(off_opt, dict(official.inner.named_parameters()))
    our_grads = grad_recorder(ours.optimizer, dict(ours.model.named_parameters()))
    trainer = types.SimpleNamespace(modulation_starts=0, modulation_ends=80, current_epoch=0)

    g = torch.Generator().manual_seed(a.seed + 1)
    batches = fake_batches(a.steps, a.batch, 6, (64, 48), (64, 64), seed=a.seed)
    rows = []
    same = lambda k: k  # noqa: E731
    for i, b in enumerate(batches):
        inputs = {"audio": b["audio"], "visual": b["visual"]}
        if a.modalities == 3:
            inputs["depth"] = torch.randn(a.batch, 1, 64, 48, generator=g)
        off_opt.zero_grad()
        loss = off.MBSDTrainer.training_step(trainer, official, {**inputs, "label": b["label"]}, i)
        off_opt.step()
        logs = ours.update(inputs, b["label"], StepContext(0, i, a.steps, 1))
        p_off, b_off = state_of(official.inner)
        p_our, b_our = state_of(ours.model)
        rows.append((i, "grads", *diff(our_grads[i], off_grads[i], same)))
        rows.append((i, "params", *diff(p_our, p_off, same)))
        rows.append((i, "bn buffers", *diff(b_our, b_off, same)))
        rows.append((i, "diagnostics (loss)", *diff({"loss": logs["loss"]}, {"loss": loss.detach()}, same)))
        print(f"step {i}: share of samples distilled {float(logs['distilled']):.2f}, RS {float(logs['loss_rs']):.3e}, "
              f"KL {float(logs['loss_kl']):.3e}")
    print(f"MBSD: BalanceBenchmark {a.commit[:12]} vs mmbench, {a.steps} steps, batch {a.batch}, {a.optimizer}, "
          f"M={a.modalities}\n")
    return report(rows)


if __name__ == "__main__":
    sys.exit(main())
