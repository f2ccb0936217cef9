"""Linear probes on frozen pooled features: how well each encoder learned, independent of the
fusion head (a dominated modality's encoder can be better than its branch's logits suggest)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, evals: dict[str, tuple[torch.Tensor, torch.Tensor]],
    c: float = 1.0, max_iter: int = 500,
) -> dict[str, float]:
    """Multinomial logistic regression fitted on train features (standardised), scored on each
    eval split. Deterministic (lbfgs)."""
    scaler = StandardScaler().fit(train_x.numpy())
    clf = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(train_x.numpy()), train_y.numpy())
    out = {}
    for split, (x, y) in evals.items():
        pred = clf.predict(scaler.transform(x.numpy()))
        out[split] = float(np.mean(pred == y.numpy()))
    return out
