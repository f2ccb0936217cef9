"""Conformance of mmbench's `pmr` against the official PMR code (developer tooling, never run by CI).

    PYTHONPATH=<mmbench checkout> python conformance/pmr.py <PMR checkout> [--epochs 2] [--steps 3]

<PMR checkout>: a work tree of fanyunfeng-bit/Modal-Imbalance-PMR at 3615e48983555089b0e693380087617c3797a641
(only its .py files are needed). Nothing of it is edited: its `main_Prototype_grad.py` is imported
with stand-ins for the dataset modules and tensorboard it imports but this harness never calls.

Both sides start from the same weights (the official `AVClassifier` after its `weight_init`, mapped
by name onto mmbench's model), see the same fake CREMA-D-shaped batches (6 classes, spectrogram
1 x 64 x 48, 2 frames of 3 x 32 x 32) and train freely for `--epochs` x `--steps` steps (chained:
each side carries its own state). The official side runs its own `calculate_prototype` before
training and after each epoch and its own `train_epoch`; the project side runs `PMR.on_epoch_start`,
`PMR.update` per step and `PMR.on_epoch_end`, as the trainer does. Per step it prints the max
absolute and relative difference of the gradients the optimizer used, the parameters after the
step, the BN buffers, the prototype logits (-distances) and the prototype ratio; per epoch, the
prototypes.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import types
from collections import OrderedDict

import torch

from _common import Recorder, diff  # noqa: E402  (conformance/_common.py, beside this script)

BATCH, CLASSES = 8, 6
AUDIO, VISUAL = (64, 48), (3, 2, 32, 32)  # official layouts: spec (F, T), image (C, T, H, W)


def load_official(repo: str):
    """Import main_Prototype_grad.py; its dataset modules (librosa, PIL, csv files) and tensorboard
    are replaced by empty stand-ins: only the model, the prototype and the training functions run."""
    for name in ("dataset", "dataset.CGMNIST", "dataset.CramedDataset", "dataset.AVEDataset", "dataset.dataset",
                 "dataset.VGGSoundDataset"):
        mod = types.ModuleType(name)
        for cls in ("CGMNISTDataset", "CramedDataset", "AVEDataset", "AVDataset", "VGGSound"):
            setattr(mod, cls, object)
        sys.modules[name] = mod
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = object  # type: ignore[attr-defined]
    sys.modules["torch.utils.tensorboard"] = tb
    sys.path.insert(0, repo)
    spec = importlib.util.spec_from_file_location("pmr_official", f"{repo}/main_Prototype_grad.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def fake_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Official-format batches; each has every class (the official prototypes divide by the count)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.arange(BATCH) % CLASSES
        label = label[torch.randperm(BATCH, generator=g)]
        out.append((torch.randn(BATCH, *AUDIO, generator=g), torch.randn(BATCH, *VISUAL, generator=g), label))
    return out


def to_project(batch):
    spec, image, label = batch
    return {"audio": spec.unsqueeze(1).float(), "visual": image.permute(0, 2, 1, 3, 4).contiguous().float()}, label.long()


def project_name(official: str) -> str | None:
    for pre, rep in (("audio_net.", "encoders.audio.trunk."), ("visual_net.", "encoders.visual.trunk."),
                     ("fusion_module.fc_out.", "fusion.fc.")):
        if official.startswith(pre):
            return rep + official[len(pre):]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", help="work tree of fanyunfeng-bit/Modal-Imbalance-PMR")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="steps per epoch (the prototypes use len // 10 -> 1 batch)")
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--momentum-coef", type=float, default=0.5, help="non-zero, so the smoothing is compared")
    ap.add_argument("--fusion", default="concat", choices=["concat", "sum"])
    ap.add_argument("--mode", default="reset", choices=["reset", "chained"],
                    help="reset: each project step starts from the official state (params, BN buffers, SGD momentum, "
                    "prototypes) after the previous step, so a step is compared in isolation; chained: each side "
                    "trains freely (drift from ReLU crossings accumulates)")
    ap.add_argument("--official-distance", action="store_true",
                    help="diagnostic: the project step uses the official EU_dist (per-pair sqrt(dot)); shows which "
                    "differences come from the distance's reduction order")
    ap.add_argument("--verbose", action="store_true", help="the three worst gradient tensors per step")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    off = load_official(a.repo)
    sys.argv = ["official", "--dataset", "CREMAD", "--modulation", "Proto", "--fusion_method", a.fusion,
                "--alpha", str(a.alpha), "--momentum_coef", str(a.momentum_coef), "--learning_rate", "1e-3",
                "--modulation_starts", "0", "--modulation_ends", "70", "--train"]
    args = off.get_arguments()
    from utils.utils import setup_seed, weight_init  # the official repo's, on sys.path now

    setup_seed(0)
    omodel = off.AVClassifier(args)
    omodel.apply(weight_init)
    # At this commit the official ResNet18 defaults to compress=True: an extra conv bottleneck
    # (compress_layer / recover_layer, hard-coded to CREMA-D map sizes) after layer2. mmbench runs
    # the plain ResNet18 every method shares; switch the bottleneck off to compare the PMR algorithm.
    omodel.audio_net.compress = omodel.visual_net.compress = False
    init = {k: v.clone() for k, v in omodel.state_dict().items()}
    oopt = torch.optim.SGD(omodel.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=1e-4)
    osched = torch.optim.lr_scheduler.StepLR(oopt, args.lr_decay_step, args.lr_decay_ratio)

    from mmbench.methods import pmr as pmr_mod
    from mmbench.methods.base import METHODS, EpochContext, ModelSpec, StepContext, TrainSpec

    cls = METHODS.get("pmr")
    spec = ModelSpec(backbone="resnet18", fusion=a.fusion, num_classes=CLASSES,
                     input_shapes={"audio": [1, *AUDIO], "visual": [VISUAL[1], VISUAL[0], *VISUAL[2:]]})
    hp = cls.HParams(alpha=a.alpha, momentum_coef=a.momentum_coef, modulation_starts=0, modulation_ends=70)
    pm = cls(spec, hp, TrainSpec(epochs=a.epochs, optimizer={"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
                                 scheduler={"name": "step", "step_size": 70, "gamma": 0.1}))
    pm.setup(torch.device("cpu"))
    rename = {o: project_name(o) for o in init}
    if a.fusion == "sum":
        rename.update({k: k.replace("fusion_module.fc_x.", "fusion.heads.audio.").replace("fusion_module.fc_y.", "fusion.heads.visual.")
                       for k in init if k.startswith("fusion_module.")})
    proj_keys = set(pm.model.state_dict())
    missing = sorted({k.split(".")[0] + "." + k.split(".")[1] for k, v in rename.items() if v not in proj_keys})
    state = OrderedDict((rename[k], v.clone()) for k, v in init.items() if rename[k] in proj_keys)
    pm.model.load_state_dict(state, strict=True)
    print(f"official modules without a project counterpart (unused by the official forward): {missing or 'none'}")

    batches = fake_batches(a.steps, seed=1)
    orec = Recorder(omodel, oopt, rename=lambda n: rename.get(n) or n)
    prec = Recorder(pm.model, pm.optimizer)
    osims: list[tuple[torch.Tensor, ...]] = []
    psims: list[torch.Tensor] = []
    real_eu, real_pl = off.EU_dist, pmr_mod.prototype_logits

    def eu(x1, x2):  # the official distance, recorded (train_epoch calls it twice per step: audio, visual)
        d = real_eu(x1, x2)
        osims.append(d.detach().clone())
        return d

    def pl(f, p):
        s = -real_eu(f, p) if a.official_distance else real_pl(f, p)
        psims.append(s.detach().clone())
        return s

    off.EU_dist, pmr_mod.prototype_logits = eu, pl
    quiet = contextlib.redirect_stdout(io.StringIO())
    # official: prototypes before training, then per epoch train_epoch + calculate_prototype
    with quiet:
        oa, ov = off.calculate_prototype(args, omodel, batches, "cpu", 0)
    oprotos = [(oa.clone(), ov.clone())]
    oratios = []
    for epoch in range(a.epochs):
        n0 = len(osims)
        with quiet:
            off.train_epoch(args, epoch, omodel, "cpu", batches, oopt, osched, oa, ov)
            oa, ov = off.calculate_prototype(args, omodel, batches, "cpu", epoch, oa, ov)
        oprotos.append((oa.clone(), ov.clone()))
        for s in range(a.steps):
            sa, sv = osims[n0 + 2 * s], osims[n0 + 2 * s + 1]
            y = batches[s][2]
            score = [torch.softmax(-d, 1).gather(1, y[:, None]).sum() for d in (sa, sv)]
            oratios.append(float(score[0] / score[1]))

    ectx = lambda e: EpochContext(epoch=e, num_epochs=a.epochs, steps_per_epoch=a.steps, device=torch.device("cpu"),  # noqa: E731
                                  loaders={"train": batches}, prepare_batch=lambda raw, train: to_project(raw))
    def load_official_state(i: int) -> None:
        """reset mode: the project starts step i from the official state after step i-1."""
        st = orec.steps[i - 1]
        pm.model.load_state_dict({k: v for k, v in st["state"].items() if k in proj_keys}, strict=True)
        for n, p in pm.model.named_parameters():
            if n in st["momentum"]:
                pm.optimizer.state[p]["momentum_buffer"] = st["momentum"][n].clone()

    pm.train()
    pm.on_epoch_start(ectx(0))
    pprotos = [(pm.prototypes["audio"].clone(), pm.prototypes["visual"].clone())]
    pratios = []
    for epoch in range(a.epochs):
        if a.mode == "reset":
            pm.prototypes = {"audio": oprotos[epoch][0].clone(), "visual": oprotos[epoch][1].clone()}
        for s, b in enumerate(batches):
            if a.mode == "reset" and epoch * a.steps + s > 0:
                load_official_state(epoch * a.steps + s)
            x, y = to_project(b)
            logs = pm.update(x, y, StepContext(epoch, s, a.steps, a.epochs))
            pratios.append(float(logs["ratio"]))
        pm.scheduler_step(epoch)
        pm.on_epoch_end(ectx(epoch))
        pprotos.append((pm.prototypes["audio"].clone(), pm.prototypes["visual"].clone()))

    worst = 0.0
    print("\n| epoch | step | grads abs / rel | params abs / rel | BN buffers abs / rel | -dist rel (a, v) | ratio off / proj | rel |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (o, p) in enumerate(zip(orec.steps, prec.steps)):
        e, s = divmod(i, a.steps)
        g, pa, bf = diff(p["grad"], o["grad"]), diff(p["param"], o["param"]), diff(p["buffer"], o["buffer"])
        da = diff({"x": -psims[2 * i]}, {"x": osims[2 * i]})[1]
        dv = diff({"x": -psims[2 * i + 1]}, {"x": osims[2 * i + 1]})[1]
        rr = abs(pratios[i] - oratios[i]) / abs(oratios[i])
        worst = max(worst, g[1], pa[1], bf[1], da, dv, rr)
        print(f"| {e} | {s} | {g[0]:.2e} / {g[1]:.2e} | {pa[0]:.2e} / {pa[1]:.2e} | {bf[0]:.2e} / {bf[1]:.2e} | "
              f"{da:.1e}, {dv:.1e} | {oratios[i]:.6f} / {pratios[i]:.6f} | {rr:.1e} |")
    print("\n| prototypes after | audio abs / rel | visual abs / rel |\n|---|---|---|")
    for i, (o, p) in enumerate(zip(oprotos, pprotos)):
        da, dv = diff({"x": p[0]}, {"x": o[0]}), diff({"x": p[1]}, {"x": o[1]})
        worst = max(worst, da[1], dv[1])
        print(f"| {'init' if i == 0 else f'epoch {i - 1}'} | {da[0]:.2e} / {da[1]:.2e} | {dv[0]:.2e} / {dv[1]:.2e} |")
    if a.verbose:
        for i, (o, p) in enumerate(zip(orec.steps, prec.steps)):
            rows = []
            for k, vb in o["grad"].items():
                if k in p["grad"]:
                    d = (p["grad"][k].double() - vb.double()).abs().max().item()
                    rows.append((d / max(vb.abs().max().item(), 1e-30), d, vb.abs().max().item(), k))
            print(f"step {i}: worst grads", *[f"{r[3]} rel {r[0]:.1e} abs {r[1]:.1e} scale {r[2]:.1e}" for r in sorted(rows)[-3:]], sep="\n  ")
    n_compared = [diff(p["grad"], o["grad"])[2] for o, p in zip(orec.steps, prec.steps)]
    if not n_compared or min(n_compared) == 0:
        print("NOTHING COMPARED: the parameter names do not match")
        return 2
    print(f"tensors compared per step: {min(n_compared)} gradients of {len(orec.steps[0]['grad'])} official")
    print(f"\nmode: {a.mode}; steps compared: {len(prec.steps)}; max relative difference: {worst:.2e} "
          f"({'within' if worst <= 1e-5 else 'BEYOND'} 1e-5)")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
