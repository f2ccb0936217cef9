"""Conformance of mmbench's `mslr` against the MSLR of the AGM repo (developer tooling, never run by CI).

    PYTHONPATH=<mmbench checkout> python conformance/mslr.py <AGM checkout> [--epochs 2] [--steps 3]

<AGM checkout>: a work tree of lihong2303/AGM_ICCV2023 at 5a65542c70b1c7c15c5df291e77fa9cf2bbb9549 (its .py
files). Nothing of it is edited; librosa and tensorboard, which it imports but this harness never
calls, are stand-ins when absent. Its own `utils/config.py::Config` (argparse), `set_seed`,
`Cramed_Task.build_model` / `build_optimizer` (the sum-fusion `AVClassifier_Sum`, SGD 0.9 / wd 1e-4,
StepLR) and `weight_init`, then `run/CREMAD_main.py::train` once per epoch with `methods MSLR`.

The per-epoch rate ratios are passed in (epoch 1: 1.0 / 1.0, as the code starts; later epochs
`--ratios`, e.g. what `acc / mean(previous 5)` gave), because the code computes them inline in
`CREMAD_main` from TEST accuracies, which mmbench deliberately replaces by validation accuracies;
`rate_ratios` (the memory rule) is unit-tested. The project side gets the same ratios in
`MSLR.ratios` and runs `MSLR.update` per step. Reset mode (default): every project step starts from
the official parameters, BN buffers and SGD momentum after the previous step. Prints per step the
max abs / rel difference of the gradients the optimizer used, the parameters after the step, the
BN buffers, and the coefficients.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import tempfile
import types
from collections import OrderedDict

import torch

from _common import Recorder, diff  # conformance/_common.py, beside this script

BATCH, CLASSES = 8, 6
AUDIO, VISUAL = (64, 48), (3, 1, 32, 32)  # official layouts: spec (F, T), image (C, T, H, W)


def load_official(repo: str):
    for name in ("librosa", "torch.utils.tensorboard"):
        try:
            importlib.import_module(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.SummaryWriter = object  # type: ignore[attr-defined]
            sys.modules[name] = mod
    sys.path.insert(0, repo)
    return (importlib.import_module("utils.config"), importlib.import_module("utils.function_tools"),
            importlib.import_module("tasks.CREMAD_task"), importlib.import_module("run.CREMAD_main"))


class NullWriter:
    def add_scalar(self, *a, **k) -> None: ...
    def add_scalars(self, *a, **k) -> None: ...


def project_name(official: str) -> str:
    for pre, rep in (("audio_net.", "encoders.audio.trunk."), ("visual_net.", "encoders.visual.trunk."),
                     ("audio_cls.", "fusion.heads.audio."), ("visual_cls.", "fusion.heads.visual.")):
        if official.startswith(pre):
            return rep + official[len(pre):]
    return official


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", help="work tree of lihong2303/AGM_ICCV2023")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ratios", default="1.25,0.8", help="audio,visual r for the epochs after the first")
    ap.add_argument("--mode", default="reset", choices=["reset", "chained"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ra, rv = (float(x) for x in a.ratios.split(","))

    config, ft, task_mod, cmain = load_official(a.repo)
    tmp = tempfile.mkdtemp(prefix="mslr_conf_")
    sys.argv = ["main.py", "--dataset", "CREMAD", "--methods", "MSLR", "--modality", "Multimodal", "--fusion_type",
                "late_fusion", "--device", "cpu", "--random_seed", "0", "--batch_size", str(BATCH), "--EPOCHS",
                str(a.epochs), "--learning_rate", "1e-3", "--modulation_starts", "1", "--modulation_ends", "100",
                "--expt_dir", tmp]
    cfgs = config.Config()
    ft.set_seed(cfgs.random_seed)
    task = types.SimpleNamespace(cfgs=cfgs)
    omodel = task_mod.Cramed_Task.build_model(task)
    task.model = omodel
    oopt, osched = task_mod.Cramed_Task.build_optimizer(task)
    omodel.apply(ft.weight_init)
    init = {k: v.clone() for k, v in omodel.state_dict().items()}

    from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

    cls = METHODS.get("mslr")
    spec = ModelSpec(backbone="resnet18", fusion="sum", num_classes=CLASSES,
                     input_shapes={"audio": [1, *AUDIO], "visual": [VISUAL[1], VISUAL[0], *VISUAL[2:]]})
    pm = cls(spec, cls.HParams(init_coeffs={"audio": 0.9, "visual": 1.1}),  # the code's CREMA-D c0
             TrainSpec(epochs=a.epochs, optimizer={"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
                       scheduler={"name": "step", "step_size": 70, "gamma": 0.1}))
    pm.setup(torch.device("cpu"))
    proj_keys = set(pm.model.state_dict())
    missing = sorted(k for k in init if project_name(k) not in proj_keys)
    pm.model.load_state_dict(OrderedDict((project_name(k), v.clone()) for k, v in init.items() if k not in missing),
                             strict=True)
    print(f"official keys without a project counterpart: {missing or 'none'}")

    g = torch.Generator().manual_seed(1)
    batches = [([f"fake_{i}" for i in range(BATCH)], torch.randn(BATCH, *AUDIO, generator=g),
                torch.randn(BATCH, *VISUAL, generator=g), torch.arange(BATCH) % CLASSES) for _ in range(a.steps)]
    orec = Recorder(omodel, oopt, rename=project_name)
    prec = Recorder(pm.model, pm.optimizer)
    ratios = [(1.0, 1.0)] + [(ra, rv)] * (a.epochs - 1)
    logger = types.SimpleNamespace(info=lambda *x, **k: None)
    with contextlib.redirect_stdout(io.StringIO()):
        for e in range(a.epochs):  # official epochs are 1-based
            cmain.train(omodel, batches, oopt, osched, logger, cfgs, e + 1, torch.device("cpu"), NullWriter(),
                        0.0, 0.0, *ratios[e])

    pm.train()
    coeffs = []
    for e in range(a.epochs):
        pm.ratios = {"audio": ratios[e][0], "visual": ratios[e][1]}
        for s, (_, spec_, image, label) in enumerate(batches):
            i = e * a.steps + s
            if a.mode == "reset" and i > 0:
                st = orec.steps[i - 1]
                pm.model.load_state_dict({k: v for k, v in st["state"].items() if k in proj_keys}, strict=True)
                for n, p in pm.model.named_parameters():
                    if n in st["momentum"]:
                        pm.optimizer.state[p]["momentum_buffer"] = st["momentum"][n].clone()
            x = {"audio": spec_.unsqueeze(1).float(), "visual": image.permute(0, 2, 1, 3, 4).contiguous().float()}
            logs = pm.update(x, label, StepContext(e, s, a.steps, a.epochs))
            coeffs.append((logs["coeff_audio"], logs["coeff_visual"]))
        pm.scheduler_step(e)

    worst = 0.0
    print("\n| epoch | step | grads abs / rel | params abs / rel | BN buffers abs / rel | coeff a / v (official: c0 * r) |")
    print("|---|---|---|---|---|---|")
    for i, (o, p) in enumerate(zip(orec.steps, prec.steps)):
        e, s = divmod(i, a.steps)
        gd, pa, bf = diff(p["grad"], o["grad"]), diff(p["param"], o["param"]), diff(p["buffer"], o["buffer"])
        want = (0.9 * ratios[e][0], 1.1 * ratios[e][1])
        cd = max(abs(coeffs[i][0] - want[0]), abs(coeffs[i][1] - want[1]))
        worst = max(worst, gd[1], pa[1], bf[1], cd)
        print(f"| {e} | {s} | {gd[0]:.2e} / {gd[1]:.2e} | {pa[0]:.2e} / {pa[1]:.2e} | {bf[0]:.2e} / {bf[1]:.2e} | "
              f"{coeffs[i][0]:.4f} / {coeffs[i][1]:.4f} ({want[0]:.4f} / {want[1]:.4f}) |")
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
