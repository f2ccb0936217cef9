"""`mmpareto`: MMPareto (Wei & Hu, ICML 2024; docs/methods/mmpareto.md).

The model is multitask-like: shared encoders, the fused concat head and one linear head per
modality, trained on L_mm + sum_m L_m. For each encoder the gradients of L_mm and of its own
unimodal loss are compared over the whole encoder; when they conflict (cosine <= 0) the two are
combined with the two-objective MGDA minimum-norm weights instead of equally. Every encoder tensor
then gets the weighted direction, its norm raised per tensor to at least the plain-sum norm, times
`gamma` (1.5 in the repo). Heads keep the plain summed gradient.

The repo runs four backward passes (three per-loss + one of the total). The total's gradient is
the sum of the three per-loss gradients, so it is formed here by summing: three passes per step.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbench.methods.base import Field, HParams, Method, StepContext, register_method
from mmbench.models.classifier import weight_init

MGDA_HIGH, MGDA_LOW = 0.999, 0.001  # the min-norm solver's clamps for the two-point case


class MMParetoHParams(HParams):
    gamma: float = Field(1.5, gt=0, description="magnitude factor on encoder gradients (hard-coded 1.5 in the repo)",
                         json_schema_extra={"search": [1.0, 1.5, 2.0]})


def mgda_two(v11: float, v12: float, v22: float) -> float:
    """Weight c of g1 in the minimum-norm convex combination c*g1 + (1-c)*g2, from the inner
    products v11 = <g1,g1>, v12 = <g1,g2>, v22 = <g2,g2>, with the solver's clamps (0.999 when
    v12 >= v11, 0.001 when v12 >= v22)."""
    if v12 >= v11:
        return MGDA_HIGH
    if v12 >= v22:
        return MGDA_LOW
    return (v22 - v12) / (v11 + v22 - 2 * v12)


def inner_products(g1: list[torch.Tensor], g2: list[torch.Tensor],
                   plain_norms: torch.Tensor | None = None) -> tuple[float, float, float]:
    """<g1,g1>, <g1,g2>, <g2,g2> of the concatenated per-tensor gradients, from per-tensor norms
    (fused multi-tensor kernels and one host sync instead of a kernel per tensor):
    <g1,g2> = (|g1 + g2|^2 - |g1|^2 - |g2|^2) / 2. `plain_norms`: the per-tensor norms of g1 + g2."""
    if plain_norms is None:
        plain_norms = torch.stack(torch._foreach_norm(torch._foreach_add(g1, g2)))
    sq = [torch.stack(torch._foreach_norm(g)).square().sum() for g in (g1, g2)] + [plain_norms.square().sum()]
    v11, v22, vs = torch.stack(sq).tolist()
    return v11, (vs - v11 - v22) / 2, v22


def pareto_weights(v11: float, v12: float, v22: float, eps: float = 1e-8) -> tuple[float, float, float]:
    """(w_mm, w_u, cos) for one encoder from the inner products of its whole-encoder gradients
    (g_mm first): equal weights unless the cosine is <= 0 (the repo's `if cos > 0` test), then
    MGDA. The cosine is F.cosine_similarity's (norms floored at eps)."""
    cos = v12 / (max(math.sqrt(max(v11, 0.0)), eps) * max(math.sqrt(max(v22, 0.0)), eps))
    if cos > 0:
        return 0.5, 0.5, cos
    c = mgda_two(v11, v12, v22)
    return c, 1.0 - c, cos


def rescale(g_mm: list[torch.Tensor], g_u: list[torch.Tensor], w_mm: float, w_u: float, gamma: float,
            plain: list[torch.Tensor] | None = None, plain_norms: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Final gradients of one encoder's tensors: per tensor, the Pareto direction
    2(w_mm g_mm + w_u g_u), its norm raised to the plain sum's norm when smaller, times gamma.
    Equal weights give the plain sum itself (ratio 1): gamma (g_mm + g_u)."""
    plain = torch._foreach_add(g_mm, g_u) if plain is None else plain
    if w_mm == w_u == 0.5:
        torch._foreach_mul_(plain, gamma)
        return plain
    if plain_norms is None:
        plain_norms = torch.stack(torch._foreach_norm(plain))
    new = torch._foreach_mul(g_mm, 2 * w_mm)
    torch._foreach_add_(new, g_u, alpha=2 * w_u)
    new_norms = torch.stack(torch._foreach_norm(new))
    ratio = plain_norms / new_norms
    # a zero Pareto direction stays zero (the repo would divide by zero there)
    factor = torch.where((new_norms > 0) & (ratio > 1), ratio, torch.ones_like(ratio)) * gamma
    torch._foreach_mul_(new, factor.tolist())
    return new


def pareto_encoder(g_mm: list[torch.Tensor], g_u: list[torch.Tensor], gamma: float) -> tuple[list[torch.Tensor], float, float]:
    """One encoder: whole-encoder cosine and weights, then the per-tensor rule. Returns
    (final gradients, w_mm, cos)."""
    plain = torch._foreach_add(g_mm, g_u)
    plain_norms = torch.stack(torch._foreach_norm(plain))
    w_mm, w_u, cos = pareto_weights(*inner_products(g_mm, g_u, plain_norms))
    return rescale(g_mm, g_u, w_mm, w_u, gamma, plain, plain_norms), w_mm, cos


@register_method
class MMPareto(Method):
    """Pareto (MGDA) combination of fused and unimodal gradients on conflicting encoders, x1.5."""

    name = "mmpareto"
    description = "MMPareto: MGDA weights for fused vs unimodal losses on conflicting encoder gradients, norm x1.5"
    HParams = MMParetoHParams
    n_modalities = (2, None)
    fusions = {"concat"}
    fusion_reason = "it is defined on a concat head plus unimodal heads"

    def build_model(self) -> nn.Module:
        model = super().build_model()
        heads = nn.ModuleDict({m: nn.Linear(enc.out_dim, self.spec.num_classes) for m, enc in model.encoders.items()})
        if self.spec.init == "repo":
            heads.apply(weight_init)
        model.unimodal_heads = heads  # type: ignore[assignment]
        return model

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: MMParetoHParams = self.hp  # type: ignore[assignment]
        mods = list(self.model.encoders)
        self.zero_grad()
        with self.autocast():
            feats = self.model.encode(inputs)
            losses = {"mm": F.cross_entropy(self.model.fusion(feats), labels)}
            for m in mods:
                losses[m] = F.cross_entropy(self.model.unimodal_heads[m](feats[m]), labels)
        params = [p for p in self.parameters() if p.requires_grad]
        grads: dict[str, list[torch.Tensor | None]] = {}
        for i, (k, loss) in enumerate(losses.items()):
            self.backward(loss, retain_graph=i < len(losses) - 1)
            grads[k] = [p.grad for p in params]
            self.zero_grad()
        index = {p: i for i, p in enumerate(params)}
        in_encoder: set[int] = set()
        logs: dict[str, Any] = {"loss": sum(v.detach() for v in losses.values())}
        logs.update({f"loss_{k}": v.detach() for k, v in losses.items()})
        for m in mods:
            idx = [index[p] for p in self.model.encoders[m].parameters() if p in index]
            in_encoder.update(idx)
            g_mm = [_or_zero(grads["mm"][i], params[i]) for i in idx]
            g_u = [_or_zero(grads[m][i], params[i]) for i in idx]
            final, w_mm, cos = pareto_encoder(g_mm, g_u, hp.gamma)
            for i, g in zip(idx, final):
                params[i].grad = g
            logs.update({f"cos_{m}": cos, f"conflict_{m}": float(cos <= 0), f"w_mm_{m}": w_mm})
        for i, p in enumerate(params):  # heads (and anything outside the encoders): plain sum
            if i not in in_encoder:
                parts = [g[i] for g in grads.values() if g[i] is not None]
                p.grad = torch.stack(parts).sum(0) if parts else None
        logs["conflict_rate"] = sum(logs[f"conflict_{m}"] for m in mods) / len(mods)
        self.optimizer_step()
        return logs

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "unimodal_heads": "linear", "backward_passes": 1 + len(self.model.encoders)}


def _or_zero(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if g is None else g

