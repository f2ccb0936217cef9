"""Imbalance between modalities, from per-modality logits.

`score/<m>` is the mean true-class softmax probability of a modality's logits; `imbalance_ratio`
is max over modalities of the score divided by the min (>= 1; 1 means balanced).
"""
from __future__ import annotations

import torch


def true_class_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    p = torch.softmax(logits.float(), dim=1)
    return float(p.gather(1, labels[:, None]).mean())


def imbalance_ratio(scores: dict[str, float]) -> float:
    vals = list(scores.values())
    if len(vals) < 2:
        return float("nan")
    lo = min(vals)
    return float("inf") if lo <= 0 else max(vals) / lo
