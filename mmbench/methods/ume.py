"""`ume`: Uni-Modal Ensemble (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning", ICML 2023).

Train each modality's unimodal model on its own (encoder + linear head, cross-entropy; here the
`unimodal` reference runs the planner schedules) and predict with their combined outputs; no
joint training. The paper recommends UME where cross-modal (paired) features matter little, UMT
otherwise. It is `ensemble` with the outputs averaged as logits by default; the authors' code
was not found (only the abstract was read; BalanceBenchmark has no UME), so
whether the paper averages logits or probabilities is not settled from code: `combine` says which
ran and `combine: softmax` gives the other.
"""
from __future__ import annotations

from typing import Literal

from mmbench.methods.base import Field, register_method
from mmbench.methods.ensemble import Ensemble, EnsembleHParams


class UMEHParams(EnsembleHParams):
    combine: Literal["softmax", "logits"] = Field(
        "logits", description="average the unimodal models' logits (default) or their softmaxes",
        json_schema_extra={"search": ["logits", "softmax"]})


@register_method
class UME(Ensemble):
    """Uni-Modal Ensemble: independently trained unimodal models, outputs averaged."""

    name = "ume"
    description = "UME: unimodal models trained alone (the unimodal references), logits averaged"
    HParams = UMEHParams
