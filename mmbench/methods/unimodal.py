"""`unimodal`: one encoder and a linear head on a single modality.

The competition-free reference: its accuracy is what a modality can reach alone, and its
features are the mono-modal concept of AGM's competition strength.
"""
from __future__ import annotations

from torch import nn

from mmbench.errors import UserError
from mmbench.methods.base import Field, HParams, ModelSpec, register_method
from mmbench.methods.joint import Joint
from mmbench.models.classifier import build_classifier
from mmbench.models.encoders import check_backbone


class UnimodalHParams(HParams):
    modality: str = Field("audio", description="the modality to train on (audio, visual, ...)")


@register_method
class Unimodal(Joint):
    """One modality alone: its encoder and a linear head, trained like `joint` (one forward, CE)."""

    name = "unimodal"
    description = "one modality alone (encoder + linear head): the competition-free reference"
    HParams = UnimodalHParams

    @classmethod
    def check(cls, spec: ModelSpec, hp: UnimodalHParams) -> None:  # type: ignore[override]
        if hp.modality not in spec.modalities:
            raise UserError(
                f"unimodal: modality '{hp.modality}' is not in the dataset; choose one of: {', '.join(spec.modalities)}"
            )
        check_backbone(spec.backbone, {hp.modality: spec.input_shapes[hp.modality]})

    @property
    def modalities(self) -> list[str]:
        return [self.hp.modality]  # type: ignore[attr-defined]

    def build_model(self) -> nn.Module:
        s = self.spec
        m = self.hp.modality  # type: ignore[attr-defined]
        return build_classifier(s.backbone, "concat", {m: s.input_shapes[m]}, s.num_classes, s.init)

    def describe_run(self) -> dict[str, object]:
        return {"estimator": "unimodal", "modality": self.hp.modality}  # type: ignore[attr-defined]
