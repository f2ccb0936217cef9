"""`mbsd`: MBSD (2023), as implemented by BalanceBenchmark, its only public code.

Each modality gets its own cross-entropy on its block of the additive head, and, for every pair of
modalities, the samples that at least one of the pair gets right are pulled together, weighted by
how far apart the pair's true-class probabilities are (w = p_strong - p_weak, 0 when both are
wrong): a squared-difference term between the pair's outputs ("RS") and a KL-style term between
the strong and weak true-class probabilities. The stronger modality distils into the weaker on the
samples where it knows better:

    L = CE(z) + sum_m CE(z_m) + (1/P) sum_pairs [ w . RS / B  +  w . KL / B ]
    RS_i = (1/C) sum_c (o_a,ic - o_v,ic)^2      KL_i = pw_i (log pw_i - ps_i)

z the fused logits, z_m each modality's term of the additive head (concat: W_m phi_m + b/M; sum:
the branch head), ps / pw the larger / smaller true-class probability of the pair, P the number of
pairs. Gradients flow through w, ps and pw as well (as in the code). One forward, one backward.

Source: GeWu-Lab/BalanceBenchmark @ 4c1482fca5aaa8d4278af8e26020daa039e3ccf3,
`balancemm/trainer/MBSD_trainer.py`, re-expressed vectorised, with its operation order kept. Points
where its code is followed rather than what the names suggest:
- "KL" is `F.kl_div(ps, pw)` on probabilities, not log-probabilities: pw (log pw - ps), a scalar per
  sample, not a divergence between distributions;
- RS compares logits for two modalities but probabilities for three (its 2- and 3-modality branches
  differ); `rs_space: code` keeps that, `logits` / `probs` choose one for every M;
- the trainer calls `model.Unimodality_Calculate()`, which its model no longer defines at that
  commit; the intended `unimodal_result` (W_m phi_m + b/M) is used.

Per-modality estimator: the fusion's own (concat `mean-feature`, sum `branch-head`); the model is
unchanged. Fusions: concat, sum. M >= 2.
"""
from __future__ import annotations

from itertools import combinations
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mmbench.methods.base import Field, Method, StepContext, register_method
from mmbench.methods.window import WindowHParams
from mmbench.models.heads import ADDITIVE_FUSIONS, ADDITIVE_REASON


class MBSDHParams(WindowHParams):
    rs_space: Literal["code", "logits", "probs"] = Field(
        "code", description="what the RS term compares: code = BalanceBenchmark's (logits for 2 modalities, "
        "probabilities for 3+), or logits / probabilities for every M")


def pair_terms(o: dict[str, torch.Tensor], p: dict[str, torch.Tensor], labels: torch.Tensor, a: str, b: str,
               rs_on_probs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, RS, KL) per sample for the pair (a, b): o logits, p softmaxes."""
    pa = p[a].gather(1, labels[:, None])[:, 0]
    pb = p[b].gather(1, labels[:, None])[:, 0]
    # Python's max(pa, pb) / min(pa, pb) per sample: ties go to the first argument
    ps = torch.where(pb > pa, pb, pa)
    pw = torch.where(pb < pa, pb, pa)
    right = (p[a].argmax(dim=-1) == labels) | (p[b].argmax(dim=-1) == labels)
    w = torch.where(right, ps - pw, torch.zeros_like(ps))
    x, y = (p[a], p[b]) if rs_on_probs else (o[a], o[b])
    rs = 1 / o[a].shape[1] * torch.sum((x - y) ** 2, dim=1)
    kl = F.kl_div(ps, pw, reduction="none")
    return w, rs, kl


def mbsd_loss(fused: torch.Tensor, split: dict[str, torch.Tensor], labels: torch.Tensor, order: list[str],
              rs_space: str = "code") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its parts for one batch (`order`: the modalities in model order)."""
    n = len(labels)
    loss_out = F.cross_entropy(fused, labels)
    loss_m = {m: F.cross_entropy(split[m], labels) for m in order}
    prob = {m: torch.softmax(split[m], dim=1) for m in order}
    on_probs = rs_space == "probs" or (rs_space == "code" and len(order) > 2)
    pairs = list(combinations(order, 2))
    kls, rss, ws = [], [], []
    for a, b in pairs:
        w, rs, kl = pair_terms(split, prob, labels, a, b, on_probs)
        w = w.reshape(1, -1)
        kls.append(torch.mm(w, kl.reshape(-1, 1)) / n)
        rss.append(torch.mm(w, rs.reshape(-1, 1)) / n)
        ws.append(w)
    if len(pairs) == 1:
        loss_kl, loss_rs = kls[0], rss[0]
    else:
        loss_kl, loss_rs = sum(kls) / len(pairs), sum(rss) / len(pairs)  # type: ignore[assignment]
    total = loss_out
    for m in order:
        total = total + loss_m[m]
    if len(pairs) == 1:  # the code's 2-modality sum: ... + RS + KL; 3 modalities: ... + KL + RS
        total = total + loss_rs.squeeze() + loss_kl.squeeze()
    else:
        total = total + loss_kl.squeeze() + loss_rs.squeeze()
    parts = {"loss_fused": loss_out.detach(), "loss_rs": loss_rs.detach().squeeze(),
             "loss_kl": loss_kl.detach().squeeze(), "distilled": (torch.cat(ws) > 0).float().mean()}
    parts.update({f"loss_{m}": v.detach() for m, v in loss_m.items()})
    return total, parts


@register_method
class MBSD(Method):
    """Per-modality cross-entropies + pairwise distillation from the stronger modality, weighted by
    the gap in true-class probability."""

    name = "mbsd"
    description = "MBSD: per-modality CE + pairwise distillation weighted by the true-class probability gap"
    HParams = MBSDHParams
    fusions = ADDITIVE_FUSIONS
    fusion_reason = ADDITIVE_REASON
    n_modalities = (2, None)
    modality_reason = "its distillation terms compare pairs of modalities"

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: MBSDHParams = self.hp  # type: ignore[assignment]
        self.zero_grad()
        with self.autocast():
            out = self.model(inputs)
            logs: dict[str, Any] = {}
            if hp.active(ctx.epoch):
                split = self.model.fusion.split_logits(out.features)
                loss, logs = mbsd_loss(out.logits, split, labels, self.modalities, hp.rs_space)
            else:
                loss = F.cross_entropy(out.logits, labels)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach(), **logs}

    def describe_run(self) -> dict[str, Any]:
        on_probs = self.hp.rs_space == "probs" or (self.hp.rs_space == "code" and len(self.modalities) > 2)  # type: ignore[attr-defined]
        return {**super().describe_run(), "mbsd_rs": "probabilities" if on_probs else "logits"}
