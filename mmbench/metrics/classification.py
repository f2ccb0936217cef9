"""Accuracy and macro-F1 from logits, written out so tests can check them on hand-made cases."""
from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(1) == labels).float().mean())


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions
    (scikit-learn's `f1_score(average='macro')` with its default labels; 0 where undefined)."""
    present = torch.unique(torch.cat([pred, labels]))
    f1s = []
    for c in present.tolist():
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        denom = 2 * tp + fp + fn
        f1s.append(0.0 if denom == 0 else 2 * tp / denom)
    return float(sum(f1s) / len(f1s)) if f1s else float("nan")
