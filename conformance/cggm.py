"""Conformance of mmbench's `cggm` step against the official CGGM code (developer tooling; CI never runs it).

    python conformance/cggm.py --official /path/to/CGGM [--setting food|iemo] [--steps 4] [--batch 8]

The official checkout (zrguo/CGGM @ 21e428cb7e666b8640453557380bb6414b7d246f) is driven through ONE call of
its own `train_model` with `num_epochs = 1`, so its training closure `train` runs UNCHANGED: the fused CE plus
lamda * l_gm of the previous step, the classifiers on the detached features, `cal_cos`, `cal_coeff`, the
coefficients, l_gm, the encoder-gradient scaling, the classifier step, the clip and the model step; then its
`evaluate` on one validation batch and the plateau scheduler.
- `--setting food` (default): `src/foodtrain.py`, two modalities (its `vision_encoder` / `text_encoder`
  names), Food-101's 101 classes, AdamW lr 1e-3 wd 6e-3, classifiers AdamW 5e-4 wd 3e-3, lamda 0.05, rou 1.3,
  clip 0.8 (run/food_run.py).
- `--setting iemo`: `src/msatrain.py` with dataset `iemo`, THREE modalities (`encoders.{i}`), 4 classes, Adam
  lr 1e-3, classifiers Adam 5e-4 without weight decay, lamda 0.2 (run/mosi_run.py, iemo's class count).

What is official and what stands in:
- official: `train_model` (foodtrain / msatrain), `ClassifierGuided` with its `Classifier.forward`
  (proj1 twice, ReLU, out_layer), `cal_coeff` with `train_eval_food` / `train_eval_iemo`, `cal_cos`;
- stand-ins: the fusion MODEL. The official FoodModel / MSAModel are transformers on token sequences that
  mmbench does not have; the harness hands `train_model` an adapter around a copy of mmbench's model with
  the `shared` fusion (one linear head for every modality, the one fusion form where the official
  "every classifier against the one `out_layer.weight`" applies as is): its encoders are registered under the
  official names, the shared head as `out_layer`, and it returns the official `(preds, hs)` with
  hs = detached features shaped (1, B, D). Each official `Classifier`'s transformer `bone` is replaced by
  an identity (mmbench's classifier has no bone), so `bone(x)[0]` is the pooled feature;
- `vit` / `bert` (foodtrain) return the given modality inputs; `transformers` and `einops` are stubbed in
  sys.modules; `use_cuda` is set (the CPU path leaves `ti` unbound) with `Tensor.cuda` and `torch.cuda.device`
  as no-ops. Batches of <= 10 samples, so the code does not wrap the model in DataParallel.
mmbench's `cggm` Method (ModelSpec(tiny, shared)) starts from the same weights and takes the same batches. Per
step it prints the max abs / rel difference of the gradients the model optimizer used (after scaling and
clipping), the model parameters and the classifier parameters after the step, the BN buffers, the
classifiers' batch accuracies (`cal_coeff`), the cosines (`cal_cos`) and the loss (CE + lamda * l_gm).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import types
from argparse import Namespace
from pathlib import Path
from unittest import mock

import torch
from torch import nn

SETTINGS = {
    "food": dict(module="src.foodtrain", classes=101, names=["vision_encoder", "text_encoder"],
                 shapes={"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}, optim="adamw", wd=6e-3, cls_wd=3e-3, lamda=0.05),
    "iemo": dict(module="src.msatrain", classes=4, names=None,
                 shapes={"text": [12], "audio": [1, 8, 8], "visual": [2, 3, 8, 8]}, optim="adam", wd=0.0, cls_wd=0.0,
                 lamda=0.2),
}


def stub_modules() -> None:
    for name, attrs in (("einops", {"rearrange": None}), ("transformers", {"ViTModel": None, "BertModel": None})):
        m = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m


class FoodAdapter(nn.Module):
    """The official `model(v, t) -> (preds, hs)` around mmbench's encoders and shared head."""

    def __init__(self, mm: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.mods = list(mm.modalities)
        self.names = names
        for n, m in zip(names, self.mods):
            setattr(self, n, mm.encoders[m])
        self.out_layer = mm.fusion.head
        self.weights = dict(mm.fusion.weights)

    def fused(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = torch.stack([self.weights[m] * self.out_layer(f) for m, f in zip(self.mods, feats)]).sum(0)
        return out, [f.clone().detach()[None] for f in feats]

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.fused([getattr(self, self.names[0])(v), getattr(self, self.names[1])(t)])


class MSAAdapter(FoodAdapter):
    """The official `model([x_0, .., x_{M-1}]) -> (preds, hs)`, encoders under `encoders.{i}`."""

    def __init__(self, mm: nn.Module) -> None:
        nn.Module.__init__(self)
        self.mods = list(mm.modalities)
        self.encoders = nn.ModuleList([mm.encoders[m] for m in self.mods])
        self.out_layer = mm.fusion.head
        self.weights = dict(mm.fusion.weights)

    def forward(self, x: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[override]
        return self.fused([enc(xi) for enc, xi in zip(self.encoders, x)])


class Recorder:
    def __init__(self, opt: torch.optim.Optimizer, names: dict[int, str]) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params: list[dict[str, torch.Tensor]] = []
        opt.register_step_pre_hook(lambda o, *a: self.grads.append(
            {names[id(p)]: p.grad.detach().clone() for g in o.param_groups for p in g["params"] if p.grad is not None}))
        opt.register_step_post_hook(lambda o, *a: self.params.append(
            {names[id(p)]: p.detach().clone() for g in o.param_groups for p in g["params"]}))


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    abs_d, rel_d = 0.0, 0.0
    for k, x in a.items():
        d = (x.double() - b[k].double()).abs().max().item()
        abs_d, rel_d = max(abs_d, d), max(rel_d, d / max(x.double().abs().max().item(), 1e-12))
    return abs_d, rel_d


def scalars(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="checkout of zrguo/CGGM")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="food")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    if args.batch > 10:
        ap.error("--batch must be <= 10 (the official code wraps larger batches in DataParallel)")
    s = SETTINGS[args.setting]
    stub_modules()
    sys.path.insert(0, str(args.official))
    import importlib

    official = importlib.import_module(s["module"])
    msamodel = importlib.import_module("models.msamodel")

    from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

    mods, classes, lamda = list(s["shapes"]), s["classes"], s["lamda"]
    cls = METHODS.get("cggm")
    torch.manual_seed(0)
    hp = cls.HParams(rou=1.3, lamda=lamda, clip=0.8, cls_lr=5e-4, cls_weight_decay=s["cls_wd"])
    method = cls(ModelSpec("tiny", "shared", s["shapes"], classes), hp,
                 TrainSpec(epochs=1, optimizer={"name": s["optim"], "lr": 1e-3, "weight_decay": s["wd"]},
                           scheduler={"name": "none"}))
    mm_init = copy.deepcopy(method.model)
    cls_init = copy.deepcopy(method.classifiers)
    method.setup(torch.device("cpu"))
    method.train()

    # ---- the official side ----------------------------------------------------------------------------
    model = FoodAdapter(mm_init, s["names"]) if args.setting == "food" else MSAAdapter(mm_init)
    dim = mm_init.fusion.head.in_features
    classifier = msamodel.ClassifierGuided(classes, len(mods), dim, 1, 1)
    for i, m in enumerate(mods):
        classifier.classifers[i].bone = nn.Identity()
        classifier.classifers[i].proj1.load_state_dict(cls_init[m].proj1.state_dict())
        classifier.classifers[i].out_layer.load_state_dict(cls_init[m].out_layer.state_dict())
    opt_cls = torch.optim.AdamW if s["optim"] == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=1e-3, weight_decay=s["wd"])
    cls_optimizer = opt_cls(classifier.parameters(), lr=5e-4, weight_decay=s["cls_wd"])
    model.train()

    g = torch.Generator().manual_seed(1)
    data = [({m: torch.randn(args.batch, *sh, generator=g) for m, sh in s["shapes"].items()},
             torch.randint(0, classes, (args.batch,), generator=g)) for _ in range(args.steps + 1)]
    train, valid = data[:-1], data[-1:]

    def official_batch(x: dict[str, torch.Tensor], y: torch.Tensor) -> object:
        if args.setting == "food":  # (text, image, labels); the stubs hand the inputs through
            ids = x[mods[1]]
            return {"input_ids": ids, "attention_mask": ids, "token_type_ids": ids}, x[mods[0]], y[:, None]
        return {"text": x[mods[0]], "audio": x[mods[1]], "vision": x[mods[2]], "labels": y[:, None]}

    o_names = {id(p): n for n, p in model.named_parameters()}
    orec = Recorder(optimizer, o_names)
    crec = Recorder(cls_optimizer, {id(p): n for n, p in classifier.named_parameters()})
    o_acc: list[list[float]] = []
    o_cos: list[list[torch.Tensor]] = []
    real_coeff, real_cos = classifier.cal_coeff, official.cal_cos
    classifier.cal_coeff = lambda *a: o_acc.append(real_coeff(*a)) or o_acc[-1]
    official.cal_cos = lambda *a: o_cos.append(real_cos(*a)) or o_cos[-1]
    crit = nn.CrossEntropyLoss()
    losses: list[torch.Tensor] = []

    def criterion(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = crit(p, y)
        if torch.is_grad_enabled() and model.training:  # per step: the fused CE, then one per classifier
            losses.append(out)  # the code adds lamda * l_gm to the fused CE in place
        return out

    hyp = Namespace(num_mod=len(mods), n_train=len(train), batch_size=args.batch, use_cuda=True, modulation="cggm",
                    lamda=lamda, rou=1.3, clip=0.8, dataset=args.setting, num_epochs=1, n_valid=1, n_test=1)
    settings = {"model": model, "optimizer": optimizer, "criterion": criterion, "classifier": classifier,
                "cls_optimizer": cls_optimizer,
                "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=10, factor=0.1),
                "vit": lambda image: {"last_hidden_state": image},
                "bert": lambda ti, ta, tt: {"last_hidden_state": ti}}
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self), \
            mock.patch.object(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext()):
        official.train_model(settings, hyp, [official_batch(*b) for b in train], [official_batch(*b) for b in valid],
                             [official_batch(*b) for b in valid])
    o_loss = [float(x.detach()) for x in losses[::1 + len(mods)]]
    bn_off = {k: v for k, v in model.state_dict().items() if "running" in k}

    # ---- mmbench ----------------------------------------------------------------------------------------
    to_off = {id(p): n for n, p in model.named_parameters()}  # the same tensor objects' names, via the copy
    mm_names = dict(zip((id(p) for p in method.model.parameters()), (to_off[id(p)] for p in mm_init.parameters())))
    prec = Recorder(method.optimizer, mm_names)
    cls_names = {id(p): f"classifers.{i}.{n}" for i, m in enumerate(mods) for n, p in method.classifiers[m].named_parameters()}
    pcrec = Recorder(method.cls_optimizer, cls_names)
    p_acc: list[list[float]] = []
    p_cos: list[list[float]] = []
    p_loss: list[float] = []
    for i, (x, y) in enumerate(train):
        logs = method.update(x, y, StepContext(0, i, len(train), 1))
        p_acc.append([logs[f"cls_acc_{m}"] for m in mods])
        p_cos.append([float(logs[f"cos_{m}"]) for m in mods])
        p_loss.append(float(logs["loss"]))
    bn_proj = {}
    for k, v in method.model.state_dict().items():
        if "running" in k:
            enc = k.split(".")[1]
            bn_proj[k.replace(f"encoders.{enc}.", f"{s['names'][mods.index(enc)]}." if s["names"]
                              else f"encoders.{mods.index(enc)}.")] = v

    print(f"CGGM conformance ({args.setting}, {official.__name__}.train_model, {len(mods)} modalities, "
          f"{args.steps} steps, batch {args.batch}): official vs mmbench")
    worst, bitwise = 0.0, True
    for t in range(len(train)):
        ga, gr = diff(orec.grads[t], prec.grads[t])
        pa, pr = diff(orec.params[t], prec.params[t])
        ca, cr = diff(crec.params[t], pcrec.params[t])
        acc_eq = [float(a) for a in o_acc[t]] == p_acc[t]
        cos_r = scalars([float(c) for c in o_cos[t]], p_cos[t])
        loss_r = scalars([o_loss[t]], [p_loss[t]])
        worst = max(worst, gr, pr, cr, cos_r, loss_r)
        bitwise &= all(torch.equal(v, prec.params[t][k]) for k, v in orec.params[t].items())
        bitwise &= all(torch.equal(v, pcrec.params[t][k]) for k, v in crec.params[t].items())
        print(f"step {t}: grads abs {ga:.2e} rel {gr:.2e}; params abs {pa:.2e} rel {pr:.2e}; classifiers abs {ca:.2e} "
              f"rel {cr:.2e}; cos rel {cos_r:.2e}; loss {o_loss[t]:.6f} vs {p_loss[t]:.6f} (rel {loss_r:.2e}); "
              f"accuracies equal {acc_eq} {p_acc[t]}")
    if bn_off:
        ba, br = diff(bn_off, bn_proj)
        worst = max(worst, br)
        print(f"BN buffers after the epoch: abs {ba:.2e} rel {br:.2e}")
    print(f"max relative difference {worst:.2e}; parameters bitwise equal: {bitwise}")


if __name__ == "__main__":
    main()
