"""`cggm`: Classifier-guided Gradient Modulation (CGGM, Guo et al., NeurIPS 2024).

Source: zrguo/CGGM @ 21e428cb7e666b8640453557380bb6414b7d246f (`src/foodtrain.py` and `src/msatrain.py`
`train_model.train`, `models/msamodel.py` `ClassifierGuided` / `Classifier`, `src/eval_metrics.py` `cal_cos`,
defaults in `run/food_run.py`). docs/methods/cggm.md.

Why it balances: a separate classifier per modality, trained on the DETACHED encoder features with its own
optimizer, measures how fast each modality is learning (the change of its batch accuracy since the previous
step, d_m = acc_m(t) - acc_m(t-1)). A modality that improves faster than the others gets a smaller
coefficient, c_m = (sum_n d_n + 1e-8 - d_m) / (sum_n d_n + 1e-8): its encoder's gradient is scaled by
c_m * rou (magnitude), and a direction term l_gm = (sum_m |c_m| - sum_m c_m cos_m) / M pulls the fusion
output weights towards the unimodal classifiers' output weights, weighted towards the slow modalities
(cos_m: cosine between the flattened output-layer WEIGHTS, not gradients, despite the code's names).

The step, in the official order: CE(fused) + lamda * l_gm(previous step) -> backward; classifiers:
sum_m CE(classifier_m(phi_m.detach())) -> backward; cos_m from the weights as they are now; batch accuracies,
d_m against the previous step's (kept across steps and epochs, 0 before the first), c_m; l_gm for the next
step; encoder gradients *= c_m * rou; classifier optimizer step; clip the model's gradient norm; model step.

l_gm enters the NEXT step's loss (the official graph is kept alive through `.clone()`), so its gradient
reaches the fusion output weights one step stale: the cosine is differentiated at the previous step's
weight values. mmbench keeps those values (coefficients, classifier and fusion weights) as tensors instead
of a live graph and re-evaluates l_gm at them with the gradient routed to the current parameter
(`old + (w - w.detach())`): the same value and gradient, and it survives a checkpoint. The gradient the
official graph also sends to the classifiers' weights is discarded by their `zero_grad` before they step,
so it is not formed here.

Mapping to mmbench (deviations, docs/methods/cggm.md): mmbench encoders give pooled vectors, so a unimodal
classifier is the official `Classifier` without its transformer `bone` (proj1 applied twice, as the code
does, ReLU after the second, then out_layer). The official fusion has ONE output layer (C, D) that follows a
fusion transformer, and every classifier is compared with it; mmbench's heads are linear in the features,
so classifier m is compared with the fusion head's weights that act on modality m: concat, the column block
of `fc.weight`; sum, that modality's head; shared, the one shared head (the official form, every modality
against one weight). The whole encoder is scaled (the official scales its `*_encoder` transformers, not the
input projections in front of them). The classifier optimizer is the recipe's optimizer with `cls_lr` and
`cls_weight_decay` (the code: `getattr(optim, hyp.optim)`, weight decay 3e-3 for Food-101, 0 for MOSI).

Per-modality accuracy: the fusion head's estimator (DESIGN.md §4.3); the classifiers' batch accuracies are
logged as `method/cls_acc_<m>`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmbench.methods.base import Field, HParams, Method, StepContext, build_optimizer, register_method
from mmbench.models.fusion import ConcatFusion, Fusion, SharedHeadFusion, SumFusion


class CGGMHParams(HParams):
    rou: float = Field(1.3, gt=0, description="encoder gradients are scaled by coeff_m * rou (Food-101 and MOSI: 1.3)",
                       json_schema_extra={"search": [1.0, 1.3, 1.5]})
    lamda: float = Field(0.05, ge=0, description="weight of the direction loss l_gm (Food-101 0.05, MOSI 0.2)",
                         json_schema_extra={"search": [0.05, 0.1, 0.2]})
    clip: float = Field(0.8, ge=0, description="max global gradient norm of the model before its step (0: no clipping)")
    cls_lr: float = Field(5e-4, gt=0, description="learning rate of the unimodal classifiers' optimizer",
                          json_schema_extra={"search": [1e-4, 5e-4, 1e-3]})
    cls_weight_decay: float = Field(3e-3, ge=0, description="weight decay of the classifiers' optimizer (Food-101 3e-3, MOSI 0)")


class UnimodalClassifier(nn.Module):
    """The official `Classifier` on a pooled feature (its transformer `bone` dropped): proj1 twice, as the
    code applies it, ReLU after the second, then `out_layer`. PyTorch's default init, as the code has."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj1 = nn.Linear(dim, dim)
        self.out_layer = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.relu(self.proj1(self.proj1(x))))


def partner_refs(fusion: Fusion) -> dict[str, tuple[nn.Parameter, slice | None]]:
    """Which fusion-head output weight (and which column block of it) acts on each modality: what
    classifier m's output weight is compared with."""
    if isinstance(fusion, ConcatFusion):
        return {m: (fusion.fc.weight, sl) for m, sl in fusion.weight_slices().items()}
    if isinstance(fusion, SumFusion):
        return {m: (fusion.heads[m].weight, None) for m in fusion.modalities}
    if isinstance(fusion, SharedHeadFusion):
        return {m: (fusion.head.weight, None) for m in fusion.modalities}
    raise TypeError(f"cggm has no per-modality output weights for {type(fusion).__name__}")


def partner_weights(fusion: Fusion) -> dict[str, torch.Tensor]:
    return {m: w if sl is None else w[:, sl] for m, (w, sl) in partner_refs(fusion).items()}


def coefficients(acc: list[float], acc_prev: list[float]) -> list[float]:
    """c_m = (sum_n d_n + 1e-8 - d_m) / (sum_n d_n + 1e-8), d = acc - acc_prev, in Python floats as the code."""
    diff = [a - b for a, b in zip(acc, acc_prev)]
    total = sum(diff) + 1e-8
    return [(total - d) / total for d in diff]


def cosines(cls_w: list[torch.Tensor], partners: list[torch.Tensor]) -> list[torch.Tensor]:
    """cos between each flattened classifier output weight and its flattened fusion partner (`cal_cos`)."""
    return [F.cosine_similarity(flat(c), flat(p), dim=0) for c, p in zip(cls_w, partners)]


def flat(x: torch.Tensor) -> torch.Tensor:
    """x flattened; a flat x as is (no new view node: the code flattens its fusion weight once for all cosines,
    and where the cosines' gradients meet changes the float sum)."""
    return x if x.dim() == 1 else x.reshape(-1)


def guidance_loss(coeff: list[float], cos: list[torch.Tensor]) -> torch.Tensor:
    """l_gm = (sum_m |c_m| - sum_m c_m cos_m) / M, summed in the code's order and precision."""
    total = coeff[0] * cos[0]
    for c, x in zip(coeff[1:], cos[1:]):
        total = total + c * x
    return (np.sum(np.abs(coeff)) - total) / len(coeff)


def batch_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of argmax hits as a Python float (sklearn's accuracy_score: count / n in float64)."""
    return int((logits.detach().argmax(1) == labels).sum()) / labels.numel()


@register_method
class CGGM(Method):
    """Unimodal classifiers on detached features set per-modality gradient scales and a direction loss."""

    name = "cggm"
    description = "CGGM (NeurIPS 2024): unimodal classifiers' accuracy gains scale encoder gradients; a cosine loss aligns the fusion head"
    HParams = CGGMHParams
    n_modalities = (2, None)
    modality_reason = "CGGM balances modalities against each other"
    fusions = {"concat", "sum", "shared"}
    fusion_reason = "CGGM compares each classifier's output weights with the fusion head's weights on that modality, which film and gated do not have"

    def __init__(self, spec: Any, hp: HParams, train: Any) -> None:
        super().__init__(spec, hp, train)
        dims = self.model.fusion.dims
        self.classifiers = nn.ModuleDict({m: UnimodalClassifier(dims[m], spec.num_classes) for m in self.modalities})
        self.cls_optimizer: torch.optim.Optimizer | None = None
        self.acc_prev: list[float] = [0.0] * len(self.modalities)
        # what l_gm of the previous step needs: its coefficients and the weights it was evaluated at
        self.coeff: list[float] | None = None
        self.cls_w: list[torch.Tensor] = []
        self.partner_w: list[torch.Tensor] = []

    @property
    def chp(self) -> CGGMHParams:
        return self.hp  # type: ignore[return-value]

    def parameter_groups(self) -> Any:
        return self.model.parameters()  # the classifiers have their own optimizer

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        cfg = {**self.train_spec.optimizer, "lr": self.chp.cls_lr, "weight_decay": self.chp.cls_weight_decay}
        self.cls_optimizer = build_optimizer(self.classifiers.parameters(), cfg)

    def previous_guidance(self) -> torch.Tensor | None:
        """The previous step's l_gm at its own weight values, differentiable w.r.t. the current fusion weights."""
        if self.coeff is None:
            return None
        refs = partner_refs(self.model.fusion)
        live: dict[tuple[int, int | None], torch.Tensor] = {}
        partners = []
        for m, old in zip(self.modalities, self.partner_w):
            w, sl = refs[m]
            key = (id(w), None if sl is None else sl.start)
            if key not in live:  # one flat node per weight, as the code's one `fgn`: the cosines' gradients meet there
                now = w if sl is None else w[:, sl]
                live[key] = (old + (now - now.detach())).reshape(-1)
            partners.append(live[key])
        return guidance_loss(self.coeff, cosines(self.cls_w, partners))

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp = self.chp
        assert self.cls_optimizer is not None
        mods = self.modalities
        self.zero_grad()
        # built before the forward, as the code's graph was built in the previous step: the autograd engine
        # then meets its gradient last, and the head's gradient is summed in the same order
        l_gm_prev = self.previous_guidance()
        with self.autocast():
            feats = self.model.encode(inputs)
            fused = self.model.fusion(feats)
            ce = F.cross_entropy(fused, labels)
        loss = ce if l_gm_prev is None else ce + hp.lamda * l_gm_prev
        self.backward(loss)
        self.unscale()

        self.cls_optimizer.zero_grad()
        cls_res = [self.classifiers[m](feats[m].detach().float()) for m in mods]
        cls_loss = F.cross_entropy(cls_res[0], labels)
        for r in cls_res[1:]:
            cls_loss = cls_loss + F.cross_entropy(r, labels)
        cls_loss.backward()

        with torch.no_grad():
            partners = partner_weights(self.model.fusion)
            self.cls_w = [self.classifiers[m].out_layer.weight.detach().clone() for m in mods]
            self.partner_w = [partners[m].detach().clone() for m in mods]
            cos = cosines(self.cls_w, self.partner_w)
            acc = [batch_accuracy(r, labels) for r in cls_res]
            coeff = coefficients(acc, self.acc_prev)
            l_gm = guidance_loss(coeff, cos)
        self.acc_prev, self.coeff = acc, coeff

        for m, c in zip(mods, coeff):
            for p in self.model.encoders[m].parameters():
                if p.grad is not None:
                    p.grad *= (c * hp.rou)
        self.cls_optimizer.step()
        if hp.clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), hp.clip)
        self.optimizer_step()

        logs: dict[str, Any] = {"loss": loss.detach(), "l_gm": l_gm, "cls_loss": cls_loss.detach()}
        for i, m in enumerate(mods):
            logs[f"coeff_{m}"] = coeff[i]
            logs[f"cos_{m}"] = cos[i]
            logs[f"cls_acc_{m}"] = acc[i]
        return logs

    def extra_state(self) -> dict[str, Any]:
        return {"acc_prev": list(self.acc_prev), "coeff": None if self.coeff is None else list(self.coeff),
                "cls_w": list(self.cls_w), "partner_w": list(self.partner_w),
                "cls_optimizer": self.cls_optimizer.state_dict() if self.cls_optimizer is not None else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        n = len(self.modalities)
        self.acc_prev = [float(a) for a in state.get("acc_prev", [0.0] * n)]
        coeff = state.get("coeff")
        self.coeff = None if coeff is None else [float(c) for c in coeff]
        self.cls_w = [t.to(self.device) for t in state.get("cls_w", [])]
        self.partner_w = [t.to(self.device) for t in state.get("partner_w", [])]
        if self.cls_optimizer is not None and state.get("cls_optimizer") is not None:
            self.cls_optimizer.load_state_dict(state["cls_optimizer"])

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "cggm_partner": f"{self.spec.fusion} head weights on each modality",
                "cggm_classifier": "official Classifier without its transformer bone, on detached pooled features"}
