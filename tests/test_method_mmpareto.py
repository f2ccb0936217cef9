"""MMPareto (docs/methods/mmpareto.md): conflict test and MGDA weights, per-tensor magnitude rule, heads'
plain sum, three backward passes, rejected inputs, and one run end to end."""
from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_recipe
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec
from mmbench.methods.mmpareto import inner_products, mgda_two, pareto_weights, rescale

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(gamma: float = 1.5, fusion: str = "concat"):
    torch.manual_seed(0)
    cls = METHODS.get("mmpareto")
    spec = ModelSpec(backbone="tiny", fusion=fusion, input_shapes=dict(SHAPES), num_classes=4)
    # plain SGD with lr 1: the update is exactly minus the gradient the method wrote
    m = cls(spec, cls.HParams(gamma=gamma), TrainSpec(epochs=1, optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0,
                                                                             "weight_decay": 0.0}, scheduler={"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(b: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, *s, generator=g) for k, s in SHAPES.items()}, torch.randint(0, 4, (b,), generator=g)


CTX = StepContext(epoch=0, step=0, steps_per_epoch=1, num_epochs=1)


# ---- weights --------------------------------------------------------------------------------
def weights(g_mm: torch.Tensor, g_u: torch.Tensor) -> tuple[float, float, float]:
    return pareto_weights(*inner_products([g_mm], [g_u]))


def test_inner_products_of_the_concatenation():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([0.5, -1.0]), torch.tensor([[2.0]])]
    assert inner_products(a, b) == pytest.approx((14.0, 4.5, 5.25))


def test_no_conflict_gives_equal_weights():
    w_mm, w_u, cos = weights(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert (w_mm, w_u) == (0.5, 0.5)
    assert cos == pytest.approx(2 ** -0.5)


def test_conflict_gives_hand_computed_mgda_weights():
    # g_mm=(1,0), g_u=(-1,2): <.,.> = -1, |g_mm|^2 = 1, |g_u|^2 = 5 -> gamma = (5+1)/(1+5+2) = 0.75
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0])
    w_mm, w_u, cos = weights(g_mm, g_u)
    assert cos == pytest.approx(-1 / 5 ** 0.5)
    assert (w_mm, w_u) == pytest.approx((0.75, 0.25))
    # and it is the minimum-norm point of the segment (brute force over c)
    cs = torch.linspace(0, 1, 10001)
    norms = ((cs[:, None] * g_mm + (1 - cs[:, None]) * g_u) ** 2).sum(1)
    assert float(cs[norms.argmin()]) == pytest.approx(0.75, abs=1e-3)


def test_orthogonal_gradients_count_as_conflict():
    w_mm, w_u, cos = weights(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert cos == 0.0
    assert (w_mm, w_u) == pytest.approx((0.2, 0.8))  # (1 - 0) / (4 + 1 - 0)


def test_solver_clamps():
    assert mgda_two(0.0, 0.0, 1.0) == 0.999  # <g1,g2> >= |g1|^2 (g1 = 0)
    assert mgda_two(1.0, 0.0, 0.0) == 0.001  # <g1,g2> >= |g2|^2 (g2 = 0)
    assert mgda_two(1.0, 2.0, 9.0) == 0.999  # both clamps would fire: the first wins
    assert mgda_two(1.0, -1.0, 5.0) == pytest.approx(0.75)


# ---- magnitude rule -------------------------------------------------------------------------
def test_no_conflict_result_is_gamma_times_plain_sum():
    g_mm, g_u = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    torch.testing.assert_close(rescale([g_mm], [g_u], 0.5, 0.5, 1.5)[0], 1.5 * (g_mm + g_u))


def test_pareto_direction_is_raised_to_the_plain_sum_norm():
    g_mm, g_u = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    out = rescale([g_mm], [g_u], 0.75, 0.25, 1.5)[0]
    direction = torch.tensor([4.5, 2.0])  # 2*(0.75 g_mm + 0.25 g_u), norm 4.92 < 5
    torch.testing.assert_close(out / out.norm(), direction / direction.norm())
    assert float(out.norm()) == pytest.approx(1.5 * 5.0)


def test_larger_pareto_norm_is_kept():
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])  # plain sum is zero
    torch.testing.assert_close(rescale([g_mm], [g_u], 0.75, 0.25, 1.5)[0], torch.tensor([1.5, 0.0]))


def test_rule_is_applied_per_tensor_not_per_encoder():
    g_mm = [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])]
    g_u = [torch.tensor([0.0, 4.0]), torch.tensor([-1.0, 0.0])]
    a, b = rescale(g_mm, g_u, 0.75, 0.25, 1.5)
    assert float(a.norm()) == pytest.approx(1.5 * 5.0)  # raised to its own plain-sum norm
    torch.testing.assert_close(b, torch.tensor([1.5, 0.0]))  # its plain sum is zero: kept


def test_vanishing_pareto_direction_stays_zero():
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.0])  # 2(0.75 g_mm + 0.25 g_u) = 0
    out = rescale([g_mm], [g_u], 0.75, 0.25, 1.5)[0]
    torch.testing.assert_close(out, torch.zeros(2))


# ---- one step against the formulas ----------------------------------------------------------
def reference_grads(method, inputs, labels):
    """Per-loss gradients of an independent copy of the model (autograd.grad, one loss at a time)."""
    model = copy.deepcopy(method.model)
    model.train()
    feats = model.encode(inputs)
    losses = {"mm": F.cross_entropy(model.fusion(feats), labels)}
    losses.update({m: F.cross_entropy(model.unimodal_heads[m](feats[m]), labels) for m in SHAPES})
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    out = {}
    for k, loss in losses.items():
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[k] = {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, params, gs)}
    return out


@pytest.mark.parametrize("gamma", [1.5, 1.0])
def test_step_applies_pareto_rule_to_encoders_and_plain_sum_to_heads(gamma):
    m = make(gamma)
    inputs, labels = batch(seed=4)
    ref = reference_grads(m, inputs, labels)
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    logs = m.update(inputs, labels, CTX)
    # this batch exercises both branches: audio conflicts (MGDA), visual does not (0.5/0.5)
    assert (logs["conflict_audio"], logs["conflict_visual"], logs["conflict_rate"]) == (1.0, 0.0, 0.5)
    delta = {n: before[n] - p.detach() for n, p in m.model.named_parameters()}  # = final gradient (lr 1)
    for mod in SHAPES:
        names = [f"encoders.{mod}.{n}" for n, _ in m.model.encoders[mod].named_parameters()]
        assert any("bn" in n or ".1." in n for n in names)  # BatchNorm affine tensors are in the group
        g_mm = torch.cat([ref["mm"][n].flatten() for n in names])
        g_u = torch.cat([ref[mod][n].flatten() for n in names])
        cos = float(g_mm @ g_u / (g_mm.norm() * g_u.norm()))
        assert logs[f"cos_{mod}"] == pytest.approx(cos, abs=1e-5)
        if cos > 0:
            w = 0.5
        else:
            v11, v12, v22 = float(g_mm @ g_mm), float(g_mm @ g_u), float(g_u @ g_u)
            w = (v22 - v12) / (v11 + v22 - 2 * v12)
        assert logs[f"w_mm_{mod}"] == pytest.approx(w, rel=1e-4)
        for n in names:
            new = 2 * w * ref["mm"][n] + 2 * (1 - w) * ref[mod][n]
            ratio = (ref["mm"][n] + ref[mod][n]).norm() / new.norm()
            want = gamma * (ratio if ratio > 1 else 1.0) * new
            torch.testing.assert_close(delta[n], want, rtol=1e-4, atol=1e-6)
    for n in delta:
        if not n.startswith("encoders."):
            torch.testing.assert_close(delta[n], sum(ref[k][n] for k in ref), rtol=1e-5, atol=1e-7)


def test_at_most_three_backward_passes(monkeypatch):
    m = make()
    calls = {"backward": 0, "grad": 0}
    real_backward, real_grad = torch.autograd.backward, torch.autograd.grad

    def counting_backward(*a, **k):
        calls["backward"] += 1
        return real_backward(*a, **k)

    def counting_grad(*a, **k):
        calls["grad"] += 1
        return real_grad(*a, **k)

    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    through = {mod: 0 for mod in SHAPES}

    def count_on(mod):  # each backward pass through an encoder reaches its pooled output once
        def on_forward(module, inp, out):
            out.register_hook(lambda g: through.__setitem__(mod, through[mod] + 1))
        return on_forward

    for mod in SHAPES:
        m.model.encoders[mod].register_forward_hook(count_on(mod))
    m.update(*batch(), CTX)
    assert calls["backward"] + calls["grad"] == 3
    assert through == {"audio": 2, "visual": 2}  # L_mm and its own loss; no fourth pass of the total


# ---- bad input ------------------------------------------------------------------------------
def test_other_fusions_rejected():
    cls = METHODS.get("mmpareto")
    spec = ModelSpec(backbone="tiny", fusion="sum", input_shapes=dict(SHAPES), num_classes=4)
    with pytest.raises(UserError, match="concat"):
        cls.check(spec, cls.HParams())


def test_gamma_must_be_positive():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        METHODS.get("mmpareto").HParams(gamma=0)


@pytest.mark.parametrize("entry,sets,needle", [
    ("[{name: mmpareto, gama: 2}]", [], "unknown parameter"),
    ("[{name: mmpareto, gamma: -1}]", [], "gamma"),
    ("[mmpareto]", ["--set", "model.fusion=sum"], "model.fusion"),
])
def test_cli_bad_input_exits_2_before_training(mm_env: Path, cli, entry, sets, needle):
    r = write_recipe(mm_env / "r.yaml", methods=entry)
    code, out = cli("sweep", r, *sets)
    assert code == 2, out
    assert needle in out
    assert not list(mm_env.rglob("config.json"))  # no run was started


# ---- end to end -----------------------------------------------------------------------------
def test_end_to_end_logs_conflicts(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml", epochs=2, methods="[mmpareto]")
    code, out = cli("train", r, "--set", "train.eval_train=false")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as con:
        (status,), = con.execute("select status from run where method='mmpareto'").fetchall()
        rows = con.execute("select epoch, name, value from epoch_metric where name like 'method/%'").fetchall()
    assert status == "completed"
    got = {(e, n): v for e, n, v in rows}
    for e in (0, 1):
        for n in ("cos_audio", "cos_visual", "conflict_rate", "conflict_audio", "w_mm_visual", "loss_mm", "loss_audio"):
            assert (e, f"method/{n}") in got, (e, n)
        assert 0 <= got[(e, "method/conflict_rate")] <= 1
        assert -1 <= got[(e, "method/cos_audio")] <= 1
        assert 0 < got[(e, "method/w_mm_audio")] < 1
