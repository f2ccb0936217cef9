"""`pmr`: Prototypical Modal Rebalance (Fan et al., CVPR 2023).

Each modality gets class prototypes: the class means of its pooled encoder features, computed in
eval mode over a slice of the training data before training and after every epoch. A sample's
prototype logits are its negative Euclidean distances to them; their softmax says how well the
modality alone already separates the classes. The modality behind (lower summed true-class
prototype probability) gets an extra prototypical cross-entropy `alpha * CE(-dist, y)` on its
encoder, so it is pulled towards its class centres without touching the leader. One forward,
one backward, as in plain training.

Re-expressed from fanyunfeng-bit/Modal-Imbalance-PMR @ 3615e48983555089b0e693380087617c3797a641
(`main_Prototype_grad.py`: `train_epoch`, `calculate_prototype`, `EU_dist`; command lines in
`bash.sh`). Following the code, not the abstract: a binary switch with constant alpha (no
prototype entropy regulariser, which the released code does not have); prototypes from the first
`len(loader) // 10` batches of the shuffled, augmented training loader (the whole validation set
for AVE); smoothing `(1 - mu) * new + mu * old` only from the prototypes computed after the
second epoch on (the code passes epoch 0 to both the initial and the first refresh, and skips
smoothing for epoch <= 0).

More than two modalities: the authors' rule accelerates whichever modality is behind; with M
modalities every modality whose prototype score is below the leader's gets the term (for M = 2
exactly the code's `ratio > 1` / `ratio < 1` / tie switch). The prototypes only use encoder
features, so any fusion works (the code runs concat, sum, film and gated).

Deliberate fix: a class absent from the prototype batches divides by zero in the code (NaN
prototypes, NaN loss from then on); here it keeps its previous prototype (zeros before the
first), counted in `method/empty_classes`.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from mmbench.methods.base import EpochContext, Field, HParams, Method, StepContext, register_method


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, C) negative Euclidean distances of each sample to each class prototype (the code's
    `-EU_dist`: the square root of the summed squared difference, per pair)."""
    diff = features.float()[:, None, :] - prototypes.float()[None, :, :]
    return -(diff * diff).sum(-1).sqrt()


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(class sums / counts, counts); a class with no sample gives a zero row and count 0."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, labels, features.float())
    counts = torch.bincount(labels, minlength=num_classes).to(sums.dtype)
    return sums / counts.clamp(min=1)[:, None], counts


def behind_coefficients(scores: dict[str, torch.Tensor], alpha: float) -> dict[str, float]:
    """alpha for every modality whose prototype score is below the leader's, else 0. For two
    modalities this is the code's switch on ratio = score_a / score_v (tie: no extra term)."""
    lead = max(float(s) for s in scores.values())
    return {m: alpha if (lead / float(s) > 1 if float(s) > 0 else lead > 0) else 0.0 for m, s in scores.items()}


class PMRHParams(HParams):
    alpha: float = Field(1.0, ge=0, description="weight of the prototypical CE on the modality behind (code default 1.0; "
                         "bash.sh CREMA-D/AVE: 2.0)", json_schema_extra={"search": [0.5, 1.0, 2.0, 3.0, 5.0]})
    momentum_coef: float = Field(0.2, ge=0, le=1, description="prototype smoothing mu: c = (1-mu) new + mu old "
                                 "(code default 0.2; bash.sh: 0.0)", json_schema_extra={"search": [0.0, 0.2, 0.5]})
    modulation_starts: int = Field(0, ge=0, description="first epoch with the prototypical term (0-based, inclusive)",
                                   json_schema_extra={"search": [0]})
    modulation_ends: int = Field(100, ge=0, description="last epoch with the prototypical term (0-based, inclusive; "
                                 "bash.sh: 70)", json_schema_extra={"search": [50, 70, 100]})
    prototype_split: Literal["train", "val"] = Field(
        "train", description="where prototypes come from: a slice of the shuffled, augmented train loader (CREMA-D, "
        "KS) or the whole validation split (the code's AVE choice)")
    prototype_fraction: float = Field(0.1, gt=0, le=1, description="share of the train batches used for prototypes "
                                      "(code: len // 10, at least one batch)", json_schema_extra={"search": [0.1, 0.5, 1.0]})

    @model_validator(mode="after")
    def _window(self) -> "PMRHParams":
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(
                f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self


@register_method
class PMR(Method):
    """Fused CE + alpha * prototypical CE of each modality behind the leader (prototype scores)."""

    name = "pmr"
    description = "PMR: prototypical CE (distances to class feature means) on the modality that lags"
    HParams = PMRHParams
    n_modalities = (2, None)
    modality_reason = "the prototype scores compare modalities"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.prototypes: dict[str, torch.Tensor] | None = None
        self.empty_classes = 0

    # ----- prototypes ---------------------------------------------------------------------
    @torch.no_grad()
    def compute_prototypes(self, ctx: EpochContext) -> dict[str, torch.Tensor]:
        """Class means of each encoder's features, the model in eval mode, as `calculate_prototype`."""
        hp: PMRHParams = self.hp  # type: ignore[assignment]
        if hp.prototype_split == "val" and "val" in ctx.loaders:
            loader, train_aug, limit = ctx.loaders["val"], False, math.inf
        else:
            loader, train_aug = ctx.loaders["train"], True
            limit = max(1, int(len(loader) * hp.prototype_fraction + 1e-9))
        was = self.model.training
        self.model.eval()
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        labels = []
        for i, raw in enumerate(loader):
            if i >= limit:
                break
            inputs, y = ctx.prepare_batch(raw, train_aug)
            with self.autocast():
                enc = self.model.encode(inputs)
            for m in self.modalities:
                feats[m].append(enc[m].float())
            labels.append(y)
        self.model.train(was)
        Y = torch.cat(labels)
        out, self.empty_classes = {}, 0
        for m in self.modalities:
            means, counts = class_means(torch.cat(feats[m]), Y, self.spec.num_classes)
            empty = counts == 0
            self.empty_classes = int(empty.sum())
            if empty.any():  # the code divides by zero here; keep what we had (zeros before the first)
                prev = self.prototypes[m] if self.prototypes is not None else torch.zeros_like(means)
                means[empty] = prev[empty]
            out[m] = means
        return out

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        if self.prototypes is None:  # before the first epoch (a resumed run restores them)
            self.prototypes = self.compute_prototypes(ctx)
        return {}

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        new = self.compute_prototypes(ctx)
        mu = self.hp.momentum_coef  # type: ignore[attr-defined]
        if ctx.epoch > 0 and self.prototypes is not None:  # the code passes epoch 0 to the first refresh too
            new = {m: (1 - mu) * new[m] + mu * self.prototypes[m] for m in new}
        self.prototypes = new
        return {"empty_classes": float(self.empty_classes)}

    # ----- the step -----------------------------------------------------------------------
    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: PMRHParams = self.hp  # type: ignore[assignment]
        assert self.prototypes is not None, "prototypes are computed in on_epoch_start"
        mods = self.modalities
        self.zero_grad()
        with self.autocast():
            out = self.model(inputs)
            loss_fused = F.cross_entropy(out.logits, labels)
        sims = {m: prototype_logits(out.features[m], self.prototypes[m]) for m in mods}
        loss_p = {m: F.cross_entropy(sims[m], labels) for m in mods}
        with torch.no_grad():
            scores = {m: torch.softmax(sims[m], dim=1).gather(1, labels[:, None]).sum() for m in mods}
        coef = {m: 0.0 for m in mods}
        if hp.modulation_starts <= ctx.epoch <= hp.modulation_ends:
            coef = behind_coefficients(scores, hp.alpha)
        loss = loss_fused
        for m in mods:
            if coef[m]:
                loss = loss + coef[m] * loss_p[m]
        self.backward(loss)
        self.optimizer_step()
        logs: dict[str, Any] = {"loss": loss.detach()}
        for m in mods:
            logs[f"loss_proto_{m}"] = loss_p[m].detach()
            logs[f"coef_{m}"] = coef[m]
        if len(mods) == 2:
            logs["ratio"] = scores[mods[0]] / scores[mods[1]]  # the code's ratio_a_p
        return logs

    # ----- state ----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"prototypes": {m: p.detach().cpu() for m, p in (self.prototypes or {}).items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        protos = state.get("prototypes") or {}
        self.prototypes = {m: p.to(self.device) for m, p in protos.items()} or None

    def describe_run(self) -> dict[str, Any]:
        hp: PMRHParams = self.hp  # type: ignore[assignment]
        return {**super().describe_run(), "pmr_prototypes": hp.prototype_split,
                "pmr_rule": "two-modality switch" if len(self.modalities) == 2 else "every modality behind the leader"}
