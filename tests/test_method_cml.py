"""CML (BalanceBenchmark's form): the reduced models' logits and the batch-sum-clipped confidence
penalty on hand-made logits, the step against a hand-written loss, M = 3, per-epoch removal orders,
refusals and one run end to end."""
from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_recipe
from method_helpers import THREE, batch, ctx, make, params
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec
from mmbench.methods.cml import cml_loss


def test_two_modalities_by_hand():
    # concat-style split: fused = a + v + b; removing audio leaves v + b
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.0, 1.0], [0.5, 0.0]])
    b = torch.tensor([0.2, -0.2])
    fused = a + v + b
    y = torch.tensor([0, 1])
    split = {"audio": a + b / 2, "visual": v + b / 2}
    loss, ce, pen = cml_loss(fused, split, b, ["audio", "visual"], y, lam=0.5)
    reduced = v + b
    want_ce = (F.cross_entropy(fused, y) + F.cross_entropy(reduced, y)) / 2
    conf = lambda z: torch.softmax(z, 1).max(1).values  # noqa: E731
    want_pen = torch.relu((conf(reduced) - conf(fused)).sum())
    assert torch.allclose(ce, want_ce) and torch.allclose(pen, want_pen)
    assert torch.allclose(loss, want_ce + 0.5 * want_pen)


def test_penalty_clips_the_batch_sum_not_each_sample():
    # sample 0: confidence rises by +0.3 without audio; sample 1: falls by more -> the sum is < 0: no penalty
    fused = torch.log(torch.tensor([[0.5, 0.5], [0.95, 0.05]]))
    reduced = torch.log(torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
    split = {"audio": fused - reduced, "visual": reduced}
    _, _, pen = cml_loss(fused, split, None, ["audio", "visual"], torch.tensor([0, 0]), lam=1.0)
    assert pen.item() == 0.0
    reduced2 = torch.log(torch.tensor([[0.8, 0.2], [0.95, 0.05]]))
    _, _, pen2 = cml_loss(fused, {"audio": fused - reduced2, "visual": reduced2}, None, ["audio", "visual"],
                          torch.tensor([0, 0]), lam=1.0)
    assert abs(pen2.item() - 0.3) < 1e-5


def test_three_modalities_remove_in_order_and_average_over_m():
    g = torch.Generator().manual_seed(0)
    parts = {m: torch.randn(4, 3, generator=g) for m in ("audio", "visual", "depth")}
    b = torch.randn(3, generator=g)
    fused = parts["audio"] + parts["visual"] + parts["depth"] + b
    split = {m: p + b / 3 for m, p in parts.items()}
    y = torch.tensor([0, 1, 2, 0])
    _, ce, _ = cml_loss(fused, split, b, ["visual", "audio", "depth"], y, lam=0.0)
    z1 = parts["audio"] + parts["depth"] + b
    z2 = parts["depth"] + b
    want = (F.cross_entropy(fused, y) + F.cross_entropy(z1, y) + F.cross_entropy(z2, y)) / 3
    assert torch.allclose(ce, want, atol=1e-6)


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_step_is_sgd_on_the_hand_written_loss(fusion):
    m = make("cml", fusion=fusion, lam=2.0)
    m.order = ["visual", "audio"]
    ref = copy.deepcopy(m.model)
    x, y = batch()
    before = params(m)
    logs = m.update(x, y, ctx())
    out = ref(x)
    if fusion == "concat":
        w, b = ref.fusion.fc.weight, ref.fusion.fc.bias
        reduced = out.features["audio"] @ w[:, :ref.fusion.dims["audio"]].t() + b
    else:
        reduced = ref.fusion.heads["audio"](out.features["audio"])
    conf = lambda z: torch.softmax(z, 1).max(1).values  # noqa: E731
    loss = (F.cross_entropy(out.logits, y) + F.cross_entropy(reduced, y)) / 2 + 2.0 * torch.relu((conf(reduced) - conf(out.logits)).sum())
    loss.backward()
    assert torch.allclose(logs["loss"], loss, atol=1e-5)
    after = params(m)
    for k, p in ref.named_parameters():
        assert torch.allclose(after[k], before[k] - p.grad, atol=1e-5, rtol=1e-4), k


def test_removal_order_is_drawn_per_epoch_and_reproducible():
    m = make("cml", shapes=THREE)
    orders = [tuple(m.removal_order(e)) for e in range(12)]
    assert all(sorted(o) == sorted(THREE) for o in orders)
    assert len(set(orders)) > 1
    m2 = make("cml", shapes=THREE)
    m2.load_extra_state(m.extra_state())
    assert [tuple(m2.removal_order(e)) for e in range(12)] == orders
    x, y = batch(THREE)
    assert torch.isfinite(m.update(x, y, ctx())["loss"])


def test_outside_the_window_is_joint():
    m = make("cml", modulation_starts=2, modulation_ends=5)
    ref = copy.deepcopy(m.model)
    x, y = batch()
    logs = m.update(x, y, ctx(epoch=0))
    assert torch.allclose(logs["loss"], F.cross_entropy(ref(x).logits, y), atol=1e-6)
    assert "calibration" not in logs


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_non_additive_fusions_refused(fusion):
    cls = METHODS.get("cml")
    with pytest.raises(UserError, match="additive"):
        cls.check(ModelSpec("tiny", fusion, {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}, 4), cls.HParams())


@pytest.mark.parametrize("entry,needle", [
    ("[{name: cml, lam: -1}]", "lam"),
    ("[{name: cml, modulation_starts: 4, modulation_ends: 1}]", "modulation_ends"),
])
def test_cli_bad_parameters_exit_2(mm_env: Path, cli, entry, needle):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=entry))
    assert code == 2, out
    assert needle in out
    assert not list(mm_env.rglob("config.json"))


def test_end_to_end(mm_env: Path, cli):
    code, out = cli("train", write_recipe(mm_env / "r.yaml", methods="[{name: cml, lam: 0.1}]"),
                    "--set", "train.eval_train=false")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as con:
        (status,), = con.execute("select status from run where method='cml'").fetchall()
        names = {n for (n,) in con.execute("select distinct name from epoch_metric")}
    assert status == "completed"
    assert {"method/ce", "method/calibration", "acc/audio", "acc/visual"} <= names
