"""All per-split metrics of one evaluation pass (DESIGN.md §4.6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmbench.metrics.classification import accuracy, macro_f1
from mmbench.metrics.imbalance import imbalance_ratio, true_class_score


def split_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    modality_logits: dict[str, torch.Tensor],
    num_classes: int,
    split_logits: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    out: dict[str, float] = {
        "loss": float(F.cross_entropy(logits.float(), labels)),
        "acc": accuracy(logits, labels),
        "macro_f1": macro_f1(logits.argmax(1), labels, num_classes),
    }
    scores: dict[str, float] = {}
    for m, lg in modality_logits.items():
        out[f"acc/{m}"] = accuracy(lg, labels)
        out[f"macro_f1/{m}"] = macro_f1(lg.argmax(1), labels, num_classes)
        scores[m] = true_class_score(lg, labels)
        out[f"score/{m}"] = scores[m]
    if len(scores) >= 2:
        out["imbalance_ratio"] = imbalance_ratio(scores)
    for m, lg in (split_logits or {}).items():
        out[f"acc_split/{m}"] = accuracy(lg, labels)
    return out
