"""`mla`: Multimodal Learning with Alternating unimodal adaptation (Zhang, Yoon, Bansal & Yao, CVPR 2024).

Source: Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation @ ab6c184579f9ff390e9c9b8216c9900c2a43545b
(`main.py` `train_epoch` with `--gs_flag`, `utils/utils.py` `GSPlugin`, `models/basic_model.py`); docs/methods/mla.md.

Why it balances: no modality ever shares a loss with another. Each batch trains the modalities one
after another, each through its own encoder and ONE classifier head that all of them share, with its
own optimizer step; the shared head is what carries cross-modal knowledge, and projecting the head's
gradient away from the directions earlier modalities used (an OWM-style recursive projector) keeps
each unimodal step from erasing what the others taught it.

The step, as the official code orders it:
1. one train-mode forward of every encoder (features phi_m, computed once, before any update);
2. for each modality m in order: loss_m = CE(h(phi_m), y); backward (only m's encoder and h get
   gradients); project h's weight gradient; optimizer step (SGD skips parameters without gradients,
   so the other encoders are untouched); zero the gradients. M optimizer steps per batch.
The projector P (D x D, identity at the start, one for the whole run, shared by the modalities) is
updated before every step except the very first of the run, with r the batch-mean of phi_m and
beta = 0.1 ** (1 + batch_index / batches_per_epoch):  k = P r^T;  P <- P - k k^T / (beta + r k);
P <- P / ||P||_F;  grad W_h <- grad W_h P^T.  The bias gradient is never projected.

Two bugs in the released projector, both fixed by default and both kept behind `projection`:
- the projector looks for a parameter named "module.weight" on the plain Linear head, whose weight is
  named "weight", so in the released code the projection never runs (`projection: released`);
- with the name fixed, its update divides k k^T elementwise by (beta + k r), an outer-product MATRIX
  (`torch.mm(k, r)` with k D x 1 and r 1 x D), where OWM's recursive least squares divides by the
  scalar beta + r k (`projection: code` runs the code's formula). BalanceBenchmark (GeWu-Lab/BalanceBenchmark
  @ 4c1482fc, `MLA_trainer.py`) fixes the name, keeps the matrix, and ADDS the projected gradient to
  the raw one (grad + grad P^T; `projection: balancebench`).
`projection: owm` (default) is the paper's OWM projection: scalar denominator, grad <- grad P^T.
The run records which ran.

Inference blends the modalities' logits from the shared head: fixed weights (the training script
evaluates with 0.55 / 0.45 for two modalities, 0.35 / 0.25 / 0.4 for audio / visual / text) or
`gating: dynamic`, entropy-based: w_m ∝ exp(H_max - H_m). The official entropy is taken with a
softmax over the BATCH dimension and summed over the batch (`entropy_dim: batch`); `classes` is the
per-sample reading the paper's text suggests (mean over the batch of the class entropy).

Per-modality accuracy uses the `branch-head` estimator: the shared head applied to one modality.
The projector's update runs under no_grad: the official code builds it from features that carry
autograd history but only ever reads `.data`, so the numbers are the same.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from mmbench.errors import UserError
from mmbench.methods.base import Field, HParams, Method, ModelSpec, StepContext, TrainSpec, register_method
from mmbench.models.classifier import ModelOutput
from mmbench.models.fusion import SharedHeadFusion

# the official evaluation blends (main(av_alpha=0.55); --a_alpha/--v_alpha/--t_alpha defaults)
OFFICIAL_WEIGHTS = {2: [0.55, 0.45], 3: [0.35, 0.25, 0.4]}


class MLAHParams(HParams):
    weights: list[float] | None = Field(
        None, description="fixed inference blend per modality, in dataset order (default: the official "
                          "0.55/0.45 for two modalities, 0.35/0.25/0.4 for three, uniform otherwise)",
        json_schema_extra={"search": [[0.5, 0.5], [0.55, 0.45], [0.6, 0.4]]})
    gating: Literal["fixed", "dynamic"] = Field(
        "fixed", description="inference blend: fixed weights, or the entropy-based dynamic gate (--dynamic)",
        json_schema_extra={"search": ["fixed", "dynamic"]})
    entropy_dim: Literal["batch", "classes"] = Field(
        "batch", description="dynamic gate's entropy: the official softmax over the batch dimension, or per sample over classes")
    projection: Literal["owm", "released", "code", "balancebench"] = Field(
        "owm", description="head-gradient projection: owm = the paper's (scalar denominator); released = none "
                           "(the released name check never matches); code = the code's matrix denominator; "
                           "balancebench = code's P, grad + grad P^T",
        json_schema_extra={"search": ["owm", "released"]})

    @model_validator(mode="after")
    def _weights(self) -> "MLAHParams":
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError(f"weights {self.weights}: must be non-negative with a positive sum")
        return self


def projector_update(P: torch.Tensor, feats: torch.Tensor, beta: float, rule: str = "owm") -> torch.Tensor:
    """One recursive step of the projector from the batch-mean feature r, Frobenius-normalised.
    `owm`: P - k k^T / (beta + r k) with the scalar r k; `code`: the released formula, which divides
    elementwise by the D x D matrix beta + k r."""
    r = feats.mean(0, keepdim=True)
    k = P @ r.t()
    denom = r @ k if rule == "owm" else k @ r
    P = P - (k @ k.t()) / (beta + denom)
    return P / torch.linalg.norm(P)


def project_gradient(grad: torch.Tensor, P: torch.Tensor, rule: str) -> torch.Tensor:
    projected = grad @ P.t().to(grad.dtype)
    return grad + projected if rule == "balancebench" else projected


def projector_beta(step: int, steps_per_epoch: int) -> float:
    return 1.0 * 0.1 ** (step / steps_per_epoch + 1)


def entropy_gates(logits: dict[str, torch.Tensor], dim: str) -> dict[str, torch.Tensor]:
    """w_m ∝ exp(H_max - H_m): the more certain modality gets more weight."""
    if dim == "batch":
        ent = {m: -(F.softmax(x, dim=0) * F.log_softmax(x, dim=0)).sum() for m, x in logits.items()}
    else:
        ent = {m: -(F.softmax(x, dim=1) * F.log_softmax(x, dim=1)).sum(1).mean() for m, x in logits.items()}
    h_max = torch.stack(list(ent.values())).max()
    raw = {m: torch.exp(h_max - h) for m, h in ent.items()}
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()}


@register_method
class MLA(Method):
    """Alternating unimodal steps through one shared head, with its gradient projected (OWM)."""

    name = "mla"
    description = "MLA: modalities trained one after another through one shared head, head gradient projected (OWM)"
    HParams = MLAHParams
    n_modalities = (2, None)
    fusions = {"shared"}
    fusion_reason = ("MLA is defined on one classifier head shared by every modality; "
                     "in a comparison recipe give its entry `model: {fusion: shared}`")

    @classmethod
    def check(cls, spec: ModelSpec, hp: HParams) -> None:
        super().check(spec, hp)
        w = hp.weights  # type: ignore[attr-defined]
        if w is not None and len(w) != len(spec.modalities):
            raise UserError(f"method 'mla': weights {w} has {len(w)} entries but the dataset has "
                            f"{len(spec.modalities)} modalities ({', '.join(spec.modalities)}); give one per modality")

    def __init__(self, spec: ModelSpec, hp: HParams, train: TrainSpec) -> None:
        self.check(spec, hp)
        super().__init__(spec, hp, train)
        head = self.shared
        dim = head.head.in_features
        self.register_buffer("projector", torch.eye(dim))
        self.steps_taken = 0  # optimizer steps of the whole run (the official exp_count)
        head.weights = dict(zip(self.modalities, self.blend_weights()))

    @property
    def mhp(self) -> MLAHParams:
        return self.hp  # type: ignore[return-value]

    @property
    def shared(self) -> SharedHeadFusion:
        return self.model.fusion  # type: ignore[return-value]

    def blend_weights(self) -> list[float]:
        n = len(self.modalities)
        w = self.mhp.weights or OFFICIAL_WEIGHTS.get(n) or [1.0 / n] * n
        return [float(x) for x in w]

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        self.zero_grad()
        with self.autocast():
            feats = self.model.encode(inputs)
        head = self.shared.head
        beta = projector_beta(ctx.step, ctx.steps_per_epoch)
        logs: dict[str, Any] = {}
        for m in self.modalities:
            with self.autocast():
                loss = F.cross_entropy(head(feats[m]), labels)
            self.backward(loss)
            self.unscale()
            rule = self.mhp.projection
            if rule != "released" and self.steps_taken != 0 and head.weight.grad is not None:
                with torch.no_grad():
                    P = projector_update(self.projector, feats[m].detach().float(), beta,
                                         "owm" if rule == "owm" else "code")
                    self.projector.copy_(P)
                    head.weight.grad.copy_(project_gradient(head.weight.grad, P, rule))
            self.optimizer_step()
            self.zero_grad()
            self.steps_taken += 1
            logs[f"loss_{m}"] = loss.detach()
        w = self.shared.weights
        logs["loss"] = sum(w[m] * logs[f"loss_{m}"] for m in self.modalities)
        return logs

    def predict(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        feats = self.model.encode(inputs)
        per = self.shared.split_logits(feats)
        if self.mhp.gating == "dynamic":
            gates = entropy_gates(per, self.mhp.entropy_dim)
            fused = torch.stack([gates[m] * per[m] for m in self.modalities]).sum(0)
        else:
            fused = self.shared(feats)
        return ModelOutput(fused, feats, per)

    def extra_state(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.steps_taken = int(state.get("steps_taken", 0))

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "projection": self.mhp.projection, "gating": self.mhp.gating,
                "blend": dict(zip(self.modalities, self.blend_weights()))}
