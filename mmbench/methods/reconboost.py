"""`reconboost`: ReconBoost, alternating boosting with reconcilement (Hua et al., ICML 2024).
Source followed: huacong/ReconBoost @ 14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932, `train.py::main`,
`models/dynamic_net.py` (DynamicNet, Head), `models/CREMA/basic_model.py`, `schedule.py`, `utils.py`.

The model is an ensemble F(x) = beta * sum_m h(phi_m(x_m)) of per-modality encoders with one shared
head h = Linear(512, 256) -> ReLU -> Linear(256, C) and a learnable boost rate beta. Training runs in
stages; stage s trains one modality m (fixed alternation in dataset order: audio, visual, audio, ...):
- phase 1 (`epochs_per_stage` epochs): only m's encoder and the shared head, new SGD, on the
  reconcilement loss per sample
  `-(w1/C) log p_m(y) + (w2/C) q_{-m}(y) log p_m(y)`, p_m = softmax(h(phi_m)), q_{-m} = softmax of the
  other ensemble members' current (detached) prediction: samples the others already get right weigh
  less, so m learns what the ensemble misses;
- phase 2 (`correct_epochs` epochs, "global rectification"): every member's encoder, the head and
  beta, new SGD, plain CE on F(x).
m joins the ensemble after its first phase 1. LR x `lr_decay` every `lr_decay_every` stages.

Followed to the letter (the code's order and modes): the others' prediction for q is a no-grad
forward in train mode (their BatchNorm uses and updates batch statistics), before m's forward; on the
first stage with an empty ensemble q = 1 (the code's `c0` expanded to one column, softmax = 1); the
code's "GA" term MSE(softmax(out_m), softmax(out_prev)) has both operands detached -- no gradient --
but its forward of the previous stage's modality (train mode, BN statistics updated) is run and the
value logged (`ga_forward: false` skips it: cheaper, BN statistics then differ from the code's).
Phase 1 optimises m's encoder and the head (the code's `model.fc = net_ensemble.head`); phase 2 every
member's encoder, the head and beta, all with the recipe's weight decay (code: 5e-4, beta included).

Not followed (recorded): the code initialises the encoders from unimodal runs (`--use_pretrain`, in
every README command); here they start from the recipe's init (the code's path without
`--use_pretrain`). mmbench evaluates after every epoch (the code after every stage); while the ensemble
is still empty (phase 1 of stage 0) the prediction is the training modality alone.

M modalities: the code's two-modality loop with the ensemble over all members; the alternation cycles
through the modalities in dataset order; q uses every other member; the GA forward uses the previous
stage's modality.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbench.errors import UserError
from mmbench.methods.base import (
    EpochContext, Field, HParams, Method, ModelSpec, StepContext, TrainSpec, build_optimizer, register_method,
)
from mmbench.models.classifier import ModelOutput, weight_init
from mmbench.models.encoders import build_encoder


class ReconBoostHParams(HParams):
    epochs_per_stage: int = Field(4, ge=1, description="phase-1 epochs per stage (one modality, reconcilement loss)",
                                  json_schema_extra={"search": [1, 2, 4]})
    correct_epochs: int = Field(4, ge=0, description="phase-2 epochs per stage (global rectification, CE on the ensemble)",
                                json_schema_extra={"search": [0, 1, 4]})
    weight1: float = Field(5.0, ge=0, description="w1: weight of -log p_m(y) (code: 5 for CREMA-D, 4 for AVE)",
                           json_schema_extra={"search": [4.0, 5.0]})
    weight2: float = Field(1.0, ge=0, description="w2: weight of q_-m(y) log p_m(y), the reconcilement term",
                           json_schema_extra={"search": [0.5, 1.0, 2.0]})
    alpha: float = Field(0.5, ge=0, description="GA term weight (logged only: the code detaches both operands)")
    boost_rate: float = Field(1.0, description="initial beta of F = beta * sum_m h(phi_m)")
    hidden: int = Field(256, ge=1, description="width of the shared head's hidden layer")
    ensemble_lr: float | None = Field(None, gt=0, description="phase-2 LR (code e_lr); empty = the optimizer's lr (code m_lr = e_lr = 0.01)")
    lr_decay_every: int = Field(30, ge=1, description="multiply both LRs by lr_decay every this many stages (code: 30 for CREMA-D)")
    lr_decay: float = Field(0.1, gt=0, le=1, description="LR factor per lr_decay_every stages (code: 0.1)")
    ga_forward: bool = Field(True, description="run the code's forward of the previous modality for the (gradient-free) GA term")


class SharedHead(nn.Module):
    """The code's `Head`: Linear(d, hidden) -> ReLU -> Linear(hidden, C), shared by every modality."""

    def __init__(self, dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class BoostEnsemble(nn.Module):
    """Encoders, the shared head and beta; `members` (the code's `models_name`, in its order) say who votes."""

    def __init__(self, encoders: dict[str, nn.Module], head: SharedHead, boost_rate: float) -> None:
        super().__init__()
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.head = head
        self.boost_rate = nn.Parameter(torch.tensor(float(boost_rate)))
        self.members: list[str] = []

    def logits(self, m: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoders[m](x)
        return self.head(feat), feat

    def ensemble(self, inputs: dict[str, torch.Tensor], members: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """beta * (sum of h(phi_j) over `members`, added in their order), the features and per-member logits."""
        pred, feats, outs = None, {}, {}
        for j in members:
            outs[j], feats[j] = self.logits(j, inputs[j])
            pred = outs[j] if pred is None else pred + outs[j]
        assert pred is not None
        return self.boost_rate * pred, feats, outs


def reconcile_loss(out_m: torch.Tensor, q_soft: torch.Tensor, labels: torch.Tensor, w1: float, w2: float) -> torch.Tensor:
    """Per-sample loss of the code: -w1 mean_c(t * log p) + w2 mean_c(t * q * log p), t one-hot, q the
    others' softmax (B, C) or ones (B, 1) for an empty ensemble; = (-(w1 - w2 q(y)) / C) log p(y)."""
    target = torch.zeros_like(out_m).scatter_(1, labels.view(-1, 1), 1)
    # two log_softmax nodes, as the code writes it: one shared node sums the two incoming gradients before
    # its backward and rounds differently (1e-6 relative on the encoder)
    return -w1 * (target * out_m.log_softmax(1)).mean(-1) + w2 * (target * q_soft * out_m.log_softmax(1)).mean(-1)


@register_method
class ReconBoost(Method):
    """Alternate modalities stage by stage: reconcilement-loss training of one, then joint rectification."""

    name = "reconboost"
    description = "ReconBoost: stage-wise alternating boosting of one modality against the ensemble, then global rectification"
    HParams = ReconBoostHParams
    fusions = {"sum"}
    fusion_reason = "its ensemble sums one shared head's logits over modalities (a late, sum fusion with a shared head)"
    n_modalities = (2, None)
    modality_reason = "it alternates between modalities, boosting each against the others"

    def __init__(self, spec: ModelSpec, hp: HParams, train: TrainSpec) -> None:
        super().__init__(spec, hp, train)
        self.phase_key: tuple[int, int] | None = None  # (stage, phase) the current optimizer serves
        self.lrs = (0.0, 0.0)

    @property
    def rhp(self) -> ReconBoostHParams:
        return self.hp  # type: ignore[return-value]

    @classmethod
    def check_train(cls, train: TrainSpec, hp: HParams) -> None:
        if train.scheduler.get("name", "none") != "none":
            raise UserError("reconboost decays its learning rates per stage (lr_decay_every, lr_decay); "
                            "set train.scheduler to {name: none}")

    def build_model(self) -> nn.Module:
        s = self.spec
        encs = {m: build_encoder(s.backbone, m, shape) for m, shape in s.input_shapes.items()}
        dims = {e.out_dim for e in encs.values()}
        if len(dims) != 1:
            raise UserError(f"reconboost shares one head across modalities, so every encoder must give the same "
                            f"feature size; got {sorted(dims)}")
        model = BoostEnsemble(encs, SharedHead(dims.pop(), self.rhp.hidden, s.num_classes), self.rhp.boost_rate)
        if s.init == "repo":
            model.encoders.apply(weight_init)  # the head keeps PyTorch's default init, as the code's Head
        return model

    # ----- schedule -------------------------------------------------------------------------------
    def position(self, epoch: int) -> tuple[int, int, str]:
        """(stage, phase 1 or 2, modality of the stage) of a 0-based epoch."""
        per = self.rhp.epochs_per_stage + self.rhp.correct_epochs
        stage, off = divmod(epoch, per)
        return stage, 1 if off < self.rhp.epochs_per_stage else 2, self.modalities[stage % len(self.modalities)]

    def stage_lrs(self, stage: int) -> tuple[float, float]:
        base = float(self.train_spec.optimizer.get("lr", 1e-3))
        ens = self.rhp.ensemble_lr if self.rhp.ensemble_lr is not None else base
        f = self.rhp.lr_decay ** (stage // self.rhp.lr_decay_every)
        return base * f, ens * f

    def phase_params(self, stage: int, phase: int) -> list[nn.Parameter]:
        model: BoostEnsemble = self.model  # type: ignore[assignment]
        if phase == 1:  # the code's model.parameters() with model.fc = head
            m = self.modalities[stage % len(self.modalities)]
            return [*model.encoders[m].parameters(), *model.head.parameters()]
        return [*(p for j in model.members for p in model.encoders[j].parameters()), *model.head.parameters(), model.boost_rate]

    def members_at(self, stage: int, phase: int) -> list[str]:
        """Ensemble members (the code's order: a re-added member moves to the end) during (stage, phase)."""
        members: list[str] = []
        for s in range(stage + (1 if phase == 2 else 0)):
            m = self.modalities[s % len(self.modalities)]
            if m in members:
                members.remove(m)
            members.append(m)
        return members

    def enter(self, stage: int, phase: int) -> None:
        model: BoostEnsemble = self.model  # type: ignore[assignment]
        model.members = self.members_at(stage, phase)
        self.lrs = self.stage_lrs(stage)
        cfg = {**self.train_spec.optimizer, "lr": self.lrs[0] if phase == 1 else self.lrs[1]}
        self.optimizer = build_optimizer(self.phase_params(stage, phase), cfg)
        self.phase_key = (stage, phase)

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        self.enter(0, 1)
        assert self.optimizer is not None
        return self.optimizer, None

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        stage, phase, m = self.position(ctx.epoch)
        if self.phase_key != (stage, phase):
            self.enter(stage, phase)
        return {"stage": stage, "phase": phase, "lr": self.optimizer.param_groups[0]["lr"],  # type: ignore[union-attr]
                f"train_{m}": 1.0, "members": len(self.model.members)}  # type: ignore[arg-type]

    def scheduler_step(self, epoch: int) -> None:
        """LRs change per stage, in `enter`."""

    # ----- steps ----------------------------------------------------------------------------------
    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        stage, phase, m = self.position(ctx.epoch)
        if self.phase_key != (stage, phase):
            self.enter(stage, phase)
        return self.boost_step(stage, m, inputs, labels) if phase == 1 else self.rectify_step(inputs, labels)

    def boost_step(self, stage: int, m: str, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, Any]:
        model: BoostEnsemble = self.model  # type: ignore[assignment]
        hp = self.rhp
        others = [j for j in model.members if j != m]
        with self.autocast():
            if others:
                with torch.no_grad():
                    pred = None
                    for j in others:
                        o, _ = model.logits(j, inputs[j])
                        pred = o if pred is None else pred + o
                    q_soft = (model.boost_rate * pred).detach().float().softmax(1)
            else:  # empty ensemble: the code's constant c0 in one column, softmax 1
                q_soft = torch.ones(labels.shape[0], 1, device=labels.device)
            out_m, _ = model.logits(m, inputs[m])
            per_sample = reconcile_loss(out_m.float(), q_soft, labels, hp.weight1, hp.weight2)
            logs: dict[str, Any] = {}
            prev = self.modalities[(stage - 1) % len(self.modalities)]
            if stage > 0 and hp.ga_forward:
                with torch.no_grad():
                    pre_out, _ = model.logits(prev, inputs[prev])
                    logs["ga_loss"] = F.mse_loss(out_m.detach().softmax(1), pre_out.softmax(1))
            loss = per_sample.mean()
        self.zero_grad()
        self.backward(loss)
        self.optimizer_step()
        logs.update({"loss": loss.detach(), "boost_loss": loss.detach(),
                     "q_true": q_soft.gather(1, labels.view(-1, 1)).mean() if q_soft.shape[1] > 1 else torch.ones(())})
        return logs

    def rectify_step(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, Any]:
        model: BoostEnsemble = self.model  # type: ignore[assignment]
        with self.autocast():
            out, _, _ = model.ensemble(inputs, model.members)
            loss = F.cross_entropy(out, labels)
        self.zero_grad()
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach(), "rectify_loss": loss.detach(), "boost_rate": model.boost_rate.detach().clone()}

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)  # members outside this phase's optimizer too

    # ----- prediction -----------------------------------------------------------------------------
    def predict(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        model: BoostEnsemble = self.model  # type: ignore[assignment]
        members = model.members or [self.position(0)[2]]
        out, feats, outs = model.ensemble(inputs, members)
        for j in self.modalities:  # every modality's features and logits, members or not
            if j not in outs:
                outs[j], feats[j] = model.logits(j, inputs[j])
        return ModelOutput(out, feats, {j: outs[j] for j in self.modalities})

    @property
    def estimator_fusion(self) -> None:
        return None

    # ----- state ----------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"phase_key": list(self.phase_key) if self.phase_key else None, "members": list(self.model.members)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("phase_key"):
            self.enter(*state["phase_key"])  # the optimizer the checkpoint's state belongs to
        self.model.members = list(state["members"])  # type: ignore[assignment]

    def describe_run(self) -> dict[str, Any]:
        return {"estimator": "shared-head per modality", "prediction": "beta * sum of shared-head logits of the members",
                "pretrained_unimodal_init": False, "ga_forward": self.rhp.ga_forward}
