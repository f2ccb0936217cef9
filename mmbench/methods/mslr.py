"""`mslr`: modality-specific learning rates (Yao & Mihalcea, Findings of ACL 2022).

Each modality's gradients are multiplied by `c_m = c0_m * r_m` before the optimizer step (a
per-modality learning rate under plain SGD). `c0_m` is a fixed per-dataset start (CREMA-D: audio
0.9, visual 1.1); `r_m` adapts after each epoch from the modality's own accuracy: once five epochs
of it are remembered, `r_m = acc_m(this epoch) / mean(previous five)` and the window slides.
A modality that keeps improving keeps its rate; one that stalls slows down. One forward, one
backward, as in plain training.

Re-expressed from the implementation the field compares against: lihong2303/AGM_ICCV2023 @
5a65542c70b1c7c15c5df291e77fa9cf2bbb9549 (`run/CREMAD_main.py`: `train` grad scaling for `methods == "MSLR"`, the
`audio_lr_memory` update after `test`; the same in `run/AVMNIST_main.py`, `run/URFunny_main.py`).
The original paper was not read. What the code scales: every parameter of the modality's encoder
and of its own classifier (the sum-fusion model `AVClassifier_Sum`: `audio_net`, `audio_cls`);
gradients are scaled after backward, so SGD's weight decay and momentum see the scaled gradient
plus unscaled decay, exactly as there. Here "its own classifier" is the fusion's part that only
that modality feeds: its branch head under sum fusion, its weight columns under concat (the shared
bias is not scaled), nothing under film/gated (their heads mix modalities).

Deviations (deliberate): the code feeds `r_m` with TEST accuracies (and on CREMA-D with an audio
accuracy its `test()` miscounts: the audio check is missing and `acc_a` is incremented under the
visual one, so its audio accuracy IS its visual accuracy and r_audio == r_visual in every CREMA-D
run of the code; c0 alone separates the modalities there; `audio_as_visual: true` reproduces it); here the accuracies are the validation split's,
computed with the fusion's own per-modality estimator exactly as mmbench reports `acc/<m>`
(`accuracy_split: test` reproduces the test-set choice). The code's epochs are 1-based; the window
here is 0-based and inclusive.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from mmbench.errors import UserError
from mmbench.methods.base import EpochContext, Field, HParams, Method, ModelSpec, StepContext, register_method


def rate_ratios(memory: dict[str, list[float]], accs: dict[str, float], window: int) -> tuple[dict[str, float] | None, dict[str, list[float]]]:
    """(new r_m or None while the memory fills, the updated memory). The code: fewer than `window`
    remembered -> append; else r = acc / mean(memory), drop the oldest, append."""
    if any(len(memory.get(m, [])) < window for m in accs):
        return None, {m: [*memory.get(m, []), a] for m, a in accs.items()}
    means = {m: sum(memory[m]) / len(memory[m]) for m in accs}
    ratios = {m: a / means[m] if means[m] > 0 else 1.0 for m, a in accs.items()}  # the code divides by 0 here
    return ratios, {m: [*memory[m][1:], a] for m, a in accs.items()}


class MSLRHParams(HParams):
    init_coeffs: dict[str, float] = Field(
        {}, description="c0 per modality (CREMA-D: audio 0.9, visual 1.1; AV-MNIST: audio 1.3, "
        "visual 0.7; UR-Funny: audio 0.9, visual 1.4, text 0.7); a modality left out starts at 1.0",
        json_schema_extra={"search": [{"audio": 0.9, "visual": 1.1}, {"audio": 1.1, "visual": 0.9}]})
    window: int = Field(5, ge=1, description="epochs of accuracy remembered for r = acc / mean(previous window)",
                        json_schema_extra={"search": [3, 5, 10]})
    modulation_starts: int = Field(0, ge=0, description="first epoch with scaled gradients (0-based, inclusive)",
                                   json_schema_extra={"search": [0]})
    modulation_ends: int = Field(100_000, ge=0, description="last epoch with scaled gradients (0-based, inclusive; "
                                 "default: the whole run)", json_schema_extra={"search": [50, 100_000]})
    accuracy_split: Literal["val", "test"] = Field(
        "val", description="split whose per-modality accuracy drives r (the code uses the test set)")
    audio_as_visual: bool = Field(
        False, description="reproduce the AGM repo's CREMA-D test() bug: the audio accuracy feeding r is the visual "
        "accuracy (so r_audio == r_visual); off = each modality's own accuracy")

    @model_validator(mode="after")
    def _check(self) -> "MSLRHParams":
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(
                f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        bad = {m: c for m, c in self.init_coeffs.items() if not c > 0}
        if bad:
            raise ValueError(f"init_coeffs must be positive, got {bad}")
        return self


@register_method
class MSLR(Method):
    """Scale each modality's gradients by c0_m * (acc_m / mean of its last `window` accuracies)."""

    name = "mslr"
    description = "MSLR: per-modality learning rates c0_m * acc_m / mean(previous 5 acc_m), adapted each epoch"
    HParams = MSLRHParams
    n_modalities = (2, None)
    modality_reason = "per-modality learning rates need modalities to differ"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ratios = {m: 1.0 for m in self.modalities}
        self.memory: dict[str, list[float]] = {m: [] for m in self.modalities}

    @classmethod
    def check(cls, spec: ModelSpec, hp: MSLRHParams) -> None:  # type: ignore[override]
        super().check(spec, hp)
        extra = sorted(set(hp.init_coeffs) - set(spec.modalities))
        if extra:
            raise UserError(f"mslr: init_coeffs names {', '.join(extra)}, not a modality of the dataset; "
                            f"use: {', '.join(spec.modalities)}")

    def coefficients(self) -> dict[str, float]:
        c0 = self.hp.init_coeffs  # type: ignore[attr-defined]
        return {m: float(c0.get(m, 1.0)) * self.ratios[m] for m in self.modalities}

    @property
    def head_part(self) -> str:
        """Which part of the fusion head counts as a modality's own classifier (recorded with the run)."""
        return {"sum": "branch-head", "concat": "weight-columns"}.get(self.spec.fusion, "none")

    def scale_gradients(self, coeffs: dict[str, float]) -> None:
        fusion = self.model.fusion
        for m, c in coeffs.items():
            for p in self.model.encoders[m].parameters():
                if p.grad is not None:
                    p.grad.mul_(c)
            if self.head_part == "branch-head":
                for p in fusion.heads[m].parameters():
                    if p.grad is not None:
                        p.grad.mul_(c)
        if self.head_part == "weight-columns" and fusion.fc.weight.grad is not None:
            for m, sl in fusion.weight_slices().items():
                fusion.fc.weight.grad[:, sl].mul_(coeffs[m])

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp: MSLRHParams = self.hp  # type: ignore[assignment]
        self.zero_grad()
        with self.autocast():
            out = self.model(inputs)
            loss = F.cross_entropy(out.logits, labels)
        self.backward(loss)
        coeffs = self.coefficients()
        if hp.modulation_starts <= ctx.epoch <= hp.modulation_ends:
            self.unscale()
            self.scale_gradients(coeffs)
        self.optimizer_step()
        return {"loss": loss.detach(), **{f"coeff_{m}": c for m, c in coeffs.items()}}

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """One eval pass over the chosen split: per-modality accuracy -> r for the next epoch."""
        from mmbench.engine.evaluate import collect, metrics_of

        hp: MSLRHParams = self.hp  # type: ignore[assignment]
        loader = ctx.loaders.get(hp.accuracy_split)
        if loader is None:
            return {}
        out = collect(self, loader, ctx.prepare_batch)
        metrics = metrics_of(out, self.spec.num_classes)
        accs = {m: metrics[f"acc/{m}"] for m in self.modalities}
        if hp.audio_as_visual and "audio" in accs and "visual" in accs:
            accs["audio"] = accs["visual"]  # the official test(): acc_a counted under the visual check
        ratios, self.memory = rate_ratios(self.memory, accs, hp.window)
        if ratios is not None:
            self.ratios = ratios
        return {**{f"ratio_{m}": r for m, r in self.ratios.items()}, **{f"acc_{m}": a for m, a in accs.items()}}

    def extra_state(self) -> dict[str, Any]:
        return {"ratios": dict(self.ratios), "memory": {m: list(v) for m, v in self.memory.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.ratios = {m: float(v) for m, v in state.get("ratios", self.ratios).items()}
        self.memory = {m: [float(x) for x in v] for m, v in state.get("memory", self.memory).items()}

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "mslr_head_part": self.head_part,
                "mslr_accuracy_split": self.hp.accuracy_split,  # type: ignore[attr-defined]
                "mslr_accuracy": "audio-as-visual (official bug)" if self.hp.audio_as_visual else "own"}  # type: ignore[attr-defined]
