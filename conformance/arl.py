"""Conformance of mmbench's `arl` step against the official ICCV 2025 code (developer tooling; CI never runs it).

    python conformance/arl.py --official /path/to/ICCV2025-ARL [--weights code|paper] [--steps 4] [--batch 8]

The official checkout (shicaiwei123/ICCV2025-ARL @ 358af4f) is run through its own `train_epoch`
(`main_arl_variance.py`) on its own `AVClassifier_AUXI_Weight` (ResNet18 `resnet18_weight` encoders with
`GradScale`, `ConcatFusion_AUXI` 1024 -> 6) with `cramed_arl.sh`'s settings (gamma 4, T 8, start 5, SGD lr
1e-3 momentum 0.9 wd 1e-4, MultiStepLR [70, 150], clip 40), one batch per call, from the official
`weight_init`. The first batch runs in epoch 5 (warm-up: loss f + a + v, no scaling, weights set to 0.5),
the others in epoch 6 (ARL: loss f + 4 (a + v), encoder gradients scaled). mmbench's `arl` Method is
built with the same settings, loaded with the same initial weights, and takes the same batches. Per step it
prints the max abs / rel difference of the gradients the optimizer used, the parameters after the step,
the BN buffers, and of the coefficients w (the code's `weight`, recorded from its softmax call).

Driven without editing the checkout:
- modules `main_arl_variance.py` imports only for data and logging (dataset.*, tensorboard, tqdm) and
  `timm` (imported by the unused Swin model) are stubbed in sys.modules;
- `models/backbone.py`'s `GradScale.backward` reads `weight = ctx.saved_tensors` (a tuple) and raises
  TypeError at the first step after warm-up; the script loads the file's text and changes that one line to
  `weight, = ctx.saved_tensors` in memory (`--unpatched` runs it as released and shows the error);
- `--weights paper` adds the one thing the code omits: the coefficients it computes are assigned to
  `args.audio_weight` / `args.visual_weight` (done by the recorder that wraps the module's `F.softmax`,
  right after the code's first softmax of a step), so the encoders read them at the next forward.
`--weights code` runs the released step; `--compare-paper` runs mmbench's paper default against the
released code to show how far apart they are by design.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import io
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def stub_modules() -> None:
    def mod(name: str, **attrs: object) -> None:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m

    dummy = type("Unused", (), {})
    mod("tqdm", tqdm=lambda it, **k: it)
    mod("dataset")
    mod("dataset.CramedDataset", CramedDataset=dummy, CramedDataset_swin=dummy)
    mod("dataset.KSDataset", KSDataset=dummy, KSDataset_swin=dummy)
    mod("dataset.VGGSoundDataset", VGGSound=dummy, VGGSound_swin=dummy)
    mod("dataset.AVEDataset", AVEDataset=dummy, AVEDataset_swin=dummy)
    mod("dataset.Kinect400", Kinect400=dummy)
    mod("torch.utils.tensorboard", SummaryWriter=dummy)
    mod("timm")
    mod("timm.models")
    mod("timm.models.layers", DropPath=dummy, to_2tuple=dummy, trunc_normal_=dummy)


def load_backbone(root: Path, patch: bool) -> None:
    """models/backbone.py, with GradScale's tuple unpacking fixed in memory unless `patch` is False."""
    import models  # the official package (a namespace package: no __init__)

    path = root / "models" / "backbone.py"
    src = path.read_text()
    bad = "weight = ctx.saved_tensors"
    assert bad in src, "GradScale.backward changed; re-read the official code"
    if patch:
        src = src.replace(bad, "weight, = ctx.saved_tensors")
        print("note: GradScale.backward's `weight = ctx.saved_tensors` (a tuple) unpacked in memory")
    module = types.ModuleType("models.backbone")
    module.__file__ = str(path)
    module.__package__ = "models"
    sys.modules["models.backbone"] = module
    exec(compile(src, str(path), "exec"), module.__dict__)
    setattr(models, "backbone", module)


class SoftmaxRecorder:
    """Stands in for the module's `F`: records the code's coefficient softmax (the first of its two per
    step) and, for `paper`, assigns it where the encoders read it."""

    def __init__(self, functional: Any, args: Any, assign: bool) -> None:
        self._f, self._args, self._assign = functional, args, assign
        self.weights: list[torch.Tensor] = []
        self._calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def softmax(self, x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the code's softmax without dim
            out = self._f.softmax(x, *a, **k)
        if self._calls % 2 == 0:
            self.weights.append(out.clone())
            if self._assign:
                self._args.audio_weight, self._args.visual_weight = out[0], out[1]
        self._calls += 1
        return out


class Recorder:
    def __init__(self, opt: torch.optim.Optimizer, names: dict[int, str]) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params: list[dict[str, torch.Tensor]] = []
        opt.register_step_pre_hook(lambda o, *a: self.grads.append(
            {names[id(p)]: p.grad.detach().clone() for g in o.param_groups for p in g["params"] if p.grad is not None}))
        opt.register_step_post_hook(lambda o, *a: self.params.append(
            {names[id(p)]: p.detach().clone() for g in o.param_groups for p in g["params"]}))


def to_project(name: str) -> str:
    name = name.removeprefix("module.")
    for pre, rep in (("audio_net.", "encoders.audio.trunk."), ("visual_net.", "encoders.visual.trunk."),
                     ("fusion_module.fc_out.", "fusion.fc.")):
        if name.startswith(pre):
            return rep + name[len(pre):]
    raise KeyError(name)


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    abs_d, rel_d = 0.0, 0.0
    for k, x in a.items():
        d = (x.double() - b[k].double()).abs().max().item()
        abs_d, rel_d = max(abs_d, d), max(rel_d, d / max(x.double().abs().max().item(), 1e-12))
    return abs_d, rel_d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="checkout of shicaiwei123/ICCV2025-ARL")
    ap.add_argument("--weights", default="code", choices=["code", "paper"],
                    help="code: the released step; paper: the released step plus the omitted assignment")
    ap.add_argument("--compare-paper", action="store_true", help="mmbench's paper default against the released code")
    ap.add_argument("--steps", type=int, default=4, help="batches: the first in warm-up (epoch 5), the rest in epoch 6")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--audio", default="64x64", help="spectrogram size FxT (64x64 pools a 2x2 map)")
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--hw", type=int, default=64)
    ap.add_argument("--unpatched", action="store_true", help="run GradScale as released (raises TypeError)")
    args = ap.parse_args()

    stub_modules()
    root = args.official.resolve()
    sys.path.insert(0, str(root))
    load_backbone(root, patch=not args.unpatched)
    import main_arl_variance as official  # noqa: E402
    from models.basic_model import AVClassifier_AUXI_Weight  # noqa: E402
    from utils.utils import weight_init  # noqa: E402

    from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

    oargs = argparse.Namespace(dataset="CREMAD", modulation="Normal", fusion_method="concat", modality="full",
                               backbone="resnet", batch_size=args.batch, epochs=100, learning_rate=1e-3,
                               lr_decay_step="[70,150]", lr_decay_ratio=0.1, gamma=4.0, T=8.0, start=5,
                               current_epoch=1, p=[1, 1])
    torch.manual_seed(0)
    omodel = AVClassifier_AUXI_Weight(oargs)
    omodel.apply(weight_init)
    init = {k: v.clone() for k, v in omodel.state_dict().items()}
    model = nn.DataParallel(omodel)  # the code reaches its args through model.module; no GPU: a plain call
    assert not model.device_ids, "run on a machine without CUDA (DataParallel would scatter)"
    oopt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    osched = torch.optim.lr_scheduler.MultiStepLR(oopt, eval(oargs.lr_decay_step), oargs.lr_decay_ratio)
    paper_official = args.weights == "paper"
    rec_sm = SoftmaxRecorder(official.F, oargs, assign=paper_official)
    official.F = rec_sm

    f_, t_ = (int(x) for x in args.audio.split("x"))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, f_, t_, generator=g), torch.randn(args.batch, 3, args.frames, args.hw, args.hw, generator=g),
                torch.randint(0, 6, (args.batch,), generator=g)) for _ in range(args.steps)]
    epochs = [5] + [6] * (args.steps - 1)

    orec = Recorder(oopt, {id(p): n for n, p in model.named_parameters()})
    bn_off: list[dict[str, torch.Tensor]] = []
    off_w: list[torch.Tensor | None] = []
    for i, b in enumerate(batches):
        before = len(rec_sm.weights)
        with contextlib.redirect_stdout(io.StringIO()):
            official.train_epoch(oargs, epochs[i], model, torch.device("cpu"), [b], oopt, osched, 0.5, 0.5)
        bn_off.append({k: v.clone() for k, v in omodel.state_dict().items() if "running" in k})
        off_w.append(rec_sm.weights[before] if len(rec_sm.weights) > before else None)  # warm-up computes none

    cls = METHODS.get("arl")
    mine = "paper" if (paper_official or args.compare_paper) else "code"
    hp = cls.HParams(weights=mine, gamma=4.0, temperature=8.0, start=5, entropy_floor=0.3, clip_norm=40.0)
    spec = ModelSpec("resnet18", "concat", {"audio": [1, f_, t_], "visual": [args.frames, 3, args.hw, args.hw]}, 6)
    method = cls(spec, hp, TrainSpec(epochs=100, optimizer={"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
                                     scheduler={"name": "none"}))
    method.model.load_state_dict({to_project(k): v for k, v in init.items()}, strict=True)
    method.setup(torch.device("cpu"))
    method.train()
    prec = Recorder(method.optimizer, {id(p): n for n, p in method.model.named_parameters()})
    bn_proj, coefs = [], []
    for i, (spec_b, img, y) in enumerate(batches):
        logs = method.update({"audio": spec_b.unsqueeze(1).float(), "visual": img.permute(0, 2, 1, 3, 4).contiguous().float()},
                             y, StepContext(epochs[i], 0, 1, 100))
        coefs.append(torch.tensor([logs["coef_audio"], logs["coef_visual"]], dtype=torch.float64))
        bn_proj.append({k: v.clone() for k, v in method.model.state_dict().items() if "running" in k})

    print(f"ARL conformance: official {'released step' if not paper_official else 'step + the omitted assignment'}"
          f" vs mmbench weights={mine}; {len(orec.grads)} / {len(prec.grads)} optimizer steps, batch {args.batch}, "
          f"epochs {epochs}, audio {f_}x{t_}, {args.frames} frames {args.hw}x{args.hw}")
    worst, bitwise = 0.0, True
    for s in range(min(len(orec.grads), len(prec.grads))):
        og = {to_project(k): v for k, v in orec.grads[s].items()}
        op = {to_project(k): v for k, v in orec.params[s].items()}
        ga, gr = diff(og, prec.grads[s])
        pa, pr = diff(op, prec.params[s])
        ba, br = diff({to_project(k): v for k, v in bn_off[s].items()}, bn_proj[s])
        ow = off_w[s]
        wtxt = "w: none (warm-up)" if ow is None else (
            f"w official {[round(x, 6) for x in ow.tolist()]} abs diff {(ow.double() - coefs[s]).abs().max().item():.1e}")
        worst = max(worst, gr, pr, br)
        same = all(torch.equal(v, prec.params[s][k]) for k, v in op.items()) and all(
            torch.equal(v, prec.grads[s][k]) for k, v in og.items())
        bitwise &= same
        print(f"step {s} (epoch {epochs[s]}): grads abs {ga:.2e} rel {gr:.2e}; params abs {pa:.2e} rel {pr:.2e}; "
              f"BN abs {ba:.2e} rel {br:.2e}; {wtxt}; "
              f"bitwise {same}")
    print(f"max relative difference {worst:.2e}; gradients and parameters bitwise equal: {bitwise}")


if __name__ == "__main__":
    main()
