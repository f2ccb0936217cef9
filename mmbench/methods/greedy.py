"""`greedy`: balanced multimodal learning against greedy learning (Wu, Jastrzębski, Cho & Geras, ICML 2022).

Source: nyukat/greedy_multimodal_learning @ a190e03755bd8d0883b2c5c0cd7921d2561ce2ee (`src/callbacks.py`
`Bias_Mitigation_Strong`, `src/balanced_mmtm.py` `MMTM_mitigate`, `src/model.py` `MMTM_MVCNN`,
`src/framework.py` `Model_.train_loop`, `train.py` `blend_loss`, `configs/training_guided.gin`); cross-checked
against GeWu-Lab/BalanceBenchmark @ 4c1482fc (`balancemm/trainer/Greedy_trainer.py`); docs/methods/greedy.md.

Why it balances: in a multimodal network whose branches exchange information (MMTM blocks, fusion `mmtm`,
mmbench/models/mmtm.py) a branch can keep leaning on the other modality through the bypass instead of
learning its own features — the network is "greedy". The conditional learning speed measures, per branch m,
how fast its bypass (MMTM) parameters learn relative to its own:
    M_main,m   += Σ_{θ in branch m}  ‖∇θ‖² / Σ ‖θ‖²      (branch m's encoder and its head)
    M_bypass,m += Σ_{θ in MMTM for m} ‖∇θ‖² / Σ ‖θ‖²     (fc_excite of m, plus the shared fc_squeeze)
    d_BDR = log10(M_bypass,0 / M_main,0) − log10(M_bypass,1 / M_main,1)
accumulated over the whole run from the first step. When |d_BDR| > epsilon, the next `window` training
steps are "curation" (re-balancing) steps for the modality that leans more on its bypass (0 if d_BDR > 0,
else 1): that modality's MMTM excitations are replaced by their running averages, a constant, so no
cross-modal information reaches its branch and the branch must learn from its own input.

The step, in the official order (`Model_.train_loop` with the callback's `on_backward_end`):
1. forward with the current curation state; loss = Σ_m CE(head_m(φ_m), y) (`blend_loss`: the sum of the
   branch heads' losses; the fused prediction, the mean of the branch logits, is not trained directly);
2. backward;
3. the curation state machine, before the optimizer step (so norms are those the step starts from):
   before `starting_epoch`: compute d_BDR, no curation. From it on: outside curation, compute d_BDR and
   enter curation if |d_BDR| > epsilon (curation_step = 0); inside curation, curation_step += 1 and leave
   when it reaches `window` — so a curation lasts `window` steps and d_BDR is not accumulated during it;
4. optimizer step.
`starting_epoch` counts from 0 here; the official `starting_epoch=2` counts the loop's epochs from 1
(`for epoch in range(1, epochs + 1)`), so it unlocks at the second epoch, mmbench epoch 1 (the default).

One bug in the released MMTM block, fixed by default and kept behind `running_average`: the second branch's
running-average excitation is updated with the FIRST branch's excitation (`running_avg_weight_skeleton`
from `vis_out`), so a curation step for modality 1 rescales its channels with modality 0's average
excitation (`running_average: official`). The run records which ran.

Per-modality accuracy uses the `branch-head` estimator: each branch's own head on its pooled feature,
which the MMTM blocks have already coupled to the other modality (as the official `acc_modal_m`).
Defined for two branches (d_BDR is a difference of two); other modality counts are refused.
BalanceBenchmark differs (docs/methods/greedy.md): CE of a concat head instead of the branch-head sum,
MMTM after all four ResNet stages, no warm-up epoch, epsilon 1e-3.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mmbench.methods.base import Field, HParams, Method, ModelSpec, StepContext, TrainSpec, register_method
from mmbench.models.mmtm import MMTMClassifier


class GreedyHParams(HParams):
    epsilon: float = Field(0.01, gt=0, description="curation starts when |d_BDR| exceeds this (official 0.01)",
                           json_schema_extra={"search": [0.001, 0.01, 0.1]})
    window: int = Field(5, ge=1, description="curation steps per re-balancing (official curation_windowsize 5)",
                        json_schema_extra={"search": [1, 5, 20]})
    starting_epoch: int = Field(1, ge=0, description="first epoch (from 0) that may curate; the official "
                                                     "starting_epoch=2 counts from 1, i.e. epoch 1 here",
                                json_schema_extra={"search": [0, 1, 2]})
    ratio: int = Field(4, ge=1, description="MMTM bottleneck ratio: hidden width = 2 (C_0 + C_1) / ratio (official 4)")
    rebalance: bool = Field(True, description="false = the paper's vanilla baseline: the same MMTM network and "
                                               "branch-sum loss, d_BDR still measured and logged, never curated")
    running_average: Literal["fixed", "official"] = Field(
        "fixed", description="fixed = each branch's own running excitation; official = the released bug that "
                             "updates the second branch's average with the first branch's excitation")


def learning_speed_terms(model: MMTMClassifier) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Parameters per role, in the order the official callback visits them (branch 0, branch 1, then the
    MMTM blocks): `main:<m>` = encoder m and its head; `bypass:<m>` = the MMTM parameters serving m
    (its fc_excite and every block's shared fc_squeeze)."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    heads = model.fusion.heads  # type: ignore[union-attr]
    for m in model.modalities:
        groups[f"main:{m}"] = [*model.encoders[m].named_parameters(), *heads[m].named_parameters()]
        groups[f"bypass:{m}"] = []
    for i, block in model.mmtm.items():
        for name, p in block.named_parameters():
            owner = name.split(".")[1] if name.startswith("fc_excite.") else None
            for m in model.modalities:
                if owner is None or owner == m:
                    groups[f"bypass:{m}"].append((f"mmtm.{i}.{name}", p))
    return groups


def speed_ratios(groups: dict[str, list[tuple[str, torch.Tensor]]]) -> dict[str, float]:
    """Σ‖∇θ‖² / Σ‖θ‖² per group. Per-tensor float32 sums as `(p ** 2).sum()` (the official expression),
    summed in Python floats in the official order; one host sync for all of them. A tensor without a
    gradient counts 0 (the official code only reads gradients on steps where every tensor has one)."""
    flat = [(k, p) for k, ps in groups.items() for _, p in ps]
    if not flat:
        return {}
    sums = torch.stack([t for _, p in flat for t in (
        (p.detach() ** 2).sum(), (p.grad.detach() ** 2).sum() if p.grad is not None else p.new_zeros(()))]).tolist()
    wn: dict[str, float] = {k: 0.0 for k in groups}
    gn: dict[str, float] = {k: 0.0 for k in groups}
    for j, (k, _) in enumerate(flat):
        wn[k] += sums[2 * j]
        gn[k] += sums[2 * j + 1]
    return {k: (gn[k] / wn[k] if wn[k] > 0 else 0.0) for k in groups}


def d_bdr(speed: dict[str, float], modalities: list[str]) -> float:
    """log10(M_bypass,0 / M_main,0) − log10(M_bypass,1 / M_main,1) of the accumulated speeds."""
    a, b = modalities
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.log10(speed[f"bypass:{a}"] / speed[f"main:{a}"]) - np.log10(speed[f"bypass:{b}"] / speed[f"main:{b}"])) \
            if speed[f"main:{a}"] > 0 and speed[f"main:{b}"] > 0 else float("nan")


@register_method
class Greedy(Method):
    """MMTM-coupled branches; curation steps cut the bypass of the branch that leans on it (d_BDR)."""

    name = "greedy"
    description = "Greedy: MMTM-coupled branches; when d_BDR (conditional learning speed) drifts, cut one branch's bypass"
    HParams = GreedyHParams
    n_modalities = (2, 2)
    modality_reason = ("its balance signal d_BDR is the difference of two branches' conditional learning speeds "
                       "and a curation step cares for one of two branches; the authors define it for two")
    fusions = {"mmtm"}
    fusion_reason = ("Greedy is defined on branches coupled by MMTM blocks, each with its own head; "
                     "in a comparison recipe give its entry `model: {fusion: mmtm}`")

    def __init__(self, spec: ModelSpec, hp: HParams, train: TrainSpec) -> None:
        self.check(spec, hp)
        super().__init__(spec, hp, train)
        self.speed = {k: 0.0 for k in learning_speed_terms(self.mmtm_model)}  # accumulated M_main / M_bypass
        self.d_bdr = float("nan")
        self.curation = False
        self.curation_step = 0
        self.caring = 0  # index of the modality cared for while curating

    @property
    def ghp(self) -> GreedyHParams:
        return self.hp  # type: ignore[return-value]

    @property
    def mmtm_model(self) -> MMTMClassifier:
        return self.model  # type: ignore[return-value]

    def build_model(self) -> MMTMClassifier:
        from mmbench.models.classifier import weight_init
        from mmbench.models.encoders import build_encoder
        from mmbench.models.fusion import build_fusion

        s = self.spec
        encoders = {m: build_encoder(s.backbone, m, shape) for m, shape in s.input_shapes.items()}
        head = build_fusion(s.fusion, {m: e.out_dim for m, e in encoders.items()}, s.num_classes)
        model = MMTMClassifier(encoders, head, self.ghp.ratio, self.ghp.running_average)
        if s.init == "repo":
            model.apply(weight_init)
        return model

    def accumulate_speed(self) -> None:
        for k, v in speed_ratios(learning_speed_terms(self.mmtm_model)).items():
            self.speed[k] += v
        self.d_bdr = d_bdr(self.speed, self.modalities)

    def advance_curation(self, epoch: int) -> None:
        """The official `on_backward_end`: decide the curation state of the NEXT step."""
        if epoch < self.ghp.starting_epoch or not self.ghp.rebalance:
            self.accumulate_speed()
            self.curation, self.caring = False, 0
        elif not self.curation:
            self.accumulate_speed()
            if abs(self.d_bdr) > self.ghp.epsilon:
                self.curation, self.curation_step = True, 0
                self.caring = 0 if self.d_bdr > 0 else 1
            else:
                self.curation, self.caring = False, 0
        else:
            self.curation_step += 1
            if self.curation_step == self.ghp.window:
                self.curation = False

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        self.zero_grad()
        model = self.mmtm_model
        curating, cared = self.curation, self.modalities[self.caring]
        model.cared = cared if curating else None
        try:
            with self.autocast():
                feats = model.encode(inputs)
                per = model.fusion.split_logits(feats)
                losses = {m: F.cross_entropy(per[m], labels) for m in self.modalities}
                loss = sum(losses.values())
        finally:
            model.cared = None
        self.backward(loss)  # type: ignore[arg-type]
        self.unscale()
        self.advance_curation(ctx.epoch)
        self.optimizer_step()
        logs: dict[str, Any] = {"loss": loss.detach(), "d_bdr": self.d_bdr, "curation": float(curating)}
        for m in self.modalities:
            logs[f"loss_{m}"] = losses[m].detach()
            logs[f"care_{m}"] = float(curating and cared == m)
        return logs

    def extra_state(self) -> dict[str, Any]:
        return {"speed": dict(self.speed), "d_bdr": self.d_bdr, "curation": self.curation,
                "curation_step": self.curation_step, "caring": self.caring}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.speed.update({k: float(v) for k, v in state.get("speed", {}).items()})
        self.d_bdr = float(state.get("d_bdr", float("nan")))
        self.curation = bool(state.get("curation", False))
        self.curation_step = int(state.get("curation_step", 0))
        self.caring = int(state.get("caring", 0))

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "running_average": self.ghp.running_average, "rebalance": self.ghp.rebalance,
                "mmtm_stages": sorted(int(i) for i in self.mmtm_model.mmtm), "loss": "sum of branch-head CEs"}
