"""AGM (docs/methods/agm.md): Shapley responses, forward count and modes, coefficients, gradient
scaling, conditional clip, window, resumable running means."""
from __future__ import annotations

import copy
import math
import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli
from conftest import write_recipe as tiny_recipe
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mmbench.errors import UserError
from mmbench.methods.agm import (
    agm_coefficients, clamped_scores, clip_order, conditional_clip, head_weights, modulated_logits,
)
from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(fusion: str = "concat", shapes: dict | None = None, **hp: object):
    torch.manual_seed(0)
    cls = METHODS.get("agm")
    spec = ModelSpec(backbone="tiny", fusion=fusion, input_shapes=dict(shapes or SHAPES), num_classes=4)
    m = cls(spec, cls.HParams(**hp), TrainSpec(epochs=2, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9},
                                               scheduler={"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(shapes: dict | None = None, b: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    inputs = {k: torch.randn(b, *s, generator=g) for k, s in (shapes or SHAPES).items()}
    return inputs, torch.randint(0, 4, (b,), generator=g)


def ctx(epoch: int = 0, step: int = 0, steps: int = 10) -> StepContext:
    return StepContext(epoch=epoch, step=step, steps_per_epoch=steps, num_epochs=100)


def reference_responses(model: torch.nn.Module, inputs):
    """AGM's two-modality responses written out: full pass in train mode, masked in eval mode."""
    x_a, x_v = inputs["audio"], inputs["visual"]
    model.train()
    f_av = model(inputs).logits
    model.eval()
    f_a = model({"audio": x_a, "visual": torch.zeros_like(x_v)}).logits
    f_v = model({"audio": torch.zeros_like(x_a), "visual": x_v}).logits
    model.train()
    return f_av, 0.5 * (f_av - f_v + f_a), 0.5 * (f_av - f_a + f_v)


# ---- responses, passes, modes ---------------------------------------------------------------
def test_responses_match_the_formula_and_sum_to_the_fused_logits():
    m = make()
    inputs, _ = batch()
    ref = copy.deepcopy(m.model)
    resp = m.responses(inputs)
    f_av, m_a, m_v = reference_responses(ref, inputs)
    torch.testing.assert_close(resp["audio"], m_a)
    torch.testing.assert_close(resp["visual"], m_v)
    torch.testing.assert_close(resp["audio"] + resp["visual"], f_av)
    assert not torch.allclose(resp["audio"], resp["visual"])


def test_three_forwards_per_step_full_in_train_masked_in_eval():
    m = make()
    inputs, y = batch()
    seen: list[tuple[bool, bool, bool]] = []

    def hook(mod, args):
        x = args[0]
        seen.append((mod.training, bool(x["audio"].abs().sum() > 0), bool(x["visual"].abs().sum() > 0)))

    h = m.model.register_forward_pre_hook(hook)
    m.update(inputs, y, ctx())
    h.remove()
    assert seen == [(True, True, True), (False, True, False), (False, False, True)]  # no all-zero pass
    assert m.model.training


def test_masked_passes_leave_batchnorm_statistics_alone():
    m = make()
    inputs, y = batch()
    ref = copy.deepcopy(m.model).train()
    with torch.no_grad():
        ref(inputs)  # exactly one train-mode pass
    m.update(inputs, y, ctx())
    bns = [(a, b) for a, b in zip(m.model.modules(), ref.modules()) if isinstance(a, torch.nn.BatchNorm2d)]
    assert bns
    for a, b in bns:
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=0)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1


# ---- coefficients and running means ---------------------------------------------------------
def test_coefficients_hand_computed():
    k_a, k_v = agm_coefficients([0.5, 1.0], [0.8, 0.9], alpha=1.5, clip=10.0)
    # r_a = e^0.5, r_hat_a = e^0.1: k_a = exp(1.5 * (1.105171 - 1.648721))
    assert k_a == pytest.approx(0.4424953, rel=1e-6)
    assert k_v == pytest.approx(1.5643339, rel=1e-6)


def test_coefficient_clip_caps_the_boost():
    k_a, k_v = agm_coefficients([0.1, 5.0], [9.0, 0.2], alpha=1.5, clip=10.0)
    assert k_v == pytest.approx(math.exp(15.0))  # r_hat_v - r_v = 6634 is clipped to 10
    assert k_a < 1e-80


def test_coefficients_three_modalities():
    ks = agm_coefficients([0.5, 1.0, 2.0], [1.0, 1.0, 1.0], alpha=1.0, clip=10.0)
    assert ks == pytest.approx([0.1793741, 0.7527475, 2.0411129], rel=1e-6)


def test_coefficients_use_running_means_before_this_step():
    m = make(alpha=1.5)
    m.load_extra_state({"running": {"audio": 0.8, "visual": 0.9}})
    inputs, y = batch()
    logs = m.update(inputs, y, ctx(epoch=1, step=3, steps=10))  # AGM's global 1-based step t = 14
    ell = [logs["score_audio"], logs["score_visual"]]
    assert [logs["k_audio"], logs["k_visual"]] == pytest.approx(agm_coefficients(ell, [0.8, 0.9], 1.5, 10.0))
    assert m.running == pytest.approx([0.8 * 13 / 14 + ell[0] / 14, 0.9 * 13 / 14 + ell[1] / 14])
    assert logs["running_score_audio"] == pytest.approx(m.running[0])


def test_scores_are_clamped_cross_entropies():
    m = make()
    inputs, y = batch()
    ref = copy.deepcopy(m.model)
    _, m_a, m_v = reference_responses(ref, inputs)
    logs = m.update(inputs, y, ctx())
    for name, r in (("audio", m_a), ("visual", m_v)):
        p = torch.softmax(r.detach(), 1).gather(1, y[:, None]).squeeze(1)
        want = torch.where(p < 1e-8, torch.full_like(p, -math.log(1e-8)), -torch.log(p)).mean()
        assert logs[f"score_{name}"] == pytest.approx(float(want), rel=1e-5)


def test_score_terms_floor_the_true_class_probability():
    resp = {"audio": torch.tensor([[0.0, -60.0], [0.0, 0.0]]), "visual": torch.tensor([[5.0, 0.0], [0.0, 5.0]])}
    got = clamped_scores(resp, torch.tensor([1, 0]))
    assert got["audio"].item() == pytest.approx((-math.log(1e-8) + math.log(2)) / 2, rel=1e-6)  # e^-60 -> 1e-8
    assert got["visual"].item() == pytest.approx(math.log(1 + math.exp(5)), rel=1e-6)


def test_first_step_starts_from_zero_running_means():
    m = make()
    inputs, y = batch()
    logs = m.update(inputs, y, ctx())
    ell = [logs["score_audio"], logs["score_visual"]]
    assert [logs["k_audio"], logs["k_visual"]] == pytest.approx(agm_coefficients(ell, [0.0, 0.0], 1.5, 10.0))
    assert m.running == pytest.approx(ell)  # t = 1: the mean is this step's score


# ---- gradients ------------------------------------------------------------------------------
def test_parameter_gradients_are_scaled_response_gradients():
    m = make(alpha=1.5, grad_clip=0.0)
    m.load_extra_state({"running": {"audio": 1.0, "visual": 1.5}})  # pushes k_a above 1, k_v below
    inputs, y = batch()
    ref = copy.deepcopy(m.model)
    logs = m.update(inputs, y, ctx())
    k_a, k_v = logs["k_audio"], logs["k_visual"]
    assert k_a > 1.5 and k_v < 0.8

    f_av, m_a, m_v = reference_responses(ref, inputs)
    g = ((torch.softmax(m_a + m_v, 1) - F.one_hot(y, 4)) / len(y)).detach()  # dCE/dlogits
    params = list(ref.parameters())
    d_a = torch.autograd.grad((m_a * g).sum(), params, retain_graph=True, allow_unused=True)
    d_v = torch.autograd.grad((m_v * g).sum(), params, allow_unused=True)
    differs = False
    for (name, p), da, dv in zip(m.model.named_parameters(), d_a, d_v):
        da = torch.zeros_like(p) if da is None else da
        dv = torch.zeros_like(p) if dv is None else dv
        want = k_a * da + k_v * dv
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=name)
        differs |= not torch.allclose(want, da + dv, rtol=1e-3, atol=1e-5)
    assert differs  # the scaling really changed the gradient


def old_detach_form(responses: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
    """The construction agm.py used before: same value in exact arithmetic, drifts in float32."""
    return sum(s * r for s, r in zip(scales, responses)) + sum((1.0 - s) * r for s, r in zip(scales, responses)).detach()


def response_grad_errors(build, k: float, seed: int = 0) -> tuple[float, float, bool]:
    """(max relative error of the gradients reaching m_a, m_v against a float64 reference of the
    official construction: CE on exactly m_a + m_v, gradient to m_i scaled by s_i; whether the
    forward value is bit-equal to m_a + m_v). Scales (k, 1/k): one modality boosted, one slowed."""
    g = torch.Generator().manual_seed(seed)
    m_a, m_v = 3 * torch.randn(32, 6, generator=g), 3 * torch.randn(32, 6, generator=g)
    y = torch.randint(0, 6, (32,), generator=g)
    scales = [k, 1.0 / k]
    a, v = m_a.clone().requires_grad_(), m_v.clone().requires_grad_()
    z = build([a, v], scales)
    F.cross_entropy(z, y).backward()
    a64, v64 = m_a.double(), m_v.double()
    d = (torch.softmax(a64 + v64, 1) - F.one_hot(y, 6).double()) / len(y)
    errs = [float((got.double() - s * d).abs().max() / (s * d).abs().max()) for got, s in ((a.grad, scales[0]), (v.grad, scales[1]))]
    return errs[0], errs[1], torch.equal(z.detach(), m_a + m_v)


@pytest.mark.parametrize("k", [1.0, 1e3, 1e5, math.exp(15.0)])
def test_loss_is_exact_at_every_coefficient(k: float) -> None:
    """Issue 9 §4: the cross-entropy sees exactly sum_i m_i, and the response gradients are the
    float64 reference's to float32 round-off, however large the coefficient."""
    err_a, err_v, exact = response_grad_errors(modulated_logits, k)
    assert exact
    assert err_a < 1e-6 and err_v < 1e-6, (err_a, err_v)


def test_clip_sums_norms_in_the_official_parameter_order():
    """The official model registers its fusion head before the encoders; the global norm's sum
    follows that order, so the clip is bitwise the official one (1 ulp apart otherwise)."""
    m = make()
    order = clip_order(m.model)
    fusion = list(m.model.fusion.parameters())
    assert order[: len(fusion)] == fusion
    assert len(order) == len(list(m.model.parameters())) and {id(p) for p in order} == {id(p) for p in m.model.parameters()}


def test_the_old_detach_form_fails_the_precision_test_at_large_k() -> None:
    """The check above can fail: the former construction is off by far more at k = e^15."""
    err_a, err_v, exact = response_grad_errors(old_detach_form, math.exp(15.0))
    assert not exact and max(err_a, err_v) > 1e-3


@pytest.mark.parametrize("epoch,modulated", [(0, False), (1, False), (2, True), (3, True), (4, False)])
def test_window_uses_agm_one_based_epochs_and_unit_scales_outside(epoch, modulated):
    # AGM epochs 3..4 = trainer epochs 2..3
    m = make(modulation_starts=3, modulation_ends=4, grad_clip=0.0)
    m.load_extra_state({"running": {"audio": 1.0, "visual": 1.5}})
    inputs, y = batch()
    ref = copy.deepcopy(m.model).train()
    F.cross_entropy(ref(inputs).logits, y).backward()  # plain joint-training gradients
    logs = m.update(inputs, y, ctx(epoch=epoch))
    assert abs(logs["k_audio"] - 1) > 0.5  # coefficients are computed either way
    same = all(torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)
               for p, q in zip(m.model.parameters(), ref.parameters()))
    assert same != modulated


def test_default_window_covers_the_first_epoch():
    m = make()
    assert m.in_window(0) and m.in_window(1499) and not m.in_window(1500)


# ---- clipping -------------------------------------------------------------------------------
def _param(values: list[float]) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(len(values)))
    p.grad = torch.tensor(values)
    return p


def test_clip_fires_only_on_an_out_of_range_head_element():
    head, body = _param([0.5, -1.0, 1.0]), _param([30.0, 40.0])
    assert not conditional_clip([head], [head, body], 1.0)  # |g| <= 1 everywhere: norm 50 stays
    assert torch.equal(body.grad, torch.tensor([30.0, 40.0]))
    head.grad = torch.tensor([0.5, -1.5, 0.0])
    assert conditional_clip([head], [head, body], 1.0)
    total = torch.cat([head.grad, body.grad]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-4)
    assert not conditional_clip([_param([9.0])], [body], 0.0)  # 0 disables


@pytest.mark.parametrize("fusion,names", [
    ("concat", ["fc"]), ("sum", ["heads.audio", "heads.visual"]), ("film", ["fc_out"]), ("gated", ["fc_out"])])
def test_clip_watches_the_fusion_output_layer(fusion, names):
    m = make(fusion)
    want = [dict(m.model.fusion.named_modules())[n].weight for n in names]
    got = head_weights(m.model.fusion)
    assert len(got) == len(want) and all(a is b for a, b in zip(got, want))


def test_large_gradients_are_clipped_in_a_step():
    m = make()
    with torch.no_grad():  # huge pooled features -> head weight-grad elements far outside [-1, 1]
        for mod in m.model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(300.0)
    logs = m.update(*batch(), ctx())
    assert logs["clipped"] == 1.0
    norm = torch.cat([p.grad.flatten() for p in m.model.parameters() if p.grad is not None]).norm()
    assert norm.item() == pytest.approx(1.0, rel=1e-3)


# ---- every fusion, M modalities -------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_every_fusion_trains_a_step(fusion):
    m = make(fusion)
    inputs, y = batch()
    resp = m.responses(inputs)
    m.model.train()
    logs = m.update(inputs, y, ctx())
    assert {"k_audio", "k_visual", "score_audio", "score_visual", "response_acc_audio", "loss"} <= set(logs)
    assert all(math.isfinite(float(v)) for v in logs.values())
    assert resp["audio"].shape == (16, 4)


def test_three_modalities_use_seven_passes_and_the_shapley_rule():
    shapes = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8], "depth": [1, 8, 8]}
    m = make(shapes=shapes)
    inputs, y = batch(shapes)
    ref = copy.deepcopy(m.model)
    calls = []
    h = m.model.register_forward_pre_hook(lambda mod, args: calls.append(mod.training))
    resp = m.responses(inputs)
    h.remove()
    assert calls == [True] + [False] * 6
    mods = list(shapes)
    outs = {frozenset(mods): ref.train()(inputs).logits}  # the train-mode pass first (it moves BN stats)
    ref.eval()
    for mask in range(1, 7):
        present = frozenset(x for i, x in enumerate(mods) if mask >> i & 1)
        outs[present] = ref({k: (v if k in present else torch.zeros_like(v)) for k, v in inputs.items()}).logits
    A, V, D = "audio", "visual", "depth"
    Fs = lambda *s: outs[frozenset(s)]  # noqa: E731
    want_a = (Fs(A, V, D) - Fs(V, D) + Fs(A)) / 3 + (Fs(A, V) - Fs(V) + Fs(A, D) - Fs(D)) / 6  # UR-Funny form
    torch.testing.assert_close(resp[A], want_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resp[A] + resp[V] + resp[D], Fs(A, V, D), rtol=1e-4, atol=1e-5)
    logs = m.update(inputs, y, ctx())
    assert {"k_audio", "k_visual", "k_depth"} <= set(logs)
    assert m.describe_run()["agm_forwards_per_step"] == 7


# ---- state --------------------------------------------------------------------------------
def test_running_means_survive_extra_state_round_trip():
    a = make()
    for step in range(3):
        a.update(*batch(seed=step), ctx(step=step))
    state = copy.deepcopy(a.extra_state())
    weights = copy.deepcopy(a.state_dict())
    b, fresh = make(), make()
    b.load_state_dict(weights)
    fresh.load_state_dict(weights)
    b.load_extra_state(state)
    assert b.running == a.running != [0.0, 0.0]
    inputs, y = batch(seed=7)
    la, lb, lf = (x.update(inputs, y, ctx(step=3)) for x in (a, b, fresh))
    assert lb["k_audio"] == pytest.approx(la["k_audio"]) and lb["k_visual"] == pytest.approx(la["k_visual"])
    assert lf["k_audio"] != pytest.approx(la["k_audio"])  # without the state the coefficients differ


# ---- bad input ------------------------------------------------------------------------------
def test_bad_hparams_rejected():
    hp = METHODS.get("agm").HParams
    with pytest.raises(ValidationError):
        hp(alpha=-1.0)
    with pytest.raises(ValidationError, match="before modulation_starts"):
        hp(modulation_starts=20, modulation_ends=10)
    with pytest.raises(ValidationError):
        hp(score_clip=0.0)


def test_one_modality_rejected():
    cls = METHODS.get("agm")
    spec = ModelSpec(backbone="tiny", fusion="concat", input_shapes={"audio": [1, 8, 8]}, num_classes=4)
    with pytest.raises(UserError, match="modalities"):
        cls.check(spec, cls.HParams())


def write_recipe(path: Path, method: str, epochs: int = 2) -> Path:
    """A tiny synthetic recipe with one method entry (the suite's shared template)."""
    return tiny_recipe(path, epochs=epochs, methods=f"[{method}]")


def test_end_to_end_logs_coefficients_and_checkpoints_running_means(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = tmp_path / "r.yaml"
    write_recipe(recipe, "agm")
    db = tmp_path / "results.db"
    code = run_cli(monkeypatch, "train", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu")
    assert code == 0
    con = sqlite3.connect(db)
    (rid, status), = con.execute("select id, status from run where method = 'agm'").fetchall()
    names = {n for (n,) in con.execute("select distinct name from epoch_metric where run_id = ?", (rid,))}
    con.close()
    assert status == "completed"
    assert {"method/k_audio", "method/k_visual", "method/score_audio", "method/running_score_visual"} <= names
    ck = torch.load(tmp_path / "runs" / rid / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and set(ck["extra"]["running"]) == {"audio", "visual"}
    assert all(0 < v < 20 for v in ck["extra"]["running"].values())
