"""`amco`: adaptive mask-based cooperation (AMCo, ICASSP 2024), as BalanceBenchmark implements it.

Source: GeWu-Lab/BalanceBenchmark @ 4c1482fca5aaa8d4278af8e26020daa039e3ccf3 (`balancemm/trainer/AMCo_trainer.py`,
`balancemm/models/avclassify_model.py` `BaseClassifierAMCoModel`, `configs/trainer_config.yaml` AMCo);
there is no other public code. docs/methods/amco.md.

Why it balances: a modality that already dominates the joint prediction ("dependent" here means the
model depends on it) has part of its class evidence masked out of the fused output, so the fused loss
must be met by the others, while each modality keeps its own unimodal loss. The masked share grows over
each epoch on a sine schedule.

The model (as BalanceBenchmark builds it): the concat head's raw per-modality split u_m = W_m phi_m + b/M,
their sum, then a class-mixing linear layer `star` (C -> C): z = star(sum_m u_m). In training, a modality
flagged dependent contributes mask * u_m instead of u_m, where mask zeroes N = int(p_t C) randomly chosen
classes (numpy's shuffle), p_t = sin(pi/2 * min(eps, l_t)/eps), and l_t starts at 0 every epoch and grows by
epoch/10 after each step (so epoch 0 never masks, and from epoch e the mask saturates after ~3/e steps).
Inside [modulation_starts, modulation_ends] the loss is CE(z, y) + sum_m CE(u_m, y); after the backward,
modality m is flagged dependent for the next step when its block of softmax(cat_m u_m) (over all M*C
columns) averages more than sigma per sample. Flags reset at every epoch start. Outside the window: CE(z, y)
only, no mask.

Deviation (a bug fixed, recorded as `mask_shape`): BalanceBenchmark expands the class mask to shape (2, C)
and multiplies it into (B, C) logits, which fails for any batch size but 2 (and 1); the mask is meant per
class, so mmbench broadcasts one (C,) mask over the batch. At batch size 2 the two are identical, which is
how the conformance script runs BalanceBenchmark's code unchanged.

Per-modality accuracy: DESIGN.md §4.3's mean-feature estimator through the whole head (`star` included):
z_m = star(u_m(phi_m) + sum_{n != m} u_n(mean phi_n)).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from mmbench.methods.base import EpochContext, Field, HParams, Method, StepContext, register_method
from mmbench.models.classifier import MultimodalClassifier, weight_init
from mmbench.models.encoders import build_encoder
from mmbench.models.fusion import ConcatFusion


class AMCoHParams(HParams):
    sigma: float = Field(0.5, gt=0, lt=1, description="a modality whose share of the joint softmax exceeds sigma is masked next step",
                         json_schema_extra={"search": [0.4, 0.5, 0.6]})
    eps: float = Field(0.3, gt=0, description="l_t at which the mask saturates (all classes masked)",
                       json_schema_extra={"search": [0.1, 0.3, 1.0]})
    modulation_starts: int = Field(0, ge=0, description="first epoch with masking and unimodal losses (0-based, inclusive)")
    modulation_ends: int = Field(80, ge=0, description="last epoch with masking and unimodal losses (0-based, inclusive)")

    @model_validator(mode="after")
    def _window(self) -> "AMCoHParams":
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self


def mask_fraction(l_t: float, eps: float) -> float:
    """p_t = sin(pi/2 * min(eps, l_t) / eps)."""
    return float(np.sin(np.pi / 2 * (min(eps, l_t) / eps)))


def class_mask(num_classes: int, p_t: float) -> torch.Tensor:
    """Ones with N = int(p_t C) zeros, shuffled by numpy's global RNG exactly as the trainer does."""
    n = int(p_t * num_classes)
    mask = np.pad(np.ones(num_classes - n), (0, n))
    np.random.shuffle(mask)
    return torch.from_numpy(mask).float()


def dependence(split: dict[str, torch.Tensor], sigma: float) -> dict[str, bool]:
    """Each modality's block of softmax over all M*C columns, averaged per sample, against sigma."""
    probs = torch.softmax(torch.cat(list(split.values()), dim=1), dim=1)
    out, start = {}, 0
    for m, u in split.items():
        share = probs[:, start:start + u.shape[1]].sum() / u.shape[0]
        out[m] = bool(share > sigma)
        start += u.shape[1]
    return out


class AMCoHead(ConcatFusion):
    """Concat head whose per-modality split is summed (masked for dependent modalities) and mixed by `star`."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.star = nn.Linear(num_classes, num_classes)
        self.masks: dict[str, torch.Tensor] = {}  # set by the method for one training step

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mix(self.split_logits(feats))

    def mix(self, split: dict[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for m in self.modalities:
            u = split[m] * self.masks[m] if m in self.masks else split[m]
            total = u if total is None else total + u
        return self.star(total)


@register_method
class AMCo(Method):
    """Mask the dependent modality's class evidence out of the fused output; unimodal losses for all."""

    name = "amco"
    description = "AMCo (ICASSP 2024, BalanceBenchmark's code): mask the dominant modality's classes in the fused output, plus unimodal losses"
    HParams = AMCoHParams
    n_modalities = (2, None)
    fusions = {"concat"}
    fusion_reason = "AMCo masks the per-modality split of a concat head before its class-mixing layer"

    def __init__(self, spec: Any, hp: HParams, train: Any) -> None:
        super().__init__(spec, hp, train)
        self.dependent: dict[str, bool] = {m: False for m in self.modalities}
        self.l_t = 0.0

    @property
    def ahp(self) -> AMCoHParams:
        return self.hp  # type: ignore[return-value]

    def build_model(self) -> nn.Module:
        s = self.spec
        encoders = {m: build_encoder(s.backbone, m, shape) for m, shape in s.input_shapes.items()}
        model = MultimodalClassifier(encoders, AMCoHead({m: e.out_dim for m, e in encoders.items()}, s.num_classes))
        if s.init == "repo":
            model.apply(weight_init)
        return model

    @property
    def head(self) -> AMCoHead:
        return self.model.fusion  # type: ignore[return-value]

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        self.dependent = {m: False for m in self.modalities}
        self.l_t = 0.0
        return {}

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp = self.ahp
        p_t = mask_fraction(self.l_t, hp.eps)
        mask = class_mask(self.spec.num_classes, p_t).to(labels.device)
        self.l_t += ctx.epoch / 10
        window = hp.modulation_starts <= ctx.epoch <= hp.modulation_ends
        self.zero_grad()
        self.head.masks = {m: mask for m in self.modalities if window and self.dependent[m]}
        try:
            with self.autocast():
                feats = self.model.encode(inputs)
                split = self.head.split_logits(feats)
                split = {m: split[m] * self.head.masks[m] if m in self.head.masks else split[m] for m in self.modalities}
                fused = self.head.star(sum(split[m] for m in self.modalities))
                loss = F.cross_entropy(fused, labels)
                uni = {m: F.cross_entropy(split[m], labels) for m in self.modalities} if window else {}
        finally:
            masked = sorted(self.head.masks)
            self.head.masks = {}
        # one backward per loss, in the trainer's order (the gradients accumulate in the same float order)
        losses = [loss, *uni.values()]
        for i, x in enumerate(losses):
            self.backward(x, retain_graph=i < len(losses) - 1)
        logs: dict[str, Any] = {"loss": loss.detach(), "mask_fraction": p_t}
        logs.update({f"masked_{m}": float(m in masked) for m in self.modalities})
        logs.update({f"loss_{m}": v.detach() for m, v in uni.items()})
        if window:
            with torch.no_grad():
                self.dependent = dependence({m: s.detach().float() for m, s in split.items()}, hp.sigma)
        self.optimizer_step()
        return logs

    def extra_state(self) -> dict[str, Any]:
        return {"dependent": dict(self.dependent), "l_t": self.l_t}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.dependent = {m: bool(state.get("dependent", {}).get(m, False)) for m in self.modalities}
        self.l_t = float(state.get("l_t", 0.0))

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "mask_shape": "per-class (C,), broadcast over the batch (BalanceBenchmark: (2, C))"}


