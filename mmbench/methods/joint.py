"""`joint`: plain joint training on the fused cross-entropy (the baseline every method is compared to)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmbench.methods.base import HParams, Method, StepContext, register_method


@register_method
class Joint(Method):
    """Plain joint training: one forward, cross-entropy on the fused logits, one backward."""

    name = "joint"
    description = "plain joint training on the fused cross-entropy (the baseline)"
    HParams = HParams

    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        self.zero_grad()
        with self.autocast():
            out = self.model(inputs)
            loss = F.cross_entropy(out.logits, labels)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach()}
