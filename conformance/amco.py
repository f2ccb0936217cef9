"""Conformance of mmbench's `amco` step against BalanceBenchmark's AMCo code (developer tooling; CI never runs it).

    python conformance/amco.py --official /path/to/BalanceBenchmark [--steps 4] [--epoch 2]

AMCo has no code of its own; BalanceBenchmark (GeWu-Lab/BalanceBenchmark @ 4c1482f) is the reference. Its
`AMCoTrainer.train_loop` (one epoch: the sine mask schedule, numpy's shuffle, the dependence flags) and
`BaseClassifierAMCoModel` (ResNet18 encoders from its own `resnet18_encoder.py`, `ConcatFusion_N`,
`linear_star`) run UNCHANGED on small fake CREMA-D-shaped batches; mmbench's `amco` Method is built with the
same settings (sigma 0.5, eps 0.3, window 0..80, SGD), loaded with the same initial weights, and takes the same
batches after `on_epoch_start`, from the same numpy state. Per step it prints the max abs / rel difference of
the gradients the optimizer used, the parameters after the step and the BN buffers, and the dependence flags.

Batch size 2 (the default here): BalanceBenchmark expands its class mask to shape (2, C) and multiplies it
into (B, C) logits, which fails for any other batch size; at B = 2 it equals mmbench's per-class mask.

BalanceBenchmark's `BaseClassifierModel.encoder_process` calls `self.resnet(...)`, which no class defines
(its ResNet path is `resnet_process`; so at this commit the model cannot run a ResNet18 forward at all):
the harness points `resnet` at `resnet_process` on the instance.

How the code is driven without editing it: the two source files are compiled as modules with `lightning`
(only used for types and the Fabric plumbing), the trainer base class, the metric calculator and the
encoder factory replaced by stand-ins; the factory builds BalanceBenchmark's own `ResNet18Encoder`.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from common import StepRecorder as Recorder
from common import per_tensor_diff as diff
from common import renamer
from torch import nn


def load(name: str, path: Path, package: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__, module.__package__ = str(path), package
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


def package(name: str, **attrs: object) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__path__ = []  # type: ignore[attr-defined]
    m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    for k, v in attrs.items():
        setattr(m, k, v)
    sys.modules[name] = m
    return m


class StubTrainer:
    """What AMCoTrainer.train_loop needs from BalanceBenchmark's BaseTrainer and Fabric."""

    def __init__(self, *a: object, **k: object) -> None:
        pass


def build_official(root: Path):
    src = root / "balancemm"
    sys.modules["lightning"] = mock.MagicMock()
    package("balancemm")
    package("balancemm.encoders")
    enc = load("balancemm.encoders.resnet18_encoder", src / "encoders" / "resnet18_encoder.py", "balancemm.encoders")

    def create_encoders(opt: dict) -> dict:
        return {m: enc.ResNet18Encoder(modality=m) for m in opt}

    sys.modules["balancemm.encoders"].create_encoders = create_encoders  # type: ignore[attr-defined]
    package("balancemm.models")
    load("balancemm.models.fusion_arch", src / "models" / "fusion_arch.py", "balancemm.models")
    models = load("balancemm.models.avclassify_model", src / "models" / "avclassify_model.py", "balancemm.models")
    package("balancemm.trainer")
    base = types.ModuleType("balancemm.trainer.base_trainer")
    base.BaseTrainer = StubTrainer  # type: ignore[attr-defined]
    sys.modules["balancemm.trainer.base_trainer"] = base
    trainer = load("balancemm.trainer.AMCo_trainer", src / "trainer" / "AMCo_trainer.py", "balancemm.trainer")
    return models, trainer


to_project = renamer([("modality_encoder.audio.", "encoders.audio.trunk."), ("modality_encoder.visual.", "encoders.visual.trunk."),
                      ("fusion_module.fc_out.", "fusion.fc."), ("linear_star.", "fusion.star.")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="checkout of GeWu-Lab/BalanceBenchmark")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--epoch", type=int, default=2, help="the epoch both sides train (l_t grows by epoch/10 a step)")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    models, trainer_mod = build_official(args.official)

    from mmbench.methods.base import METHODS, EpochContext, ModelSpec, StepContext, TrainSpec

    classes, F_, T_, frames, hw = 6, 64, 48, 2, 32
    torch.manual_seed(0)
    omodel = models.BaseClassifierAMCoModel({
        "n_classes": classes, "fusion": "concat", "device": " ", "modality_size": {"audio": 512, "visual": 512},
        "encoders": {"audio": {"name": "ResNet18"}, "visual": {"name": "ResNet18"}}})
    omodel.resnet = omodel.resnet_process  # encoder_process calls a `resnet` method that does not exist
    omodel.train()
    init = {k: v.clone() for k, v in omodel.state_dict().items()}
    oopt = torch.optim.SGD(omodel.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    g = torch.Generator().manual_seed(1)
    batches = [{"audio": torch.randn(args.batch, 1, F_, T_, generator=g),
                "visual": torch.randn(args.batch, 3, frames, hw, hw, generator=g),
                "label": torch.randint(0, classes, (args.batch,), generator=g)} for _ in range(args.steps)]

    t = trainer_mod.AMCoTrainer.__new__(trainer_mod.AMCoTrainer)
    trainer_mod.AMCoTrainer.__init__(t, mock.MagicMock(), {"alpha": 0.1, "method": "None", "modulation_starts": 0,
                                                            "modulation_ends": 80, "sigma": 0.5, "U": 512, "eps": 0.3,
                                                            "modality": 2})
    t.fabric, t.should_stop, t.global_step, t.grad_accum_steps = mock.MagicMock(), False, 0, 1
    t.current_epoch, t._current_train_return = args.epoch, {}
    t.progbar_wrapper = lambda it, total, desc: it
    t.PrecisionCalculatorType = lambda *a: mock.MagicMock()
    t._format_iterable = lambda *a: None
    flags_off: list[dict[str, bool]] = []
    original_step = t.training_step

    def recording_step(**kw: object) -> object:
        out = original_step(**kw)
        flags_off.append(dict(out[1]))
        return out

    t.training_step = recording_step
    orec = Recorder(oopt, {id(p): n for n, p in omodel.named_parameters()})
    np.random.seed(7)
    t.train_loop(omodel, oopt, batches)
    bn_off = {k: v for k, v in omodel.state_dict().items() if "running" in k}

    cls = METHODS.get("amco")
    spec = ModelSpec("resnet18", "concat", {"audio": [1, F_, T_], "visual": [frames, 3, hw, hw]}, classes)
    method = cls(spec, cls.HParams(sigma=0.5, eps=0.3, modulation_starts=0, modulation_ends=80),
                 TrainSpec(epochs=10, optimizer={"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
                           scheduler={"name": "none"}))
    method.model.load_state_dict({to_project(k): v for k, v in init.items()}, strict=True)
    method.setup(torch.device("cpu"))
    method.train()
    prec = Recorder(method.optimizer, {id(p): n for n, p in method.model.named_parameters()})
    method.on_epoch_start(EpochContext(args.epoch, 10, args.steps, torch.device("cpu")))
    np.random.seed(7)
    flags_proj = []
    for i, b in enumerate(batches):
        inputs = {"audio": b["audio"], "visual": b["visual"].permute(0, 2, 1, 3, 4).contiguous()}
        method.update(inputs, b["label"], StepContext(args.epoch, i, args.steps, 10))
        flags_proj.append(dict(method.dependent))
    bn_proj = {k: v for k, v in method.model.state_dict().items() if "running" in k}

    print(f"AMCo conformance: {args.steps} steps, batch {args.batch}, epoch {args.epoch} (BalanceBenchmark vs mmbench)")
    worst, bitwise = 0.0, True
    for s in range(len(orec.grads)):
        ga, gr = diff({to_project(k): v for k, v in orec.grads[s].items()}, prec.grads[s])
        op = {to_project(k): v for k, v in orec.params[s].items()}
        pa, pr = diff(op, prec.params[s])
        worst = max(worst, gr, pr)
        bitwise &= all(torch.equal(v, prec.params[s][k]) for k, v in op.items())
        print(f"step {s}: grads abs {ga:.2e} rel {gr:.2e}; params abs {pa:.2e} rel {pr:.2e}; "
              f"dependent official {flags_off[s]} mmbench {flags_proj[s]}")
    ba, br = diff({to_project(k): v for k, v in bn_off.items()}, bn_proj)
    print(f"BN buffers after the epoch: abs {ba:.2e} rel {br:.2e}")
    print(f"max relative difference {max(worst, br):.2e}; parameters bitwise equal: {bitwise}; "
          f"flags equal: {flags_off == flags_proj}")


if __name__ == "__main__":
    main()
