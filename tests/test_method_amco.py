"""AMCo (docs/methods/amco.md): the mask schedule, the dependence rule, the step, the estimator."""
from __future__ import annotations

import copy
import math
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import method_util
from conftest import run_cli, write_recipe
from pydantic import ValidationError

from mmbench.errors import UserError
from mmbench.methods.amco import class_mask, dependence, mask_fraction
from mmbench.methods.base import METHODS, EpochContext, ModelSpec, StepContext

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(shapes: dict | None = None, **hp: object):
    return method_util.make("amco", "concat", shapes or SHAPES, epochs=10,
                            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, **hp)


def batch(shapes: dict | None = None, b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return ({k: torch.randn(b, *s, generator=g) for k, s in (shapes or SHAPES).items()},
            torch.randint(0, 4, (b,), generator=g))


def ctx(epoch: int, step: int = 0) -> StepContext:
    return StepContext(epoch=epoch, step=step, steps_per_epoch=4, num_epochs=10)


def test_mask_schedule():
    assert mask_fraction(0.0, 0.3) == 0.0
    assert mask_fraction(0.15, 0.3) == pytest.approx(math.sin(math.pi / 4))
    assert mask_fraction(5.0, 0.3) == pytest.approx(1.0)
    np.random.seed(0)
    m = class_mask(10, 0.5)
    assert m.dtype == torch.float32 and int(m.sum()) == 5
    np.random.seed(0)
    ref = np.pad(np.ones(5), (0, 5))
    np.random.shuffle(ref)
    assert m.tolist() == ref.tolist()  # the trainer's numpy draw, same order


def test_dependence_is_the_share_of_the_joint_softmax():
    a = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    v = torch.zeros(2, 2)
    dep = dependence({"audio": a, "visual": v}, 0.5)
    assert dep == {"audio": True, "visual": False}
    share = torch.softmax(torch.cat([a, v], 1), 1)[:, :2].sum() / 2
    assert float(share) > 0.5
    assert dependence({"audio": v, "visual": v}, 0.5) == {"audio": False, "visual": False}  # a tie is not > sigma


def reference_step(model, inputs, y, mask, dependent, window):
    feats = model.encode(inputs)
    head = model.fusion
    split = head.split_logits(feats)
    split = {k: split[k] * mask if dependent.get(k) else split[k] for k in split}
    z = head.star(sum(split.values()))
    loss = F.cross_entropy(z, y)
    if window:
        loss = loss + sum(F.cross_entropy(u, y) for u in split.values())
    loss.backward()
    return split


def test_step_masks_the_dependent_modality_and_adds_unimodal_losses():
    m = make()
    ref = copy.deepcopy(m.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    inputs, y = batch()
    m.dependent = {"audio": True, "visual": False}
    m.l_t = 1.0  # saturated: every class masked
    np.random.seed(0)
    logs = m.update(inputs, y, ctx(1))
    np.random.seed(0)
    mask = class_mask(4, 1.0)
    assert mask.sum() == 0
    split = reference_step(ref, inputs, y, mask, {"audio": True}, True)
    opt.step()
    for (n, a), (_, b) in zip(m.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert logs["masked_audio"] == 1.0 and logs["masked_visual"] == 0.0
    assert m.dependent == dependence({k: v.detach() for k, v in split.items()}, 0.5)
    assert m.l_t == pytest.approx(1.1)


def test_outside_the_window_only_the_fused_loss_and_no_mask():
    m = make(modulation_starts=2)
    ref = copy.deepcopy(m.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    inputs, y = batch()
    m.dependent = {"audio": True, "visual": True}
    m.l_t = 1.0
    logs = m.update(inputs, y, ctx(1))
    reference_step(ref, inputs, y, torch.zeros(4), {}, False)
    opt.step()
    for (n, a), (_, b) in zip(m.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert "loss_audio" not in logs and m.dependent == {"audio": True, "visual": True}  # flags untouched


def test_epoch_start_resets_flags_and_schedule():
    m = make()
    m.dependent, m.l_t = {"audio": True, "visual": True}, 2.0
    m.on_epoch_start(EpochContext(epoch=3, num_epochs=10, steps_per_epoch=4, device=torch.device("cpu")))
    assert m.dependent == {"audio": False, "visual": False} and m.l_t == 0.0
    assert m.extra_state() == {"dependent": {"audio": False, "visual": False}, "l_t": 0.0}


def test_estimator_runs_through_the_mixing_layer():
    m = make()
    m.eval()
    inputs, _ = batch()
    with torch.no_grad():
        feats = m.model.encode(inputs)
        means = {k: v.mean(0, keepdim=True) for k, v in feats.items()}
        per = m.model.fusion.modality_logits(feats, means)
        split = m.model.fusion.split_logits(feats)
        split_mean = m.model.fusion.split_logits({k: v.expand_as(feats[k]) for k, v in means.items()})
        want = m.model.fusion.star(split["audio"] + split_mean["visual"])
    torch.testing.assert_close(per["audio"], want)


def test_three_modalities():
    three = {**SHAPES, "depth": [1, 8, 8]}
    m = make(three)
    logs = m.update(*batch(three), ctx(1))
    assert {"loss_audio", "loss_visual", "loss_depth"} <= set(logs)


def test_bad_parameters():
    cls = METHODS.get("amco")
    with pytest.raises(ValidationError):
        cls.HParams(sigma=1.5)
    with pytest.raises(ValidationError):
        cls.HParams(modulation_starts=3, modulation_ends=1)
    with pytest.raises(UserError, match="cannot serve fusion"):
        cls.check(ModelSpec("tiny", "sum", dict(SHAPES), 4), cls.HParams())


def test_cli_bad_parameter_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: amco, eps: -1}]")
    assert run_cli(monkeypatch, "sweep", str(recipe), "--dry-run", "--db", f"sqlite:///{tmp_path / 'r.db'}") == 2


def test_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[amco]")
    db = tmp_path / "results.db"
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu") == 0
    con = sqlite3.connect(db)
    status = con.execute("select status from run where method = 'amco'").fetchall()
    names = {r[0] for r in con.execute("select distinct name from epoch_metric")}
    con.close()
    assert status == [("completed",)]
    assert {"acc/audio", "acc/visual", "method/mask_fraction", "method/loss_audio"} <= names
