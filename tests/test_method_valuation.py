"""Modality valuation (docs/methods/valuation.md): contributions, re-sampling plans, the zeroed copies, the trainer's plan."""
from __future__ import annotations

import copy
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import method_util
from conftest import run_cli, write_recipe
from pydantic import ValidationError

from mmbench.data.resample import PlannedSplit
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainPlan
from mmbench.methods.valuation import contributions, copies, modality_plan, sample_plan

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(**hp: object):
    return method_util.make("valuation", "concat", SHAPES, epochs=4,
                            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, **hp)


def test_contributions_by_hand():
    t, f = torch.tensor([True]), torch.tensor([False])
    # fused right, audio alone right, visual alone wrong: audio earns (1 + 2 - 0)/2
    ca, cv = contributions(t, t, f)
    assert (float(ca), float(cv)) == (1.5, 0.5)
    ca, cv = contributions(f, f, t)  # fused wrong, only visual alone right
    assert (float(ca), float(cv)) == (-0.5, 0.5)
    ca, cv = contributions(t, f, f)
    assert (float(ca), float(cv)) == (1.0, 1.0)


def test_copy_thresholds():
    assert [copies(c) for c in (1.5, 1.0, 0.5, 0.0, -0.5)] == [0, 0, 1, 2, 3]


def test_sample_plan_order_and_tags():
    plan = sample_plan([0.5, 1.5], [0.0, -0.5])
    # items once; item 0: 1 audio copy (visual zeroed, tag 2) then 2 visual copies (tag 1); item 1: 3 visual copies
    assert plan.indices == [0, 1, 0, 0, 0, 1, 1, 1]
    assert plan.tags == [0, 0, 2, 1, 1, 1, 1, 1]


def test_modality_plan_draws_like_the_code():
    c_a = [0.5] * 10
    c_v = [1.5] * 10
    np.random.seed(3)
    plan, logs = modality_plan(c_a, c_v, part_ratio=0.2, alpha=1.0)
    np.random.seed(3)
    np.random.choice(10, 2)
    chosen = np.random.choice(10, int(abs(0.5 - (-0.5)) / 3 * 2 * 10))  # gaps 0.5 and -0.5
    assert plan.indices[10:] == chosen.tolist()
    assert set(plan.tags[10:]) == {2}  # audio has the larger gap: its copies zero the visual features
    assert logs["extra_copies"] == len(chosen) == 6


def test_update_zeroes_the_tagged_modality():
    m = make()
    ref = copy.deepcopy(m.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    inputs = {k: torch.randn(6, *s, generator=g) for k, s in SHAPES.items()}
    y = torch.randint(0, 4, (6,), generator=g)
    tags = torch.tensor([0, 1, 2, 0, 2, 1])
    logs = m.update(inputs, y, StepContext(0, 0, 1, 4, tags))
    feats = ref.encode(inputs)
    feats["audio"] = feats["audio"] * (tags != 1).float()[:, None]
    feats["visual"] = feats["visual"] * (tags != 2).float()[:, None]
    F.cross_entropy(ref.fusion(feats), y).backward()
    opt.step()
    for (n, a), (_, b) in zip(m.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, msg=n)
    assert float(logs["zeroed_audio"]) == pytest.approx(2 / 6)


def test_planned_split_repeats_and_tags():
    class Base:
        def __len__(self):
            return 3

        def __getitems__(self, idx):
            return {"x": np.asarray(idx) * 10, "label": np.asarray(idx), "index": np.asarray(idx)}

        def __getitem__(self, i):
            return {"x": i * 10, "label": i, "index": i}

    ps = PlannedSplit(Base(), TrainPlan([0, 2, 2], [0, 1, 2]))
    out = ps.__getitems__([2, 0])
    assert out["index"].tolist() == [2, 0] and out["tag"].tolist() == [2, 0]
    assert ps[1]["tag"] == 1 and len(ps) == 3
    with pytest.raises(ValueError, match="outside"):
        PlannedSplit(Base(), TrainPlan([5], [0]))


def test_refuses_three_modalities_and_bad_parameters():
    cls = METHODS.get("valuation")
    with pytest.raises(UserError, match="two modalities"):
        cls.check(ModelSpec("tiny", "concat", {**SHAPES, "depth": [1, 8, 8]}, 4), cls.HParams())
    with pytest.raises(ValidationError):
        cls.HParams(level="batch")
    with pytest.raises(ValidationError):
        cls.HParams(part_ratio=0)


def test_cli_bad_parameter_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: valuation, warmup: 0}]")
    assert run_cli(monkeypatch, "sweep", str(recipe), "--dry-run", "--db", f"sqlite:///{tmp_path / 'r.db'}") == 2


@pytest.mark.parametrize("level", ["sample", "modality"])
def test_end_to_end_trains_on_the_plan_and_resumes_it(tmp_path, monkeypatch, level):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", epochs=3, methods=f"[{{name: valuation, warmup: 1, level: {level}}}]")
    db = tmp_path / "results.db"
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu") == 0
    con = sqlite3.connect(db)
    rows = con.execute("select epoch, name, value from epoch_metric where name in "
                       "('method/train_set_size', 'method/zeroed_audio', 'method/zeroed_visual') order by epoch").fetchall()
    n_train = con.execute("select n_train from run").fetchone()[0]
    con.close()
    sizes = [v for _, n, v in rows if n == "method/train_set_size"]
    assert len(sizes) == 3 and all(s >= n_train for s in sizes)  # valued after epochs 0, 1 and 2
    zeroed = [(e, v) for e, n, v in rows if n.startswith("method/zeroed")]
    assert {e for e, _ in zeroed} == {1, 2}  # epochs after the first train on the plan
    ck = torch.load(next((tmp_path / "runs").rglob("checkpoint.pt")), weights_only=False)  # our own file
    assert ck["extra"]["plan"] is not None and len(ck["extra"]["plan"]["indices"]) == int(sizes[-1])
