"""Conformance of mmbench's `valuation` against the official CVPR 2024 code (developer tooling; CI never runs it).

    python conformance/valuation.py --official /path/to/Valuate-and-Enhance-Multimodal-Cooperation [--n 24]

The official checkout (GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation @ 7ed12b0) is run unchanged on
small fake Kinetics-Sounds-shaped data (ResNet18 audio/visual, 31 classes), and three things are compared:
1. valuation: the official `execute_modulation` (sample_level.py) writes each train item's (c_a, c_v) to
   disk; mmbench's `Valuation.value` computes them from the same model and the same batches;
2. re-sampling: the official `AV_KS_Dataset_sample_level` / `AV_KS_Dataset_modality_level` (built by the
   official `execute_modulation` of each script, from the same numpy state for the modality level) give the
   next epoch's item list and drop flags; mmbench's `sample_plan` / `modality_plan` give its TrainPlan;
3. the training step with dropped features: the official `train_epoch` (Adam lr 5e-5, wd 1e-4, as its
   defaults) on batches carrying drop flags vs mmbench's `update` with the same tags.

Repairs needed to run the released code at all (in memory; the checkout is untouched): both scripts build
their re-sampled dataset with a `loader=` argument the dataset classes do not take (TypeError) -- the
harness drops that argument; the dataset classes read `ks_audio/...` lists and check `.npy` files exist,
relative to the working directory -- the harness writes such fake files in a temporary folder. tqdm, h5py
and tensorboard are stubbed (logging and the unused HDF5 loader only).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from common import renamer
from torch import nn


def stub(name: str, **attrs: object) -> None:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(m, k, v)
    sys.modules[name] = m


to_project = renamer([("audio_net.", "encoders.audio.trunk."), ("visual_net.", "encoders.visual.trunk."),
                      ("fusion_module.fc_out.", "fusion.fc.")])


def without_loader(cls: type) -> object:
    return lambda *a, **k: cls(*a, **{key: v for key, v in k.items() if key != "loader"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path)
    ap.add_argument("--n", type=int, default=24, help="fake train items")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    stub("tqdm", tqdm=lambda it, *a, **k: it)
    stub("h5py")
    stub("torch.utils.tensorboard", SummaryWriter=object)
    sys.path.insert(0, str(args.official / "code"))
    import modality_level  # noqa: E402
    import sample_level  # noqa: E402
    from datasets import dataloader as official_data  # noqa: E402
    from models.models import AVClassifier  # noqa: E402

    from mmbench.methods.base import METHODS, EpochContext, ModelSpec, StepContext, TrainSpec
    from mmbench.methods.valuation import modality_plan, sample_plan

    classes, F_, T_, frames, hw, n, bs = 31, 64, 48, 3, 32, args.n, args.batch
    torch.manual_seed(0)
    oargs = argparse.Namespace(n_classes=classes, warmup=1, log_path=tempfile.mkdtemp(), loader=165, part_ratio=0.5,
                               alpha=1.0, batch_size=bs)
    omodel = nn.DataParallel(AVClassifier(oargs))
    init = {k.removeprefix("module."): v.clone() for k, v in omodel.state_dict().items()}

    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, frames, hw, hw, generator=g)
    specs = torch.randn(n, 1, F_, T_, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[: n // 2] = 0  # an easy class, so some predictions are right and contributions vary
    batches = [(images[i:i + bs], specs[i:i + bs], labels[i:i + bs], torch.arange(i, min(i + bs, n)))
               for i in range(0, n, bs)]

    class Loader(list):
        dataset = range(n)

    # fake item lists and .npy files for the official dataset classes (they only check existence)
    work = Path(tempfile.mkdtemp())
    (work / "ks_audio" / "train").mkdir(parents=True)
    (work / "ks_audio" / "train_1fps_path.txt").write_text("".join(f"x/item{i} {int(labels[i])}\n" for i in range(n)))
    for i in range(n):
        (work / "ks_audio" / "train" / f"item{i}.npy").write_bytes(b"")
    sample_level.AV_KS_Dataset_sample_level = without_loader(official_data.AV_KS_Dataset_sample_level)
    modality_level.AV_KS_Dataset_modality_level = without_loader(official_data.AV_KS_Dataset_modality_level)

    cwd = os.getcwd()
    os.chdir(work)
    try:
        _, _, sample_loader = sample_level.execute_modulation(oargs, omodel, torch.device("cpu"), Loader(batches), "s", 0)
        contribution = np.load(Path(oargs.log_path) / "s" / "contribution" / "0.npy", allow_pickle=True).item()
        np.random.seed(11)
        _, _, modality_loader = modality_level.execute_modulation(oargs, omodel, torch.device("cpu"), Loader(batches), "m", 0)
    finally:
        os.chdir(cwd)

    cls = METHODS.get("valuation")
    spec = ModelSpec("resnet18", "concat", {"audio": [1, F_, T_], "visual": [frames, 3, hw, hw]}, classes)
    method = cls(spec, cls.HParams(level="sample", warmup=1),
                 TrainSpec(epochs=2, optimizer={"name": "adam", "lr": 5e-5, "weight_decay": 1e-4}, scheduler={"name": "none"}))
    method.model.load_state_dict({to_project(k): v for k, v in init.items()}, strict=True)
    method.setup(torch.device("cpu"))

    def raw_batches() -> list[dict[str, torch.Tensor]]:
        return [{"visual": im.permute(0, 2, 1, 3, 4).contiguous(), "audio": sp, "label": y, "index": idx}
                for im, sp, y, idx in batches]

    ctx = EpochContext(0, 2, len(batches), torch.device("cpu"),
                       loaders={"train": raw_batches(), "train_eval": Loader()},
                       prepare_batch=lambda raw, train: ({"audio": raw["audio"], "visual": raw["visual"]}, raw["label"]))
    c_a, c_v = method.value(ctx)
    want = [contribution[i] for i in range(n)]
    same_values = [(a, v) for a, v in zip(c_a, c_v)] == [(float(a), float(v)) for a, v in want]
    print(f"valuation: {n} items, contributions equal: {same_values} "
          f"(audio mean {np.mean(c_a):.3f}, visual mean {np.mean(c_v):.3f}; official {np.mean([w[0] for w in want]):.3f}, "
          f"{np.mean([w[1] for w in want]):.3f})")

    plan = sample_plan(c_a, c_v)
    ds = sample_loader.dataset
    names = [int(x.removeprefix("item")) for x in ds.data]
    print(f"sample-level plan: {len(plan.indices)} entries (official {len(names)}); items equal: {plan.indices == names}; "
          f"drop flags equal: {plan.tags == list(ds.drop)}")
    np.random.seed(11)  # the official modality-level call drew its part, then its copies, from this state
    mplan, _ = modality_plan(c_a, c_v, 0.5, 1.0)
    mds = modality_loader.dataset
    mnames = [int(x.removeprefix("item")) for x in mds.data]
    print(f"modality-level plan: {len(mplan.indices)} entries (official {len(mnames)}); items equal: {mplan.indices == mnames}; "
          f"drop flags equal: {mplan.tags == list(mds.drop)}")

    # the step with dropped features: one official train_epoch over two batches of the plan vs two updates
    sel = torch.tensor(plan.indices[-2 * bs:])
    tags = torch.tensor(plan.tags[-2 * bs:])
    step_batches = [(images[sel[i:i + bs]], specs[sel[i:i + bs]], labels[sel[i:i + bs]], sel[i:i + bs], tags[i:i + bs])
                    for i in range(0, len(sel), bs)]
    oopt = torch.optim.Adam(omodel.parameters(), lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    grads_off: list[dict[str, torch.Tensor]] = []
    params_off: list[dict[str, torch.Tensor]] = []
    oopt.register_step_pre_hook(lambda o, *a: grads_off.append({to_project(k.removeprefix("module.")): p.grad.clone()
                                                                  for k, p in omodel.named_parameters() if p.grad is not None}))
    oopt.register_step_post_hook(lambda o, *a: params_off.append({to_project(k.removeprefix("module.")): p.detach().clone()
                                                                   for k, p in omodel.named_parameters()}))
    sample_level.train_epoch(oargs, 1, omodel, torch.device("cpu"), Loader(step_batches), oopt)
    worst, bitwise = 0.0, True
    method.train()
    for s, (im, sp, y, _, t) in enumerate(step_batches):
        grads: dict[str, torch.Tensor] = {}
        h = method.optimizer.register_step_pre_hook(lambda o, *a: grads.update(
            {k: p.grad.clone() for k, p in method.model.named_parameters() if p.grad is not None}))
        method.update({"audio": sp, "visual": im.permute(0, 2, 1, 3, 4).contiguous()}, y, StepContext(1, s, 2, 2, t))
        h.remove()
        gd = max(((grads_off[s][k] - v).abs().max() / grads_off[s][k].abs().max().clamp_min(1e-12)).item() for k, v in grads.items())
        pd = max(((params_off[s][k] - p).abs().max()).item() for k, p in method.model.named_parameters())
        bitwise &= all(torch.equal(params_off[s][k], p) for k, p in method.model.named_parameters())
        worst = max(worst, gd)
        print(f"step {s} (drop flags {t.tolist()}): grads max rel {gd:.2e}; params max abs {pd:.2e}")
    print(f"training step: max relative gradient difference {worst:.2e}; parameters bitwise equal: {bitwise}")


if __name__ == "__main__":
    main()
