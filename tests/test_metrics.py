"""Accuracy, macro-F1, scores and the imbalance ratio on hand-made cases."""
from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import f1_score

from mmbench.metrics.classification import accuracy, macro_f1
from mmbench.metrics.evaluate import split_metrics
from mmbench.metrics.imbalance import imbalance_ratio, true_class_score


def onehot_logits(pred: list[int], c: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), c).float() * 5


def test_accuracy_hand_case() -> None:
    y = torch.tensor([0, 1, 2, 2])
    assert accuracy(onehot_logits([0, 1, 1, 2]), y) == 0.75


def test_macro_f1_hand_case() -> None:
    # class 0: tp1 fp0 fn0 -> 1; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp1 fp0 fn1 -> 2/3
    y = torch.tensor([0, 1, 2, 2])
    p = torch.tensor([0, 1, 1, 2])
    assert macro_f1(p, y, 3) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_macro_f1_matches_sklearn_with_absent_classes() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 5, (50,), generator=g)
    p = torch.randint(0, 4, (50,), generator=g)
    assert macro_f1(p, y, 6) == pytest.approx(f1_score(y.numpy(), p.numpy(), average="macro"))


def test_score_and_imbalance_ratio() -> None:
    y = torch.tensor([0, 1])
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p(true) = 0.75 and 0.5
    assert true_class_score(logits, y) == pytest.approx(0.625)
    assert imbalance_ratio({"audio": 0.6, "visual": 0.3}) == pytest.approx(2.0)
    assert imbalance_ratio({"audio": 0.3, "visual": 0.6}) == pytest.approx(2.0)
    assert math.isnan(imbalance_ratio({"audio": 0.5}))


def test_split_metrics_names() -> None:
    y = torch.tensor([0, 1, 2, 2])
    m = split_metrics(onehot_logits([0, 1, 1, 2]), y, {"audio": onehot_logits([0, 0, 0, 0]), "visual": onehot_logits([0, 1, 2, 2])}, 3)
    assert {"loss", "acc", "macro_f1", "acc/audio", "acc/visual", "macro_f1/audio", "score/audio", "score/visual", "imbalance_ratio"} <= set(m)
    assert m["acc/audio"] == 0.25 and m["acc/visual"] == 1.0
    assert m["imbalance_ratio"] == pytest.approx(m["score/visual"] / m["score/audio"])
