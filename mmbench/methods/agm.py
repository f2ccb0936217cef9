"""`agm`: Adaptive Gradient Modulation (Li et al., ICCV 2023; docs/methods/agm.md).

The fused prediction is split into per-modality "mono-modal responses" by an exact Shapley
decomposition over zeroed inputs, so AGM works with any fusion. Each response's gradient path is
rescaled by how far its modality is ahead of (k < 1) or behind (k > 1) its own historical
standing, measured by cumulative running means of the responses' cross-entropies.

Cost: 2^M - 1 forwards per step (3 for two modalities: the all-zero pass cancels out of every
response, so it is skipped), backward through all of them.

Epoch numbering: AGM's code counts epochs from 1, the trainer from 0. `modulation_starts` and
`modulation_ends` keep AGM's 1-based meaning so the authors' settings carry over unchanged:
trainer epoch `e` is modulated iff `modulation_starts <= e + 1 <= modulation_ends`. The running
means use AGM's global 1-based step `t = e * steps_per_epoch + step + 1`, which is the same count.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from mmbench.methods.base import Field, HParams, Method, StepContext, register_method
from mmbench.models.fusion import Fusion

PROB_FLOOR = 1e-8  # AGM replaces a true-class probability below this by the floor itself


def present_subsets(modalities: list[str]) -> list[frozenset[str]]:
    """Non-empty proper subsets of modalities, smallest first, in modality order (AGM's masked
    passes for two modalities: audio present, then visual present)."""
    return [frozenset(c) for size in range(1, len(modalities)) for c in itertools.combinations(modalities, size)]


def masked_outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[frozenset[str], torch.Tensor]:
    """Logits with only the modalities of each proper subset present, the rest replaced by zero
    inputs. Run in eval mode (BatchNorm uses, and does not update, its running statistics;
    dropout off), as AGM does; the caller decides whether a graph is kept."""
    was_training = model.training
    model.eval()
    try:
        outs = {}
        for present in present_subsets(list(inputs)):
            masked = {m: (x if m in present else torch.zeros_like(x)) for m, x in inputs.items()}
            outs[present] = model(masked).logits
    finally:
        model.train(was_training)
    return outs


def shapley_responses(outs: dict[frozenset[str], torch.Tensor], modalities: list[str]) -> dict[str, torch.Tensor]:
    """AGM's mono-modal responses m_i = Shapley value of i + F_0 / M, from the outputs F_S of every
    non-empty coalition S (F_0, the all-zero output, cancels out of m_i, so it is not needed).

    Two modalities: m_a = (F_av - F_v + F_a) / 2. The responses sum to the full-input output.
    """
    n = len(modalities)
    out = {}
    for i in modalities:
        others = [m for m in modalities if m != i]
        total: torch.Tensor | float = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                s = frozenset(coalition)
                gain = outs[s | {i}] - outs[s] if s else outs[s | {i}]
                total = total + weight * gain
        out[i] = total  # type: ignore[assignment]
    return out


def clamped_scores(responses: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean cross-entropy of each response, each term's true-class probability floored at 1e-8
    (AGM's guard against log 0). Lower = the modality fits the labels better."""
    out = {}
    for m, r in responses.items():
        p = torch.softmax(r.detach().float(), dim=1).gather(1, labels[:, None]).squeeze(1)
        out[m] = -torch.log(p.clamp_min(PROB_FLOOR)).mean()
    return out


def agm_coefficients(scores: list[float], running: list[float], alpha: float, clip: float) -> list[float]:
    """k_i = exp(alpha * min(r_hat_i - r_i, clip)), with r_i = exp(sum_{j != i}(l_j - l_i) / (M - 1))
    from this step's scores and r_hat_i the same from the running means (two modalities:
    r_a = exp(l_v - l_a)). A modality doing better than it usually does is slowed (k < 1)."""
    n = len(scores)

    def standing(s: list[float], i: int) -> float:
        return math.exp(sum(s[j] - s[i] for j in range(n) if j != i) / (n - 1))

    return [math.exp(alpha * min(standing(running, i) - standing(scores, i), clip)) for i in range(n)]


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `scale` (AGM's backward
    hooks on identity modules, `model/CREMAD_net.py` hooka/hookv)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def modulated_logits(responses: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
    """sum_i m_i, bit for bit, with the gradient reaching m_i scaled by s_i (as the official hooks).

    Not `sum s_i m_i + (sum (1 - s_i) m_i).detach()`: same value in exact arithmetic, but in float32
    its two sums of size k|m| cancel, so the logits the cross-entropy sees drift with k (6 % relative
    gradient error at k = e^15, which alpha 1.5 with the score clip at 10 allows)."""
    total: torch.Tensor | None = None
    for r, s in zip(responses, scales):
        term = ScaleGrad.apply(r.float(), float(s))
        total = term if total is None else total + term
    assert total is not None
    return total


def head_weights(fusion: Fusion) -> list[torch.Tensor]:
    """The fusion head's output-layer weights, whose gradient triggers AGM's clipping: `fc`
    (concat), every branch head (sum), `fc_out` (film, gated); otherwise the last Linear."""
    if isinstance(getattr(fusion, "fc", None), nn.Linear):
        return [fusion.fc.weight]
    heads = getattr(fusion, "heads", None)
    if isinstance(heads, nn.ModuleDict):
        return [h.weight for h in heads.values()]
    if isinstance(getattr(fusion, "fc_out", None), nn.Linear):
        return [fusion.fc_out.weight]
    linears = [m for m in fusion.modules() if isinstance(m, nn.Linear)]
    return [linears[-1].weight] if linears else []


def clip_order(model: nn.Module) -> list[torch.Tensor]:
    """Parameters in the official model's order (fusion head first, then the encoders): the global
    norm sums per-tensor norms in this order, so the clip matches the official one bit for bit."""
    head = list(model.fusion.parameters())  # type: ignore[union-attr]
    seen = {id(p) for p in head}
    return head + [p for p in model.parameters() if id(p) not in seen]


def conditional_clip(watched: list[torch.Tensor], params: list[torch.Tensor], limit: float) -> bool:
    """AGM's clip: only when some element of a watched gradient lies outside [-limit, limit],
    clip the global gradient norm of all parameters to `limit`. Returns whether it fired."""
    if limit <= 0:
        return False
    fire = any(w.grad is not None and bool((w.grad.abs() > limit).any()) for w in watched)
    if fire:
        nn.utils.clip_grad_norm_(params, max_norm=limit)
    return fire


class AGMHParams(HParams):
    alpha: float = Field(1.5, ge=0, description="modulation strength (authors' CREMA-D setting 1.5)",
                         json_schema_extra={"search": [0.5, 1.0, 1.5, 2.5]})
    modulation_starts: int = Field(
        0, ge=0, description="first modulated epoch in AGM's 1-based numbering (0 or 1: from the start)")
    modulation_ends: int = Field(
        1500, ge=0, description="last modulated epoch, 1-based inclusive (authors' CREMA-D: 1500 = whole run)")
    score_clip: float = Field(10.0, gt=0, description="upper clip on r_hat - r inside the exponential (CREMA-D: 10)",
                              json_schema_extra={"search": [7.0, 10.0]})
    grad_clip: float = Field(
        1.0, ge=0,
        description="if a fusion-head weight-grad element exceeds this in magnitude, clip the global norm to it; 0: off")

    @model_validator(mode="after")
    def _window(self) -> "AGMHParams":
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(
                f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self


@register_method
class AGM(Method):
    """Shapley responses from zero-input passes; each response's gradient scaled by exp(alpha*(r_hat - r))."""

    name = "agm"
    description = "AGM: Shapley mono-modal responses, gradients scaled by each modality's standing vs. its running mean"
    HParams = AGMHParams
    n_modalities = (2, None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running = [0.0] * len(self.modalities)  # cumulative mean score per modality, whole run

    def in_window(self, epoch: int) -> bool:
        hp: AGMHParams = self.hp  # type: ignore[assignment]
        return hp.modulation_starts <= epoch + 1 <= hp.modulation_ends

    def responses(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full pass in the current (train) mode, then the masked passes in eval mode; graphs kept."""
        outs = {frozenset(self.modalities): self.model(inputs).logits}
        outs.update(masked_outputs(self.model, inputs))
        return shapley_responses(outs, self.modalities)

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: AGMHParams = self.hp  # type: ignore[assignment]
        mods = self.modalities
        self.zero_grad()
        with self.autocast():
            resp = self.responses(inputs)
        scores = clamped_scores(resp, labels)
        ell = torch.stack([scores[m] for m in mods]).tolist()
        # coefficients from the running means as they were BEFORE this step
        k = agm_coefficients(ell, self.running, hp.alpha, hp.score_clip)
        t = ctx.global_step + 1
        self.running = [s * (t - 1) / t + l / t for s, l in zip(self.running, ell)]
        scales = k if self.in_window(ctx.epoch) else [1.0] * len(mods)

        loss = F.cross_entropy(modulated_logits([resp[m] for m in mods], scales), labels)
        self.backward(loss)
        self.unscale()
        clipped = conditional_clip(head_weights(self.model.fusion), clip_order(self.model), hp.grad_clip)
        self.optimizer_step()

        logs: dict[str, Any] = {"loss": loss.detach(), "clipped": float(clipped)}
        for i, m in enumerate(mods):
            logs[f"k_{m}"] = k[i]
            logs[f"score_{m}"] = ell[i]
            logs[f"running_score_{m}"] = self.running[i]
            # accuracy of AGM's own response m_i on this training batch
            logs[f"response_acc_{m}"] = (resp[m].detach().argmax(1) == labels).float().mean()
        return logs

    def extra_state(self) -> dict[str, Any]:
        return {"running": dict(zip(self.modalities, self.running))}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        running = state.get("running")
        if running:
            self.running = [float(running[m]) for m in self.modalities]

    def describe_run(self) -> dict[str, Any]:
        n = len(self.modalities)
        return {
            **super().describe_run(),
            "agm_responses": "shapley-zero-input",
            "agm_forwards_per_step": 2**n - 1,
            "agm_window": "trainer epoch e (0-based) modulated iff modulation_starts <= e + 1 <= modulation_ends",
        }
