"""The multimodal classifier: one encoder per modality and a fusion head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmbench.models.encoders import build_encoder
from mmbench.models.fusion import Fusion, build_fusion


@dataclass
class ModelOutput:
    """What a forward returns: fused logits (B, C) and pooled features per modality (B, D).

    `modality_logits` is filled only by models/methods that have their own per-modality heads
    (MIE's classifiers); otherwise the trainer derives them with the fusion's estimator.
    """

    logits: torch.Tensor
    features: dict[str, torch.Tensor]
    modality_logits: dict[str, torch.Tensor] | None = None


class MultimodalClassifier(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: Fusion) -> None:
        super().__init__()
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def forward(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        feats = self.encode(inputs)
        return ModelOutput(self.fusion(feats), feats)


def weight_init(module: nn.Module) -> None:
    """The init every method repo applies to the whole model (OGM-GE `weight_init`): Linear
    xavier-normal with zero bias, Conv2d kaiming-normal fan_out, BatchNorm weight 1 bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_classifier(
    backbone: str,
    fusion: str,
    input_shapes: dict[str, list[int]],
    num_classes: int,
    init: str = "repo",
) -> MultimodalClassifier:
    """`init='repo'` applies `weight_init` (the recipes' default); `'backbone'` keeps each
    layer's own init."""
    encoders = {m: build_encoder(backbone, m, shape) for m, shape in input_shapes.items()}
    head = build_fusion(fusion, {m: e.out_dim for m, e in encoders.items()}, num_classes)
    if fusion == "mmtm":  # the fusion is an architecture: MMTM blocks between the encoders (Greedy)
        from mmbench.models.mmtm import MMTMClassifier

        model: MultimodalClassifier = MMTMClassifier(encoders, head)
    else:
        model = MultimodalClassifier(encoders, head)
    if init == "repo":
        model.apply(weight_init)
    return model
