"""`opm`: On-the-fly Prediction Modulation, and OGM as in the journal version (Wei, Hu et al., "On-the-fly
Modulation for Balanced Multimodal Learning", TPAMI 2024).

Source: GeWu-Lab/BML_TPAMI2024 @ 4b3aa4fd841856c4acbebf48549e6c59fbf7635e (`code/main.py` `train`,
`code/models/Classifier.py` `Modality_drop`, `calcu_q`, `Classifier.forward`, `code/config.py`,
`code/scripts/train_opm.sh`, `train_ogm.sh`); for more than two modalities, BalanceBenchmark @ 4c1482fc
(`balancemm/trainer/OPM_trainer.py`). docs/methods/opm.md.

Why it balances: OGM slows the leading modality's gradients; OPM instead weakens its PREDICTION while
training, by dropping the leading modality's features for a random subset of samples, so the fused loss
has to be carried by the others. The drop probability grows with how far the modality leads:
    s_m = sum_i softmax(t_m)_i[y_i]   (t_m: the head's raw split with bias/M, detached weights)
    rho_m = tanh(relu(s_m / sum_{n != m} s_n - 1));   q_m = q_base * (1 + lam * rho_m) if rho_m > 0 else 0,
clipped to [0, 1]. With probability p_exe per step (numpy's RNG, as the code draws it) the drop runs:
each sample keeps modality m with probability 1 - q_m (one Bernoulli draw per sample and modality, on the
CPU generator, in the code's shape and order), kept features are scaled by 1 / (1 - theta) with
theta = sum_m d_m q_m / sum_m d_m (d_m the feature widths), and samples that lost every modality leave the
batch; if none is left the step is skipped (the code's `continue`). The loss is the fused cross-entropy
on what is left. Epochs 0..warmup_epochs-1 are plain joint training (the code's `epoch <= 5`).

A bug in the released drop, kept behind `theta_grad: official`: the lead scores are not detached, so q and
theta carry autograd history, and the custom autograd Function that scales the kept features returns
`theta` itself as theta's gradient. Backward therefore adds theta * d(theta)/d(params), a gradient with no
loss behind it, into the encoders through the scores (measured on the conformance batch: 17 % of the audio
encoder's first conv gradient). `theta_grad: none` (default) treats q and theta as the constants the paper
describes; `official` reproduces the released gradient exactly.

`mode: ogm` is the journal's OGM(-GE): the CVPR rule (docs/methods/ogm_ge.md) with the same warm-up,
coefficients from the same raw-split scores, applied inside [modulation_starts, modulation_ends]; `plus`
is the code's OGM+ switch (the weaker modality's conv gradients multiplied by 4 instead of slowing the
leader). The journal code defines OGM for two modalities only; `mode: ogm` refuses more.

Per-modality accuracy uses the fusion's own estimator (DESIGN.md §4.3); the drop needs the raw split, so
only `concat` and `sum` are served.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator

from mmbench.errors import UserError
from mmbench.methods.base import Field, HParams, Method, ModelSpec, StepContext, register_method
from mmbench.methods.modulation import modulate_encoder_grads

class OPMHParams(HParams):
    mode: Literal["opm", "ogm"] = Field("opm", description="opm = prediction modulation (feature drop); ogm = the journal's gradient modulation",
                                        json_schema_extra={"search": ["opm", "ogm"]})
    q_base: float = Field(0.5, ge=0, le=1, description="opm: base drop probability of a leading modality (train_opm.sh 0.5)",
                          json_schema_extra={"search": [0.3, 0.4, 0.5, 0.6]})
    lam: float = Field(0.5, ge=0, description="opm: how much the lead raises the drop probability (train_opm.sh 0.5)",
                       json_schema_extra={"search": [0.3, 0.5, 1.0]})
    p_exe: float = Field(0.7, ge=0, le=1, description="opm: probability that a step drops at all (train_opm.sh 0.7)",
                         json_schema_extra={"search": [0.5, 0.7, 0.9]})
    warmup_epochs: int = Field(6, ge=0, description="plain joint epochs first (the code's `epoch <= 5`: six)",
                               json_schema_extra={"search": [0, 6]})
    alpha: float = Field(0.8, ge=0, description="ogm: modulation strength (train_ogm.sh 0.8)",
                         json_schema_extra={"search": [0.3, 0.5, 0.8, 1.0]})
    ge: bool = Field(True, description="ogm: add the generalisation-enhancement noise (the code's default OGM_GE)")
    plus: bool = Field(False, description="ogm: the code's OGM+ (weaker modality's conv gradients x4 instead of slowing the leader)")
    modulation_starts: int = Field(0, ge=0, description="ogm: first modulated epoch (0-based, inclusive)")
    modulation_ends: int = Field(60, ge=0, description="ogm: last modulated epoch (0-based, inclusive; train_ogm.sh 60)")
    theta_grad: Literal["none", "official"] = Field(
        "none", description="opm: none = q and theta are constants (paper); official = the released code's spurious "
                            "theta gradient through the undetached scores")

    @model_validator(mode="after")
    def _window(self) -> "OPMHParams":
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self


def lead_ratios(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tanh(relu(s_m / sum of the others - 1)): zero unless m leads; two modalities give the code's s1/s2."""
    out = {}
    for m, s in scores.items():
        others = sum(v for k, v in scores.items() if k != m)
        out[m] = torch.tanh(torch.relu(s / others - 1))
    return out


def drop_probabilities(scores: dict[str, torch.Tensor], q_base: float, lam: float) -> torch.Tensor:
    """q per modality (float32, CPU, dataset order), as `calcu_q` builds it."""
    q = torch.zeros(len(scores))
    for i, r in enumerate(lead_ratios(scores).values()):
        q[i] = q_base * (1 + lam * r) if r > 0 else 0
    return torch.clip(q, 0.0, 1.0)


def drop_masks(q: torch.Tensor, batch: int) -> torch.Tensor:
    """(M, B) keep-masks: one Bernoulli(1 - q_m) draw per sample and modality, in the code's order
    (sample([B, 1]) then permute), so the same generator state gives the same masks."""
    m = q.numel()
    return torch.distributions.Bernoulli(1 - q).sample([batch, 1]).permute(2, 1, 0).contiguous().reshape(m, batch)


def drop_theta(q: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """theta = sum_m d_m q_m / sum_m d_m (float32, as the code builds it; keeps q's autograd history)."""
    return (torch.tensor(dims, device=q.device) * q).sum() / sum(dims)


def drop_scale(q: torch.Tensor, dims: list[int]) -> float:
    """1 - theta as the code divides by it (a Python float)."""
    return 1 - drop_theta(q, dims).item()


class ScaleKept(torch.autograd.Function):
    """x / (1 - theta) forward, (1 / (1 - theta)) * g backward: the code's rounding in both directions
    (plain autograd of a division would compute g / (1 - theta), off in the last bit)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x / scale

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return 1 / ctx.scale * g.clone(), None


def detached_split(fusion: torch.nn.Module, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The raw split with the head's parameters detached but the features' history kept."""
    if hasattr(fusion, "fc"):  # concat: W_m phi_m + b / M
        w, b, n = fusion.fc.weight.detach(), fusion.fc.bias.detach(), len(fusion.modalities)
        return {m: feats[m] @ w[:, sl].t() + b / n for m, sl in fusion.weight_slices().items()}
    return {m: F.linear(feats[m], h.weight.detach(), h.bias.detach()) for m, h in fusion.heads.items()}


@register_method
class OPM(Method):
    """Drop the leading modality's features for some samples (OPM), or the journal's OGM."""

    name = "opm"
    description = "OPM (TPAMI 2024): drop the leading modality's features per sample with a lead-dependent probability; or the journal OGM"
    HParams = OPMHParams
    n_modalities = (2, None)
    fusions = {"concat", "sum"}
    fusion_reason = "the lead is measured on the head's raw per-modality split, which only concat and sum have"

    @classmethod
    def check(cls, spec: ModelSpec, hp: HParams) -> None:
        super().check(spec, hp)
        if hp.mode == "ogm" and len(spec.modalities) != 2:  # type: ignore[attr-defined]
            raise UserError(f"method 'opm' with mode: ogm needs 2 modalities, the dataset gives {len(spec.modalities)} "
                            f"({', '.join(spec.modalities)}): the journal code defines OGM for two; use mode: opm")

    def __init__(self, spec: ModelSpec, hp: HParams, train: Any) -> None:
        self.check(spec, hp)
        super().__init__(spec, hp, train)

    @property
    def ohp(self) -> OPMHParams:
        return self.hp  # type: ignore[return-value]

    def scores(self, feats: dict[str, torch.Tensor], labels: torch.Tensor, graph: bool = False) -> dict[str, torch.Tensor]:
        """Summed true-class probabilities of the raw split. `graph`: keep the features' autograd history
        (head weights detached), as the released code does (`theta_grad: official`)."""
        with torch.set_grad_enabled(graph):
            fusion = self.model.fusion
            split = detached_split(fusion, feats) if graph else fusion.split_logits({m: f.detach() for m, f in feats.items()})
            return {m: torch.softmax(split[m].float(), dim=1).gather(1, labels[:, None]).sum() for m in self.modalities}

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp = self.ohp
        self.zero_grad()
        warm = ctx.epoch < hp.warmup_epochs
        with self.autocast():
            feats = self.model.encode(inputs)
        official_grad = hp.mode == "opm" and not warm and hp.theta_grad == "official"
        scores = self.scores(feats, labels, graph=official_grad)
        logs: dict[str, Any] = {f"score_{m}": s.detach() for m, s in scores.items()}
        y = labels
        spurious = None
        if hp.mode == "opm" and not warm:
            q = drop_probabilities(scores, hp.q_base, hp.lam)
            logs.update({f"q_{m}": q[i].detach() for i, m in enumerate(self.modalities)})
            execute = bool(np.random.rand(1) >= 1 - hp.p_exe)
            logs["drop_executed"] = float(execute)
            if execute:
                keep = drop_masks(q, labels.shape[0]).to(labels.device)
                theta = drop_theta(q, [feats[m].shape[1] for m in self.modalities])
                scale = 1 - theta.item()
                if official_grad and theta.requires_grad:
                    spurious = theta * theta.detach()  # its gradient is theta * dtheta/dparams, as the code's backward
                alive = keep.sum(0) > 0
                logs["kept_samples"] = alive.float().mean()
                if not bool(alive.any()):
                    logs["skipped"] = 1.0
                    return logs  # the code's `continue`: no loss, no step
                feats = {m: ScaleKept.apply(feats[m] * keep[i].unsqueeze(1).to(feats[m].dtype), scale)[alive]
                         for i, m in enumerate(self.modalities)}
                y = labels[alive]
        with self.autocast():
            loss = F.cross_entropy(self.model.fusion(feats), y)
        self.backward(loss if spurious is None else loss + spurious)
        if hp.mode == "ogm":
            a, v = self.modalities
            rho = scores[a] / scores[v]
            if hp.plus:
                k = {a: 1.0, v: 4.0} if rho > 1 else {a: 4.0, v: 1.0}
            elif rho > 1:
                k = {a: float(1 - torch.tanh(hp.alpha * torch.relu(rho))), v: 1.0}
            else:
                k = {a: 1.0, v: float(1 - torch.tanh(hp.alpha * torch.relu(1 / rho)))}
            logs.update({f"k_{m}": v_ for m, v_ in k.items()} | {"ratio": rho})
            if not warm and hp.modulation_starts <= ctx.epoch <= hp.modulation_ends:
                self.unscale()
                modulate_encoder_grads(self.model.encoders, k, hp.ge, lambda g: g.dim() == 4)  # the code's 4-D kernels
        self.optimizer_step()
        logs["loss"] = loss.detach()
        return logs

    def describe_run(self) -> dict[str, Any]:
        hp = self.ohp
        variant = "OPM" if hp.mode == "opm" else ("OGM+" if hp.plus else "OGM-GE" if hp.ge else "OGM") + " (journal)"
        return {**super().describe_run(), "opm_variant": variant, "theta_grad": hp.theta_grad,
                "lead_rule": "s_m / s_other" if len(self.modalities) == 2 else "s_m / sum of the others (BalanceBenchmark)"}
