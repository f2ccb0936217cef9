"""`arl`: Asymmetric Representation Learning (Wei, Luo & Luo, "Improving Multimodal Learning via Imbalanced
Learning", ICCV 2025, arXiv 2507.10203).

Source: shicaiwei123/ICCV2025-ARL @ 358af4f6782781ac3821527beae3321e77f9d31e (`main_arl_variance.py`
`train_epoch`, `models/backbone.py` `GradScale` / `ResNet_weight`, `models/fusion_modules.py` `*_AUXI`,
`cramed_arl.sh`); docs/methods/arl.md.

Why it helps: the paper argues that the best multimodal model depends on each modality in inverse proportion
to that modality's prediction variance, not equally. Each encoder gets an auxiliary classifier that SHARES the
fusion head's parameters (concat: the head with every other modality's feature zeroed; sum / shared: the
modality's own branch of the head), so there are no extra parameters. From those unimodal logits z_m:
- variance: H_m, the batch-mean entropy of softmax(z_m); normalised H_m / sum_k H_k, floored at 0.3;
  dependence a_m = (1 / H_m) / sum_k (1 / H_k) (inverse-variance);
- bias: B_m = sum over classes of the batch-mean |z_m|, normalised B_m / sum_k B_k;
- coefficient: w = softmax(T * s), s_m = (sum_{k != m} B_k) * a_m (two modalities: audio B_visual a_audio,
  visual B_audio a_visual, the code's cross product);
- each encoder's gradient is scaled by (1 + w_m) (the code's `GradScale` after the encoder), and the
  unimodal losses (the bias term) join the multimodal loss: CE(fused) + gamma * sum_m CE(z_m).
Before that, for epochs 0..`start` (0-based, inclusive), the loss is CE(fused) + sum_m CE(z_m) with no
scaling. Gradients are clipped to norm 40 before the SGD step.

What the released code does (`weights: code`): it computes w every step and prints it, but never assigns
it; the encoders read `args.audio_weight` / `args.visual_weight`, which the warm-up branch sets to 0.5 and
nothing changes later, so after warm-up both encoders get 1.5x their gradient whatever the variances are.
(As released, `GradScale.backward` multiplies by `ctx.saved_tensors`, a tuple, which raises a TypeError at
the first step after warm-up in every torch version; `code` is the released behaviour with that unpacking
fixed: weight 0.5.) `weights: paper` (default) assigns the computed w the way the code's plumbing implies:
the encoders read the coefficients when the forward runs, so a step uses the coefficients computed at the
previous step (0.5 at the first step after warm-up). The run records which ran.

The coefficient arithmetic repeats the code's dtypes (float32 statistics, the entropy sum in float64, the
floor in float32) so mmbench's w equals the code's bit for bit. The gradient is scaled where the code
scales it, on the CNN trunk's last map before pooling, and the gradient norm is clipped over the head's
parameters first, then the encoders' (the code's parameter order), so the step is the code's bit for
bit (conformance/arl.py). The code also requires a non-zero unimodal validation accuracy from the
previous epoch before it switches to gamma (`(acc_v + acc_a) != 0`); mmbench does not read validation
inside a step and drops that guard.

Per-modality accuracy (metrics) uses the fusion's own estimator (concat: mean-feature); the method's
internal unimodal logits are the code's zero-others / branch-head ones described above.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmbench.methods.base import Field, HParams, Method, StepContext, register_method
from mmbench.models.fusion import ConcatFusion, Fusion

CODE_WEIGHT = 0.5  # what the released warm-up branch sets and nothing changes afterwards


class ARLHParams(HParams):
    weights: Literal["paper", "code"] = Field(
        "paper", description="paper = apply the variance/bias coefficients to the encoders' gradients; "
                             "code = the released code, which computes them but scales every encoder by 1.5",
        json_schema_extra={"search": ["paper", "code"]})
    gamma: float = Field(4.0, ge=0, description="weight of the unimodal (bias) losses after warm-up (cramed_arl.sh --gamma 4.0)",
                         json_schema_extra={"search": [1.0, 2.0, 4.0]})
    temperature: float = Field(8.0, gt=0, description="T of the coefficient softmax (--T 8.0)",
                               json_schema_extra={"search": [1.0, 4.0, 8.0]})
    start: int = Field(5, ge=0, description="last warm-up epoch (0-based); ARL acts from epoch start+1 (--start 5)",
                       json_schema_extra={"search": [0, 5, 10]})
    entropy_floor: float = Field(0.3, ge=0, lt=1, description="floor of each modality's normalised entropy (the code's clamp 0.3)")
    clip_norm: float | None = Field(40.0, gt=0, description="clip the gradient norm to this before the step (the code's 40); null = no clipping")


class GradScale(torch.autograd.Function):
    """Identity forward; backward g + g * w (the code's GradScale, with its tuple unpacking fixed)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (w,) = ctx.saved_tensors
        return g + g * w, None


def auxiliary_logits(fusion: Fusion, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The code's parameter-sharing regularizers: concat head with every other feature zeroed; otherwise
    the modality's branch of the head (sum: its own linear head, shared: the shared head)."""
    if isinstance(fusion, ConcatFusion):
        return {m: fusion({k: v if k == m else torch.zeros_like(v) for k, v in feats.items()}) for m in feats}
    split = fusion.split_logits(feats)
    assert split is not None
    return split


def variance_and_bias(logits: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, Any]]:
    """H_m (batch-mean entropy, a Python float as the code's `.item()`) and B_m (sum over classes of the
    batch-mean |z_m|, a float32 numpy scalar as the code's `.numpy()`). One transfer to the host per step."""
    stats = []
    for z in logits.values():
        z = z.detach().float()
        p = torch.softmax(z, dim=1)
        stats += [torch.mean(torch.abs(z), 0).sum(), torch.sum(-p * torch.log(p + 1e-16), dim=1).mean()]
    host = torch.stack(stats).cpu().numpy()
    bias = {m: host[2 * i] for i, m in enumerate(logits)}
    ent = {m: host[2 * i + 1].item() for i, m in enumerate(logits)}
    return ent, bias


def coefficients(ent: dict[str, float], bias: dict[str, Any], temperature: float, floor: float
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """(w, a): the coefficients softmax(T * s) and the inverse-variance dependences a, in the code's order
    of operations and dtypes (two modalities give exactly `main_arl_variance.py`'s `weight`)."""
    h_total = sum(ent.values())
    h = {m: torch.clamp(torch.tensor(e / h_total), floor).cpu().numpy() for m, e in ent.items()}
    inv = {m: 1 / x for m, x in h.items()}
    inv_total = sum(inv.values())
    a = {m: x / inv_total for m, x in inv.items()}
    b_total = sum(bias.values())
    b = {m: x / b_total for m, x in bias.items()}
    s = [sum(b[k] for k in b if k != m) * a[m] * temperature for m in ent]
    w = F.softmax(torch.tensor(np.array(s)), dim=0)
    return {m: float(w[i]) for i, m in enumerate(ent)}, {m: float(a[m]) for m in ent}


@register_method
class ARL(Method):
    """Re-weight each encoder's gradient by its inverse prediction variance; unimodal losses via the shared head."""

    name = "arl"
    description = ("ARL (ICCV 2025): encoder gradients scaled by coefficients from unimodal prediction variance "
                   "and bias, unimodal losses through the shared head")
    HParams = ARLHParams
    n_modalities = (2, None)
    fusions = {"concat", "sum", "shared"}
    fusion_reason = ("ARL's auxiliary classifiers share the fusion head's parameters; mmbench re-expresses them "
                     "for concat (other features zeroed), sum and shared (the modality's branch); the code's "
                     "FiLM / gated variants are two-modality constructs not re-expressed here")

    def __init__(self, spec: Any, hp: HParams, train: Any) -> None:
        super().__init__(spec, hp, train)
        # what the encoders read at the next forward (the code's args.audio_weight / visual_weight)
        self.scale: dict[str, float] = {m: CODE_WEIGHT for m in self.modalities}

    @property
    def ahp(self) -> ARLHParams:
        return self.hp  # type: ignore[return-value]

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        hp = self.ahp
        active = ctx.epoch > hp.start
        self.zero_grad()
        with self.autocast(), self.scaled_encoders(active):
            feats = self.model.encode(inputs)
            fused = self.model.fusion(feats)
            aux = auxiliary_logits(self.model.fusion, feats)
            loss_f = F.cross_entropy(fused, labels)
            uni = {m: F.cross_entropy(aux[m], labels) for m in self.modalities}
            uni_sum = sum(uni.values())
            loss = loss_f + uni_sum * (hp.gamma if active else 1)
        ent, bias = variance_and_bias(aux)
        w, a = coefficients(ent, bias, hp.temperature, hp.entropy_floor)
        applied = dict(self.scale) if active else {m: 0.0 for m in self.modalities}
        if not active:
            self.scale = {m: CODE_WEIGHT for m in self.modalities}
        elif hp.weights == "paper":
            self.scale = w
        self.backward(loss)
        if hp.clip_norm is not None:
            self.unscale()
            nn.utils.clip_grad_norm_(self.clip_order(), max_norm=hp.clip_norm, norm_type=2)
        self.optimizer_step()
        logs: dict[str, Any] = {"loss": loss.detach(), "loss_fused": loss_f.detach()}
        for m in self.modalities:
            logs.update({f"loss_{m}": uni[m].detach(), f"coef_{m}": w[m], f"scale_{m}": applied[m],
                         f"dependence_{m}": a[m], f"entropy_{m}": ent[m], f"bias_{m}": float(bias[m])})
        return logs

    @contextlib.contextmanager
    def scaled_encoders(self, active: bool) -> Iterator[None]:
        """While active, every encoder's output passes through GradScale where the code puts it: on the
        CNN trunk's last map, before pooling (a feature encoder, which has no trunk, on its pooled output).
        Scaling after the pool instead is the same in exact arithmetic but rounds differently when the
        pooled size is not a power of two, and those last bits grow over steps."""
        handles = []
        if active:
            for m in self.modalities:
                enc = self.model.encoders[m]
                w = torch.tensor(self.scale[m], dtype=torch.float32)
                target = getattr(enc, "trunk", enc)
                handles.append(target.register_forward_hook(lambda mod, inp, out, w=w: GradScale.apply(out, w)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def clip_order(self) -> list[nn.Parameter]:
        """The code's model lists the fusion head before the encoders; the total norm sums the squares
        in that order, so the same order gives the same clipping factor to the last bit."""
        model = self.model
        return [*model.fusion.parameters(), *(p for m in self.modalities for p in model.encoders[m].parameters())]

    def extra_state(self) -> dict[str, Any]:
        return {"scale": dict(self.scale)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("scale", {})
        self.scale = {m: float(saved.get(m, CODE_WEIGHT)) for m in self.modalities}

    def describe_run(self) -> dict[str, Any]:
        what = ("paper: the computed coefficients scale the encoders' gradients (read at the next step)"
                if self.ahp.weights == "paper" else
                "code: coefficients computed and logged, never applied; every encoder's gradient x1.5 after warm-up")
        return {**super().describe_run(), "weights": what,
                "auxiliary": "zero-others" if isinstance(self.model.fusion, ConcatFusion) else "branch-head"}
