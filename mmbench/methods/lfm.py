"""`lfm`: Facilitating Multimodal Classification via Dynamically Learning Modality Gap (Yang, Wan,
Jiang & Xu, NeurIPS 2024), "LFM".

Each modality has its own head; the step mixes a supervised term on the averaged logits with an
unsupervised term that aligns the modalities' predictions, under weights that change over training:

    L = 2 * (alpha_cls(e) * CE(mean_m z_m) + alpha_align(e) * JS(z_a, z_v))

JS, as the code computes it: 0.5 * (KL(m || p) + KL(m || q)) with p, q the two softmaxes and
m = (p + q) / 2 (`F.kl_div(p.log(), m)` is KL(m || p); the textbook JS is KL(p || m) + KL(q || m)).
The paper presents the unsupervised term as contrastive learning; the code aligns predictions, and
the code is followed. For M > 2 the JS is averaged over pairs (BalanceBenchmark's generalisation).

The weights, once per epoch (`strategy`):
- `fitted` (the README's `Crema_epoch.py`, the default): the two degree-5 polynomials in the epoch
  that the authors fitted to the learnt trajectory (alpha_cls starts at 0.205, alpha_align at 0.795);
- `learnable` (`Crema_epoch_learnable.py`): before each epoch, on a small held-out batch, one
  hyper-gradient step alpha_align -= lr_alpha * mean(H_theta0 . g_cls) with H the Hessian of
  alpha_cls*CE + alpha_align*JS and g_cls the gradient of CE, taken (as the code does) over the FIRST
  parameter tensor only (the audio encoder's first conv); alpha_align is clipped to [0.05, 0.95],
  alpha_cls = 1 - alpha_align; lr_alpha halves every 20 epochs; start [0.05, 0.95], lr_alpha 1e-4.

Source: njustkmg/NeurIPS24-LFM @ ad44fa09fee471c9267a7cba526b222c54d45493 (Crema_epoch.py,
Crema_epoch_learnable.py, model/AudioVideo.py); M >= 3 and the concat head as in BalanceBenchmark
(GeWu-Lab/BalanceBenchmark @ 4c1482fca5aaa8d4278af8e26020daa039e3ccf3, LFM_trainer.py).
Deviations, each recorded by `describe_run` or the docs page:
- held-out batch for `learnable`: the code removes 16 random training samples and uses 8 of them;
  here the first `alpha_samples` samples of the validation split (train keeps all its samples);
- BN during the hyper-gradient pass: in the code the model is in train mode at epoch 0 (the probe
  updates BN statistics) and in eval mode afterwards (left so by the previous test pass). `alpha_bn:
  eval` (default) uses eval mode every epoch; `official` reproduces the code;
- the code steps its StepLR before each epoch (decay one epoch early); mmbench's trainer steps after.

Per-modality estimator: sum fusion (the official model: two heads, logits summed) -> `branch-head`,
the official per-modality accuracies; concat (BalanceBenchmark's) -> `mean-feature`. The fused
prediction is the mean of the per-modality logits, as the code's test pass. film/gated refused.
"""
from __future__ import annotations

from itertools import combinations
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mmbench.methods.base import EpochContext, Field, Method, StepContext, register_method
from mmbench.methods.window import WindowHParams
from mmbench.models.classifier import ModelOutput
from mmbench.models.heads import ADDITIVE_FUSIONS, ADDITIVE_REASON

# Crema_epoch.py getAlpha_Learnable_Fitted: coefficients of epoch^0 .. epoch^5
FITTED_CLS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)
FITTED_ALIGN = (7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11)
ALPHA_START = (0.05, 0.95)  # learnable: (cls, align) before the first epoch
ALPHA_CLIP = (0.05, 0.95)


class LFMHParams(WindowHParams):
    strategy: Literal["fitted", "learnable"] = Field(
        "fitted", description="loss weights per epoch: the authors' fitted polynomials, or learnt by a hyper-gradient step")
    lr_alpha: float = Field(1e-4, gt=0, description="learnable: step size of the alpha update (halved every 20 epochs)",
                            json_schema_extra={"search": [1e-5, 1e-4, 1e-3]})
    alpha_samples: int = Field(8, ge=1, description="learnable: held-out samples (from the validation split) of the alpha step")
    alpha_bn: Literal["eval", "official"] = Field(
        "eval", description="learnable: BN mode of the alpha step; official = train mode at epoch 0, eval after")
    loss_scale: float = Field(2.0, gt=0, description="the code's overall factor on the weighted loss")


def fitted_alpha(epoch: int) -> tuple[float, float]:
    """(alpha_cls, alpha_align) of the authors' fitted polynomials at a 0-based epoch."""
    return (sum(c * epoch ** i for i, c in enumerate(FITTED_CLS)),
            sum(c * epoch ** i for i, c in enumerate(FITTED_ALIGN)))


def alignment(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The code's "JS": 0.5 * (KL(m||p) + KL(m||q)), m the mean of the two softmaxes (batch mean)."""
    p, q = F.softmax(p, dim=-1), F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))


def lfm_terms(split: dict[str, torch.Tensor], labels: torch.Tensor, order: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE of the averaged logits, alignment averaged over pairs). The average is written as the
    code writes it for two modalities, 0.5 * z_v + 0.5 * z_a (last modality first)."""
    k = 1.0 / len(order)
    mean = k * split[order[-1]]
    for m in reversed(order[:-1]):
        mean = mean + k * split[m]
    pairs = list(combinations(order, 2))
    align = alignment(split[pairs[0][0]], split[pairs[0][1]])
    for a, b in pairs[1:]:
        align = align + alignment(split[a], split[b])
    if len(pairs) > 1:
        align = align / len(pairs)
    return F.cross_entropy(mean, labels, reduction="none").mean(), align  # the code's reduction


@register_method
class LFM(Method):
    """2 * (alpha_cls * CE(mean logits) + alpha_align * JS(per-modality predictions)), weights per epoch."""

    name = "lfm"
    description = "LFM: cross-entropy + prediction alignment between modalities, weights fitted or learnt per epoch"
    HParams = LFMHParams
    fusions = ADDITIVE_FUSIONS
    fusion_reason = ADDITIVE_REASON
    n_modalities = (2, None)
    modality_reason = "it aligns the predictions of pairs of modalities"

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.alpha = list(ALPHA_START)
        self.lr_alpha = float(self.hp.lr_alpha)  # type: ignore[attr-defined]
        if self.hp.strategy == "fitted":  # type: ignore[attr-defined]
            self.alpha = list(fitted_alpha(0))

    def per_modality(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.fusion.split_logits(feats)

    # ----- the weights ----------------------------------------------------------------------
    def alpha_step(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, epoch: int) -> float:
        """One hyper-gradient step on alpha_align (Crema_epoch_learnable.py getAlpha_Learnable)."""
        params = list(self.model.parameters())
        split = self.per_modality(self.model.encode(inputs))
        loss_cls, loss_align = lfm_terms(split, labels, self.modalities)
        total = self.alpha[0] * loss_cls + self.alpha[1] * loss_align
        theta = torch.autograd.grad(total, params, create_graph=True)
        g_cls = torch.autograd.grad(loss_cls, params, retain_graph=True, create_graph=True)
        hvp = torch.autograd.grad(theta, params, grad_outputs=g_cls, retain_graph=True)
        grad = hvp[0].mean().item()
        if epoch % 20 == 0 and epoch != 0:
            self.lr_alpha = self.lr_alpha / 2
        a = self.alpha[1] - self.lr_alpha * grad
        self.alpha[1] = max(ALPHA_CLIP[0], min(ALPHA_CLIP[1], a))
        self.alpha[0] = 1.0 - self.alpha[1]
        return grad

    def held_out(self, ctx: EpochContext) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        loader = ctx.loaders.get("val") or ctx.loaders["train_eval"]
        inputs, y = ctx.prepare_batch(next(iter(loader)), False)
        n = self.hp.alpha_samples  # type: ignore[attr-defined]
        return {m: v[:n] for m, v in inputs.items()}, y[:n]

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        hp: LFMHParams = self.hp  # type: ignore[assignment]
        logs: dict[str, float] = {}
        if hp.strategy == "fitted":
            self.alpha = list(fitted_alpha(ctx.epoch))
        elif hp.active(ctx.epoch):
            inputs, y = self.held_out(ctx)
            was = self.model.training
            self.model.train(hp.alpha_bn == "official" and ctx.epoch == 0)
            try:
                logs["alpha_grad"] = self.alpha_step(inputs, y, ctx.epoch)
            finally:
                self.model.train(was)
        logs.update({"alpha_cls": self.alpha[0], "alpha_align": self.alpha[1]})
        return logs

    # ----- the step -------------------------------------------------------------------------
    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: LFMHParams = self.hp  # type: ignore[assignment]
        self.zero_grad()
        with self.autocast():
            out = self.model(inputs)
            if hp.active(ctx.epoch):
                loss_cls, loss_align = lfm_terms(self.per_modality(out.features), labels, self.modalities)
                loss = hp.loss_scale * (self.alpha[0] * loss_cls + self.alpha[1] * loss_align)
                logs: dict[str, Any] = {"loss_cls": loss_cls.detach(), "loss_align": loss_align.detach()}
            else:
                loss, logs = F.cross_entropy(out.logits, labels), {}
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach(), **logs}

    def predict(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        """The code's test pass: softmax of the mean of the per-modality logits."""
        out = self.model(inputs)
        return ModelOutput(out.logits / len(self.modalities), out.features)

    def extra_state(self) -> dict[str, Any]:
        return {"alpha": [float(a) for a in self.alpha], "lr_alpha": self.lr_alpha}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.alpha = [float(a) for a in state.get("alpha", self.alpha)]
        self.lr_alpha = float(state.get("lr_alpha", self.lr_alpha))

    def describe_run(self) -> dict[str, Any]:
        hp: LFMHParams = self.hp  # type: ignore[assignment]
        d = {**super().describe_run(), "lfm_strategy": hp.strategy}
        if hp.strategy == "learnable":
            d.update({"lfm_alpha_batch": f"first {hp.alpha_samples} validation samples", "lfm_alpha_bn": hp.alpha_bn})
        return d
