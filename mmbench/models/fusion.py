"""Fusion heads: pooled per-modality features -> class logits.

Every fusion also says how per-modality logits are estimated (DESIGN.md §4.3) and names that
estimator, so a run records which definition of "audio accuracy" its numbers use:
- concat: the fused head with every other modality held at its mean feature (`mean-feature`);
- sum: each branch's own linear head (`branch-head`);
- film / gated: the fused head with the other modality's feature at its mean (`mean-feature`);
- shared: the one head every modality shares, applied to that modality alone (`branch-head`).
`split_logits` is OGM-GE's raw split (concat: W_m phi_m + b/M; sum: the branch head), which
OGM-GE's coefficient uses and which is logged as `acc_split/<m>` for comparison with papers.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Callable

import torch
from torch import nn

from mmbench.errors import UserError
from mmbench.registry import Registry

FUSIONS: Registry[Callable[..., "Fusion"]] = Registry("fusion")


class Fusion(nn.Module, metaclass=ABCMeta):
    estimator = "mean-feature"
    two_modalities_only = False  # film / gated: one modality conditions the other

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.modalities = list(dims)
        self.dims = dict(dims)
        self.num_classes = num_classes

    @abstractmethod
    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused logits (B, C) from pooled features per modality."""

    def modality_logits(self, feats: dict[str, torch.Tensor], means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits of each modality with every other modality held at its mean feature."""
        out = {}
        for m in self.modalities:
            held = {k: (v if k == m else means[k].expand_as(v)) for k, v in feats.items()}
            out[m] = self.forward(held)
        return out

    def split_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return None


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """Linear head on the concatenated features (modalities in declared order, audio first)."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.fc = nn.Linear(sum(dims.values()), num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([feats[m] for m in self.modalities], dim=1))

    def weight_slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for m in self.modalities:
            out[m] = slice(start, start + self.dims[m])
            start += self.dims[m]
        return out

    def split_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = len(self.modalities)
        w, b = self.fc.weight, self.fc.bias
        return {m: feats[m] @ w[:, sl].t() + b / n for m, sl in self.weight_slices().items()}


@FUSIONS.register("sum")
class SumFusion(Fusion):
    """One linear head per modality; logits summed."""

    estimator = "branch-head"

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.heads[m](feats[m]) for m in self.modalities]).sum(0)

    def modality_logits(self, feats: dict[str, torch.Tensor], means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.split_logits(feats)

    def split_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](feats[m]) for m in self.modalities}


@FUSIONS.register("shared")
class SharedHeadFusion(Fusion):
    """One linear head shared by every modality (MLA): logits_m = h(phi_m); fused = sum_m w_m logits_m.

    Sharing the head is what lets MLA train modalities one at a time without each one forgetting
    the others' decision boundaries; it needs equal feature widths. `weights` (default 1/M each) is
    the late-fusion blend used at inference; a method may set it (MLA: 0.55/0.45)."""

    estimator = "branch-head"

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        widths = set(dims.values())
        if len(widths) != 1:
            raise UserError(f"fusion 'shared' needs every modality's feature width to be equal, got {dims}; "
                            "use a backbone that gives equal widths (e.g. resnet18 or tiny)")
        self.head = nn.Linear(widths.pop(), num_classes)
        self.weights: dict[str, float] = {m: 1.0 / len(dims) for m in dims}

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.weights[m] * self.head(feats[m]) for m in self.modalities]).sum(0)

    def modality_logits(self, feats: dict[str, torch.Tensor], means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.split_logits(feats)

    def split_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.head(feats[m]) for m in self.modalities}


def _two(dims: dict[str, int], name: str) -> tuple[str, str]:
    if len(dims) != 2:
        raise UserError(f"fusion '{name}' needs exactly two modalities, got {list(dims)}; use concat or sum")
    a, b = list(dims)
    return a, b


@FUSIONS.register("film")
class FiLMFusion(Fusion):
    """FiLM (OGM-GE `x_film`): the first modality produces gamma, beta that modulate the second."""

    two_modalities_only = True

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.cond, self.target = _two(dims, "film")
        self.film = nn.Linear(dims[self.cond], 2 * dims[self.target])
        self.fc_out = nn.Linear(dims[self.target], num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(feats[self.cond]).chunk(2, dim=1)
        return self.fc_out(gamma * feats[self.target] + beta)


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    """Gated (OGM-GE `x_gate`): fc_out(sigmoid(fc_x(first)) * fc_y(second))."""

    two_modalities_only = True

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int | None = None) -> None:
        super().__init__(dims, num_classes)
        self.gate_mod, self.value_mod = _two(dims, "gated")
        h = hidden or max(dims.values())
        self.fc_x = nn.Linear(dims[self.gate_mod], h)
        self.fc_y = nn.Linear(dims[self.value_mod], h)
        self.fc_out = nn.Linear(h, num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc_out(torch.sigmoid(self.fc_x(feats[self.gate_mod])) * self.fc_y(feats[self.value_mod]))


def check_fusion(name: str, modalities: list[str]) -> None:
    """Raise UserError before training if fusion `name` cannot combine these modalities."""
    cls = FUSIONS.get(name)
    if getattr(cls, "two_modalities_only", False) and len(modalities) != 2:
        raise UserError(f"fusion '{name}' needs exactly two modalities, the dataset gives {len(modalities)} "
                        f"({', '.join(modalities)}); set model.fusion to concat or sum")


def build_fusion(name: str, dims: dict[str, int], num_classes: int) -> Fusion:
    return FUSIONS.get(name)(dims, num_classes)
