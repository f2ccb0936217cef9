#!/usr/bin/env python
"""InfoReg: mmbench's `inforeg` step against the official `train_epoch` (GeWu-Lab/InfoReg_CVPR2025).

    python conformance/inforeg.py OFFICIAL [--seed 0] [--epochs 3] [--steps 2] [--batch 8] [--close-at 2] [--json OUT]

OFFICIAL: a checkout of GeWu-Lab/InfoReg_CVPR2025, or its git directory (exported at HEAD to a temp folder).
Both sides start from the same weights and see the same fake batches; per step the script prints the max
abs / rel differences of the gradients the optimizer uses, the parameters and BN buffers after the step, and
the diagnostics (scores, betas, the window k and the Fisher trace per epoch). Exit 0 when every relative
difference is <= --tol (1e-5).

How the official code is driven (nothing of it is edited):
- `main.train_epoch(args, epoch, model, cpu, batches, optimizer, scheduler, writer, visual_trace_list,
  audio_trace_list)` is called once per epoch, as `main()` does; `args` from the official `get_arguments()`.
- The model: official `AVClassifier(args)` (torch.manual_seed(seed)), with the OGM-GE `weight_init` that
  `main()` applies (mmbench's copy: the repo's `utils/utils.py` is not in the repository), in DataParallel
  (on a CPU it passes straight through; the code needs `model.module`). SGD(lr, 0.9, wd 1e-4), StepLR(30, 0.1).
- Stand-ins for imports missing from the repository: `utils.utils` (setup_seed, weight_init) and
  `dataset.VGGSoundDataset` (never called); a no-op tensorboard writer.
- The modules the forward never uses for the loss (`head_audio`, `head_video`, `head2`, `fc_x`, `fc_y`,
  `fusion_module`) get `requires_grad=False`: the code's Fisher loop multiplies `module.weight.grad` of
  every Conv/Linear module with `requires_grad` and crashes on their `None` grads otherwise. They receive
  no gradient either way, so nothing compared changes.
- `--close-at E`: before epoch E both trace lists are set to 21 equal values, so k = 0 and the window is
  closed (the window otherwise needs > 10 epochs to close).
- Observation: optimizer pre/post-step hooks (grads, params, buffers) and the `train_epoch` frame's locals
  (score_a, score_v, beta, beta2, k) read at `optimizer.step()`.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CPU, REPO, Diff, export_official, fake_av, import_official, official_args, project_method,  # noqa: E402
                    recipe_run, table)

sys.path.insert(0, str(REPO))
UNUSED = ("head_audio", "head_video", "head2", "fc_x", "fc_y", "fusion_module")


class NoWriter:
    def add_scalar(self, *a: Any, **k: Any) -> None: ...
    def add_scalars(self, *a: Any, **k: Any) -> None: ...


def frame_locals(fn: str) -> dict[str, Any]:
    f = sys._getframe(1)
    while f is not None and f.f_code.co_name != fn:
        f = f.f_back
    return dict(f.f_locals) if f is not None else {}


def to_float(x: Any) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def run_official(root: Path, batches_per_epoch: list[list[Any]], seed: int, close_at: int | None) -> dict[str, Any]:
    from mmbench.models.classifier import weight_init

    main = import_official(root, "main.py", "inforeg_official_main", {
        "utils.utils": {"setup_seed": lambda *a, **k: None, "weight_init": weight_init},
        "dataset.VGGSoundDataset": {"VGGSound": type("VGGSound", (), {})}})
    args = official_args(main, "get_arguments", [])
    torch.manual_seed(seed)
    net = main.AVClassifier(args)
    net.apply(weight_init)
    for name in UNUSED:
        for p in getattr(net, name).parameters():
            p.requires_grad_(False)
    init = copy.deepcopy(net.state_dict())
    model = torch.nn.DataParallel(net, device_ids=[])
    opt = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, args.lr_decay_step, args.lr_decay_ratio)
    rec: dict[str, Any] = {"grads": [], "params": [], "buffers": [], "momentum": [], "diag": [], "traces": [], "k": [],
                           "trace_lists": []}
    names = {p: n.removeprefix("module.") for n, p in model.named_parameters()}

    def pre(o: Any, *_: Any) -> None:
        rec["grads"].append({names[p]: p.grad.detach().clone() for g in o.param_groups for p in g["params"] if p.grad is not None})
        loc = frame_locals("train_epoch")
        rec["diag"].append({"score_audio": to_float(loc["score_a"]), "score_visual": to_float(loc["score_v"]),
                            "beta_audio": to_float(loc["beta"]), "beta_visual": to_float(loc["beta2"])})

    def post(o: Any, *_: Any) -> None:
        rec["params"].append({n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()})
        rec["momentum"].append({names[p]: o.state[p]["momentum_buffer"].clone() for g in o.param_groups for p in g["params"]
                                if "momentum_buffer" in o.state.get(p, {})})
        rec["buffers"].append({n.removeprefix("module."): b.detach().clone() for n, b in model.named_buffers()})

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    audio_traces, visual_traces = [0] * 10, [0] * 10
    for e, batches in enumerate(batches_per_epoch):
        if e == close_at:
            audio_traces[:] = [1.0] * 21
        rec["trace_lists"].append([float(t) for t in audio_traces])
        out = main.train_epoch(args, e, model, CPU, batches, opt, sched, NoWriter(), visual_traces, audio_traces, None)
        rec["traces"].append(float(out[6]))  # fim_trace_audio
        assert audio_traces[-1] == out[6]
    rec["args"] = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    rec["init"] = init
    rec["lr"] = args.learning_rate
    return rec


def official_to_project(name: str) -> str | None:
    for pre, new in (("audio_net.", "encoders.audio.trunk."), ("visual_net.", "encoders.visual.trunk."), ("head.", "fusion.fc.")):
        if name.startswith(pre):
            return new + name[len(pre):]
    return None


def force(m: Any, off: dict[str, Any], i: int) -> None:
    """Teacher forcing: the project's model, BN buffers and SGD momentum set to the official state after step i."""
    with torch.no_grad():
        params = dict(m.model.named_parameters())
        for n, t in off["params"][i].items():
            pn = official_to_project(n)
            if pn is not None:
                params[pn].copy_(t)
        buffers = dict(m.model.named_buffers())
        for n, t in off["buffers"][i].items():
            pn = official_to_project(n)
            if pn is not None:
                buffers[pn].copy_(t)
        for n, t in off["momentum"][i].items():
            pn = official_to_project(n)
            if pn is not None:
                m.optimizer.state[params[pn]]["momentum_buffer"] = t.clone()


def run_project(off: dict[str, Any], batches_per_epoch: list[list[Any]], close_at: int | None,
                forced: bool, hp: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    from mmbench.methods.base import EpochContext, StepContext

    cfg = recipe_run("inforeg")
    cfg["method"].update(hp)
    spec, img, _ = batches_per_epoch[0][0]
    shapes = {"audio": [1, *spec.shape[1:]], "visual": [img.shape[2], 3, *img.shape[3:]]}
    m = project_method(cfg, shapes, 6)
    state = {}
    for n, t in off["init"].items():
        pn = official_to_project(n)
        if pn is not None:
            state[pn] = t
    m.model.load_state_dict(state, strict=True)
    rec: dict[str, Any] = {"grads": [], "params": [], "buffers": [], "diag": [], "traces": [], "k": []}
    names = {p: n for n, p in m.model.named_parameters()}
    m.optimizer.register_step_pre_hook(lambda o, *_: rec["grads"].append(
        {names[p]: p.grad.detach().clone() for g in o.param_groups for p in g["params"] if p.grad is not None}))
    m.optimizer.register_step_post_hook(lambda o, *_: (
        rec["params"].append({n: p.detach().clone() for n, p in m.model.named_parameters()}),
        rec["buffers"].append({n: b.detach().clone() for n, b in m.model.named_buffers()})))
    epochs = len(batches_per_epoch)
    i = 0
    for e, batches in enumerate(batches_per_epoch):
        if e == close_at:
            m.traces = [1.0] * 21
        if forced:
            m.traces = list(off["trace_lists"][e])
            if i > 0:
                force(m, off, i - 1)
        ectx = EpochContext(e, epochs, len(batches), CPU)
        m.train()
        rec["k"].append(m.on_epoch_start(ectx)["window_k"])
        for s, (spec, img, y) in enumerate(batches):
            if forced and s > 0:
                force(m, off, i - 1)
            i += 1
            logs = m.update({"audio": spec.unsqueeze(1), "visual": img.permute(0, 2, 1, 3, 4)}, y, StepContext(e, s, len(batches), epochs))
            rec["diag"].append({k: to_float(logs[k]) for k in ("score_audio", "score_visual", "beta_audio", "beta_visual")})
        m.scheduler_step(e)
        rec["traces"].append(m.on_epoch_end(ectx)["fisher_trace"])
    return rec, cfg


def groups(d: dict[str, torch.Tensor], official: bool) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"audio encoder": {}, "visual encoder": {}, "head": {}}
    for n, t in d.items():
        pn = official_to_project(n) if official else n
        if pn is None:
            continue
        g = "audio encoder" if pn.startswith("encoders.audio") else "visual encoder" if pn.startswith("encoders.visual") else "head"
        out[g][pn] = t
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per epoch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--audio", default="64x48")
    ap.add_argument("--visual", default="64x64")
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--close-at", type=int, default=2, help="epoch before which the window is forced shut (-1: never)")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--mode", choices=["forced", "free"], default="forced",
                    help="forced: before each step the project is set to the official state after the previous one "
                         "(the per-step verdict); free: the project's own trajectory")
    ap.add_argument("--hp", action="append", default=[], metavar="KEY=JSON", help="override a recipe hyper-parameter")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    close_at = None if a.close_at < 0 else a.close_at
    root, commit = export_official(a.official)
    ahw = tuple(int(x) for x in a.audio.split("x"))
    vhw = tuple(int(x) for x in a.visual.split("x"))
    flat = fake_av(a.seed, a.epochs * a.steps, a.batch, ahw, vhw, a.frames)  # type: ignore[arg-type]
    per_epoch = [flat[e * a.steps:(e + 1) * a.steps] for e in range(a.epochs)]
    off = run_official(root, per_epoch, a.seed, close_at)
    hp = {k: json.loads(v) for k, v in (x.split("=", 1) for x in a.hp)}
    proj, cfg = run_project(off, per_epoch, close_at, a.mode == "forced", hp)

    d = Diff()
    opt = cfg["train"]["optimizer"]
    print(f"# InfoReg conformance: official {commit[:12]} vs mmbench at {REPO}")
    print(f"seed {a.seed}, {a.epochs} epochs x {a.steps} steps, batch {a.batch}, audio {ahw}, visual {a.frames}x{vhw}, "
          f"window closed from epoch {close_at}; mode {a.mode}; method {cfg['method']}; recipe optimizer {opt} (official lr {off['lr']}, momentum 0.9, wd 1e-4)\n")
    for i in range(len(off["grads"])):
        e, s = divmod(i, a.steps)
        step = f"e{e}s{s}"
        for q in ("grads", "params", "buffers"):
            go, gp = groups(off[q][i], True), groups(proj[q][i], False)
            for g in go:
                if go[g] or gp[g]:
                    d.add(step, q, g, gp[g], go[g])
        for k, v in off["diag"][i].items():
            d.scalar(step, k, proj["diag"][i][k], v)
    for e in range(a.epochs):
        d.scalar(f"e{e} end", "fisher_trace_audio", proj["traces"][e], off["traces"][e])
    print(table(d))
    print(f"\nwindow k per epoch (project): {proj['k']}")
    worst = d.worst()
    ok = worst <= a.tol
    print(f"\n**verdict: {'conforms' if ok else 'DIFFERS'}; max rel {worst:.2e}; bitwise {'yes' if d.bitwise() else 'no'}**")
    if a.json:
        Path(a.json).write_text(json.dumps({"method": "inforeg", "official_commit": commit, "rows": d.rows,
                                            "max_rel": worst, "bitwise": d.bitwise(), "k": proj["k"],
                                            "mode": a.mode, "method_cfg": cfg["method"]}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
