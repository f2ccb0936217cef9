"""`mmcosine`: Multi-Modal Cosine loss (Xu, Feng, Zhang & Hu, ICASSP 2023).

Each modality's logits are s * cos(phi_m, w_{m,c}): its pooled features and its own block of the
classifier weight (concat's column slice), both L2-normalised, so no modality wins the fused
logits by feature or weight norm alone; the fused logits are their sum and the loss is the plain
cross-entropy on it. The head's bias is unused (it gets no gradient). One forward, one backward.

Source: GeWu-Lab/MMCosine_ICASSP23 @ 00ba0a9cbd9b866b5017e972a1266d7b664bf86e (`main_CD.py`,
`train_epoch`), read and re-expressed; the M >= 3 form and the modulation window are
BalanceBenchmark's (GeWu-Lab/BalanceBenchmark @ 4c1482fca5aaa8d4278af8e26020daa039e3ccf3,
`MMCosine_trainer.py`), which slices the concat weight per modality the same way.

Where the code and the paper differ, the code is followed. Known points:
- The official `valid()` predicts with the plain linear head (W [phi_a; phi_v] + b, features not
  normalised), which the cosine loss never trains as such, while its per-modality accuracies use
  the cosine logits; BalanceBenchmark predicts with the cosine sum. The cosine sum is what the
  method trains and is the default here; `eval_head: linear` reproduces the official evaluation.
- The supplementary NCE term (`--lam`, default 0 in the repo) is not implemented.
- The official film/gated are symmetric "mid-concat" variants (both modalities' fused features
  go into one concat head); mmbench's film/gated end in a single-modality output layer with no
  per-modality weight block, so they are refused. The sum head (each branch its own weight) is
  served: the same per-class cosine on each branch's weight.

Per-modality estimator: `cosine-branch` (mmbench.models.heads.CosineHead): each modality's own
cosine term, the exact additive parts of the fused logits.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbench.methods.base import Field, Method, StepContext, register_method
from mmbench.methods.window import WindowHParams
from mmbench.models.classifier import ModelOutput
from mmbench.models.heads import ADDITIVE_FUSIONS, ADDITIVE_REASON, CosineHead


class MMCosineHParams(WindowHParams):
    scaling: float = Field(10.0, gt=0, description="s, the scale of the cosine logits (repo README: 10 on CREMA-D; "
                           "BalanceBenchmark: 15)", json_schema_extra={"search": [5.0, 10.0, 15.0, 20.0, 30.0]})
    eval_head: Literal["cosine", "linear"] = Field(
        "cosine", description="fused prediction at evaluation: the trained cosine sum, or the official valid()'s "
        "plain linear head")


@register_method
class MMCosine(Method):
    """Cross-entropy on s * sum_m cos(phi_m, W_m): modality-wise L2 normalisation of features and weights."""

    name = "mmcosine"
    description = "MMCosine: cross-entropy on s * sum of per-modality cosines of features and class weights"
    HParams = MMCosineHParams
    fusions = ADDITIVE_FUSIONS
    fusion_reason = ADDITIVE_REASON
    n_modalities = (2, None)
    modality_reason = "it normalises each modality's block of a fused head, which needs at least two"

    def build_model(self) -> nn.Module:
        model = super().build_model()
        model.fusion = CosineHead(model.fusion, self.hp.scaling)  # type: ignore[attr-defined]
        return model

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: MMCosineHParams = self.hp  # type: ignore[assignment]
        head: CosineHead = self.model.fusion  # type: ignore[assignment]
        self.zero_grad()
        with self.autocast():
            feats = self.model.encode(inputs)
            if hp.active(ctx.epoch):
                parts = head.split_logits(feats)
                logits = parts[self.modalities[0]]
                for m in self.modalities[1:]:
                    logits = logits + parts[m]
            else:  # outside BalanceBenchmark's window: plain training of the linear head
                parts, logits = None, head.base(feats)
            loss = F.cross_entropy(logits, labels)
        self.backward(loss)
        self.optimizer_step()
        logs: dict[str, Any] = {"loss": loss.detach()}
        if parts is not None:  # the repo's logged fy_<m>: mean true-class cosine logit
            for m, lg in parts.items():
                logs[f"logit_{m}"] = lg.detach().float().gather(1, labels[:, None]).mean()
        return logs

    def predict(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        out = self.model(inputs)
        if self.hp.eval_head == "linear":  # type: ignore[attr-defined]
            return ModelOutput(self.model.fusion.base(out.features), out.features)
        return out

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "eval_head": self.hp.eval_head}  # type: ignore[attr-defined]
