"""Per-modality terms of an additive fusion head, and the cosine head built on them.

Several balancing methods (MMCosine, CML, MBSD, LFM) work on each modality's own block of the
classifier: concat's weight split (W_m phi_m, the bias shared) or sum's branch heads. This module
names those blocks once, so every such method reads them the same way and the trainer's
per-modality estimators (DESIGN.md §4.3) keep working:

- `weight_blocks` / `shared_bias`: W_m per modality and the bias that is not any one modality's
  (concat's b; none for sum, whose biases live in the branch heads);
- `CosineHead`: MMCosine's head, s * sum_m cos(phi_m, W_m) per class. It wraps the concat/sum head
  it replaces (same parameters, same initialisation, the bias unused) and is additive over
  modalities, so its per-modality logits are exact terms of the fused logits: estimator
  `cosine-branch`, the cosine analogue of sum's `branch-head`.

Only concat and sum are additive per modality; film/gated mix modalities before the output layer,
so they have no per-modality weight block and the methods here refuse them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmbench.models.fusion import ConcatFusion, Fusion, SumFusion

ADDITIVE_FUSIONS = {"concat", "sum"}
ADDITIVE_REASON = ("it works on each modality's own block of the classifier, which only the additive "
                   "heads have (concat's weight split, sum's branch heads); film/gated mix modalities first")


def weight_blocks(fusion: Fusion) -> dict[str, torch.Tensor]:
    """W_m (C, D_m) of each modality: concat's column slice, sum's branch-head weight (views, with grad)."""
    if isinstance(fusion, ConcatFusion):
        return {m: fusion.fc.weight[:, sl] for m, sl in fusion.weight_slices().items()}
    if isinstance(fusion, SumFusion):
        return {m: fusion.heads[m].weight for m in fusion.modalities}
    raise TypeError(f"{type(fusion).__name__} has no per-modality weight blocks")


def shared_bias(fusion: Fusion) -> torch.Tensor | None:
    """The bias no modality owns: concat's (its split gives each modality b/M); sum has none."""
    if isinstance(fusion, ConcatFusion):
        return fusion.fc.bias
    if isinstance(fusion, SumFusion):
        return None
    raise TypeError(f"{type(fusion).__name__} is not an additive fusion")


def cosine_logits(feat: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * cos(phi, w_c) for every class c: features L2-normalised per sample, W per class row.

    Written as MMCosine's code writes it (normalise W^T along dim 0, then scale the product), so
    the result matches it bit for bit."""
    return torch.mm(F.normalize(feat, dim=1), F.normalize(weight.t(), dim=0)) * scaling


class CosineHead(Fusion):
    """MMCosine's classifier: s * sum_m cos(phi_m, W_m); wraps the concat or sum head it replaces.

    `base` keeps the original linear head: its weight blocks are the cosine head's weights, and
    methods may still call it (MMCosine outside its modulation window, or the official repo's
    evaluation, which reads the linear head)."""

    estimator = "cosine-branch"

    def __init__(self, base: Fusion, scaling: float) -> None:
        super().__init__(base.dims, base.num_classes)
        weight_blocks(base)  # raises for heads without per-modality blocks
        self.base = base
        self.scaling = scaling

    def split_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = weight_blocks(self.base)
        return {m: cosine_logits(feats[m], w[m], self.scaling) for m in self.modalities}

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.split_logits(feats)
        out = parts[self.modalities[0]]
        for m in self.modalities[1:]:
            out = out + parts[m]
        return out

    def modality_logits(self, feats: dict[str, torch.Tensor], means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's own cosine term: the fused logits are exactly their sum (no other
        modality to hold at its mean)."""
        return self.split_logits(feats)
