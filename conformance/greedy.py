"""Conformance of mmbench's `greedy` step against the official code (developer tooling; CI never runs it).

    python conformance/greedy.py --official /path/to/greedy_multimodal_learning \
        [--epochs 3] [--steps-per-epoch 4] [--batch 4] [--size 64] [--running-average official|fixed]

The official checkout (nyukat/greedy_multimodal_learning @ a190e03) is run UNCHANGED: its `Model_.train_loop`
(src/framework.py) trains its own `MMTM_MVCNN` (two torchvision ResNet18 branches, MMTM blocks after layer2-4,
a linear head per branch) with `train.blend_loss` and the `Bias_Mitigation_Strong` callback at the
training_guided.gin settings (SGD lr 0.1, momentum 0, wd 0; epsilon 0.01, window 5, starting_epoch 2), on
small fake two-view batches, with zero validation/test steps. mmbench's `greedy` Method is built as
ModelSpec(resnet18, mmtm) with the first view as a 3-channel "audio" image and the second as a one-frame
"visual" clip, loaded with the official initial weights, and takes the same batches in the same epochs
(official epoch k = mmbench epoch k - 1). Per optimizer step it prints the max abs / rel difference of the
gradients the optimizer used, the parameters after the step, the BN buffers, the MMTM running-average
excitations, d_BDR and the curation state the step leaves for the next one.

Driven without editing the checkout: modules imported only for data, configuration and logging (gin, argh, tqdm,
src.dataset) are stubbed in sys.modules (gin.configurable = identity, so every default is the code's own
and the gin file's values are passed explicitly); the MMTM blocks put their running averages on
"cuda:<device>" when built, so while the model is constructed `Tensor.to("cuda:…")` is pointed at the CPU.
The official running average of the second branch is updated with the first branch's excitation: compare
with `--running-average official` (the default here) for the code as released; `fixed` shows how far the fix
moves the step (it differs from the first curation step that cares for modality 1 on).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import io
import sys
import types
from pathlib import Path
from typing import Any

import torch


def stub_modules() -> None:
    def mod(name: str, **attrs: object) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m
        return m

    def configurable(fn: Any = None, *a: object, **k: object) -> Any:
        return fn if callable(fn) else (lambda f: f)

    gin = mod("gin", configurable=configurable, parse_config_files_and_bindings=lambda *a, **k: None)
    gin.config = mod("gin.config", _CONFIG={}, _OPERATIVE_CONFIG={})  # type: ignore[attr-defined]
    mod("argh", dispatch_command=lambda *a, **k: None, arg=lambda *a, **k: (lambda f: f))
    mod("src.dataset", get_mvdcndata=None)
    mod("tqdm", tqdm=lambda it=None, *a, **k: it)


@contextlib.contextmanager
def cuda_strings_on_cpu() -> Any:
    real = torch.Tensor.to

    def to(self: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        if a and isinstance(a[0], str) and a[0].startswith("cuda"):
            a = ("cpu", *a[1:])
        return real(self, *a, **k)

    torch.Tensor.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.to = real  # type: ignore[method-assign]


BLOCK = {"mmtm2": "1", "mmtm3": "2", "mmtm4": "3"}  # official block -> mmbench stage index


def to_project(name: str) -> str:
    for view, m in (("net_view_0.", "audio"), ("net_view_1.", "visual")):
        if name.startswith(view + "fc."):
            return f"fusion.heads.{m}." + name[len(view) + 3:]
        if name.startswith(view):
            return f"encoders.{m}.trunk." + name[len(view):]
    block, rest = name.split(".", 1)
    rest = rest.replace("fc_visual.", "fc_excite.audio.").replace("fc_skeleton.", "fc_excite.visual.")
    return f"mmtm.{BLOCK[block]}.{rest}"


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    abs_d, rel_d = 0.0, 0.0
    for k, x in a.items():
        y = b[k]
        d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        scale = max(x.double().abs().max().item(), 1e-12) if x.numel() else 1.0
        abs_d, rel_d = max(abs_d, d), max(rel_d, d / scale)
    return abs_d, rel_d


class Recorder:
    """Optimizer pre/post step hooks: the gradients the step used, the parameters after it."""

    def __init__(self, opt: torch.optim.Optimizer, names: dict[int, str]) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params: list[dict[str, torch.Tensor]] = []
        opt.register_step_pre_hook(lambda o, *a: self.grads.append(
            {names[id(p)]: p.grad.detach().clone() for g in o.param_groups for p in g["params"] if p.grad is not None}))
        opt.register_step_post_hook(lambda o, *a: self.params.append(
            {names[id(p)]: p.detach().clone() for g in o.param_groups for p in g["params"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="checkout of nyukat/greedy_multimodal_learning")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="not 2: the official `acc` reads a 2-element label as a pair")
    ap.add_argument("--size", type=int, default=64, help="image side of both views")
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--running-average", default="official", choices=["official", "fixed"])
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batches")
    ap.add_argument("--scale0", type=float, default=1.0,
                    help="multiply the first view (e.g. 0: an uninformative first branch, so curation cares for it)")
    args = ap.parse_args()

    stub_modules()
    sys.path.insert(0, str(args.official))
    import train as official_train  # noqa: E402  (blend_loss, acc)
    from src import callbacks as ocb  # noqa: E402
    from src.framework import Model_  # noqa: E402
    from src.model import MMTM_MVCNN  # noqa: E402

    from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

    E, S, B, H, C = args.epochs, args.steps_per_epoch, args.batch, args.size, args.classes
    torch.manual_seed(args.seed)
    with cuda_strings_on_cpu():
        omodel = MMTM_MVCNN(nclasses=C, num_views=2, pretraining=False, device="cpu")
    init = {k: v.clone() for k, v in omodel.state_dict().items()}
    oopt = torch.optim.SGD(omodel.parameters(), lr=0.1, weight_decay=0.0, momentum=0)
    g = torch.Generator().manual_seed(1000 + args.seed)
    batches = [(torch.arange(B), torch.randn(B, 2, 3, H, H, generator=g), torch.randint(0, C, (B,), generator=g))
               for _ in range(S * E)]
    for _, x, _ in batches:
        x[:, 0] *= args.scale0

    bias = ocb.Bias_Mitigation_Strong(epsilon=0.01, curation_windowsize=5, branchnames=["net_view_0", "net_view_1"],
                                      starting_epoch=2, MMTMnames=["visual", "skeleton"])
    official_steps: list[dict[str, Any]] = []

    class Record(ocb.Callback):
        def on_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
            mp = self.model_pytoune
            official_steps.append({
                "d_bdr": float(bias.d_BDR), "curation": bool(mp.curation_mode),
                "caring": mp.caring_modality if mp.curation_mode else None,
                "avg": {f"mmtm.{BLOCK[b]}.avg_excitation_{m}": getattr(omodel, b).__dict__[f"running_avg_weight_{o}"].clone()
                        for b in BLOCK for m, o in (("audio", "visual"), ("visual", "skeleton"))},
                "bn": {to_project(k): v.clone() for k, v in omodel.state_dict().items() if "running" in k},
            })

    orec = Recorder(oopt, {id(p): n for n, p in omodel.named_parameters()})
    runner = Model_(model=omodel, optimizer=oopt, loss_function=official_train.blend_loss, metrics=[official_train.acc],
                    nummodalities=2)
    callbacks = [bias, Record()]
    for c in callbacks:
        c.set_model(omodel, ignore=False)
        c.set_optimizer(oopt)
    with contextlib.redirect_stdout(io.StringIO()):  # the official progress bar
        runner.train_loop(Stream(batches), valid_generator=[], test_generator=[], epochs=E,
                          steps_per_epoch=S, validation_steps=0, test_steps=0, callbacks=callbacks)

    cls = METHODS.get("greedy")
    hp = cls.HParams(epsilon=0.01, window=5, starting_epoch=1, ratio=4, running_average=args.running_average)
    spec = ModelSpec("resnet18", "mmtm", {"audio": [3, H, H], "visual": [1, 3, H, H]}, C, init="backbone")
    method = cls(spec, hp, TrainSpec(epochs=E, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
                                     scheduler={"name": "none"}))
    missing = method.model.load_state_dict({to_project(k): v for k, v in init.items()}, strict=False)
    assert not missing.unexpected_keys and all("avg_" in k for k in missing.missing_keys), missing
    method.setup(torch.device("cpu"))
    method.train()
    prec = Recorder(method.optimizer, {id(p): n for n, p in method.model.named_parameters()})
    ours: list[dict[str, Any]] = []
    for e in range(E):
        for s in range(S):
            _, x, y = batches[e * S + s]
            method.update({"audio": x[:, 0], "visual": x[:, 1].unsqueeze(1)}, y, StepContext(e, s, S, E))
            ours.append({"d_bdr": method.d_bdr, "curation": method.curation,
                         "caring": method.caring if method.curation else None,
                         "avg": {k: v.clone() for k, v in method.model.state_dict().items() if "avg_excitation" in k},
                         "bn": {k: v.clone() for k, v in method.model.state_dict().items() if "running" in k}})

    print(f"Greedy conformance: running_average={args.running_average}, seed {args.seed}, {E} epochs x {S} steps, batch {B}, "
          f"{H}x{H} views (first x{args.scale0}), {len(orec.grads)} official / {len(prec.grads)} mmbench optimizer steps")
    print(f"{'step':>4} {'ep':>2} {'grad abs':>9} {'grad rel':>9} {'param abs':>9} {'param rel':>9} {'BN rel':>9} "
          f"{'avg rel':>9} {'d_BDR off':>10} "
          f"{'d_BDR diff':>10} {'next: official / mmbench':>26}")
    worst, bitwise, same_state = 0.0, True, True
    for t in range(min(len(orec.grads), len(prec.grads))):
        og = {to_project(k): v for k, v in orec.grads[t].items()}
        op = {to_project(k): v for k, v in orec.params[t].items()}
        if set(og) != set(prec.grads[t]):
            print(f"step {t}: tensors with gradients differ: {sorted(set(og) ^ set(prec.grads[t]))}")
            same_state = False
        ga, gr = diff({k: v for k, v in og.items() if k in prec.grads[t]}, prec.grads[t])
        pa, pr = diff(op, prec.params[t])
        o, p = official_steps[t], ours[t]
        _, br = diff(o["bn"], p["bn"])
        _, ar = diff(o["avg"], p["avg"])
        dd = abs(o["d_bdr"] - p["d_bdr"])
        state_o = f"{'curate ' + str(o['caring']) if o['curation'] else 'joint'}"
        state_p = f"{'curate ' + str(p['caring']) if p['curation'] else 'joint'}"
        same_state &= state_o == state_p
        worst = max(worst, gr, pr, br, ar)
        bitwise &= all(torch.equal(v, prec.params[t][k]) for k, v in op.items())
        print(f"{t:>4} {t // S:>2} {ga:9.2e} {gr:9.2e} {pa:9.2e} {pr:9.2e} {br:9.2e} {ar:9.2e} {o['d_bdr']:10.5f} {dd:10.2e} "
              f"{state_o + ' / ' + state_p:>26}")
    print(f"max relative difference {worst:.2e}; parameters bitwise equal: {bitwise}; "
          f"same curation decisions: {same_state}")


class Stream:
    """The official loop re-iterates its generator every epoch (`cycle`); one shared iterator makes each
    epoch continue where the last stopped, as a shuffled loader gives new batches."""

    def __init__(self, batches: list[Any]) -> None:
        self.it = iter(batches)

    def __iter__(self) -> Any:
        return self.it


if __name__ == "__main__":
    main()
