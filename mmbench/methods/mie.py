"""`mie`: Modal-aware Interactive Enhancement (Jiang, Chi & Yang, 2024; docs/methods/mie.md), as
implemented by the authors' IGM code.

No fusion layer: one encoder and one MLP classifier per modality, trained in alternating
single-modality stages (`epoch_list`, audio first). A step mixes up the active modality's input,
adds a SAM-style "flat" loss, and, from the second stage on, right-multiplies the gradients of the
active classifier's Linear weights by a "flat" projection P = U exp(-tau s_hat) U^T built from the
previous modality's layer-input covariances: directions the previous modality relies on are
damped (by at most e^-tau), unused ones pass unchanged, so one modality's training interferes
less with what the other has learnt. Prediction averages the classifiers' softmaxes.

Each stage restarts from the best state so far with a fresh optimizer and scheduler. The repo
picks that state on the test set (fused macro-F1); here it is picked on the validation split, by
the same metric, and kept in the method's state so a resumed run restarts from the same weights.

More than two modalities, as the authors' three-modality code (IJCAI25-IGM@19aa8e5,
`train_nvGesture.py`: depth -> rgb -> of -> depth ...): stages cycle through the modalities in
order and each stage's projections come from the modality of the stage before.
"""
from __future__ import annotations

import math
import warnings
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from mmbench.errors import UserError
from mmbench.methods.base import (
    EpochContext, Field, HParams, Method, ModelSpec, StepContext, TrainSpec, build_optimizer, build_scheduler,
    register_method,
)
from mmbench.metrics.classification import macro_f1
from mmbench.models.classifier import ModelOutput, weight_init
from mmbench.models.encoders import build_encoder


class MIEHParams(HParams):
    epoch_list: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [25, 50] * 6, min_length=1,
        description="epochs of each stage; stages alternate modalities, audio first; the sum must equal train.epochs "
        "(with stages: scale, proportions rescaled to train.epochs)")
    stages: Literal["exact", "scale"] = Field(
        "exact", description="exact: epoch_list is in epochs (the official setting); scale: epoch_list gives the "
        "stages' proportions, rescaled to train.epochs when the recipe is expanded (the run records the result)")
    mixup_alpha: float = Field(1.0, ge=0, description="Beta(alpha, alpha) mixup on the active modality (0: no mixup)")
    flat_ratio: float = Field(0.3, ge=0, le=1, description="weight of the flat (SAM) loss: L = (1-r) L_ori + r L_flat",
                              json_schema_extra={"search": [0.1, 0.3, 0.5]})
    noise_ratio: float = Field(1e-10, ge=0, description="SAM radius rho for encoder tensors")
    noise_ratio_cls: float = Field(1e-10, ge=0, description="SAM radius rho for classifier tensors")
    temperature: float = Field(0.4, ge=0, description="tau in P = U exp(-tau * s_hat) U^T (the repo's temperature1)",
                               json_schema_extra={"search": [0.2, 0.4, 0.8]})
    sam: Literal["code", "faithful"] = Field(
        "code", description="code: the repo's per-tensor, never-undone perturbation and classifier-only flat loss; "
        "faithful: SAM proper (perturb, forward both encoder and classifier, restore before the update)")

    @model_validator(mode="after")
    def _stages(self) -> "MIEHParams":
        if len(self.epoch_list) < 2:
            raise ValueError("epoch_list needs at least two stages (one per modality)")
        return self


def stage_at(epoch: int, epoch_list: list[int]) -> tuple[int, int]:
    """(0-based stage, 0-based epoch within it) of a 0-based run epoch."""
    start = 0
    for s, n in enumerate(epoch_list):
        if epoch < start + n:
            return s, epoch - start
        start += n
    raise ValueError(f"epoch {epoch} is past the end of epoch_list {epoch_list}")


def scale_stages(proportions: list[int], epochs: int) -> list[int]:
    """Stage lengths in proportion to `proportions` that sum to `epochs`, each at least one epoch.

    Largest remainder, ties to the earlier stage, so a schedule that already sums to `epochs` is
    returned unchanged. With fewer epochs than stages the first `epochs` stages get one epoch each
    (the alternation is kept, its tail dropped)."""
    if epochs < 2:
        raise UserError(f"method 'mie' needs at least 2 epochs (one stage per modality); train.epochs is {epochs}")
    props = proportions[:epochs]
    total = sum(props)
    quota = [p * epochs / total for p in props]
    out = [int(q) for q in quota]
    order = sorted(range(len(props)), key=lambda i: (-(quota[i] - out[i]), i))
    for i in order[: epochs - sum(out)]:
        out[i] += 1
    for i in range(len(out)):  # every stage keeps at least one epoch, taken from the longest
        if out[i] == 0:
            j = max(range(len(out)), key=lambda k: (out[k], -k))
            out[j] -= 1
            out[i] = 1
    return out


def mean_softmax_logits(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """log of the mean of the per-modality softmaxes (the repo's 'test' prediction, as logits)."""
    logp = torch.stack([F.log_softmax(v.float(), dim=1) for v in logits.values()])
    return torch.logsumexp(logp, dim=0) - math.log(len(logits))


def flat_projection(cov: torch.Tensor, tau: float) -> torch.Tensor:
    """P = U diag(exp(-tau * s_hat)) U^T with singular values min-max normalised to [0, 1];
    eigenvalues lie in [exp(-tau), 1]. A flat spectrum (s_max == s_min) gives the identity,
    where the repo would divide by zero."""
    _, s, vh = torch.linalg.svd(cov.float())
    v = vh.mH
    span = s.max() - s.min()
    s_hat = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    return v @ torch.diag(torch.exp(-tau * s_hat)) @ v.mH


def mlp_classifier(dim: int, num_classes: int) -> nn.Sequential:
    """The repo's per-modality classifier (512 -> 256 -> ReLU -> 64 -> C; D -> 256 here)."""
    return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 64), nn.Linear(64, num_classes))


class MIEModel(nn.Module):
    """Per-modality encoder + MLP classifier; no shared head."""

    def __init__(self, backbone: str, input_shapes: dict[str, list[int]], num_classes: int, init: str) -> None:
        super().__init__()
        self.modalities = list(input_shapes)
        self.encoders = nn.ModuleDict({m: build_encoder(backbone, m, s) for m, s in input_shapes.items()})
        self.classifiers = nn.ModuleDict({m: mlp_classifier(e.out_dim, num_classes) for m, e in self.encoders.items()})
        if init == "repo":
            self.apply(weight_init)

    def linears(self, m: str) -> list[nn.Linear]:
        """The Linear layers of one branch in forward order (the units the projection matches by position)."""
        mods = [*self.encoders[m].modules(), *self.classifiers[m].modules()]
        return [x for x in mods if isinstance(x, nn.Linear)]

    def forward(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        feats = {m: self.encoders[m](inputs[m]) for m in self.modalities}
        logits = {m: self.classifiers[m](feats[m]) for m in self.modalities}
        return ModelOutput(mean_softmax_logits(logits), feats, logits)


@register_method
class MIE(Method):
    """Alternating unimodal stages with mixup, a SAM-style flat loss and flat gradient projection."""

    name = "mie"
    description = "MIE: alternating unimodal stages, SAM-style flat loss, SVD flat projection of classifier gradients"
    HParams = MIEHParams
    n_modalities = (2, None)
    fusions = {"concat"}
    fusion_reason = "it has no fusion layer: it averages its per-modality classifiers' softmaxes"

    @classmethod
    def resolve(cls, hp: HParams, train: TrainSpec) -> HParams:
        if hp.stages == "exact":  # type: ignore[attr-defined]
            return hp
        return hp.model_copy(update={"epoch_list": scale_stages(list(hp.epoch_list), train.epochs)})  # type: ignore[attr-defined]

    @classmethod
    def check_train(cls, train: TrainSpec, hp: HParams) -> None:
        total = sum(hp.epoch_list)  # type: ignore[attr-defined]
        if total != train.epochs:
            raise UserError(
                f"method 'mie': epoch_list {hp.epoch_list} sums to {total} epochs but train.epochs is {train.epochs}; "  # type: ignore[attr-defined]
                f"set train.epochs: {total} (e.g. in the method entry's own `train:`), change epoch_list, "
                f"or add `stages: scale` to the mie entry to rescale epoch_list to train.epochs"
            )

    def __init__(self, spec: ModelSpec, hp: HParams, train: TrainSpec) -> None:
        self.check_train(train, hp)
        self._opt_stage = 0
        super().__init__(spec, hp, train)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_score = -math.inf
        self.proj: list[tuple[list[int], torch.Tensor] | None] = []  # per active Linear: (prev weight shape, P)

    @property
    def mhp(self) -> MIEHParams:
        return self.hp  # type: ignore[return-value]

    def build_model(self) -> nn.Module:
        s = self.spec
        return MIEModel(s.backbone, s.input_shapes, s.num_classes, s.init)

    def active(self, stage: int) -> str:
        mods = self.model.modalities
        return mods[stage % len(mods)]

    # ----- optimizer per stage ----------------------------------------------------------------
    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """SGD (or the recipe's optimizer) and scheduler for one stage: a cosine schedule spans the stage."""
        opt = build_optimizer(self.parameter_groups(), self.train_spec.optimizer)
        return opt, build_scheduler(opt, self.train_spec.scheduler, self.mhp.epoch_list[self._opt_stage])

    def scheduler_step(self, epoch: int) -> None:
        """The repo steps its scheduler at the start of every epoch (see on_epoch_start), not after."""

    # ----- stage switches -----------------------------------------------------------------------
    @torch.no_grad()
    def input_covariances(self, m: str, loader: Any, prepare: Any) -> list[torch.Tensor | None]:
        """sum over batches of xbar^T xbar, xbar the batch-mean input of each Linear layer of
        branch m, over one pass of the (augmented) train loader in eval mode."""
        layers = self.model.linears(m)
        covs: list[torch.Tensor | None] = [None] * len(layers)

        def hook(i: int) -> Any:
            def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                x = inp[0].detach()
                with torch.autocast(x.device.type, enabled=False):  # fp32 statistics under mixed precision
                    xbar = x.float().mean(0, keepdim=True)
                    c = xbar.t() @ xbar
                covs[i] = c if covs[i] is None else covs[i] + c
            return fn

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        was_training = self.training
        self.eval()
        try:
            for raw in loader:
                inputs, _ = prepare(raw, True)
                with self.autocast():
                    self.model.classifiers[m](self.model.encoders[m](inputs[m]))
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        return covs

    def flat_projections(self, prev: str, ctx: EpochContext) -> list[tuple[list[int], torch.Tensor] | None]:
        covs = self.input_covariances(prev, ctx.loaders["train"], ctx.prepare_batch)
        layers = self.model.linears(prev)
        return [None if c is None else (list(layer.weight.shape), flat_projection(c, self.mhp.temperature))
                for layer, c in zip(layers, covs)]

    def restart(self, stage: int, ctx: EpochContext) -> None:
        """Stage start: best state so far, projections from the previous modality, new optimizer."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.proj = self.flat_projections(self.active(stage - 1), ctx)
        self._opt_stage = stage
        self.optimizer, self.scheduler = self.make_optimizer()

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        stage, k = stage_at(ctx.epoch, self.mhp.epoch_list)
        self._opt_stage = stage
        if k == 0 and stage > 0:
            self.restart(stage, ctx)
        if self.scheduler is not None:
            with warnings.catch_warnings():  # stepping before the first optimizer step is the repo's order
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                self.scheduler.step()
        act = self.active(stage)
        assert self.optimizer is not None
        return {"stage": stage + 1, "lr": self.optimizer.param_groups[0]["lr"],
                **{f"active_{m}": float(m == act) for m in self.model.modalities}}

    @torch.no_grad()
    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Track the best state on val (fused macro-F1 of the averaged softmax, the repo's rule)."""
        if "val" not in ctx.loaders:
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return {}
        was_training = self.training
        self.eval()
        preds, labels = [], []
        try:
            for raw in ctx.loaders["val"]:
                inputs, y = ctx.prepare_batch(raw, False)
                with self.autocast():
                    preds.append(self.predict(inputs).logits.argmax(1).cpu())
                labels.append(y.cpu())
        finally:
            self.train(was_training)
        f1 = macro_f1(torch.cat(preds), torch.cat(labels), self.spec.num_classes)
        if f1 > self.best_score:
            self.best_score = f1
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return {"val_f1": f1, "best_val_f1": self.best_score}

    # ----- the step -----------------------------------------------------------------------------
    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp = self.mhp
        stage, _ = stage_at(ctx.epoch, hp.epoch_list)
        m = self.active(stage)
        enc, cls = self.model.encoders[m], self.model.classifiers[m]
        x = inputs[m]
        lam = float(np.random.beta(hp.mixup_alpha, hp.mixup_alpha)) if hp.mixup_alpha > 0 else 1.0
        perm = torch.randperm(x.shape[0]).to(x.device)
        x_mix = lam * x + (1 - lam) * x[perm]
        y_b = labels[perm]
        with self.autocast():
            feat = enc(x_mix)
            out = cls(feat)
            l_ori = lam * F.cross_entropy(out, labels, reduction="none") + (1 - lam) * F.cross_entropy(out, y_b, reduction="none")
        if hp.sam == "code":
            l_flat = self._code_sam(m, l_ori, feat, labels)
        else:
            l_flat = self._faithful_sam(m, l_ori, x_mix, labels, y_b, lam)
        if stage > 0:
            self.project(m)
        self.optimizer_step()
        loss = (1 - hp.flat_ratio) * l_ori.mean().detach() + hp.flat_ratio * l_flat.detach()
        return {"loss": loss, "loss_ori": l_ori.mean().detach(), "loss_flat": l_flat.detach(), "mixup_lambda": lam}

    def _code_sam(self, m: str, l_ori: torch.Tensor, feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The repo: perturb each tensor by rho g/|g| (never undone), flat loss of the perturbed
        classifier on the same (mixed) features with the un-mixed labels, one backward."""
        hp = self.mhp
        cls = self.model.classifiers[m]
        params_e, params_h = list(self.model.encoders[m].parameters()), list(cls.parameters())
        params = params_e + params_h
        grads = torch.autograd.grad(l_ori.mean(), params, retain_graph=True, allow_unused=True)
        rhos = [hp.noise_ratio] * len(params_e) + [hp.noise_ratio_cls] * len(params_h)
        for p, g, rho in zip(params, grads, rhos):
            if g is not None:
                n = torch.linalg.vector_norm(g)
                if n > 0:  # the repo divides by the norm unguarded
                    p.data = p.data + rho * (g / n)
        with self.autocast():
            l_flat = F.cross_entropy(cls(feat), labels, reduction="none").mean()
            loss = (1 - hp.flat_ratio) * l_ori.mean() + hp.flat_ratio * l_flat
        self.zero_grad()
        self.backward(loss)
        return l_flat

    def _faithful_sam(self, m: str, l_ori: torch.Tensor, x_mix: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
                      lam: float) -> torch.Tensor:
        """SAM proper: gradient of the clean mixup loss at theta, ascent step of radius rho per
        group (encoder, classifier) along the group's normalised gradient, the same loss at
        theta + eps, weights restored; update with (1-r) grad L(theta) + r grad L(theta + eps).
        BatchNorm statistics of the perturbed forward are discarded."""
        hp = self.mhp
        enc, cls = self.model.encoders[m], self.model.classifiers[m]
        params_e, params_h = list(enc.parameters()), list(cls.parameters())
        params = params_e + params_h
        g_ori = torch.autograd.grad(l_ori.mean(), params, allow_unused=True)
        g_ori = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, g_ori))
        saved = [p.detach().clone() for p in params]
        buffers = [b.detach().clone() for b in enc.buffers()]
        with torch.no_grad():
            for group, rho in ((range(len(params_e)), hp.noise_ratio), (range(len(params_e), len(params)), hp.noise_ratio_cls)):
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g_ori[i]) for i in group]))
                if norm > 0:
                    for i in group:
                        params[i].add_(g_ori[i], alpha=rho / float(norm))
        with self.autocast():
            out = cls(enc(x_mix))
            l_flat = (lam * F.cross_entropy(out, y_a, reduction="none") + (1 - lam) * F.cross_entropy(out, y_b, reduction="none")).mean()
        self.zero_grad()
        self.backward(hp.flat_ratio * l_flat)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
            for b, v in zip(enc.buffers(), buffers):
                b.copy_(v)
            for p, g in zip(params, g_ori):
                extra = (1 - hp.flat_ratio) * scale * g
                p.grad = extra if p.grad is None else p.grad + extra
        return l_flat

    def project(self, m: str) -> None:
        """Right-multiply each Linear weight gradient of branch m by the previous modality's P of
        the same position (when the weight shapes agree). Biases and convs are left alone."""
        for layer, entry in zip(self.model.linears(m), self.proj):
            if entry is None or layer.weight.grad is None:
                continue
            shape, p = entry
            if list(layer.weight.shape) == shape:
                layer.weight.grad = layer.weight.grad @ p.to(layer.weight.grad.dtype)

    # ----- state ------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"best_state": self.best_state, "best_score": self.best_score, "proj": self.proj}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.best_state = state.get("best_state")
        self.best_score = float(state.get("best_score", -math.inf))
        self.proj = list(state.get("proj") or [])

    def describe_run(self) -> dict[str, Any]:
        return {"estimator": "own-classifiers", "prediction": "mean of per-modality softmaxes", "sam": self.mhp.sam,
                "stage_restart": "best val macro-F1 so far (the repo: best test macro-F1)",
                "stage_modalities": [self.active(s) for s in range(len(self.mhp.epoch_list))],
                "stage_epochs": list(self.mhp.epoch_list), "stages": self.mhp.stages}
