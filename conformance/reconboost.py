#!/usr/bin/env python
"""ReconBoost: mmbench's `reconboost` steps against the official `train.py::main` (huacong/ReconBoost).

    python conformance/reconboost.py OFFICIAL [--stages 3] [--steps 2] [--batch 8] [--json OUT]

OFFICIAL: a checkout of huacong/ReconBoost, or its git directory (exported at HEAD to a temp folder).
The official `main()` runs unedited for `--stages` stages of 1 phase-1 epoch + 1 rectification epoch
(`--epochs_per_stage 1 --correct_epoch 1`; every other flag is the README's CREMA-D command without
`--use_pretrain`), each epoch = the same `--steps` fake batches. mmbench's method (recipes/reconboost.yaml,
same two overrides) starts from the official initial weights and sees the same batches. Per optimizer step
the script prints the max abs / rel differences of the gradients the optimizer uses, of every parameter and
BN buffer after the step (the members' train-mode no-grad forwards and the GA forward move BN statistics),
and of the losses; exit 0 when every relative difference is <= --tol (1e-5).

Stand-ins (the step logic is inline in `main()`, so `main()` itself is called, with these module-level names
of the official `train` module replaced; nothing in the official files is edited):
- `CramedDataset` -> a placeholder; `DataLoader` -> the list of fake batches (batch_size, shuffle and drop_last
  recorded); `SummaryWriter` -> no-op; `test` -> returns 0.0 (evaluation only: eval mode, no state change);
  `check_status` -> stops after `--stages` stages (the code: 1001).
- CUDA: `Tensor.cuda` / `Module.cuda` return self and `torch.tensor(..., device="cuda")` builds on the CPU
  (DynamicNet's boost rate), as the shared harness's Re-learning runner does for `.cuda()`.
- `AudioNet`, `VisualNet`, `DynamicNet` are wrapped only to keep a reference and the initial weights.
- Observation: global optimizer step pre/post hooks (grads, params, buffers) and `main`'s frame locals.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.optim.optimizer as optim_hooks
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CPU, REPO, Diff, export_official, fake_av, import_official, project_method, recipe_run, table  # noqa: E402

sys.path.insert(0, str(REPO))


def frame_locals(fn: str) -> dict[str, Any]:
    f = sys._getframe(1)
    while f is not None and f.f_code.co_name != fn:
        f = f.f_back
    return dict(f.f_locals) if f is not None else {}


class NoWriter:
    def __init__(self, *a: Any, **k: Any) -> None: ...
    def add_scalar(self, *a: Any, **k: Any) -> None: ...


def run_official(root: Path, batches: list[Any], stages: int, batch: int) -> dict[str, Any]:
    tr = import_official(root, "train.py", "reconboost_official_train")
    rec: dict[str, Any] = {"grads": [], "params": [], "buffers": [], "diag": [], "loader_kw": None, "init": {}}
    objs: dict[str, Any] = {}

    def keep(cls: Any, key: str) -> Any:
        def make(*a: Any, **k: Any) -> Any:
            obj = cls(*a, **k)
            objs[key] = obj
            rec["init"][key] = copy.deepcopy((obj.head if key == "net" else obj).state_dict())
            if key == "net":
                rec["init"]["boost_rate"] = float(obj.boost_rate.detach())
            return obj
        return make

    def loader(dataset: Any, **kw: Any) -> list[Any]:
        rec["loader_kw"] = {k: kw.get(k) for k in ("batch_size", "shuffle", "drop_last")}
        return batches

    tr.CramedDataset = lambda *a, **k: object()
    tr.DataLoader = loader
    tr.SummaryWriter = NoWriter
    tr.test = lambda *a, **k: 0.0
    tr.check_status = lambda stage: stage < stages
    tr.AudioNet = keep(tr.AudioNet, "audio")
    tr.VisualNet = keep(tr.VisualNet, "visual")
    tr.DynamicNet = keep(tr.DynamicNet, "net")

    def names() -> dict[int, str]:
        out: dict[int, str] = {}
        net = objs["net"]
        for n, p in net.head.named_parameters():
            out[id(p)] = f"head.{n}"
        out[id(net.boost_rate)] = "boost_rate"
        for m in ("audio", "visual"):
            for n, p in objs[m].named_parameters():
                out.setdefault(id(p), f"{m}.{n}")
        return out

    def pre(o: Any, *_: Any) -> None:
        nm = names()
        rec["grads"].append({nm[id(p)]: p.grad.detach().clone() for g in o.param_groups for p in g["params"] if p.grad is not None})
        loc = frame_locals("main")
        phase = 2 if o is loc.get("optimizer_correct") else 1
        d: dict[str, Any] = {"stage": loc["stage"], "phase": phase, "modality": loc["model_name"], "lr": o.param_groups[0]["lr"]}
        if phase == 1:
            d["boost_loss"] = float(loc["boosting_loss"].mean())
            oj = loc["out_join"].detach()
            lbl = loc["lbl"]
            d["q_true"] = float(oj.softmax(1).gather(1, lbl.view(-1, 1)).mean()) if oj.shape[1] > 1 else 1.0
            if loc["stage"] > 0:
                d["ga_loss"] = float(loc["ga_loss"])
        else:
            d["rectify_loss"] = float(loc["loss"].detach())
        rec["diag"].append(d)

    def post(o: Any, *_: Any) -> None:
        nm = names()
        ps = {}
        for m in ("audio", "visual"):
            ps.update({nm[id(p)]: p.detach().clone() for p in objs[m].parameters()})
        ps.update({nm[id(p)]: p.detach().clone() for p in objs["net"].head.parameters()})
        ps["boost_rate"] = objs["net"].boost_rate.detach().clone()
        rec["params"].append(ps)
        rec["buffers"].append({f"{m}.{n}": b.detach().clone() for m in ("audio", "visual") for n, b in objs[m].named_buffers()})

    h1 = optim_hooks.register_optimizer_step_pre_hook(pre)
    h2 = optim_hooks.register_optimizer_step_post_hook(post)
    real_tensor = torch.tensor
    real_tcuda, real_mcuda = torch.Tensor.cuda, nn.Module.cuda

    def tensor(*a: Any, device: Any = None, **k: Any) -> torch.Tensor:
        return real_tensor(*a, device=None if str(device).startswith("cuda") else device, **k)

    torch.tensor = tensor  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    tmp = tempfile.mkdtemp(prefix="reconboost-")
    argv = ["--dataset", "CREMAD", "--n_class", "6", "--batch_size", str(batch), "--boost_rate", "1.0",
            "--epochs_per_stage", "1", "--correct_epoch", "1", "--m_lr", "0.01", "--e_lr", "0.01",
            "--weight1", "5.0", "--weight2", "1.0", "--ckpt_dir", tmp, "--tensorboard_dir", tmp]
    saved = sys.argv
    try:
        sys.argv = ["train.py", *argv]
        args = tr.parse_args()
        tr.main(args=args, this_task="CREMAD")
    finally:
        sys.argv = saved
        torch.tensor = real_tensor  # type: ignore[assignment]
        torch.Tensor.cuda, nn.Module.cuda = real_tcuda, real_mcuda  # type: ignore[method-assign]
        h1.remove()
        h2.remove()
    rec["argv"] = argv
    return rec


def to_project(name: str) -> str | None:
    """official name (as recorded) -> mmbench model name; None for the code's orphaned per-model fc."""
    for pre, new in (("audio.audio_net.", "encoders.audio.trunk."), ("visual.visual_net.", "encoders.visual.trunk."),
                     ("head.", "head."), ("boost_rate", "boost_rate")):
        if name.startswith(pre):
            return new + name[len(pre):]
    return None


def run_project(off: dict[str, Any], batches: list[Any], stages: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from mmbench.methods.base import EpochContext, StepContext

    cfg = recipe_run("reconboost")
    cfg["method"].update({"epochs_per_stage": 1, "correct_epochs": 1})
    spec, img, _ = batches[0]
    shapes = {"audio": [1, *spec.shape[1:]], "visual": [img.shape[2], 3, *img.shape[3:]]}
    m = project_method(cfg, shapes, 6)
    state = {}
    for key in ("audio", "visual"):
        for n, t in off["init"][key].items():
            pn = to_project(f"{key}.{n}")
            if pn is not None:
                state[pn] = t
    for n, t in off["init"]["net"].items():
        state[f"head.{n}"] = t
    state["boost_rate"] = torch.tensor(off["init"]["boost_rate"])
    m.model.load_state_dict(state, strict=True)
    rec: dict[str, Any] = {"grads": [], "params": [], "buffers": [], "diag": [], "lr": []}
    names = {id(p): n for n, p in m.model.named_parameters()}
    hooks = []

    def attach() -> None:
        if getattr(m.optimizer, "_conf_hooked", False):
            return
        m.optimizer._conf_hooked = True
        def pre(o: Any, *_: Any) -> None:
            rec["grads"].append({names[id(p)]: p.grad.detach().clone() for g in o.param_groups for p in g["params"]
                                 if p.grad is not None})
            rec["lr"].append(o.param_groups[0]["lr"])

        def post(o: Any, *_: Any) -> None:
            rec["params"].append({n: p.detach().clone() for n, p in m.model.named_parameters()})
            rec["buffers"].append({n: b.detach().clone() for n, b in m.model.named_buffers()})

        hooks.extend([m.optimizer.register_step_pre_hook(pre), m.optimizer.register_step_post_hook(post)])

    epochs = 2 * stages
    for e in range(epochs):
        m.train()
        m.on_epoch_start(EpochContext(e, epochs, len(batches), CPU))
        attach()
        for s, (spec, img, y) in enumerate(batches):
            logs = m.update({"audio": spec.unsqueeze(1), "visual": img.permute(0, 2, 1, 3, 4)}, y, StepContext(e, s, len(batches), epochs))
            rec["diag"].append({k: float(v) for k, v in logs.items()})
    return rec, cfg


def group(name: str) -> str:
    return ("audio encoder" if name.startswith("encoders.audio") else "visual encoder" if name.startswith("encoders.visual")
            else "head" if name.startswith("head") else "boost rate")


def split(d: dict[str, torch.Tensor], official: bool) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for n, t in d.items():
        pn = to_project(n) if official else n
        if pn is not None:
            out.setdefault(group(pn), {})[pn] = t
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official")
    ap.add_argument("--seed", type=int, default=0, help="fake-batch seed (the code's own model seed is fixed at 0)")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="batches per epoch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--audio", default="64x48")
    ap.add_argument("--visual", default="64x64")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    root, commit = export_official(a.official)
    ahw = tuple(int(x) for x in a.audio.split("x"))
    vhw = tuple(int(x) for x in a.visual.split("x"))
    batches = fake_av(a.seed, a.steps, a.batch, ahw, vhw, 1)  # type: ignore[arg-type]
    off = run_official(root, batches, a.stages, a.batch)
    proj, cfg = run_project(off, batches, a.stages)
    print(f"# ReconBoost conformance: official {commit[:12]} vs mmbench at {REPO}")
    print(f"{a.stages} stages x (1 + 1 epochs) x {a.steps} steps, batch {a.batch}, audio {ahw}, visual 1x{vhw}; "
          f"official loader {off['loader_kw']}; official argv {' '.join(off['argv'][:-4])}; method {cfg['method']}; "
          f"optimizer {cfg['train']['optimizer']}\n")
    if len(off["grads"]) != len(proj["grads"]):
        print(f"**DIFFERS: {len(off['grads'])} official optimizer steps vs {len(proj['grads'])} project steps**")
        return 1
    d = Diff()
    for i, od in enumerate(off["diag"]):
        step = f"s{od['stage']}p{od['phase']}{od['modality'][0]}#{i}"
        for q in ("grads", "params", "buffers"):
            go, gp = split(off[q][i], True), split(proj[q][i], False)
            for g in sorted(set(go) | set(gp)):
                d.add(step, q, g, gp.get(g, {}), go.get(g, {}))
        pd = proj["diag"][i]
        for k in ("boost_loss", "q_true", "ga_loss", "rectify_loss"):
            if k in od:
                d.scalar(step, k, pd[k], od[k])
        d.scalar(step, "lr", proj["lr"][i], od["lr"])
    print(table(d))
    worst = d.worst()
    ok = worst <= a.tol
    print(f"\n**verdict: {'conforms' if ok else 'DIFFERS'}; max rel {worst:.2e}; bitwise {'yes' if d.bitwise() else 'no'}**")
    if a.json:
        Path(a.json).write_text(json.dumps({"method": "reconboost", "official_commit": commit, "rows": d.rows,
                                            "max_rel": worst, "bitwise": d.bitwise()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
