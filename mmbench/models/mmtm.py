"""MMTM: multimodal transfer modules between the modality encoders (fusion `mmtm`).

The architecture of "Balanced multimodal learning against greedy learning" (Wu et al., ICML 2022;
nyukat/greedy_multimodal_learning @ a190e03, `src/model.py`, `src/balanced_mmtm.py`), itself after Joze et
al.'s MMTM (CVPR 2020): each modality has its own ResNet18 trunk and its own linear head; after every trunk
stage but the first (ResNet18: layer2, layer3, layer4 — 128, 256, 512 channels) an MMTM block squeezes each
branch's feature map to a channel vector (mean over space, and over frames for video), passes their
concatenation through one shared `fc_squeeze` + ReLU, and gives each branch a sigmoid excitation from its
own `fc_excite` that rescales that branch's channels. These blocks are the cross-modal "bypass" paths whose
learning speed Greedy compares with the branches' own. The fused prediction is the MEAN of the branch heads'
logits (the official `(x_0 + x_1) / 2`).

Per-modality logits use the `branch-head` estimator (DESIGN.md §4.3): each branch's own head on its pooled
feature. Because of the MMTM blocks that feature has already been rescaled by the other modality, so a
branch head's accuracy is that of "modality m with the other's help through the bypass", the quantity the
paper's conditional utilisation rate starts from, not a unimodal model's.

Greedy's curation steps replace one branch's excitation with its running average over training forwards
(`cared`); every block keeps those averages as buffers so they travel with checkpoints. Averages are
updated on training-mode forwards only (the official code also updates them during val/test forwards,
which lets evaluation data move the training state; docs/methods/greedy.md).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mmbench.errors import UserError
from mmbench.models.classifier import ModelOutput, MultimodalClassifier
from mmbench.models.encoders import Encoder, ResNet18Trunk, SmallTrunk, TinyTrunk
from mmbench.models.fusion import Fusion

Stage = Callable[[torch.Tensor], torch.Tensor]


class MMTM(nn.Module):
    """One transfer block between M >= 2 branches (the official block for two; same algebra for more).

    `average_rule`: "fixed" updates every branch's running excitation with its own excitation; "official"
    reproduces the released code (two branches only), which updates the SECOND branch's average with the
    FIRST branch's excitation (`running_avg_weight_skeleton` from `vis_out`)."""

    def __init__(self, dims: dict[str, int], ratio: int = 4, average_rule: str = "fixed") -> None:
        super().__init__()
        self.modalities = list(dims)
        total = sum(dims.values())
        hidden = int(2 * total / ratio)
        if average_rule == "official" and (len(dims) != 2 or len(set(dims.values())) != 1):
            raise UserError(f"running_average 'official' copies the first branch's excitation into the second's "
                            f"average, which needs two branches of equal width; got {dims}; use running_average: fixed")
        self.average_rule = average_rule
        self.fc_squeeze = nn.Linear(total, hidden)
        self.fc_excite = nn.ModuleDict({m: nn.Linear(hidden, d) for m, d in dims.items()})
        self.relu = nn.ReLU()
        for m, d in dims.items():
            self.register_buffer(f"avg_excitation_{m}", torch.zeros(d))
        self.register_buffer("avg_count", torch.zeros((), dtype=torch.long))

    def average(self, m: str) -> torch.Tensor:
        return getattr(self, f"avg_excitation_{m}")

    def excitations(self, squeezed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-branch sigmoid excitations (B, C_m) from the per-sample squeezed channel vectors."""
        hidden = self.relu(self.fc_squeeze(torch.cat([squeezed[m] for m in self.modalities], 1)))
        return {m: torch.sigmoid(self.fc_excite[m](hidden)) for m in self.modalities}

    @torch.no_grad()
    def update_averages(self, exc: dict[str, torch.Tensor]) -> None:
        """Cumulative mean over forwards of the batch-mean excitation (the official running average)."""
        n = self.avg_count  # a tensor: no host sync per block and step
        first = self.modalities[0]
        new = {m: ((exc[first] if self.average_rule == "official" else exc[m]).mean(0) + self.average(m) * n) / (n + 1)
               for m in self.modalities}
        for m in self.modalities:
            self.average(m).copy_(new[m])
        self.avg_count += 1

    def forward(self, squeezed: dict[str, torch.Tensor], cared: str | None = None) -> dict[str, torch.Tensor]:
        """Excitations to apply, (B, C_m) each; for the `cared` modality its running average instead
        (a constant: no cross-modal information reaches that branch, and its fc_excite gets no gradient)."""
        exc = self.excitations(squeezed)
        if self.training:
            self.update_averages(exc)
        if cared is not None:
            exc[cared] = self.average(cared).clone().expand_as(exc[cared])
        return exc


def trunk_stages(trunk: nn.Module) -> list[Stage]:
    """The trunk's forward cut into its stages (their composition is exactly `trunk.forward`): ResNet18's
    four residual stages (the stem belongs to the first), the tiny CNN's three conv blocks."""
    if isinstance(trunk, ResNet18Trunk):
        t = trunk
        return [lambda x: t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x))))), t.layer2, t.layer3, t.layer4]
    if isinstance(trunk, (TinyTrunk, SmallTrunk)):  # one stage per conv block (conv, BN, ReLU, pool)
        net = trunk.net
        starts = [i for i, m in enumerate(net) if isinstance(m, nn.Conv2d)]
        return [net[a:b] for a, b in zip(starts, starts[1:] + [len(net)])]
    raise UserError(f"fusion 'mmtm' needs convolutional trunks whose stages it can couple (resnet18, tiny or small); "
                    f"got {type(trunk).__name__}")


def stage_widths(trunk: nn.Module) -> list[int]:
    if isinstance(trunk, ResNet18Trunk):
        return [64, 128, 256, 512]
    assert isinstance(trunk, (TinyTrunk, SmallTrunk))
    convs = [m for m in trunk.net if isinstance(m, nn.Conv2d)]
    return [c.out_channels for c in convs]


class MMTMClassifier(MultimodalClassifier):
    """Encoders coupled by MMTM blocks after every stage but the first; a mean-of-branch-heads fusion.

    `cared`: the modality whose excitations the next training forward replaces with their running
    averages (Greedy's curation step), or None."""

    def __init__(self, encoders: dict[str, Encoder], fusion: Fusion, ratio: int = 4, average_rule: str = "fixed") -> None:
        super().__init__(encoders, fusion)
        if len(encoders) < 2:
            raise UserError("fusion 'mmtm' couples two or more modalities; the dataset gives one")
        trunks = {m: e.trunk for m, e in encoders.items()}
        stages = {m: trunk_stages(t) for m, t in trunks.items()}
        n = {len(s) for s in stages.values()}
        if len(n) != 1:
            raise UserError("fusion 'mmtm' needs the same backbone for every modality")
        widths = {m: stage_widths(t) for m, t in trunks.items()}
        self.n_stages = n.pop()
        self.mmtm = nn.ModuleDict({
            str(i): MMTM({m: widths[m][i] for m in self.modalities}, ratio, average_rule) for i in range(1, self.n_stages)
        })
        self.cared: str | None = None

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        enc: dict[str, Encoder] = dict(self.encoders.items())  # type: ignore[arg-type]
        frames: dict[str, int] = {}
        x: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            v = inputs[m]
            if enc[m].video:  # frames folded into the batch, as Encoder does
                frames[m] = v.shape[1]
                v = v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])
            x[m] = v
        stages = {m: trunk_stages(enc[m].trunk) for m in self.modalities}
        for i in range(self.n_stages):
            x = {m: stages[m][i](x[m]) for m in self.modalities}
            if i == 0:
                continue
            squeezed = {m: self._squeeze(x[m], frames.get(m)) for m in self.modalities}
            cared = self.cared if self.training else None
            exc = self.mmtm[str(i)](squeezed, cared)
            x = {m: self._excite(x[m], exc[m], frames.get(m)) for m in self.modalities}
        out = {}
        for m in self.modalities:  # pooling exactly as Encoder.forward pools
            y = x[m]
            if m in frames:
                b = y.shape[0] // frames[m]
                out[m] = y.reshape(b, frames[m], *y.shape[1:]).mean(dim=(1, 3, 4))
            else:
                out[m] = y.mean(dim=(2, 3))
        return out

    @staticmethod
    def _squeeze(y: torch.Tensor, t: int | None) -> torch.Tensor:
        """Per-sample channel vector: mean over space (and frames for video)."""
        if t is None:
            return y.reshape(y.shape[0], y.shape[1], -1).mean(-1)
        return y.reshape(y.shape[0] // t, t, y.shape[1], -1).mean(-1).mean(1)

    @staticmethod
    def _excite(y: torch.Tensor, e: torch.Tensor, t: int | None) -> torch.Tensor:
        if t is not None:
            e = e.repeat_interleave(t, dim=0)
        return y * e.reshape(*e.shape, *([1] * (y.dim() - 2)))

    def forward(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        feats = self.encode(inputs)
        return ModelOutput(self.fusion(feats), feats)
