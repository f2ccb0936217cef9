"""Conformance of mmbench's `mla` step against the official MLA code (developer tooling; CI never runs it).

    python conformance/mla.py --official /path/to/Multimodal-Learning-with-Alternating-Unimodal-Adaptation \
        [--steps 4] [--batch 4] [--rule released|code|owm|balancebench]

The official checkout (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation @ ab6c184) is run
UNCHANGED: its `main.train_epoch(..., gs_flag=True)` trains its own `AVClassifier` (ResNet18 audio/visual,
`fusion_module.fc_out` shared head) on small fake CREMA-D-shaped batches with its own `GSPlugin`. mmbench's
`Method` (mmbench/methods/mla.py) is built with ModelSpec(resnet18, shared) and loaded with the official
initial weights; both then take the same batches. Per optimizer step (two per batch: audio, visual) it
prints the max absolute and relative difference of the gradients the optimizer used, the parameters after
the step, the BN buffers after each batch, the per-modality losses and the projector.

How the official code is driven without editing it:
- modules main.py imports only for other datasets/models (dataset.dataset, models.cav_mae, models.m3ae,
  ml_collections, einops, tensorboard) are stubbed in sys.modules; the ResNet18, fusion module, GSPlugin
  and train_epoch are the official ones;
- GSPlugin builds its projector with `torch.cuda.FloatTensor`; on a CPU-only machine that type is
  pointed at `torch.FloatTensor` while it is constructed;
- `--rule released` runs the official code as released (its name check never matches, so no projection);
  `--rule code` and `--rule balancebench` hand GSPlugin a wrapper whose weight is named "module.weight" so
  the official projector runs (BalanceBenchmark's `add_` is applied by wrapping the same call); `owm` has no
  official counterpart: the script then only reports mmbench against `code` to show how far the fix moves.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from common import StepRecorder as Recorder
from common import per_tensor_diff, renamer
from torch import nn


def stub_modules() -> None:
    def mod(name: str, **attrs: object) -> None:
        m = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m

    dummy = type("Unused", (), {})
    mod("dataset")
    mod("dataset.dataset", AVDataset=dummy, CAVDataset=dummy, M3AEDataset=dummy, TVDataset=dummy,
        Modal3Dataset=dummy, CLIPDataset=dummy)
    mod("models.cav_mae", CAVMAEFT=dummy)
    mod("models.m3ae", MaskedMultimodalAutoencoder=dummy)
    mod("ml_collections", ConfigDict=dummy)
    mod("ml_collections.config_dict", config_dict=dummy)
    mod("einops")
    mod("torch.utils.tensorboard", SummaryWriter=dummy)


to_project = renamer([("audio_net.", "encoders.audio.trunk."), ("visual_net.", "encoders.visual.trunk."),
                      ("fusion_module.fc_out.", "fusion.head.")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="checkout of the official MLA repository")
    ap.add_argument("--steps", type=int, default=4, help="batches (two optimizer steps each)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rule", default="released", choices=["released", "code", "owm", "balancebench"])
    args = ap.parse_args()

    stub_modules()
    sys.path.insert(0, str(args.official))
    import main as official  # noqa: E402  (the official main.py)
    from models.basic_model import AVClassifier  # noqa: E402
    from utils import utils as official_utils  # noqa: E402

    from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

    torch.manual_seed(0)
    F_, T_, frames, hw, classes = 64, 48, 3, 32, 6
    oargs = types.SimpleNamespace(dataset="CREMAD", fusion_method="concat", gs_flag=True, modulation="Normal",
                                  lorb="base", clip=False, modal3=False, use_tensorboard=False)
    omodel = AVClassifier(oargs)
    omodel.apply(official_utils.weight_init)
    init = {k: v.clone() for k, v in omodel.state_dict().items()}
    wrapped = nn.DataParallel(omodel)  # train_epoch reaches the head as model.module.fusion_module.fc_out
    oopt = torch.optim.SGD(wrapped.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    osched = torch.optim.lr_scheduler.StepLR(oopt, 70, 0.1)
    cuda_ft = torch.cuda.FloatTensor
    torch.cuda.FloatTensor = torch.FloatTensor  # GSPlugin's projector on the CPU
    try:
        gs = official_utils.GSPlugin()
    finally:
        torch.cuda.FloatTensor = cuda_ft
    official_rule = "code" if args.rule == "owm" else args.rule  # owm has no official counterpart
    if official_rule in ("code", "balancebench"):
        original = gs.before_update

        def named_so_it_runs(model: nn.Module, x: torch.Tensor, *rest: object) -> None:
            holder = nn.Module()
            holder.module = model  # its weight is now "module.weight", the name the check wants
            if official_rule == "balancebench":
                raw = model.weight.grad.clone()
                original(holder, x, *rest)
                if model.weight.grad is not None and rest[-1] != 0:
                    model.weight.grad = raw + model.weight.grad
                return
            original(holder, x, *rest)

        gs.before_update = named_so_it_runs

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, F_, T_, generator=g), torch.randn(args.batch, 3, frames, hw, hw, generator=g),
                torch.randint(0, classes, (args.batch,), generator=g), torch.arange(args.batch).unsqueeze(1))
               for _ in range(args.steps)]

    onames = {id(p): n.removeprefix("module.") for n, p in wrapped.named_parameters()}
    orec = Recorder(oopt, onames)
    losses_off: list[float] = []
    ce_forward = nn.CrossEntropyLoss.forward

    def ce_record(self: nn.CrossEntropyLoss, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        out = ce_forward(self, inp, tgt)
        losses_off.append(float(out))
        return out

    bn_off: list[dict[str, torch.Tensor]] = []
    nn.CrossEntropyLoss.forward = ce_record  # type: ignore[method-assign]
    try:
        for b in batches:  # one batch per official epoch call, so BN buffers can be read after each
            official.train_epoch(oargs, 0, wrapped, torch.device("cpu"), [b], oopt, osched, gs_plugin=gs,
                                 gs_flag=True, av_alpha=0.55)
            gs_P = gs.Pl.detach().clone()
            bn_off.append({k: v.clone() for k, v in omodel.state_dict().items() if "running" in k})
    finally:
        nn.CrossEntropyLoss.forward = ce_forward  # type: ignore[method-assign]
    # train_epoch calls scheduler.step() per call; with StepLR(70) that changes nothing over a few calls

    rule = args.rule
    spec = ModelSpec("resnet18", "shared", {"audio": [1, F_, T_], "visual": [frames, 3, hw, hw]}, classes)
    cls = METHODS.get("mla")
    hp = cls.HParams(weights=[0.55, 0.45], projection=rule)
    method = cls(spec, hp, TrainSpec(epochs=1, optimizer={"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
                                     scheduler={"name": "step", "step_size": 70, "gamma": 0.1}))
    method.model.load_state_dict({to_project(k): v for k, v in init.items()}, strict=True)
    method.setup(torch.device("cpu"))
    method.train()
    pnames = {id(p): n for n, p in method.model.named_parameters()}
    prec = Recorder(method.optimizer, pnames)
    losses_proj: list[float] = []
    bn_proj: list[dict[str, torch.Tensor]] = []
    for i, (spec_b, img, y, _) in enumerate(batches):
        inputs = {"audio": spec_b.unsqueeze(1).float(), "visual": img.permute(0, 2, 1, 3, 4).contiguous().float()}
        logs = method.update(inputs, y, StepContext(0, 0, 1, 1))  # each official call is a one-batch epoch
        losses_proj += [float(logs["loss_audio"]), float(logs["loss_visual"])]
        bn_proj.append({k: v.clone() for k, v in method.model.state_dict().items() if "running" in k})

    print(f"MLA conformance: mmbench projection={rule} vs official {official_rule}, "
          f"{args.steps} batches x 2 optimizer steps, batch {args.batch}")
    print(f"{'step':>4} {'modality':>8} {'grad abs':>10} {'grad rel':>10} {'param abs':>10} {'param rel':>10} {'loss diff':>10}")
    worst = 0.0
    for s in range(len(orec.grads)):
        og = {to_project(k): v for k, v in orec.grads[s].items()}
        op = {to_project(k): v for k, v in orec.params[s].items()}
        ga, gr = per_tensor_diff(og, {k: prec.grads[s][k] for k in og})
        pa, pr = per_tensor_diff(op, prec.params[s])
        ld = abs(losses_off[s] - losses_proj[s])
        worst = max(worst, gr, pr)
        print(f"{s:>4} {('audio', 'visual')[s % 2]:>8} {ga:10.2e} {gr:10.2e} {pa:10.2e} {pr:10.2e} {ld:10.2e}")
    for i in range(len(bn_off)):
        ba, br = per_tensor_diff({to_project(k): v for k, v in bn_off[i].items()}, bn_proj[i])
        worst = max(worst, br)
        print(f"batch {i}: BN buffers max abs {ba:.2e} rel {br:.2e}")
    pa, pr = per_tensor_diff({"P": gs_P}, {"P": method.projector})
    print(f"projector after the last step: max abs {pa:.2e} rel {pr:.2e}")
    bitwise = all(torch.equal(orec.params[s][k], prec.params[s][to_project(k)]) for s in range(len(orec.params))
                  for k in orec.params[s])
    print(f"max relative difference {worst:.2e}; parameters bitwise equal: {bitwise}")


if __name__ == "__main__":
    main()
