"""`inforeg`: InfoReg, information-acquisition regulation (Huang, Wei, Yang & Hu, CVPR 2025).
Source followed: GeWu-Lab/InfoReg_CVPR2025 @ 939b2ed11dcbf4daddb2507157b2cb9f8d0e24d7,
`main.py::train_epoch` and `main()`, `models/basic_model.py::AVClassifier`.

Early in training ("the prime learning window") the modality that already fits the batch best
acquires information fastest and crowds the others out. InfoReg slows that modality down: its
encoder gets a proximal gradient beta_m * (theta_m - theta_m^{epoch start}) that pulls it back
towards where it started the epoch, with beta_m = c_m * exp(tanh(score_m - score_runner_up))
(c = 0.95 for audio, 0.1 for visual in the code). The window is open while the first encoder's
empirical Fisher trace (sum over its conv/linear layers of the mean accumulated squared gradient
of an epoch) still grows by more than 5 % of its 10-epoch average; once it closes, training is
plain joint training on the same loss.

The loss is the code's: CE(fused) + sum_m CE(out_m), with out_m the fusion's split logits (concat:
W_m phi_m + b/M, as the code's head split; sum: each branch head). The code backpropagates the three
losses separately (v, a, fused) and, before that, three more times only to log gradient means; one
backward of the summed loss gives the same gradients up to float32 summation order (<= 6.8e-6 relative
per encoder in the conformance run), so one pass runs by default; `backward: per-loss` runs the code's
three passes and is bitwise.

M modalities (the code has two): the leader m (strictly highest score) gets
beta_m = c_m exp(tanh(score_m - max_{j != m} score_j)), every other modality 0 -- for M = 2 this is
exactly the code's if/elif/else. `beta` gives c per modality in dataset order (a shorter list is
padded with its last value; the resolved list is recorded). The window is read from the first
modality's encoder (the code's audio), or from `window_modality`.

Deviations from the code (each recorded or harmless): the code's Fisher accumulation over *every*
Conv/Linear module of the model crashes on its first step (`None * None` for the unused heads
`head_audio`, `head_video`, `head2`, `fc_x`, `fc_y`, `fusion_module`); only the encoder's layers
matter for the window, and only those are accumulated here. A zero trace (k = 0/0, a
ZeroDivisionError in the code) closes the window.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from mmbench.errors import UserError
from mmbench.methods.base import EpochContext, Field, HParams, Method, ModelSpec, StepContext, register_method


class InfoRegHParams(HParams):
    beta: list[float] = Field(
        [0.95, 0.1],
        description="proximal strength c_m per modality in dataset order (code: audio 0.95, visual 0.1); "
                    "a shorter list is padded with its last value",
        json_schema_extra={"search": [[0.95, 0.1], [0.5, 0.5], [2.0, 0.2]]})
    window_threshold: float = Field(0.05, description="window open while the trace growth k exceeds this",
                                    json_schema_extra={"search": [0.0, 0.05, 0.1]})
    window_history: int = Field(10, ge=1, description="epochs averaged on each side of the trace growth k (code: 10)",
                                json_schema_extra={"search": [5, 10]})
    window_modality: str = Field("", description="encoder whose Fisher trace opens the window; empty = first modality (code: audio)")
    backward: Literal["summed", "per-loss"] = Field(
        "summed", description="summed: one backward of the total loss; per-loss: the code's order (each unimodal loss "
                              "from the last modality to the first, then the fused one), bitwise the code's gradients")

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("beta needs at least one value")
        if any(not math.isfinite(b) or b < 0 for b in v):
            raise ValueError(f"beta values must be finite and >= 0, got {v}")
        return v


def proximal_betas(scores: dict[str, torch.Tensor], c: dict[str, float]) -> dict[str, torch.Tensor]:
    """beta per modality: c_m exp(tanh(score_m - runner-up)) for the strict leader, 0 for the rest
    (and for everyone on a tie). Float32 tensor arithmetic, as the code."""
    mods = list(scores)
    out = {m: torch.zeros((), dtype=torch.float32, device=scores[m].device) for m in mods}
    for m in mods:
        rival = torch.stack([scores[j] for j in mods if j != m]).max()
        if bool(scores[m] > rival):
            out[m] = c[m] * torch.exp(torch.tanh(scores[m] - rival))
    return out


def window_growth(traces: list[float], history: int) -> float:
    """k = (mean of the last `history` traces - mean of the `history` before the last, shifted by
    one) / mean of the last `history`; the list starts with `history` zeros, as the code's. A zero
    denominator gives 0 (window closed)."""
    new = sum(traces[-history:]) / history
    old = sum(traces[-history - 1:-1]) / history
    return (new - old) / new if new != 0 else 0.0


@register_method
class InfoReg(Method):
    """Pull the leading modality's encoder back to its epoch-start weights during the prime learning window."""

    name = "inforeg"
    description = "InfoReg: proximal pull of the leading encoder to its epoch-start weights while the Fisher trace grows"
    HParams = InfoRegHParams
    fusions = {"concat", "sum"}
    fusion_reason = "its unimodal losses need per-modality logits from the head (concat weight split or sum branch heads)"
    n_modalities = (2, None)
    modality_reason = "it slows the leading modality relative to the others"

    def __init__(self, spec: ModelSpec, hp: HParams, train: Any) -> None:
        super().__init__(spec, hp, train)
        h: InfoRegHParams = self.hp  # type: ignore[assignment]
        mods = spec.modalities
        self.c = {m: float(h.beta[min(i, len(h.beta) - 1)]) for i, m in enumerate(mods)}
        self.window_mod = h.window_modality or mods[0]
        self.traces: list[float] = [0.0] * h.window_history  # the code's ten leading zeros
        self.k = 1.0
        self.anchor: list[torch.Tensor] = []  # theta^{epoch start} per encoder parameter (not checkpointed: retaken each epoch)
        self.fisher: dict[str, torch.Tensor] = {}

    @classmethod
    def check(cls, spec: ModelSpec, hp: HParams) -> None:
        super().check(spec, hp)
        h: InfoRegHParams = hp  # type: ignore[assignment]
        if h.window_modality and h.window_modality not in spec.modalities:
            raise UserError(f"inforeg window_modality '{h.window_modality}' is not a modality of the dataset; "
                            f"choose one of {', '.join(spec.modalities)} or leave it empty")
        if len(h.beta) > len(spec.modalities):
            raise UserError(f"inforeg beta has {len(h.beta)} values for {len(spec.modalities)} modalities "
                            f"({', '.join(spec.modalities)}); give at most one per modality")

    def fisher_layers(self) -> dict[str, nn.Module]:
        """The conv and linear layers of the window's encoder (the code's `fim_audio`)."""
        enc = self.model.encoders[self.window_mod]
        return {n: m for n, m in enc.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad}

    def window_open(self) -> bool:
        return self.k > self.hp.window_threshold  # type: ignore[attr-defined]

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        h: InfoRegHParams = self.hp  # type: ignore[assignment]
        self.k = 1.0 if ctx.epoch == 0 else window_growth(self.traces, h.window_history)
        self.anchor = [p.detach().clone() for m in self.modalities for p in self.model.encoders[m].parameters()]
        self.fisher = {n: torch.zeros_like(l.weight) for n, l in self.fisher_layers().items()}
        return {"window_k": self.k, "window_open": float(self.window_open())}

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        trace = sum(f.mean().item() for f in self.fisher.values())  # Python float sum in layer order, as the code
        self.traces.append(trace)
        return {"fisher_trace": trace}

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        mods = self.modalities
        if not self.anchor:  # a step outside the trainer's epoch hooks (benchmarks): start an epoch here
            self.on_epoch_start(EpochContext(ctx.epoch, ctx.num_epochs, ctx.steps_per_epoch, self.device))
        self.zero_grad()
        with self.autocast():
            out = self.model(inputs)
            per_mod = self.model.fusion.split_logits(out.features)
            loss_mm = F.cross_entropy(out.logits, labels)
            loss_u = {m: F.cross_entropy(per_mod[m], labels) for m in mods}
            loss = loss_mm + sum(loss_u.values())
        if self.hp.backward == "summed":  # type: ignore[attr-defined]
            self.backward(loss)
        else:
            for part in [*(loss_u[m] for m in reversed(mods)), loss_mm]:
                self.backward(part, retain_graph=part is not loss_mm)
        self.unscale()
        with torch.no_grad():
            scores = {m: torch.softmax(per_mod[m].float(), dim=1).gather(1, labels[:, None]).sum() for m in mods}
            betas = proximal_betas(scores, self.c)
            if not self.window_open():
                betas = {m: torch.zeros_like(b) for m, b in betas.items()}
            i = 0
            for m in mods:
                params = list(self.model.encoders[m].parameters())
                if float(betas[m]) != 0:
                    for p, p0 in zip(params, self.anchor[i:i + len(params)]):
                        if p.grad is not None:
                            p.grad.add_(betas[m] * (p - p0))
                i += len(params)
            for n, layer in self.fisher_layers().items():
                g = layer.weight.grad
                if g is not None:
                    self.fisher[n] += g * g
        self.optimizer_step()
        logs: dict[str, Any] = {"loss": loss.detach(), "loss_mm": loss_mm.detach()}
        for m in mods:
            logs[f"loss_{m}"] = loss_u[m].detach()
            logs[f"score_{m}"] = scores[m]
            logs[f"beta_{m}"] = betas[m]
        return logs

    def extra_state(self) -> dict[str, Any]:
        return {"traces": list(self.traces), "k": self.k}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.traces = [float(t) for t in state["traces"]]
        self.k = float(state["k"])

    def describe_run(self) -> dict[str, Any]:
        return {**super().describe_run(), "inforeg_beta": [self.c[m] for m in self.modalities],
                "inforeg_window_modality": self.window_mod,
                "backward_passes": 1 if self.hp.backward == "summed" else 1 + len(self.modalities)}  # type: ignore[attr-defined]
