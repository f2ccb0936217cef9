"""`gblending`: Gradient-Blending (Wang, Tran & Feiszli, "What Makes Training Multi-Modal
Classification Networks Hard?", CVPR 2020).

The model has a classifier per modality besides the fused head, and trains on the blend
`L = sum_k w_k CE(out_k, y)`, k over the modalities and the fused head. The weights come from each
head's overfitting-to-generalisation behaviour: from the current weights, a copy of the model is
trained on head k alone for `probe_epochs` epochs; with train/validation losses L^T, L^V at the
start and end of that probe, the generalisation gain is G_k = L^V_start - L^V_end, the change in
overfitting O = L^V - L^T is dO_k = O_end - O_start, and w_k = G_k / dO_k^2, normalised to sum 1
(the paper's optimal blend under its OGR analysis). A head that generalises much for little extra
overfitting gets a large weight. Offline G-Blend estimates once before training; online re-estimates
every `super_epoch` epochs. The probes cost (M + 1) x probe_epochs training epochs each time.

There is no official PyTorch code. This follows the paper's definition; the cross-check is
BalanceBenchmark (GeWu-Lab/BalanceBenchmark @ 4c1482fca5aaa8d4278af8e26020daa039e3ccf3, `balancemm/trainer/GBlending_trainer.py`,
`super_epoch_origin`; `configs/trainer_config.yaml`: online, super_epoch 10), which differs in:
(1) its per-modality outputs are the concat head's weight split (bias / M), not own classifiers
(`heads: split` here); (2) its unimodal probe trains the FUSED output with the other modalities'
inputs zeroed, here the probe trains head k (only modality k's encoder and classifier, as the
paper's unimodal models); (3) its "start" losses are taken after the first probe epoch (train loss
summed over that epoch's running batches, val loss summed over batches), so with a one-epoch probe G
and dO are 0/0; here start = the current weights, end = after the probe, both as mean losses in
eval mode (train split without augmentation, validation split); (4) it takes |G / dO^2|; the paper's
G can be negative (the head's validation loss rose), so `negative_gain` says what to do with it:
`abs` (BalanceBenchmark, default) or `zero` (no weight for a head that does not generalise).
Probe optimizer: a fresh one from the run's optimizer settings (initial learning rate), as
BalanceBenchmark reloads its initial optimizer state for every head.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbench.errors import UserError
from mmbench.methods.base import (EpochContext, Field, HParams, Method, ModelSpec, StepContext, build_optimizer,
                                  register_method)
from mmbench.models.fusion import Fusion

FUSED = "fused"
OGR_EPS = 1e-12  # dO^2 below this is treated as this (a head that did not change at all)


def blend_weights(start: dict[str, tuple[float, float]], end: dict[str, tuple[float, float]],
                  negative_gain: str = "abs") -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(normalised weights, G, dO) from per-head (train loss, val loss) at the probe's start and end."""
    gain, d_over, raw = {}, {}, {}
    for k in start:
        (t0, v0), (t1, v1) = start[k], end[k]
        gain[k] = v0 - v1
        d_over[k] = (v1 - t1) - (v0 - t0)
        g = abs(gain[k]) if negative_gain == "abs" else max(gain[k], 0.0)
        raw[k] = g / max(d_over[k] ** 2, OGR_EPS)
    z = sum(raw.values())
    weights = {k: r / z for k, r in raw.items()} if z > 0 else {k: 1.0 / len(raw) for k in raw}
    return weights, gain, d_over


def split_head(fusion: Fusion, m: str, feat: torch.Tensor) -> torch.Tensor:
    """Modality m's part of the fusion head (BalanceBenchmark's unimodal output): concat's weight
    columns with bias / M, or sum's branch head; uses only m's features."""
    if hasattr(fusion, "weight_slices"):
        fc = fusion.fc  # type: ignore[attr-defined]
        return feat @ fc.weight[:, fusion.weight_slices()[m]].t() + fc.bias / len(fusion.modalities)  # type: ignore[operator]
    return fusion.heads[m](feat)  # type: ignore[index]


class GBlendingHParams(HParams):
    mode: Literal["online", "offline"] = Field(
        "online", description="online: re-estimate the weights every super_epoch epochs; offline: once, before training")
    super_epoch: int = Field(10, ge=1, description="epochs between re-estimations (online; BalanceBenchmark: 10)",
                             json_schema_extra={"search": [5, 10, 20]})
    probe_epochs: int = Field(10, ge=1, description="epochs each probe copy trains on one head (BalanceBenchmark: "
                              "= super_epoch)", json_schema_extra={"search": [1, 5, 10]})
    heads: Literal["own", "split"] = Field(
        "own", description="per-modality classifiers: own linear heads (the paper) or the fusion head's weight split "
        "(BalanceBenchmark; concat/sum only)")
    negative_gain: Literal["abs", "zero"] = Field(
        "abs", description="a head whose validation loss rose (G < 0): |G| (BalanceBenchmark) or weight 0")


@register_method
class GBlending(Method):
    """Train on sum_k w_k CE(head_k); w_k = G_k / dO_k^2 from short per-head probes (normalised)."""

    name = "gblending"
    description = "G-Blending: weighted CE of per-modality and fused heads, weights G/dO^2 from per-head probes"
    HParams = GBlendingHParams
    n_modalities = (2, None)
    modality_reason = "blends per-modality heads with the fused one"

    def __init__(self, spec: ModelSpec, hp: HParams, train: Any) -> None:
        super().__init__(spec, hp, train)
        # own per-modality classifiers (the paper's); registered, so trained and saved with the model
        self.heads = nn.ModuleDict({m: nn.Linear(self.model.encoders[m].out_dim, spec.num_classes)
                                    for m in self.modalities}) if hp.heads == "own" else nn.ModuleDict()  # type: ignore[attr-defined]
        if hp.heads == "own" and spec.init == "repo":  # type: ignore[attr-defined]
            from mmbench.models.classifier import weight_init

            self.heads.apply(weight_init)
        self.weights = {k: 1.0 / (len(self.modalities) + 1) for k in [*self.modalities, FUSED]}
        self.estimated_at = -1

    @classmethod
    def check(cls, spec: ModelSpec, hp: GBlendingHParams) -> None:  # type: ignore[override]
        super().check(spec, hp)
        if hp.heads == "split" and spec.fusion not in ("concat", "sum"):
            raise UserError(f"gblending: heads 'split' needs a fusion with per-modality weights (concat or sum), "
                            f"not '{spec.fusion}'; set heads: own")

    # ----- heads ------------------------------------------------------------------------------
    @staticmethod
    def head_logits(model: nn.Module, heads: nn.ModuleDict, inputs: dict[str, torch.Tensor],
                    which: Iterable[str]) -> dict[str, torch.Tensor]:
        """Logits of the requested heads; without the fused head only the needed encoders run."""
        which = list(which)
        res: dict[str, torch.Tensor] = {}
        if FUSED in which:
            out = model(inputs)
            feats, res[FUSED] = out.features, out.logits
        else:
            feats = {m: model.encoders[m](inputs[m]) for m in which}
        for m in (k for k in which if k != FUSED):
            res[m] = heads[m](feats[m]) if len(heads) else split_head(model.fusion, m, feats[m])
        return res

    # ----- the weights --------------------------------------------------------------------------
    def due(self, epoch: int) -> bool:
        hp: GBlendingHParams = self.hp  # type: ignore[assignment]
        if hp.mode == "offline":
            return self.estimated_at < 0
        return epoch % hp.super_epoch == 0 and self.estimated_at != epoch

    @torch.no_grad()
    def mean_loss(self, model: nn.Module, heads: nn.ModuleDict, k: str, loader: Any, ctx: EpochContext) -> float:
        model.eval(), heads.eval()
        total, n = 0.0, 0
        for raw in loader:
            inputs, y = ctx.prepare_batch(raw, False)
            with self.autocast():
                lg = self.head_logits(model, heads, inputs, [k])[k]
            total += float(F.cross_entropy(lg.float(), y, reduction="sum"))
            n += len(y)
        model.train(), heads.train()
        return total / max(n, 1)

    def probe(self, k: str, ctx: EpochContext) -> tuple[tuple[float, float], tuple[float, float]]:
        """Train a copy on head k alone for probe_epochs; (train, val) mean losses at start and end."""
        hp: GBlendingHParams = self.hp  # type: ignore[assignment]
        model, heads = copy.deepcopy(self.model), copy.deepcopy(self.heads)
        model.train(), heads.train()
        params = [p for p in [*model.parameters(), *heads.parameters()]]
        opt = build_optimizer(params, self.train_spec.optimizer)
        losses = lambda: (self.mean_loss(model, heads, k, ctx.loaders["train_eval"], ctx),  # noqa: E731
                          self.mean_loss(model, heads, k, ctx.loaders["val"], ctx))
        start = losses()
        for _ in range(hp.probe_epochs):
            for raw in ctx.loaders["train"]:
                inputs, y = ctx.prepare_batch(raw, True)
                opt.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = F.cross_entropy(self.head_logits(model, heads, inputs, [k])[k].float(), y)
                loss.backward()
                opt.step()
        return start, losses()

    def estimate(self, ctx: EpochContext) -> dict[str, float]:
        if "val" not in ctx.loaders:
            raise UserError("gblending needs a validation split to estimate its blending weights")
        starts, ends = {}, {}
        for k in [*self.modalities, FUSED]:
            starts[k], ends[k] = self.probe(k, ctx)
        self.weights, gain, d_over = blend_weights(starts, ends, self.hp.negative_gain)  # type: ignore[attr-defined]
        self.estimated_at = ctx.epoch
        return {**{f"gain_{k}": g for k, g in gain.items()}, **{f"d_overfit_{k}": o for k, o in d_over.items()}}

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        return self.estimate(ctx) if self.due(ctx.epoch) else {}

    # ----- the step -------------------------------------------------------------------------------
    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        self.zero_grad()
        with self.autocast():
            logits = self.head_logits(self.model, self.heads, inputs, [FUSED, *self.modalities])
            per_head = {k: F.cross_entropy(v.float(), labels) for k, v in logits.items()}
            loss = sum(self.weights[k] * per_head[k] for k in [*self.modalities, FUSED])
        self.backward(loss)  # type: ignore[arg-type]
        self.optimizer_step()
        return {"loss": loss.detach(), **{f"loss_{k}": v.detach() for k, v in per_head.items()},  # type: ignore[union-attr]
                **{f"w_{k}": w for k, w in self.weights.items()}}

    def extra_state(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "estimated_at": self.estimated_at}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.weights = {k: float(v) for k, v in state.get("weights", self.weights).items()}
        self.estimated_at = int(state.get("estimated_at", self.estimated_at))

    def describe_run(self) -> dict[str, Any]:
        hp: GBlendingHParams = self.hp  # type: ignore[assignment]
        return {**super().describe_run(), "gblend_mode": hp.mode, "gblend_heads": hp.heads,
                "gblend_negative_gain": hp.negative_gain}
