"""`unimodal`: one encoder and a linear head on a single modality.

The competition-free reference: its accuracy is what a modality can reach alone, and its
features are the mono-modal concept of AGM's competition strength.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mmbench.methods.base import Field, HParams, Method, ModelSpec, StepContext, register_method
from mmbench.models.classifier import build_classifier
from torch import nn


class UnimodalHParams(HParams):
    modality: str = Field("audio", description="the modality to train on (audio, visual, ...)")


@register_method
class Unimodal(Method):
    """One modality alone: its encoder and a linear head."""

    name = "unimodal"
    description = "one modality alone (encoder + linear head): the competition-free reference"
    HParams = UnimodalHParams

    @classmethod
    def check(cls, spec: ModelSpec, hp: UnimodalHParams) -> None:  # type: ignore[override]
        from mmbench.errors import UserError

        if hp.modality not in spec.modalities:
            raise UserError(
                f"unimodal: modality '{hp.modality}' is not in the dataset; choose one of: {', '.join(spec.modalities)}"
            )

    @property
    def modalities(self) -> list[str]:
        return [self.hp.modality]  # type: ignore[attr-defined]

    def build_model(self) -> nn.Module:
        s = self.spec
        m = self.hp.modality  # type: ignore[attr-defined]
        return build_classifier(s.backbone, "concat", {m: s.input_shapes[m]}, s.num_classes, s.init)

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        self.zero_grad()
        with self.autocast():
            out = self.model(inputs)
            loss = F.cross_entropy(out.logits, labels)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach()}

    def describe_run(self) -> dict[str, object]:
        return {"estimator": "unimodal", "modality": self.hp.modality}  # type: ignore[attr-defined]
