"""`umt`: Uni-Modal Teacher (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning", ICML 2023).

Joint late-fusion training whose encoders are also pulled towards the features of unimodal
teachers: `L = CE(f, y) + lambda * sum_m MSE(phi_m, phi_m^teacher)`, the teachers being each
modality's unimodal model trained alone and frozen, fed the same input. The fused loss learns the
paired (cross-modal) features; the distillation keeps every encoder learning the uni-modal
features joint training would leave unlearned ("modality laziness"). One forward and one
backward of the joint model, plus one no-grad forward of each teacher.

Teachers are the `unimodal` reference runs of the same dataset, protocol, backbone, training and
seed (scheduled by the planner, `needs_unimodal_references`), at the epoch their run selects.

Sources: the authors' code was not found (searched by title and author); the paper's abstract and
BalanceBenchmark (GeWu-Lab/BalanceBenchmark @ 4c1482fca5aaa8d4278af8e26020daa039e3ccf3,
`balancemm/trainer/UMT_trainer.py`), which this follows: distillation on the pooled encoder
outputs, MSE (mean over batch and feature), `scaling` lambda = 10, every step inside the
`modulation_starts..modulation_ends` window. BalanceBenchmark never switches its teachers to eval
mode, so their BatchNorm normalises with the batch's statistics (and keeps updating running
stats that are never used); a frozen teacher in eval mode is what the paper describes, so that
is the default here and `teacher_bn: train` reproduces BalanceBenchmark.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from mmbench.methods.base import Field, HParams, Method, StepContext, register_method


def distillation_losses(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per modality, the mean squared error between the student's and the teacher's pooled features."""
    return {m: F.mse_loss(student[m].float(), teacher[m].float()) for m in teacher}


class UMTHParams(HParams):
    scaling: float = Field(10.0, ge=0, description="lambda, the weight of the feature distillation (BalanceBenchmark: 10)",
                           json_schema_extra={"search": [1.0, 5.0, 10.0, 50.0]})
    modulation_starts: int = Field(0, ge=0, description="first epoch with distillation (0-based, inclusive)",
                                   json_schema_extra={"search": [0]})
    modulation_ends: int = Field(100_000, ge=0, description="last epoch with distillation (0-based, inclusive; "
                                 "default: the whole run; BalanceBenchmark: 80)", json_schema_extra={"search": [80, 100_000]})
    teacher_bn: Literal["eval", "train"] = Field(
        "eval", description="teachers' BatchNorm: eval = frozen statistics (the paper's frozen teacher); "
        "train = batch statistics, as BalanceBenchmark leaves them")

    @model_validator(mode="after")
    def _window(self) -> "UMTHParams":
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(
                f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self


@register_method
class UMT(Method):
    """Fused CE + lambda * sum_m MSE(encoder_m features, frozen unimodal teacher_m features)."""

    name = "umt"
    description = "UMT: joint training + lambda * MSE between each encoder's features and its unimodal teacher's"
    HParams = UMTHParams
    n_modalities = (2, None)
    modality_reason = "distils unimodal teachers into a multimodal model"
    needs_unimodal_references = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.teachers: dict[str, Method] = {}

    def attach_references(self, references: dict[str, Method]) -> None:
        self.teachers = {m: r.to(self.device) for m, r in references.items()}  # a plain dict: not trained, not saved
        for t in self.teachers.values():
            t.train(self.hp.teacher_bn == "train")  # type: ignore[attr-defined]
            t.requires_grad_(False)

    def teacher_features(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if set(self.teachers) != set(self.modalities):
            raise RuntimeError("umt: the unimodal teachers were not attached")
        with torch.no_grad():
            return {m: t.model({m: inputs[m]}).features[m] for m, t in self.teachers.items()}

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: UMTHParams = self.hp  # type: ignore[assignment]
        self.zero_grad()
        on = hp.modulation_starts <= ctx.epoch <= hp.modulation_ends
        with self.autocast():
            out = self.model(inputs)
            loss = F.cross_entropy(out.logits, labels)
            logs: dict[str, Any] = {"loss_ce": loss.detach()}
            if on:
                dist = distillation_losses(out.features, self.teacher_features(inputs))
                for m, d in dist.items():
                    loss = loss + hp.scaling * d
                    logs[f"distill_{m}"] = d.detach()
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach(), **logs}

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "umt_teacher_bn": self.hp.teacher_bn}  # type: ignore[attr-defined]
