"""`relearn`: Diagnosing & Re-learning (Wei, Li, Feng & Hu, ECCV 2024; docs/methods/relearn.md).

Training is plain joint training. Every `reinit_epoch` epochs (at most `reinit_num` times) each
modality's learning state is diagnosed from how well k-means recovers the classes in its pooled
features on the training data versus the validation data; a large purity gap means the encoder
memorises rather than generalises, so it is pulled back toward its own initial weights by
w = tanh(lambda * gap). Only encoder parameters move: heads, BatchNorm running statistics and the
optimizer's momentum are left as they are.

Order within a diagnosis epoch follows the repo: train epoch e, evaluate it, then diagnose and
re-initialise. The trainer evaluates after `on_epoch_end`, so the diagnosis runs there (on the
same weights the evaluation sees) and the re-initialisation is applied at the start of epoch e+1,
before its first step: epoch e's metrics and checkpoint are the pre-re-init model, as in the repo,
and the pending weights are part of the method state, so a resume applies them too.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import nn

from mmbench.errors import UserError
from mmbench.methods.base import EpochContext, Field, HParams, TrainSpec, register_method
from mmbench.methods.joint import Joint


class RelearnHParams(HParams):
    move_lambda: float = Field(3.0, ge=0, description="lambda in w = tanh(lambda * |purity gap|)",
                               json_schema_extra={"search": [1.0, 3.0, 5.0]})
    reinit_epoch: int = Field(20, ge=1, description="diagnose after every epoch e > 0 with e % reinit_epoch == 0 (0-based)",
                              json_schema_extra={"search": [10, 15, 20]})
    reinit_num: int = Field(3, ge=0, description="at most this many diagnosis + re-init events",
                            json_schema_extra={"search": [2, 3]})
    kmeans_n_init: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="k-means restarts; the repo leaves scikit-learn's default (10 before 1.4, 'auto' since)")


def is_diagnosis_epoch(epoch: int, reinit_epoch: int, reinit_num: int) -> bool:
    """The repo's schedule: after 0-based epoch e when e > 0, e % reinit_epoch == 0 and fewer
    than reinit_num events happened before (events occur only at these multiples)."""
    return epoch > 0 and epoch % reinit_epoch == 0 and epoch // reinit_epoch <= reinit_num


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Cluster purity: the fraction of items whose cluster's majority label is their own."""
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    table = np.zeros((c.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (c, y), 1)
    return float(table.max(axis=1).sum() / len(y))


def kmeans_purity(features: np.ndarray, labels: np.ndarray, k: int, n_init: int | str) -> float:
    """Purity of k-means (random_state 0) on features min-max scaled to [-1, 1] per dimension."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import MinMaxScaler

    x = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)
    pred = KMeans(n_clusters=k, random_state=0, n_init=n_init).fit_predict(x)
    return purity(labels, pred)


def reinit_weight(gap: float, move_lambda: float) -> float:
    return float(torch.tanh(torch.tensor(move_lambda * abs(gap), dtype=torch.float64)))


class InitSnapshot(nn.Module):
    """theta^0 of every encoder parameter, kept as buffers so checkpoints carry it and a resumed
    run re-initialises toward the same point."""

    def __init__(self, encoders: nn.ModuleDict) -> None:
        super().__init__()
        for m, enc in encoders.items():
            for name, p in enc.named_parameters():
                self.register_buffer(self.key(m, name), p.detach().clone())

    @staticmethod
    def key(modality: str, name: str) -> str:
        return f"{modality}__{name.replace('.', '__')}"

    def get(self, modality: str, name: str) -> torch.Tensor:
        return getattr(self, self.key(modality, name))


@torch.no_grad()
def soft_reinit(encoder: nn.Module, init: dict[str, torch.Tensor], w: float) -> None:
    """theta <- w * theta0 + (1 - w) * theta for every parameter of the encoder, in place (the
    optimizer keeps its momentum for the same tensors)."""
    wt = torch.tensor(w, dtype=torch.float64)
    for name, p in encoder.named_parameters():
        p.copy_(wt * init[name] + (1 - wt) * p)


@register_method
class Relearn(Joint):
    """Joint training with periodic k-means diagnosis and soft re-init of each encoder toward theta^0."""

    name = "relearn"
    description = "Diagnosing & Re-learning: soft re-init of each encoder by tanh(lambda * train-val purity gap)"
    HParams = RelearnHParams

    @classmethod
    def check_train(cls, train: TrainSpec, hp: HParams) -> None:
        """A schedule that never re-initialises is joint training under another name: refuse it before
        training (a re-init diagnosed after 0-based epoch e applies at the start of e+1, so the first
        one needs e = reinit_epoch <= epochs - 2). reinit_num: 0 asks for none and is allowed."""
        r: RelearnHParams = hp  # type: ignore[assignment]
        if r.reinit_num > 0 and r.reinit_epoch > train.epochs - 2:
            raise UserError(
                f"method 'relearn': reinit_epoch {r.reinit_epoch} never re-initialises in {train.epochs} epochs (the "
                f"first re-init follows epoch {r.reinit_epoch} (0-based) and needs train.epochs >= {r.reinit_epoch + 2}); "
                + (f"set reinit_epoch <= {train.epochs - 2}, " if train.epochs >= 3 else "")
                + "raise train.epochs, or set reinit_num: 0 for none")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.theta0 = InitSnapshot(self.model.encoders)
        self.pending: dict[str, float] = {}  # weights diagnosed at the end of the last epoch, not yet applied

    @torch.no_grad()
    def features(self, loader: Any, prepare: Any, train: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Pooled features of every item of a loader, in eval mode."""
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in self.model.encoders}
        labels = []
        for raw in loader:
            inputs, y = prepare(raw, train)
            with self.autocast():
                out = self.model.encode(inputs)
            for m, f in out.items():
                feats[m].append(f.float().cpu())
            labels.append(y.cpu())
        return {m: torch.cat(v).numpy() for m, v in feats.items()}, torch.cat(labels).numpy()

    def diagnose(self, ctx: EpochContext) -> dict[str, float]:
        """Purities on the (augmented, shuffled) train loader and on val, gaps and weights."""
        hp: RelearnHParams = self.hp  # type: ignore[assignment]
        if "val" not in ctx.loaders:
            raise UserError("relearn diagnoses on the validation split, and this dataset/protocol has none")
        was_training = self.training
        self.eval()
        try:
            tr, ytr = self.features(ctx.loaders["train"], ctx.prepare_batch, True)
            va, yva = self.features(ctx.loaders["val"], ctx.prepare_batch, False)
        finally:
            self.train(was_training)
        logs: dict[str, float] = {}
        k = self.spec.num_classes
        for m in self.model.encoders:
            p_tr = kmeans_purity(tr[m], ytr, k, hp.kmeans_n_init)
            p_va = kmeans_purity(va[m], yva, k, hp.kmeans_n_init)
            gap = abs(p_tr - p_va)
            logs.update({f"purity_train_{m}": p_tr, f"purity_val_{m}": p_va, f"gap_{m}": gap,
                         f"w_{m}": reinit_weight(gap, hp.move_lambda)})
        return logs

    def apply_reinit(self, weights: dict[str, float]) -> None:
        for m, w in weights.items():
            enc = self.model.encoders[m]
            soft_reinit(enc, {n: self.theta0.get(m, n) for n, _ in enc.named_parameters()}, w)

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        if self.pending:
            self.apply_reinit(self.pending)
            self.pending = {}
        return {}

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        hp: RelearnHParams = self.hp  # type: ignore[assignment]
        if not is_diagnosis_epoch(ctx.epoch, hp.reinit_epoch, hp.reinit_num):
            return {}
        logs = self.diagnose(ctx)
        self.pending = {m: logs[f"w_{m}"] for m in self.model.encoders}
        return {**logs, "reinit": 1.0}

    def extra_state(self) -> dict[str, Any]:
        return {"pending": dict(self.pending)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pending = dict(state.get("pending", {}))

    def describe_run(self) -> dict[str, Any]:
        import sklearn

        hp: RelearnHParams = self.hp  # type: ignore[assignment]
        return {**super().describe_run(), "kmeans_n_init": hp.kmeans_n_init, "sklearn": sklearn.__version__,
                "reinit_applied": "start of the epoch after each diagnosis"}
