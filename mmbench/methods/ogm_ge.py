"""`ogm_ge`: On-the-fly Gradient Modulation with Generalisation Enhancement (Peng, Wei et al.,
CVPR 2022; docs/methods/ogm_ge.md).

After the ordinary backward on the fused cross-entropy, the conv-kernel gradients of the
modality that currently fits the batch better are shrunk by k = 1 - tanh(alpha * rho), where rho
is the ratio of the modalities' summed true-class probabilities. OGM-GE then adds Gaussian noise,
scaled by each kernel's own (unmodulated) gradient std, to both modalities' conv kernels: the
noise is what restores the generalisation the shrinking takes away. BatchNorm and heads are never
touched. One forward, one backward, as in plain training.

Per-modality outputs for the ratio are the official ones: concat splits the head's weight with
bias/2, sum uses each branch head. The official code has none for film/gated (it crashes there),
so `film_gated_estimator` picks one and the run records which.

More than two modalities. Neither the official repo (GeWu-Lab/OGM-GE_CVPR2022@343dc1d) nor the
journal version (GeWu-Lab/BML_TPAMI2024@4b3aa4f, two-modality KS only) defines M > 2; the authors'
lab does in BalanceBenchmark (GeWu-Lab/BalanceBenchmark@4c1482f, `OGM_trainer.py`): each
modality's ratio is its score over the weakest modality's score (+1e-5), rho_m = s_m / (min_j s_j
+ 1e-5), and every modality with rho_m > 1 is slowed by k_m = 1 - tanh(alpha * rho_m); the weakest
keeps k = 1. For M = 2 this is the official rule (the leader's ratio over the other; the laggard
untouched), so M = 2 keeps the official code path, tie rule included. The concat split gives each
modality bias/M. Scores: `multi_score: probability` (default) is the two-modality score (summed
true-class probabilities), as BalanceBenchmark's `OGM_GE3` and the paper; `balancebench` is what
BalanceBenchmark's `OGM_GE` runs for three modalities: softmax(cos(logits)) at the true class,
summed over the items the modality classifies correctly only. (BalanceBenchmark's `OGM_GE3`
ratio, a mean of pairwise ratios, divides only the last modality's sum by M - 1, an indentation
slip; it is not offered.)

Which gradients: the official code modulates the encoders' 4-D (conv-kernel) gradients;
BalanceBenchmark every non-1-D encoder gradient. Here: every encoder weight of dimension >= 2,
which for the CNN encoders (tiny, resnet18) is exactly their conv kernels (BatchNorm is 1-D) and
for a 1-D feature encoder (mlp, transformer) its weight matrices, without which a feature
modality would never be modulated.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from mmbench.methods.agm import masked_outputs, shapley_responses
from mmbench.methods.base import Field, HParams, Method, StepContext, register_method
from mmbench.methods.modulation import modulate_encoder_grads
from mmbench.models.classifier import ModelOutput
from mmbench.models.fusion import Fusion

MULTI_EPS = 1e-5  # BalanceBenchmark's guard on the weakest score (M >= 3 only)


def ogm_coefficients_multi(scores: dict[str, torch.Tensor], alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """M >= 3 (BalanceBenchmark's rule): rho_m = s_m / (min_j s_j + 1e-5); k_m = 1 - tanh(alpha *
    rho_m) where rho_m > 1, else 1. Returns (k, rho) per modality."""
    s = {m: torch.as_tensor(v, dtype=torch.float32) for m, v in scores.items()}
    weakest = torch.stack(list(s.values())).min()
    rho = {m: v / (weakest + MULTI_EPS) for m, v in s.items()}
    k = {m: torch.where(r > 1, 1 - torch.tanh(alpha * torch.relu(r)), torch.ones_like(r)) for m, r in rho.items()}
    return k, rho


def modality_scores(logits: dict[str, torch.Tensor], labels: torch.Tensor, rule: str) -> dict[str, torch.Tensor]:
    """Batch sums per modality: true-class probability (`probability`), or BalanceBenchmark's
    three-modality score softmax(cos(logits))[y] counted only where argmax(logits) == y."""
    out = {}
    for m, lg in logits.items():
        lg = lg.float()
        if rule == "balancebench":
            p = torch.softmax(torch.cos(lg), dim=1).gather(1, labels[:, None]).squeeze(1)
            out[m] = (p * (lg.argmax(1) == labels)).sum()
        else:
            out[m] = torch.softmax(lg, dim=1).gather(1, labels[:, None]).sum()
    return out


def ogm_coefficients(score_a: Any, score_v: Any, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_a, k_v, rho_v) from the batch sums of true-class probabilities. Only the modality ahead
    is slowed; on a tie (rho_v == 1) the official `else` branch slows the first modality."""
    score_a, score_v = torch.as_tensor(score_a, dtype=torch.float32), torch.as_tensor(score_v, dtype=torch.float32)
    rho_v = score_v / score_a
    rho_a = 1 / rho_v
    one = torch.ones_like(rho_v)
    second_ahead = rho_v > 1
    k_v = torch.where(second_ahead, 1 - torch.tanh(alpha * torch.relu(rho_v)), one)
    k_a = torch.where(second_ahead, one, 1 - torch.tanh(alpha * torch.relu(rho_a)))
    return k_a, k_v, rho_v


class OGMGEHParams(HParams):
    alpha: float = Field(0.8, ge=0, description="modulation strength (README: 0.8 for CREMA-D, 0.1 for VGGSound)",
                         json_schema_extra={"search": [0.1, 0.3, 0.5, 0.8, 1.0]})
    ge: bool = Field(True, description="add the generalisation-enhancement noise (OGM-GE); false = plain OGM",
                     json_schema_extra={"search": [True, False]})
    modulation_starts: int = Field(0, ge=0, description="first modulated epoch (0-based, inclusive)",
                                   json_schema_extra={"search": [0, 10]})
    modulation_ends: int = Field(50, ge=0, description="last modulated epoch (0-based, inclusive)",
                                 json_schema_extra={"search": [50, 80]})
    film_gated_estimator: Literal["shapley", "zero"] = Field(
        "shapley",
        description="per-modality outputs for film/gated: AGM's zero-input Shapley responses, or f(x_a,0) / f(0,x_v)")
    multi_score: Literal["probability", "balancebench"] = Field(
        "probability", description="score for M >= 3: summed true-class probability, or BalanceBenchmark's "
        "cos-softmax over correctly classified items")

    @model_validator(mode="after")
    def _window(self) -> "OGMGEHParams":
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(
                f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self


@register_method
class OGMGE(Method):
    """Shrink the leading modality's conv-kernel gradients by 1 - tanh(alpha * rho) (+ GE noise)."""

    name = "ogm_ge"
    description = "OGM-GE: slow the leading modality's conv gradients by 1 - tanh(alpha*rho), plus Gaussian noise"
    HParams = OGMGEHParams
    n_modalities = (2, None)

    @property
    def ogm_estimator(self) -> str:
        """Which per-modality outputs feed the ratio (recorded with the run)."""
        fusion = self.model.fusion
        if type(fusion).split_logits is not Fusion.split_logits:
            return {"concat": f"weight-split-bias/{len(self.modalities)}", "sum": "branch-head"}.get(self.spec.fusion, "split-logits")
        hp: OGMGEHParams = self.hp  # type: ignore[assignment]
        return "shapley-zero-input" if hp.film_gated_estimator == "shapley" else "zero-input"

    def modality_outputs(self, inputs: dict[str, torch.Tensor], out: ModelOutput) -> dict[str, torch.Tensor]:
        """Detached per-modality logits used only for the ratio (never in the loss)."""
        with torch.no_grad():
            split = self.model.fusion.split_logits(out.features)
            if split is not None:
                return split
            # film/gated: two extra no-grad passes with one modality's input zeroed, in eval mode
            alone = masked_outputs(self.model, inputs)
            if self.hp.film_gated_estimator == "zero":  # type: ignore[attr-defined]
                return {m: alone[frozenset([m])] for m in self.modalities}
            return shapley_responses({frozenset(self.modalities): out.logits.detach(), **alone}, self.modalities)

    def modulate(self, coeffs: dict[str, torch.Tensor]) -> None:
        """Scale each encoder's weight (dim >= 2: conv kernels, feature encoders' matrices)
        gradients; with GE add N(0, (std(g) + 1e-8)^2) noise, std taken from the unmodulated
        gradient, whatever that modality's k."""
        modulate_encoder_grads(self.model.encoders, coeffs, self.hp.ge,  # type: ignore[attr-defined]
                               lambda g: g.dim() >= 2)

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: OGMGEHParams = self.hp  # type: ignore[assignment]
        mods = self.modalities
        self.zero_grad()
        with self.autocast():
            out = self.model(inputs)
            loss = F.cross_entropy(out.logits, labels)
            per_mod = self.modality_outputs(inputs, out)
        self.backward(loss)
        logs: dict[str, Any] = {"loss": loss.detach()}
        if len(mods) == 2:
            a, v = mods
            scores = modality_scores(per_mod, labels, "probability")
            k_a, k_v, rho_v = ogm_coefficients(scores[a], scores[v], hp.alpha)
            coeffs = {a: k_a, v: k_v}
            logs["ratio"] = rho_v
        else:
            coeffs, rho = ogm_coefficients_multi(modality_scores(per_mod, labels, hp.multi_score), hp.alpha)
            logs.update({f"ratio_{m}": r for m, r in rho.items()})
        if hp.modulation_starts <= ctx.epoch <= hp.modulation_ends:
            self.unscale()
            self.modulate(coeffs)
        self.optimizer_step()
        logs.update({f"k_{m}": k for m, k in coeffs.items()})
        return logs

    def describe_run(self) -> dict[str, Any]:
        out = {**super().describe_run(), "ogm_variant": "OGM-GE" if self.hp.ge else "OGM",  # type: ignore[attr-defined]
               "ogm_estimator": self.ogm_estimator}
        if len(self.modalities) > 2:
            out["ogm_multi"] = f"ratio to the weakest (BalanceBenchmark), score {self.hp.multi_score}"  # type: ignore[attr-defined]
        return out
