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


# -------------------------------------------------------------------------------------------
# BatchNorm statistics at evaluation. Papers evaluate with the running statistics, so that is the
# default; but with a high learning rate or few steps per epoch those lag the weights, and on real
# AV-MNIST re-estimating them moved test accuracy by 4-44 points. `bn_gap` shows when that
# dominates a result; `train.precise_bn` evaluates with re-estimated statistics instead.

BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


def bn_modules(method: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in method.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]


def bn_buffers(method: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.named_buffers(recurse=False)} for m in bn_modules(method)]


def restore_bn(method: torch.nn.Module, saved: list[dict[str, torch.Tensor]]) -> None:
    """Put the training's own running statistics back: methods such as AGM train through eval-mode
    forwards, so evaluation must not change what they see."""
    for m, buf in zip(bn_modules(method), saved):
        for k, v in buf.items():
            getattr(m, k).copy_(v)


@torch.no_grad()
def recompute_bn(method: Method, batches: Iterable[Any], prepare: Callable[..., Any], limit: int) -> int:
    """Precise BN: running statistics re-estimated as the plain average over `limit` train batches
    (momentum None) with the current weights; returns the number of batches used."""
    mods = bn_modules(method)
    if not mods or limit <= 0:
        return 0
    momenta = [m.momentum for m in mods]
    was_training = method.training
    method.eval()
    for m in mods:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    n = 0
    try:
        for raw in batches:
            if n >= limit:
                break
            inputs, _ = prepare(raw, train=True)
            with method.autocast():
                method.predict(inputs)
            n += 1
    finally:
        for m, mom in zip(mods, momenta):
            m.momentum = mom
        method.train(was_training)
    return n


@torch.no_grad()
def batch_stat_accuracy(method: Method, loader: Iterable[Any], prepare: Callable[..., Any]) -> float:
    """Accuracy with each eval batch's own BN statistics (train-mode BN, no update kept): the
    accuracy the weights give when the running statistics are not in the way."""
    saved = bn_buffers(method)
    was_training = method.training
    method.eval()
    for m in bn_modules(method):
        m.train()
    right = total = 0
    try:
        for raw in loader:
            inputs, y = prepare(raw, train=False)
            with method.autocast():
                out = method.predict(inputs)
            right += int((out.logits.argmax(1) == y).sum())
            total += int(y.numel())
    finally:
        restore_bn(method, saved)
        method.train(was_training)
    return right / total if total else float("nan")
