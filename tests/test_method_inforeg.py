"""InfoReg (METHODS.md §6.8): leader's beta, the window's trace growth, which gradients get the proximal
pull, the Fisher trace, M = 3, bad input, and a 2-epoch run through the CLI."""
from __future__ import annotations

import copy
import math
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from conftest import write_recipe
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, EpochContext, ModelSpec, StepContext, TrainSpec
from mmbench.methods.inforeg import proximal_betas, window_growth

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}
SHAPES3 = {**SHAPES, "depth": [1, 8, 8]}


def make(shapes=SHAPES, fusion: str = "concat", **hp: object):
    torch.manual_seed(0)
    cls = METHODS.get("inforeg")
    spec = ModelSpec(backbone="tiny", fusion=fusion, input_shapes=dict(shapes), num_classes=4)
    h = cls.HParams(**hp)
    cls.check(spec, h)
    m = cls(spec, h, TrainSpec(epochs=2, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, scheduler={"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(shapes=SHAPES, b: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, *s, generator=g) for k, s in shapes.items()}, torch.randint(0, 4, (b,), generator=g)


def ectx(epoch: int = 0) -> EpochContext:
    return EpochContext(epoch, 2, 2, torch.device("cpu"))


def ctx(epoch: int = 0, step: int = 0) -> StepContext:
    return StepContext(epoch=epoch, step=step, steps_per_epoch=2, num_epochs=2)


def summed_loss_grads(model, inputs, labels) -> dict[str, torch.Tensor]:
    """Gradients of CE(fused) + sum_m CE(split logits) on an untouched copy (the loss, no proximal term)."""
    ref = copy.deepcopy(model)
    out = ref(inputs)
    split = ref.fusion.split_logits(out.features)
    loss = F.cross_entropy(out.logits, labels) + sum(F.cross_entropy(s, labels) for s in split.values())
    loss.backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}


# ---- the coefficient --------------------------------------------------------------------------
def test_first_modality_leads():
    b = proximal_betas({"audio": torch.tensor(30.0), "visual": torch.tensor(29.5)}, {"audio": 0.95, "visual": 0.1})
    assert float(b["audio"]) == pytest.approx(0.95 * math.exp(math.tanh(0.5)), rel=1e-6)
    assert float(b["visual"]) == 0.0


def test_second_modality_leads():
    b = proximal_betas({"audio": torch.tensor(10.0), "visual": torch.tensor(20.0)}, {"audio": 0.95, "visual": 0.1})
    assert float(b["visual"]) == pytest.approx(0.1 * math.exp(math.tanh(10.0)), rel=1e-6)  # ~0.2718
    assert float(b["audio"]) == 0.0


def test_tie_pulls_nobody():
    b = proximal_betas({"audio": torch.tensor(7.0), "visual": torch.tensor(7.0)}, {"audio": 0.95, "visual": 0.1})
    assert float(b["audio"]) == 0.0 and float(b["visual"]) == 0.0


def test_three_modalities_gap_to_runner_up():
    b = proximal_betas({"a": torch.tensor(3.0), "v": torch.tensor(5.0), "d": torch.tensor(4.25)}, {"a": 1.0, "v": 0.5, "d": 2.0})
    assert float(b["v"]) == pytest.approx(0.5 * math.exp(math.tanh(0.75)), rel=1e-6)
    assert float(b["a"]) == 0.0 and float(b["d"]) == 0.0


# ---- the window ---------------------------------------------------------------------------------
def test_window_growth_from_ten_leading_zeros():
    assert window_growth([0.0] * 10 + [2.0], 10) == pytest.approx(1.0)
    assert window_growth([0.0] * 10 + [2.0, 3.0], 10) == pytest.approx((0.5 - 0.2) / 0.5)
    traces = [0.0] * 10 + [1.0] * 11  # a flat trace for more than ten epochs: growth 0, window closed
    assert window_growth(traces, 10) == pytest.approx(0.0)
    assert window_growth([0.0] * 11, 10) == 0.0  # 0/0 closes the window instead of raising


def test_window_k_opens_and_closes_the_proximal_term():
    m = make()
    assert m.on_epoch_start(ectx(0))["window_k"] == 1.0
    m.traces = [0.0] * 10 + [1.0] * 11
    logs = m.on_epoch_start(ectx(1))
    assert logs["window_open"] == 0.0 and logs["window_k"] == pytest.approx(0.0)


# ---- the step -----------------------------------------------------------------------------------
def test_leader_encoder_gets_the_proximal_pull_others_do_not():
    m = make()
    m.on_epoch_start(ectx(0))
    inputs, y = batch()
    m.update(inputs, y, ctx())  # move away from the epoch-start weights
    anchor = {n: p.detach().clone() for n, p in zip(
        [f"encoders.{mod}.{n}" for mod in m.modalities for n, _ in m.model.encoders[mod].named_parameters()], m.anchor)}
    inputs, y = batch(seed=2)
    plain = summed_loss_grads(m.model, inputs, y)
    theta = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    logs = m.update(inputs, y, ctx(step=1))
    used = {n: p.grad for n, p in m.model.named_parameters()}
    betas = {mod: float(logs[f"beta_{mod}"]) for mod in m.modalities}
    leader = max(m.modalities, key=lambda mod: float(logs[f"score_{mod}"]))
    assert betas[leader] > 0 and all(b == 0 for mod, b in betas.items() if mod != leader)
    moved = 0
    for n, g in plain.items():
        want = g
        if n.startswith(f"encoders.{leader}."):
            want = g + betas[leader] * (theta[n] - anchor[n])
            moved += int(not torch.equal(theta[n], anchor[n]))
        torch.testing.assert_close(used[n], want, rtol=1e-5, atol=1e-7)
    assert moved > 0


def test_closed_window_is_the_summed_loss():
    m = make()
    m.on_epoch_start(ectx(0))
    m.update(*batch(), ctx())
    m.k = 0.0
    inputs, y = batch(seed=2)
    plain = summed_loss_grads(m.model, inputs, y)
    logs = m.update(inputs, y, ctx(step=1))
    assert all(float(logs[f"beta_{mod}"]) == 0 for mod in m.modalities)
    for n, p in m.model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-7)


def test_scores_use_split_logits_with_bias_over_m():
    m = make()
    with torch.no_grad():
        m.model.fusion.fc.bias.copy_(torch.tensor([2.0, -1.0, 0.5, -3.0]))
    m.on_epoch_start(ectx(0))
    inputs, y = batch()
    ref = copy.deepcopy(m.model)
    with torch.no_grad():
        out = ref(inputs)
    w, b = ref.fusion.fc.weight, ref.fusion.fc.bias
    d = out.features["audio"].shape[1]
    s_a = torch.softmax(out.features["audio"] @ w[:, :d].t() + b / 2, 1).gather(1, y[:, None]).sum()
    logs = m.update(inputs, y, ctx())
    assert float(logs["score_audio"].detach()) == pytest.approx(float(s_a.detach()), rel=1e-5)


def test_fisher_trace_of_the_first_encoder():
    m = make()
    m.on_epoch_start(ectx(0))
    acc: dict[str, torch.Tensor] = {}
    for s in range(2):
        m.update(*batch(seed=s + 3), ctx(step=s))
        for n, mod in m.model.encoders["audio"].named_modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                acc[n] = acc.get(n, 0) + mod.weight.grad ** 2
    assert len(acc) == 3  # the tiny trunk's three conv layers
    logs = m.on_epoch_end(ectx(0))
    assert logs["fisher_trace"] == pytest.approx(sum(a.mean().item() for a in acc.values()), rel=1e-6)
    assert m.traces[-1] == logs["fisher_trace"] and len(m.traces) == 11
    m2 = make()
    m2.load_extra_state(m.extra_state())
    assert m2.traces == m.traces


def test_sum_fusion_runs_with_branch_heads():
    m = make(fusion="sum")
    m.on_epoch_start(ectx(0))
    logs = m.update(*batch(), ctx())
    assert {"beta_audio", "beta_visual", "loss_audio", "loss_visual"} <= set(logs)


def test_three_modalities_step():
    m = make(SHAPES3, beta=[0.95, 0.1])
    assert m.describe_run()["inforeg_beta"] == [0.95, 0.1, 0.1]
    m.on_epoch_start(ectx(0))
    m.update(*batch(SHAPES3), ctx())
    logs = m.update(*batch(SHAPES3, seed=2), ctx(step=1))
    nonzero = [mod for mod in SHAPES3 if float(logs[f"beta_{mod}"]) > 0]
    assert len(nonzero) == 1
    assert nonzero[0] == max(SHAPES3, key=lambda mod: float(logs[f"score_{mod}"]))


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_hparams_rejected():
    hp = METHODS.get("inforeg").HParams
    with pytest.raises(ValidationError):
        hp(beta=[-1.0, 0.1])
    with pytest.raises(ValidationError):
        hp(beta=[])
    with pytest.raises(ValidationError):
        hp(window_history=0)


@pytest.mark.parametrize("hp, fusion, needle", [
    ({"window_modality": "depth"}, "concat", "window_modality"),
    ({"beta": [1.0, 1.0, 1.0]}, "concat", "beta"),
    ({}, "film", "fusion"),
])
def test_check_refuses(hp, fusion, needle):
    cls = METHODS.get("inforeg")
    spec = ModelSpec(backbone="tiny", fusion=fusion, input_shapes=dict(SHAPES), num_classes=4)
    with pytest.raises(UserError, match=needle):
        cls.check(spec, cls.HParams(**hp))


@pytest.mark.parametrize("entry, needle", [
    ("{name: inforeg, beta: [-0.5, 0.1]}", "beta"),
    ("{name: inforeg, window_modality: depth}", "window_modality"),  # checked against the dataset's modalities
    ("{name: inforeg, beta: [1.0, 1.0, 1.0]}", "beta"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_cli_bad_parameters_exit_2(mm_env: Path, cli, entry: str, needle: str, dry: bool) -> None:
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=f"[{entry}]"), *(["--dry-run"] if dry else []))
    assert code == 2, out
    assert needle in out
    assert not (mm_env / "runs").exists() and not (mm_env / "results.db").exists()


# ---- end to end -----------------------------------------------------------------------------------
def test_end_to_end_two_epochs(mm_env: Path, cli) -> None:
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods="[{name: inforeg}]"))
    assert code == 0, out
    con = sqlite3.connect(mm_env / "results.db")
    status = con.execute("select status from run where method = 'inforeg'").fetchall()
    rows = con.execute("select epoch, name, value from epoch_metric where name like 'method/%'").fetchall()
    con.close()
    assert status == [("completed",)]
    got = {(e, n): v for e, n, v in rows}
    assert got[(0, "method/window_k")] == 1.0
    assert got[(1, "method/window_k")] == 1.0  # epoch 1: (t0/10 - 0) / (t0/10)
    assert got[(0, "method/fisher_trace")] > 0
    assert got[(0, "method/beta_audio")] + got[(0, "method/beta_visual")] > 0


def test_per_loss_backward_matches_summed():
    grads = {}
    for mode in ("summed", "per-loss"):
        m = make(backward=mode)
        m.on_epoch_start(ectx(0))
        m.update(*batch(), ctx())
        m.update(*batch(seed=2), ctx(step=1))
        grads[mode] = {n: p.grad.clone() for n, p in m.model.named_parameters()}
        assert m.describe_run()["backward_passes"] == (1 if mode == "summed" else 3)
    for n, g in grads["summed"].items():
        torch.testing.assert_close(grads["per-loss"][n], g, rtol=1e-4, atol=1e-6)


def test_synthetic_three_end_to_end(mm_env: Path, cli) -> None:
    """Three modalities (audio, visual, 1-D text) through the CLI: per-modality metrics and betas for all."""
    r = mm_env / "r3.yaml"
    r.write_text(THREE.format(method="{name: inforeg, beta: [0.95, 0.1, 0.1]}"))
    code, out = cli("sweep", r)
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as c:
        (status,) = c.execute("select status from run").fetchone()
        finals = {n for (n,) in c.execute("select name from final_metric where split='test' and selection='best-val'")}
        logged = {n for (n,) in c.execute("select distinct name from epoch_metric where name like 'method/%'")}
    assert status == "completed"
    assert {"acc/audio", "acc/visual", "acc/text"} <= finals
    assert {f"method/{k}_{m}" for k in ("beta", "score", "loss") for m in ("audio", "visual", "text")} <= logged


THREE = """
name: three
dataset: {{name: synthetic, protocol: three}}
model: {{backbone: tiny, fusion: concat}}
train:
  epochs: 2
  batch_size: 32
  optimizer: {{name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 1.0e-4}}
methods: [{method}]
seeds: [0]
"""
