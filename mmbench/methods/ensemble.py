"""`ensemble`: late-fusion ensemble of the unimodal reference models (a baseline, no training of its own).

Each modality's `unimodal` run (same dataset, protocol, backbone, training settings and seed, its
model selected as that run selects it) predicts alone; the ensemble averages their softmaxes.
It is the strong, often unreported baseline of the balancing literature: every modality is fully
trained by construction, so no modality is starved, at the price of learning no cross-modal
interaction. The planner schedules the unimodal runs (`needs_unimodal_references`), they are
shared with competition strength and with every other run that uses them, and this run only
evaluates (one epoch, no optimizer), so it reports the same metrics as any run: `acc` from the
averaged prediction, `acc/<m>` from each unimodal model on its own.

Fused "logits" are log(mean softmax) (`combine: softmax`), so anything computed from the logits'
softmax sees the averaged probabilities; `combine: logits` averages the logits instead (UME).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbench.methods.base import Field, HParams, Method, StepContext, register_method
from mmbench.models.classifier import ModelOutput


def combine_predictions(logits: dict[str, torch.Tensor], how: str) -> torch.Tensor:
    """The ensemble's fused logits: log of the mean softmax, or the mean of the logits."""
    stack = torch.stack([v.float() for v in logits.values()])
    if how == "logits":
        return stack.mean(0)
    return torch.log(torch.softmax(stack, dim=-1).mean(0))


class EnsembleHParams(HParams):
    combine: Literal["softmax", "logits"] = Field(
        "softmax", description="average the unimodal models' softmaxes (log taken as the fused logits) or their logits",
        json_schema_extra={"search": ["softmax", "logits"]})


@register_method
class Ensemble(Method):
    """Average the predictions of the selected unimodal reference models; nothing is trained."""

    name = "ensemble"
    description = "late-fusion ensemble: averages the softmaxes of the unimodal reference runs (no training)"
    HParams = EnsembleHParams
    n_modalities = (2, None)
    modality_reason = "an ensemble of unimodal models needs at least two of them"
    fusions = {"concat"}
    fusion_reason = "the ensemble has no fusion head of its own; its references are trained with concat's linear head"
    needs_unimodal_references = True
    trains = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.references: dict[str, Method] = {}

    def build_model(self) -> nn.Module:
        return nn.Module()  # no parameters: the references are attached, not owned

    def make_optimizer(self) -> tuple[Any, Any]:
        return None, None  # type: ignore[return-value]

    def attach_references(self, references: dict[str, Method]) -> None:
        # a plain dict, not a ModuleDict: never trained, never in this run's checkpoints
        self.references = {m: r.eval().to(self.device) for m, r in references.items()}

    def outputs(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        if set(self.references) != set(self.modalities):
            raise RuntimeError(f"{self.name}: the unimodal reference models were not attached")
        logits, feats = {}, {}
        with torch.no_grad():
            for m, ref in self.references.items():
                out = ref.model({m: inputs[m]})
                logits[m], feats[m] = out.logits, out.features[m]
        return ModelOutput(combine_predictions(logits, self.hp.combine), feats, logits)  # type: ignore[attr-defined]

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        """No optimisation: the training loss of the ensemble's prediction, for the record."""
        return {"loss": F.cross_entropy(self.outputs(inputs).logits, labels)}

    def predict(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        return self.outputs(inputs)

    @property
    def estimator_fusion(self) -> None:
        return None

    def describe_run(self) -> dict[str, Any]:
        return {"estimator": "unimodal-references", "combine": self.hp.combine}  # type: ignore[attr-defined]
