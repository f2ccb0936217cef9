"""`valuation`: sample- and modality-level re-sampling by modality valuation (Wei, Feng, Wang & Hu, "Enhancing
Multimodal Cooperation via Sample-level Modality Valuation", CVPR 2024).

Source: GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation @ 7ed12b07ee7d233aa835089185c909aaa3ff6b1e
(`code/sample_level.py`, `code/modality_level.py`: `execute_modulation`, `train_epoch`, `main`;
`code/datasets/dataloader.py`: `AV_KS_Dataset_sample_level`, `AV_KS_Dataset_modality_level`;
`code/models/models.py`: `AVClassifier.forward(drop)`, `exec_drop`). docs/methods/valuation.md.

Why it balances: after each epoch every training sample is valued per modality (a Shapley-style share
of the correct prediction); the next epoch's training set adds copies of the samples whose audio (or
visual) contribution is low, with the OTHER modality's features zeroed in those copies, so the weak
modality must carry them alone.

Valuation (eval mode, no gradient, over the train split with its training augmentation, as the code's
train-mode `train_val` loader): with fused prediction correct -> value_all = 2 (else 0), audio-only
(visual features zeroed) correct -> value_a = 1, visual-only -> value_v = 1,
    c_a = (value_a + value_all - value_v) / 2,   c_v = (value_v + value_all - value_a) / 2.
Sample level: every stored item once, then per item (in order) 1 / 2 / 3 extra copies with the visual
features zeroed when 0.4 < c_a < 1 / -0.1 < c_a < 0.4 / c_a < -0.1 (none when c_a >= 1), then the same for
c_v with the audio features zeroed. Modality level: the mean contributions over `part_ratio` N items drawn
with replacement (numpy), gaps g_m = 1 - mean c_m, and int(|g_a - g_v| * 2/3 * alpha * N) extra copies of
items drawn with replacement, each with the stronger modality (smaller gap) zeroed.
Epochs 0..warmup-1 train on the plain set; valuation runs after every epoch from warmup-1 on, and
its plan is the next epoch's training set. The loss is the fused cross-entropy, one step per batch.

Bugs in the released code (none changes what is computed here): `sample_level.py` builds its re-sampled
dataset with a `loader=` argument the class does not take (a TypeError on the first valuation), and both
scripts read `args.dynamic` / `args.method`, which their parsers never define, when saving the best model.
The value scale (2 for the full coalition, 1 for one modality) is specific to two modalities, so the
method refuses others.

Per-modality accuracy: the fusion's own estimator (DESIGN.md §4.3; concat: mean-feature).
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mmbench.methods.base import EpochContext, Field, HParams, Method, StepContext, TrainPlan, register_method

DROP_NONE = 0  # tag values: 1 + index of the modality whose features are zeroed in that copy


class ValuationHParams(HParams):
    level: Literal["sample", "modality"] = Field("sample", description="sample-level (sample_level.py) or modality-level (modality_level.py) re-sampling",
                                                 json_schema_extra={"search": ["sample", "modality"]})
    warmup: int = Field(5, ge=1, description="epochs on the plain set; valuation runs after every epoch from warmup-1 on (the code's --warmup)",
                        json_schema_extra={"search": [1, 5, 10]})
    part_ratio: float = Field(0.2, gt=0, le=1, description="modality level: share of the train set (drawn with replacement) whose mean contribution is used")
    alpha: float = Field(1.0, ge=0, description="modality level: how many copies per unit of contribution gap (the code's --alpha)",
                         json_schema_extra={"search": [0.5, 1.0, 2.0]})


def contributions(fused_ok: torch.Tensor, a_ok: torch.Tensor, v_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (c_a, c_v) from correctness of the fused, audio-only and visual-only predictions."""
    all_ = fused_ok.double() * 2.0
    a, v = a_ok.double(), v_ok.double()
    return (a + all_ - v) / 2.0, (v + all_ - a) / 2.0


def copies(c: float) -> int:
    """Extra copies for one modality's contribution (the dataset's thresholds; 1.0 and 1.5 get none)."""
    if 0.4 < c < 1:
        return 1
    if -0.1 < c < 0.4:
        return 2
    if c < -0.1:
        return 3
    return 0


def sample_plan(c_a: list[float], c_v: list[float]) -> TrainPlan:
    """Every item once, then per item its audio copies (visual zeroed: tag 2), then visual copies (tag 1)."""
    n = len(c_a)
    idx, tags = list(range(n)), [DROP_NONE] * n
    for i in range(n):
        k = copies(c_a[i])
        idx += [i] * k
        tags += [2] * k
        k = copies(c_v[i])
        idx += [i] * k
        tags += [1] * k
    return TrainPlan(idx, tags)


def modality_plan(c_a: list[float], c_v: list[float], part_ratio: float, alpha: float) -> tuple[TrainPlan, dict[str, float]]:
    """numpy draws in the code's order: the part (with replacement), then the copies (with replacement)."""
    n = len(c_a)
    num = int(n * part_ratio)
    part = np.random.choice(n, num)
    part_a = sum(c_a[i] for i in part) / num
    part_v = sum(c_v[i] for i in part) / num
    gap_a, gap_v = 1.0 - part_a, 1.0 - part_v
    difference = abs(gap_a - gap_v) / 3 * 2 * alpha
    chosen = np.random.choice(n, int(difference * n))
    tag = 2 if gap_a > gap_v else 1  # zero the stronger modality
    plan = TrainPlan(list(range(n)) + [int(i) for i in chosen], [DROP_NONE] * n + [tag] * len(chosen))
    return plan, {"part_contrib_audio": part_a, "part_contrib_visual": part_v, "extra_copies": float(len(chosen))}


@register_method
class Valuation(Method):
    """Value each sample's modalities after every epoch; re-sample the weak modality's samples with the other zeroed."""

    name = "valuation"
    description = "Modality valuation (CVPR 2024): re-sample samples (or a modality) whose contribution is low, the other modality zeroed"
    HParams = ValuationHParams
    n_modalities = (2, 2)
    modality_reason = "the code's contribution values (2 for both modalities, 1 for one) are defined for two modalities"

    def __init__(self, spec: Any, hp: HParams, train: Any) -> None:
        super().__init__(spec, hp, train)
        self.plan: TrainPlan | None = None

    @property
    def vhp(self) -> ValuationHParams:
        return self.hp  # type: ignore[return-value]

    def train_plan(self) -> TrainPlan | None:
        return self.plan

    def zero_dropped(self, feats: dict[str, torch.Tensor], tags: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if tags is None:
            return feats
        return {m: f.masked_fill((tags == i + 1).unsqueeze(1), 0.0) for i, (m, f) in enumerate(feats.items())}

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        self.zero_grad()
        with self.autocast():
            feats = self.zero_dropped(self.model.encode(inputs), ctx.tags)
            loss = F.cross_entropy(self.model.fusion(feats), labels)
        self.backward(loss)
        self.optimizer_step()
        logs: dict[str, Any] = {"loss": loss.detach()}
        if ctx.tags is not None:
            logs.update({f"zeroed_{m}": (ctx.tags == i + 1).float().mean() for i, m in enumerate(self.modalities)})
        return logs

    @torch.no_grad()
    def value(self, ctx: EpochContext) -> tuple[list[float], list[float]]:
        """(c_a, c_v) per stored train item, by index."""
        n = len(ctx.loaders["train_eval"].dataset)
        c_a, c_v = [0.0] * n, [0.0] * n
        a, v = self.modalities
        was = self.training
        self.eval()
        try:
            for raw in ctx.loaders["train"]:
                inputs, y = ctx.prepare_batch(raw, True)
                with self.autocast():
                    feats = self.model.encode(inputs)
                    fused = self.model.fusion(feats)
                    only_a = self.model.fusion({a: feats[a], v: torch.zeros_like(feats[v])})
                    only_v = self.model.fusion({a: torch.zeros_like(feats[a]), v: feats[v]})
                ca, cv = contributions(fused.argmax(1) == y, only_a.argmax(1) == y, only_v.argmax(1) == y)
                for k, i in enumerate(raw["index"].tolist()):
                    c_a[i], c_v[i] = float(ca[k]), float(cv[k])
        finally:
            self.train(was)
        return c_a, c_v

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        if ctx.epoch < self.vhp.warmup - 1:
            return {}
        c_a, c_v = self.value(ctx)
        logs = {"contrib_audio": float(np.mean(c_a)), "contrib_visual": float(np.mean(c_v))}
        if self.vhp.level == "sample":
            self.plan = sample_plan(c_a, c_v)
        else:
            self.plan, extra = modality_plan(c_a, c_v, self.vhp.part_ratio, self.vhp.alpha)
            logs.update(extra)
        logs["train_set_size"] = float(len(self.plan.indices))
        return logs

    def extra_state(self) -> dict[str, Any]:
        return {"plan": None if self.plan is None else {"indices": list(self.plan.indices), "tags": list(self.plan.tags)}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        p = state.get("plan")
        self.plan = None if p is None else TrainPlan([int(i) for i in p["indices"]], [int(t) for t in p["tags"]])

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "valuation_level": self.vhp.level}
