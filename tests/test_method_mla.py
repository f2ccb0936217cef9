"""MLA (docs/methods/mla.md): the projector, the alternating per-modality steps, the inference blend."""
from __future__ import annotations

import copy
import sqlite3

import pytest
import torch
import torch.nn.functional as F
import method_util
from conftest import run_cli
from conftest import write_recipe
from pydantic import ValidationError

from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec, StepContext
from mmbench.methods.mla import entropy_gates, project_gradient, projector_beta, projector_update
from mmbench.models.fusion import build_fusion

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(shapes: dict | None = None, lr: float = 0.1, **hp: object):
    return method_util.make("mla", "shared", shapes or SHAPES, epochs=2,
                            optimizer={"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4}, **hp)


def batch(shapes: dict | None = None, b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    return {k: torch.randn(b, *s, generator=g) for k, s in shapes.items()}, torch.randint(0, 4, (b,), generator=g)


def ctx(step: int = 0) -> StepContext:
    return StepContext(epoch=0, step=step, steps_per_epoch=4, num_epochs=2)


# ---- the projector --------------------------------------------------------------------------
def test_projector_update_matches_the_recursive_formula():
    P = torch.eye(3, dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 2.0]], dtype=torch.float64)
    beta = 0.1
    r = torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.float64)  # the batch mean, by hand
    k = r.t()  # P = I
    want = torch.eye(3, dtype=torch.float64) - (k @ k.t()) / (beta + 6.0)  # r k = 4 + 1 + 1
    want = want / want.pow(2).sum().sqrt()
    torch.testing.assert_close(projector_update(P, x, beta), want)


def test_code_rule_divides_by_the_outer_product():
    """The released formula (torch.mm(k, r) with k D x 1, r 1 x D) divides elementwise by a matrix."""
    P = torch.eye(2, dtype=torch.float64)
    x = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    k = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    want = P - (k @ k.t()) / (0.5 + k @ torch.tensor([[1.0, 3.0]], dtype=torch.float64))
    want = want / want.pow(2).sum().sqrt()
    torch.testing.assert_close(projector_update(P, x, 0.5, "code"), want)
    assert not torch.allclose(projector_update(P, x, 0.5, "owm"), want)


def test_project_gradient_rules():
    g = torch.tensor([[1.0, 2.0]])
    P = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(project_gradient(g, P, "owm"), torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(project_gradient(g, P, "balancebench"), torch.tensor([[1.5, 2.0]]))


def test_projector_suppresses_the_direction_already_used():
    """After learning from features along r, a gradient along r is shrunk far more than one orthogonal to it."""
    P = torch.eye(4, dtype=torch.float64)
    feats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5, dtype=torch.float64)
    P = projector_update(P, feats, 1e-3)
    along = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64) @ P.t()
    ortho = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64) @ P.t()
    assert along.norm() < 0.01 * ortho.norm()


def test_beta_schedule():
    assert projector_beta(0, 4) == pytest.approx(0.1)
    assert projector_beta(2, 4) == pytest.approx(0.1 ** 1.5)


# ---- the step -------------------------------------------------------------------------------
class Reference:
    """The official order re-derived by hand on a copy: one encoder pass, then per modality a CE
    on the shared head, optional projection, an SGD step, zeroed gradients."""

    def __init__(self, m, rule: str) -> None:
        self.model = copy.deepcopy(m.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.P = torch.eye(m.projector.shape[0])
        self.rule = rule
        self.count = 0

    def step(self, inputs, labels, step: int) -> None:
        model = self.model
        feats = {k: model.encoders[k](inputs[k]) for k in model.modalities}
        head = model.fusion.head
        for k in model.modalities:
            F.cross_entropy(head(feats[k]), labels).backward()
            if self.rule != "released" and self.count != 0:
                r = feats[k].detach().mean(0, keepdim=True)
                kk = self.P @ r.t()
                denom = r @ kk if self.rule == "owm" else kk @ r
                self.P = self.P - kk @ kk.t() / (projector_beta(step, 4) + denom)
                self.P = self.P / self.P.norm()
                proj = head.weight.grad @ self.P.t()
                head.weight.grad = head.weight.grad + proj if self.rule == "balancebench" else proj
            self.opt.step()
            self.opt.zero_grad()
            self.count += 1


@pytest.mark.parametrize("projection", ["owm", "released", "code", "balancebench"])
def test_update_matches_hand_derived_step(projection):
    m = make(projection=projection)
    ref = Reference(m, projection)
    for s in range(3):
        inputs, y = batch(seed=s)
        ref.step(inputs, y, s)
        logs = m.update(inputs, y, ctx(s))
        for (n, a), (_, b) in zip(m.model.named_parameters(), ref.model.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(m.projector, ref.P)
        assert set(logs) == {"loss", "loss_audio", "loss_visual"}
    assert m.steps_taken == 6  # one optimizer step per modality per batch


def test_each_encoder_learns_only_from_its_own_loss():
    m = make()
    before = copy.deepcopy(m.model)
    inputs, y = batch()
    inputs_b = dict(inputs)
    inputs_b["visual"] = torch.zeros_like(inputs["visual"])  # visual input changes; audio's step must not care
    m2 = make()
    m.update(inputs, y, ctx())
    m2.update(inputs_b, y, ctx())
    for (n, a), (_, b), (_, c) in zip(m.model.encoders["audio"].named_parameters(),
                                      m2.model.encoders["audio"].named_parameters(),
                                      before.encoders["audio"].named_parameters()):
        torch.testing.assert_close(a, b, msg=n)
    assert any(not torch.equal(a, c) for a, c in zip(m.model.encoders["audio"].parameters(), before.encoders["audio"].parameters()))


def test_first_step_of_the_run_is_not_projected():
    m = make()
    inputs, y = batch()
    m0 = make()
    visual_before = m0.model.encode(inputs)["visual"].detach()  # the features the step computes, before any update
    m.update(inputs, y, ctx())
    # the run's first step (audio) leaves P alone; only the second (visual) updates it
    P = projector_update(torch.eye(m0.projector.shape[0]), visual_before, projector_beta(0, 4))
    torch.testing.assert_close(m.projector, P, rtol=1e-5, atol=1e-6)


def test_three_modalities_take_three_steps():
    shapes = {**SHAPES, "depth": [1, 8, 8]}
    m = make(shapes)
    inputs, y = batch(shapes)
    logs = m.update(inputs, y, ctx())
    assert m.steps_taken == 3 and "loss_depth" in logs
    assert list(m.shared.weights.values()) == [0.35, 0.25, 0.4]  # the official three-modality blend


# ---- inference ------------------------------------------------------------------------------
def test_fixed_blend_is_the_official_055_045():
    m = make()
    m.eval()
    inputs, _ = batch()
    out = m.predict(inputs)
    want = 0.55 * out.modality_logits["audio"] + 0.45 * out.modality_logits["visual"]
    torch.testing.assert_close(out.logits, want)


def test_entropy_gates():
    sure = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    unsure = torch.zeros(2, 2)
    g = entropy_gates({"a": sure, "v": unsure}, "classes")
    assert g["a"] > g["v"] and float(g["a"] + g["v"]) == pytest.approx(1.0)
    # the official reading: softmax over the batch dimension, entropy summed over the batch
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    p = torch.softmax(x, 0)
    h = -(p * p.log()).sum()
    g = entropy_gates({"a": x, "v": unsure}, "batch")
    h_v = -(torch.softmax(unsure, 0) * torch.softmax(unsure, 0).log()).sum()
    wa, wv = torch.exp(torch.maximum(h, h_v) - h), torch.exp(torch.maximum(h, h_v) - h_v)
    torch.testing.assert_close(g["a"], wa / (wa + wv))


def test_dynamic_gating_predicts_with_gates():
    m = make(gating="dynamic", entropy_dim="classes")
    m.eval()
    out = m.predict(batch()[0])
    g = entropy_gates(out.modality_logits, "classes")
    torch.testing.assert_close(out.logits, g["audio"] * out.modality_logits["audio"] + g["visual"] * out.modality_logits["visual"])


# ---- bad input ------------------------------------------------------------------------------
def test_shared_fusion_needs_equal_widths():
    with pytest.raises(UserError, match="equal"):
        build_fusion("shared", {"audio": 8, "visual": 16}, 3)


def test_refuses_other_fusions_and_wrong_weight_count():
    cls = METHODS.get("mla")
    with pytest.raises(UserError, match="fusion: shared"):
        cls.check(ModelSpec("tiny", "concat", dict(SHAPES), 4), cls.HParams())
    with pytest.raises(UserError, match="3 entries"):
        cls.check(ModelSpec("tiny", "shared", dict(SHAPES), 4), cls.HParams(weights=[0.2, 0.3, 0.5]))
    with pytest.raises(ValidationError):
        cls.HParams(weights=[-1.0, 0.5])
    with pytest.raises(ValidationError):
        cls.HParams(projection="on")


def test_bad_parameters_exit_2_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: mla, model: {fusion: shared}, gating: sometimes}]")
    assert run_cli(monkeypatch, "sweep", str(recipe), "--dry-run", "--db", f"sqlite:///{tmp_path / 'r.db'}") == 2
    recipe = write_recipe(tmp_path / "c.yaml", methods="[mla]")  # the recipe's concat fusion
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{tmp_path / 'c.db'}",
                   "--runs-dir", str(tmp_path / "runs"), "--device", "cpu") == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint.pt"))


# ---- end to end -----------------------------------------------------------------------------
def test_end_to_end_with_a_per_method_model_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[joint, {name: mla, model: {fusion: shared}}]")
    db = tmp_path / "results.db"
    code = run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu")
    assert code == 0
    con = sqlite3.connect(db)
    runs = dict(con.execute("select method, fusion from run where status = 'completed'").fetchall())
    names = {n for (n,) in con.execute("select distinct name from epoch_metric e join run r on r.id = e.run_id "
                                      "where r.method = 'mla'")}
    con.close()
    assert runs == {"joint": "concat", "mla": "shared"}
    assert {"acc", "acc/audio", "acc/visual", "method/loss_audio", "method/loss_visual"} <= names
