"""One evaluation pass over a split: logits, per-modality logits and pooled features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from mmbench.methods.base import Method
from mmbench.metrics.evaluate import split_metrics


@dataclass
class SplitOutputs:
    logits: torch.Tensor
    labels: torch.Tensor
    features: dict[str, torch.Tensor]
    modality_logits: dict[str, torch.Tensor]
    split_logits: dict[str, torch.Tensor] | None


@torch.no_grad()
def collect(method: Method, loader: Iterable[Any], prepare: Callable[..., Any]) -> SplitOutputs:
    """Eval-mode pass; per-modality logits use the fusion's estimator with means over this split
    (DESIGN.md §4.3), unless the method predicts them itself."""
    was_training = method.training
    method.eval()
    logits, labels, feats, own = [], [], {}, {}  # type: ignore[var-annotated]
    for raw in loader:
        inputs, y = prepare(raw, train=False)
        with method.autocast():
            out = method.predict(inputs)
        logits.append(out.logits.float().cpu())
        labels.append(y.cpu())
        for m, f in out.features.items():
            feats.setdefault(m, []).append(f.float().cpu())
        for m, lg in (out.modality_logits or {}).items():
            own.setdefault(m, []).append(lg.float().cpu())
    method.train(was_training)
    L = torch.cat(logits)
    Y = torch.cat(labels)
    F = {m: torch.cat(v) for m, v in feats.items()}
    split = None
    if own:
        mod = {m: torch.cat(v) for m, v in own.items()}
    else:
        fusion = method.estimator_fusion
        if fusion is not None and len(F) > 1:
            dev = next(fusion.parameters()).device
            fd = {m: v.to(dev) for m, v in F.items()}
            means = {m: v.mean(0, keepdim=True) for m, v in fd.items()}
            mod = {m: v.float().cpu() for m, v in fusion.modality_logits(fd, means).items()}
            sl = fusion.split_logits(fd)
            split = {m: v.float().cpu() for m, v in sl.items()} if sl is not None else None
        else:
            mod = {m: L for m in F}  # a single modality: its logits are the model's
    return SplitOutputs(L, Y, F, mod, split)


def metrics_of(out: SplitOutputs, num_classes: int) -> dict[str, float]:
    return split_metrics(out.logits, out.labels, out.modality_logits, num_classes, out.split_logits)
