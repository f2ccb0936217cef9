"""CGGM (docs/methods/cggm.md): the coefficients, l_gm and its one-step-stale gradient, the encoder-gradient
scaling, the whole step against a re-statement of the official one (with its live graph), state, bad input."""
from __future__ import annotations

import copy
import io
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, write_recipe
from pydantic import ValidationError

from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec
from mmbench.methods.cggm import coefficients, guidance_loss, partner_weights

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(fusion: str = "concat", shapes: dict | None = None, optimizer: dict | None = None, **hp: object):
    torch.manual_seed(0)
    cls = METHODS.get("cggm")
    spec = ModelSpec(backbone="tiny", fusion=fusion, input_shapes=dict(shapes or SHAPES), num_classes=4)
    m = cls(spec, cls.HParams(**hp), TrainSpec(epochs=2, optimizer=optimizer or {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                                               scheduler={"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(shapes: dict | None = None, b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return ({k: torch.randn(b, *s, generator=g) for k, s in (shapes or SHAPES).items()},
            torch.randint(0, 4, (b,), generator=g))


def ctx(step: int = 0) -> StepContext:
    return StepContext(epoch=0, step=step, steps_per_epoch=4, num_epochs=2)


def test_coefficients():
    # d = (0.25, 0): the improving modality gets ~0, the other 1
    c = coefficients([0.5, 0.25], [0.25, 0.25])
    assert c == [pytest.approx(1e-8 / (0.25 + 1e-8), rel=1e-12), 1.0]
    assert coefficients([0.5, 0.5], [0.5, 0.5]) == [1.0, 1.0]  # no change: 1e-8 / 1e-8
    # d = (-0.25, 0.375, 0): sum 0.125 -> (3, -2, 1): the code's coefficients can be negative
    assert coefficients([0.0, 0.375, 0.25], [0.25, 0.0, 0.25]) == pytest.approx([3.0, -2.0, 1.0], rel=1e-6)


def test_guidance_loss():
    cos = [torch.tensor(0.2), torch.tensor(-0.4)]
    assert float(guidance_loss([1.0, 0.5], cos)) == pytest.approx((1.5 - (0.2 - 0.2)) / 2)
    assert float(guidance_loss([-2.0, 1.0, 3.0], [torch.tensor(0.5)] * 3)) == pytest.approx((6.0 - 1.0) / 3)


def test_partners_are_the_fusion_weights_on_each_modality():
    m = make("concat")
    w = m.model.fusion.fc.weight
    d = m.model.fusion.dims["audio"]
    p = partner_weights(m.model.fusion)
    assert torch.equal(p["audio"], w[:, :d]) and torch.equal(p["visual"], w[:, d:])
    s = make("sum")
    assert partner_weights(s.model.fusion)["visual"] is s.model.fusion.heads["visual"].weight


def test_the_direction_loss_reaches_the_fusion_weights_one_step_stale():
    m = make("concat", lamda=1.0)
    inputs, y = batch()
    m.update(inputs, y, ctx(0))
    w = m.model.fusion.fc.weight
    old = m.partner_w  # the blocks as they were when step 0's l_gm was formed, before the step moved them
    assert not torch.equal(torch.cat(old, 1), w.detach())
    # the gradient of l_gm at the OLD weight values, computed from scratch
    leaf = torch.cat(old, 1).clone().requires_grad_(True)
    d = m.model.fusion.dims["audio"]
    cos = [F.cosine_similarity(c.reshape(-1), b.reshape(-1), dim=0) for c, b in zip(m.cls_w, [leaf[:, :d], leaf[:, d:]])]
    want_value = guidance_loss(m.coeff, cos)
    want_value.backward()
    got = m.previous_guidance()
    assert float(got.detach()) == pytest.approx(float(want_value.detach()), rel=1e-6)
    w.grad = None
    got.backward()
    torch.testing.assert_close(w.grad, leaf.grad, rtol=1e-6, atol=1e-9)
    assert w.grad.abs().sum() > 0
    # ... and not the gradient at the current weights
    now = w.detach().clone().requires_grad_(True)
    cos_now = [F.cosine_similarity(c.reshape(-1), b.reshape(-1), dim=0) for c, b in zip(m.cls_w, [now[:, :d], now[:, d:]])]
    guidance_loss(m.coeff, cos_now).backward()
    assert not torch.allclose(now.grad, leaf.grad, rtol=1e-4, atol=0)


def test_encoder_gradients_are_scaled_by_coeff_times_rou():
    m = make("concat", rou=2.0, clip=0.0)
    m.acc_prev = [0.0, 0.0]
    ref = copy.deepcopy(m.model)
    inputs, y = batch()
    F.cross_entropy(ref(inputs).logits, y).backward()  # step 0: no l_gm yet
    seen = {}
    m.optimizer.register_step_pre_hook(lambda o, *a: seen.update({id(p): p.grad.clone() for p in m.model.parameters()}))
    logs = m.update(inputs, y, ctx(0))
    for (name, p), (_, q) in zip(m.model.named_parameters(), ref.named_parameters()):
        mod = name.split(".")[1] if name.startswith("encoders.") else None
        scale = logs[f"coeff_{mod}"] * 2.0 if mod else 1.0
        torch.testing.assert_close(seen[id(p)], q.grad * scale, rtol=1e-5, atol=1e-7, msg=name)
    assert any(logs[f"coeff_{k}"] != 1.0 for k in SHAPES)  # the batch does move some accuracy


class OfficialStep:
    """The official `train` body (src/foodtrain.py) on mmbench's model, with its live l_gm graph."""

    def __init__(self, model, classifiers, hp, lr):
        self.model, self.cls = model, classifiers
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.cls_opt = torch.optim.SGD(classifiers.parameters(), lr=hp.cls_lr, momentum=0.9, weight_decay=hp.cls_weight_decay)
        self.hp, self.acc1, self.l_gm = hp, [0] * len(classifiers), None

    def step(self, inputs, y):
        mods = list(self.cls)
        self.model.zero_grad()
        out = self.model(inputs)
        raw_loss = F.cross_entropy(out.logits, y)
        if self.l_gm is not None:
            raw_loss += self.hp.lamda * self.l_gm
        raw_loss.backward()
        self.cls_opt.zero_grad()
        res = [self.cls[m](out.features[m].clone().detach()) for m in mods]
        sum(F.cross_entropy(r, y) for r in res).backward()
        fus = self.model.fusion
        blocks = [fus.fc.weight[:, sl] for sl in fus.weight_slices().values()]
        llist = [F.cosine_similarity(self.cls[m].out_layer.weight.clone().view(-1), b.clone().reshape(-1), dim=0)
                 for m, b in zip(mods, blocks)]
        acc2 = [float(np.mean((r.detach().argmax(1) == y).numpy())) for r in res]
        diff = [a - b for a, b in zip(acc2, self.acc1)]
        s = sum(diff) + 1e-8
        coeff = [(s - d) / s for d in diff]
        self.acc1 = acc2
        l_gm = np.sum(np.abs(coeff)) - sum(c * x for c, x in zip(coeff, llist))
        self.l_gm = l_gm / len(mods)
        for i, m in enumerate(mods):
            for p in self.model.encoders[m].parameters():
                p.grad *= coeff[i] * self.hp.rou
        self.cls_opt.step()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.clip)
        self.opt.step()


@pytest.mark.parametrize("shapes", [SHAPES, {**SHAPES, "text": [6]}])
def test_steps_follow_the_official_order(shapes):
    m = make("concat", shapes)
    ref = OfficialStep(copy.deepcopy(m.model), copy.deepcopy(m.classifiers), m.chp, 0.05)
    for t in range(4):
        inputs, y = batch(shapes, seed=t)
        m.update(inputs, y, ctx(t))
        ref.step(inputs, y)
        for (n, a), (_, b) in zip(m.model.named_parameters(), ref.model.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {t} {n}")
        for (n, a), (_, b) in zip(m.classifiers.named_parameters(), ref.cls.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {t} {n}")


def test_state_survives_a_checkpoint():
    m = make("sum", optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 6e-3})
    for t in range(2):
        m.update(*batch(seed=t), ctx(t))
    buf = io.BytesIO()
    torch.save({"method": m.state_dict(), "extra": m.extra_state(), "opt": m.optimizer.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    r = make("sum", optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 6e-3})
    r.load_extra_state(state["extra"])
    r.load_state_dict(state["method"])
    r.optimizer.load_state_dict(state["opt"])
    a, b = m.update(*batch(seed=5), ctx(2)), r.update(*batch(seed=5), ctx(2))
    assert float(a["loss"]) == float(b["loss"])  # the stale l_gm came back
    for (n, x), (_, z) in zip(m.named_parameters(), r.named_parameters()):
        assert torch.equal(x, z), n


def test_classifiers_are_not_in_the_model_optimizer():
    m = make()
    ids = {id(p) for g in m.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in ids for p in m.classifiers.parameters())
    assert {id(p) for g in m.cls_optimizer.param_groups for p in g["params"]} == {id(p) for p in m.classifiers.parameters()}
    assert m.cls_optimizer.param_groups[0]["lr"] == 5e-4 and m.cls_optimizer.param_groups[0]["weight_decay"] == 3e-3


def test_bad_parameters():
    cls = METHODS.get("cggm")
    with pytest.raises(ValidationError):
        cls.HParams(rou=0)
    with pytest.raises(ValidationError):
        cls.HParams(lamda=-1)
    with pytest.raises(UserError, match="cannot serve fusion"):
        cls.check(ModelSpec("tiny", "film", dict(SHAPES), 4), cls.HParams())
    with pytest.raises(UserError, match="needs 2..any modalities"):
        cls.check(ModelSpec("tiny", "concat", {"audio": [1, 8, 8]}, 4), cls.HParams())


def test_cli_bad_parameter_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: cggm, cls_lr: 0}]")
    assert run_cli(monkeypatch, "sweep", str(recipe), "--dry-run", "--db", f"sqlite:///{tmp_path / 'r.db'}") == 2


@pytest.mark.parametrize("protocol,mods", [("tiny", ["audio", "visual"]), ("three", ["audio", "visual", "text"])])
def test_end_to_end(tmp_path, monkeypatch, protocol, mods):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[cggm]")
    recipe.write_text(recipe.read_text().replace("protocol: tiny", f"protocol: {protocol}"))
    db = tmp_path / "results.db"
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu") == 0
    con = sqlite3.connect(db)
    status = con.execute("select status from run where method = 'cggm'").fetchall()
    names = {r[0] for r in con.execute("select distinct name from epoch_metric")}
    con.close()
    assert status == [("completed",)]
    assert {f"acc/{m}" for m in mods} | {f"method/coeff_{m}" for m in mods} | {"method/l_gm"} <= names
