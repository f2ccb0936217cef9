"""`cml`: Calibrating Multimodal Learning (Ma, Zhang, Zhang, Wu, Fu, Zhou & Hu, ICML 2023).

CML's principle: a prediction's confidence must not grow when a modality is removed. The step
removes the modalities one at a time (in an order drawn once per epoch), takes each reduced
model's logits from the additive head (the fused logits minus the removed modality's own term),
and adds to the averaged cross-entropies of the full and every reduced model a penalty on the
confidence rising between consecutive ones:

    L = (1/M) * [CE(z_0) + sum_i CE(z_i)] + lam * sum_i max(0, sum_batch(conf(z_i) - conf(z_{i-1})))

with z_0 the fused logits, z_i = z_{i-1} - split_{r_i} + b/M (concat: each modality's block of the
head plus its b/M share, so the bias stays whole; sum: the removed branch head), conf = max softmax.
One forward, one backward: the reduced models reuse the same features.

Source: the authors' code (QingyangZhang/CML @ 9d2496e6f37ad5571d44165da0a35b4e46c8a1e6) trains
CPM-Nets / MIWAE on tabular multi-view data, not a two-branch audio-visual classifier; the form
used on audio-visual benchmarks is BalanceBenchmark's trainer (GeWu-Lab/BalanceBenchmark @
4c1482fca5aaa8d4278af8e26020daa039e3ccf3, `CML_trainer.py`), followed here to the letter:
- the penalty is clipped on the batch SUM (Python `max(0, sum)`), not per sample; the authors'
  MIWAE code clips per sample, with a margin epsilon and masks on which samples are penalised
  (their "trick 1/2"); BalanceBenchmark computes such a mask and discards it. Not implemented;
- the removal order is shuffled once per epoch (BalanceBenchmark: `random.shuffle` at the start of
  each epoch, popped from the end); here a per-run generator seeded from the run's seed and the
  epoch, so a resumed run draws the same orders;
- BalanceBenchmark's trainer at that commit calls `model.Unimodality_Calculate()`, which its model
  no longer defines (renamed `unimodality_calculate`, returning a tuple); the intended values, its
  `unimodal_result` (concat: W_m phi_m + b/M; `output`: the fused logits), are what is used.

Per-modality estimator: the fusion's own (concat: `mean-feature`; sum: `branch-head`); the model is
unchanged. Fusions: concat and sum (additive heads); M >= 2.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmbench.methods.base import EpochContext, Field, Method, StepContext, register_method
from mmbench.methods.window import WindowHParams
from mmbench.models.heads import ADDITIVE_FUSIONS, ADDITIVE_REASON, shared_bias


class CMLHParams(WindowHParams):
    lam: float = Field(0.1, ge=0, description="weight of the confidence-calibration penalty (BalanceBenchmark: 0.1)",
                       json_schema_extra={"search": [0.01, 0.1, 0.5, 1.0, 2.0]})


def cml_loss(fused: torch.Tensor, split: dict[str, torch.Tensor], bias: torch.Tensor | None, order: list[str],
             labels: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, summed cross-entropies / M, calibration penalty) for one batch; `order` lists the
    modalities in removal order (all but the last are removed)."""
    n = len(order)
    out_s = fused
    ce: torch.Tensor | None = None
    penalty = fused.new_zeros(())
    # BalanceBenchmark's operation order (confidences, then the cross-entropies, then the penalty):
    # the order autograd sums gradient contributions in, so it keeps the step bitwise equal
    for removed in order[:-1]:
        out_p = out_s - split[removed]
        if bias is not None:
            out_p = out_p + bias / n
        conf_s = torch.softmax(out_s, dim=1).max(dim=1).values
        conf_p = torch.softmax(out_p, dim=1).max(dim=1).values
        if ce is None:
            ce = F.cross_entropy(out_s, labels)
        ce = ce + F.cross_entropy(out_p, labels)
        penalty = penalty + torch.relu((conf_p - conf_s).sum())
        out_s = out_p
    assert ce is not None
    ce = ce / n
    return ce + lam * penalty, ce, penalty


@register_method
class CML(Method):
    """Cross-entropy of the full and successively reduced models + a penalty on confidence rising
    when a modality is removed."""

    name = "cml"
    description = "CML: penalise confidence that rises when a modality is removed (BalanceBenchmark's form)"
    HParams = CMLHParams
    fusions = ADDITIVE_FUSIONS
    fusion_reason = ADDITIVE_REASON
    n_modalities = (2, None)
    modality_reason = "it removes modalities from a fused prediction, which needs at least two"

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.order_seed = int(torch.initial_seed()) % (2 ** 62)
        self.order: list[str] = list(self.modalities)

    def removal_order(self, epoch: int) -> list[str]:
        g = torch.Generator().manual_seed(self.order_seed + epoch)
        return [self.modalities[i] for i in torch.randperm(len(self.modalities), generator=g).tolist()]

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        self.order = self.removal_order(ctx.epoch)
        return {}

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: CMLHParams = self.hp  # type: ignore[assignment]
        self.zero_grad()
        with self.autocast():
            out = self.model(inputs)
            logs: dict[str, Any] = {}
            if hp.active(ctx.epoch):
                fusion = self.model.fusion
                split = fusion.split_logits(out.features)
                loss, ce, penalty = cml_loss(out.logits.float(), {m: v.float() for m, v in split.items()},
                                             shared_bias(fusion), self.order, labels, hp.lam)
                logs = {"ce": ce.detach(), "calibration": penalty.detach(),
                        "kept": float(self.modalities.index(self.order[-1]))}
            else:
                loss = F.cross_entropy(out.logits, labels)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach(), **logs}

    def extra_state(self) -> dict[str, Any]:
        return {"order_seed": self.order_seed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.order_seed = int(state.get("order_seed", self.order_seed))

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "cml_form": "balancebenchmark (batch-sum clip, no masks)"}
