"""Conformance of mmbench's `opm` step against the official TPAMI 2024 code (developer tooling; CI never runs it).

    python conformance/opm.py --official /path/to/BML_TPAMI2024 [--mode opm|ogm] [--steps 4] [--batch 8]

The official checkout (GeWu-Lab/BML_TPAMI2024 @ 4b3aa4f) is run UNCHANGED: its `code/main.py` `train` trains
its own `Classifier` (ResNet18 audio/visual, `ConcatFusion` 1024 -> 31) with `Modality_drop` (OPM, the
`train_opm.sh` settings q_base 0.5, lam 0.5, p_exe 0.7) or OGM-GE (`train_ogm.sh`: alpha 0.8, window 0..60)
on small fake KS-shaped batches, epoch 6 (the first after the code's warm-up `epoch <= 5`), AdamW lr 5e-5
wd 0.01. mmbench's `opm` Method is built with the same settings, loaded with the official initial weights,
and takes the same batches; before each batch both sides start from the same numpy and torch generator
states, so the drop draws (numpy for "drop at all", torch's CPU generator for the masks) and the GE noise
are the same. Per step it prints the max abs / rel difference of the gradients the optimizer used, the
parameters after the step and the BN buffers.

Driven without editing the checkout: the released `code/models/Classifier.py` does not even compile (a
stray `]` after `torch.chunk(cleaned_fea,num_mod,dim=0)`, line 53); the script loads its text, removes that
one character in memory, and registers the result as `models.Classifier`. Modules `main.py` imports only for its data pipeline and logging (dataset.*,
utils.log_file, tensorboard, tqdm) are stubbed in sys.modules; `Classifier`, `Modality_drop`, `calcu_q` and
`train` are the official ones. Each batch is one call of `train` (a one-batch epoch).
"""
from __future__ import annotations

import argparse
import warnings
import contextlib
import importlib.machinery
import sys
import types
from pathlib import Path

import numpy as np
import torch
from common import StepRecorder as Recorder
from common import per_tensor_diff as diff
from common import renamer


def stub_modules() -> None:
    def mod(name: str, **attrs: object) -> None:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch's import-time scans call find_spec
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m

    dummy = type("Unused", (), {})

    class Bar(contextlib.nullcontext):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(self)

        def update(self, n: int) -> None:
            pass

    mod("tqdm", tqdm=Bar)
    mod("dataset")
    mod("dataset.KS", KSDataset=dummy)
    mod("dataset.spatial_transforms", get_spatial_transform=dummy, get_val_spatial_transforms=dummy)
    mod("dataset.loader", VideoLoaderHDF5=dummy)
    mod("utils")
    mod("utils.log_file", Logger=dummy)
    mod("torch.utils.tensorboard", SummaryWriter=dummy)


def load_repaired_classifier(code: Path) -> None:
    """Compile the released models/Classifier.py with its one stray ']' removed (in memory only)."""
    import models  # the official package (its __init__ is empty or absent)

    src = (code / "models" / "Classifier.py").read_text()
    bad = "torch.chunk(cleaned_fea,num_mod,dim=0) ]"
    if bad in src:
        src = src.replace(bad, "torch.chunk(cleaned_fea,num_mod,dim=0)")
        print("note: repaired the released Classifier.py's syntax error (a stray ']') in memory")
    module = types.ModuleType("models.Classifier")
    module.__file__ = str(code / "models" / "Classifier.py")
    module.__package__ = "models"
    sys.modules["models.Classifier"] = module
    exec(compile(src, module.__file__, "exec"), module.__dict__)
    setattr(models, "Classifier", module)


to_project = renamer([("encoder_1.", "encoders.audio.trunk."), ("encoder_2.", "encoders.visual.trunk."),
                      ("fusion_model.fxy.", "fusion.fc.")])


VERBOSE = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="checkout of GeWu-Lab/BML_TPAMI2024")
    ap.add_argument("--mode", default="opm", choices=["opm", "ogm"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--plus", action="store_true", help="ogm: the code's OGM+ switch")
    ap.add_argument("--verbose", action="store_true", help="name every tensor that differs")
    ap.add_argument("--theta-grad", default="official", choices=["official", "none"],
                    help="mmbench's theta_grad (official = the released spurious gradient, to compare bit for bit)")
    args = ap.parse_args()
    global VERBOSE
    VERBOSE = args.verbose

    stub_modules()
    code = args.official / "code"
    sys.path.insert(0, str(code))
    load_repaired_classifier(code)
    import main as official  # noqa: E402
    from config import Config  # noqa: E402
    from models.Classifier import Classifier  # noqa: E402

    from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

    cfg = Config()
    opm = args.mode == "opm"
    warnings.filterwarnings("ignore", message="has not attribute")  # use_OGM_plus is an argparse-only flag
    cfg.parse({"use_adam_drop": opm, "use_modulation": not opm, "q_base": 0.5, "lam": 0.5, "p_exe": 0.7,
               "alpha": 0.8, "modulation_starts": 0, "modulation_ends": 60, "modulation": "OGM_GE",
               "use_OGM_plus": args.plus})
    torch.manual_seed(0)
    omodel = Classifier(cfg, device="cpu")
    omodel.apply(official.weight_init)
    init = {k: v.clone() for k, v in omodel.state_dict().items()}
    oopt = torch.optim.AdamW(omodel.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    osched = torch.optim.lr_scheduler.StepLR(oopt, step_size=cfg.lr_decay_step, gamma=cfg.lr_decay_ratio)

    F_, T_, frames, hw, classes, epoch = 64, 48, 3, 32, 31, 6
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, F_, T_, generator=g), torch.randn(args.batch, 3, frames, hw, hw, generator=g),
                torch.randint(0, classes, (args.batch,), generator=g)) for _ in range(args.steps)]
    rng = [(np.random.RandomState(100 + i).get_state(), torch.Generator().manual_seed(200 + i).get_state())
           for i in range(args.steps)]

    orec = Recorder(oopt, {id(p): n for n, p in omodel.named_parameters()})
    bn_off = []
    for i, b in enumerate(batches):
        np.random.set_state(rng[i][0])
        torch.set_rng_state(rng[i][1])
        official.train(cfg, epoch, omodel, torch.device("cpu"), [b], oopt, osched)
        bn_off.append({k: v.clone() for k, v in omodel.state_dict().items() if "running" in k})

    cls = METHODS.get("opm")
    hp = cls.HParams(mode=args.mode, q_base=0.5, lam=0.5, p_exe=0.7, alpha=0.8, ge=True, modulation_starts=0,
                     modulation_ends=60, theta_grad=args.theta_grad, plus=args.plus)
    spec = ModelSpec("resnet18", "concat", {"audio": [1, F_, T_], "visual": [frames, 3, hw, hw]}, classes)
    method = cls(spec, hp, TrainSpec(epochs=100, optimizer={"name": "adamw", "lr": cfg.learning_rate, "weight_decay": 0.01},
                                     scheduler={"name": "step", "step_size": cfg.lr_decay_step, "gamma": cfg.lr_decay_ratio}))
    method.model.load_state_dict({to_project(k): v for k, v in init.items()}, strict=True)
    method.setup(torch.device("cpu"))
    method.train()
    prec = Recorder(method.optimizer, {id(p): n for n, p in method.model.named_parameters()})
    bn_proj = []
    for i, (spec_b, img, y) in enumerate(batches):
        np.random.set_state(rng[i][0])
        torch.set_rng_state(rng[i][1])
        method.update({"audio": spec_b.unsqueeze(1).float(), "visual": img.permute(0, 2, 1, 3, 4).contiguous().float()},
                      y, StepContext(epoch, 0, 1, 100))
        bn_proj.append({k: v.clone() for k, v in method.model.state_dict().items() if "running" in k})

    print(f"OPM conformance: mode={args.mode}, theta_grad={args.theta_grad}, {len(orec.grads)} official / {len(prec.grads)} mmbench optimizer steps, "
          f"batch {args.batch}, epoch {epoch}")
    if len(orec.grads) != len(prec.grads):
        print("different numbers of optimizer steps (a skipped step on one side only)")
    worst, bitwise = 0.0, True
    for s in range(min(len(orec.grads), len(prec.grads))):
        og = {to_project(k): v for k, v in orec.grads[s].items()}
        op = {to_project(k): v for k, v in orec.params[s].items()}
        ga, gr = diff(og, prec.grads[s])
        if VERBOSE:
            for k in og:
                d = (og[k] - prec.grads[s][k]).abs().max().item()
                if d > 1e-6:
                    print("   ", k, d, og[k].abs().max().item())
        pa, pr = diff(op, prec.params[s])
        worst = max(worst, gr, pr)
        bitwise &= all(torch.equal(v, prec.params[s][k]) for k, v in op.items())
        print(f"step {s}: grads abs {ga:.2e} rel {gr:.2e}; params abs {pa:.2e} rel {pr:.2e}")
    for i in range(len(bn_off)):
        ba, br = diff({to_project(k): v for k, v in bn_off[i].items()}, bn_proj[i])
        worst = max(worst, br)
        print(f"batch {i}: BN buffers abs {ba:.2e} rel {br:.2e}")
    print(f"max relative difference {worst:.2e}; parameters bitwise equal: {bitwise}")


if __name__ == "__main__":
    main()
