"""ReconBoost (METHODS.md §6.7): the reconcilement loss, the stage schedule, what each phase trains, M = 3,
bad input, and a 2-epoch run through the CLI."""
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
from mmbench.methods.reconboost import reconcile_loss

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}
SHAPES3 = {**SHAPES, "depth": [1, 8, 8]}


def make(shapes=SHAPES, **hp: object):
    torch.manual_seed(0)
    cls = METHODS.get("reconboost")
    spec = ModelSpec(backbone="tiny", fusion="sum", input_shapes=dict(shapes), num_classes=4)
    h = cls.HParams(**{"epochs_per_stage": 1, "correct_epochs": 1, **hp})
    cls.check(spec, h)
    train = TrainSpec(epochs=6, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}, scheduler={"name": "none"})
    cls.check_train(train, h)
    m = cls(spec, h, train)
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(shapes=SHAPES, b: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, *s, generator=g) for k, s in shapes.items()}, torch.randint(0, 4, (b,), generator=g)


def start(m, epoch: int) -> None:
    m.on_epoch_start(EpochContext(epoch, 6, 1, torch.device("cpu")))


def ctx(epoch: int) -> StepContext:
    return StepContext(epoch=epoch, step=0, steps_per_epoch=1, num_epochs=6)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- the loss -------------------------------------------------------------------------------------
def test_reconcile_loss_is_a_ce_weighted_by_the_others_confidence():
    out = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 1])
    q = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    got = reconcile_loss(out, q, y, 5.0, 1.0)
    logp = out.log_softmax(1)[torch.arange(2), y]
    want = -(5.0 - 1.0 * torch.tensor([0.7, 0.3])) / 3 * logp
    torch.testing.assert_close(got, want)


def test_empty_ensemble_gives_q_one():
    out = torch.tensor([[2.0, 0.0, -1.0]])
    got = reconcile_loss(out, torch.ones(1, 1), torch.tensor([2]), 5.0, 1.0)
    assert float(got) == pytest.approx(-(5.0 - 1.0) / 3 * float(out.log_softmax(1)[0, 2]))


# ---- the schedule -----------------------------------------------------------------------------------
def test_stage_schedule_and_members():
    m = make(epochs_per_stage=2, correct_epochs=1)
    assert [m.position(e) for e in range(7)] == [
        (0, 1, "audio"), (0, 1, "audio"), (0, 2, "audio"), (1, 1, "visual"), (1, 1, "visual"), (1, 2, "visual"), (2, 1, "audio")]
    assert m.members_at(0, 1) == [] and m.members_at(0, 2) == ["audio"]
    assert m.members_at(1, 1) == ["audio"] and m.members_at(1, 2) == ["audio", "visual"]
    assert m.members_at(2, 2) == ["visual", "audio"]  # a re-added member moves to the end, as the code's list


def test_lr_decays_per_stage():
    m = make(lr_decay_every=2, lr_decay=0.1, ensemble_lr=0.02)
    assert m.stage_lrs(0) == (0.05, 0.02) and m.stage_lrs(1) == (0.05, 0.02)
    lr2 = m.stage_lrs(2)
    assert lr2[0] == pytest.approx(0.005) and lr2[1] == pytest.approx(0.002)


# ---- what each phase trains -------------------------------------------------------------------------
def test_phase1_trains_only_its_encoder_and_the_head_against_the_others():
    m = make()
    for e in (0, 1):  # stage 0: audio alone, then joins the ensemble
        start(m, e)
        m.update(*batch(seed=e), ctx(e))
    start(m, 2)  # stage 1, phase 1: visual against audio
    assert m.model.members == ["audio"]
    inputs, y = batch(seed=5)
    ref = copy.deepcopy(m.model)
    before = {k: snapshot(getattr(m.model, k)) for k in ("encoders", "head")}
    beta0 = float(m.model.boost_rate.detach())
    # the expected gradient, by hand: q from audio in train mode, then visual's loss
    with torch.no_grad():
        q = (ref.boost_rate * ref.head(ref.encoders["audio"](inputs["audio"]))).softmax(1)
    out_v = ref.head(ref.encoders["visual"](inputs["visual"]))
    logp = out_v.log_softmax(1)[torch.arange(len(y)), y]
    (-(5.0 - q[torch.arange(len(y)), y]) / 4 * logp).mean().backward()
    logs = m.update(inputs, y, ctx(2))
    assert "ga_loss" in logs
    for n, p in m.model.head.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.head.named_parameters())[n].grad, rtol=1e-5, atol=1e-7)
    for n, p in m.model.encoders["visual"].named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.encoders["visual"].named_parameters())[n].grad, rtol=1e-5, atol=1e-7)
    audio_now = snapshot(m.model.encoders["audio"])
    for k, v in before["encoders"].items():
        if k.startswith("audio."):
            name = k[len("audio."):]
            if "running" in name or "num_batches" in name:
                continue
            assert torch.equal(audio_now[name], v)  # audio's weights are not trained in visual's phase 1
    assert any(not torch.equal(audio_now[k[len("audio."):]], v) for k, v in before["encoders"].items()
               if k.startswith("audio.") and "running_mean" in k)  # but its BN statistics move (train-mode forwards)
    assert float(m.model.boost_rate) == beta0


def test_phase2_trains_members_head_and_beta_on_the_ensemble_ce():
    m = make()
    start(m, 0)
    m.update(*batch(), ctx(0))
    start(m, 1)
    inputs, y = batch(seed=3)
    ref = copy.deepcopy(m.model)
    F.cross_entropy(ref.boost_rate * ref.head(ref.encoders["audio"](inputs["audio"])), y).backward()
    logs = m.update(inputs, y, ctx(1))
    assert m.model.members == ["audio"]
    torch.testing.assert_close(m.model.boost_rate.grad, ref.boost_rate.grad)
    assert all(p.grad is None for p in m.model.encoders["visual"].parameters())  # not a member yet
    assert float(logs["boost_rate"]) != 1.0


def test_prediction_is_beta_times_sum_over_members():
    m = make()
    for e in range(4):
        start(m, e)
        m.update(*batch(seed=e), ctx(e))
    m.eval()
    inputs, _ = batch(seed=9)
    out = m.predict(inputs)
    with torch.no_grad():
        la = m.model.head(m.model.encoders["audio"](inputs["audio"]))
        lv = m.model.head(m.model.encoders["visual"](inputs["visual"]))
    torch.testing.assert_close(out.logits, m.model.boost_rate * (la + lv))
    torch.testing.assert_close(out.modality_logits["visual"], lv)


def test_three_modalities_cycle():
    m = make(SHAPES3)
    assert [m.position(2 * s)[2] for s in range(4)] == ["audio", "visual", "depth", "audio"]
    for e in range(6):
        start(m, e)
        logs = m.update(*batch(SHAPES3, seed=e), ctx(e))
        assert math.isfinite(float(logs["loss"]))
    assert m.model.members == ["audio", "visual", "depth"]


def test_resume_rebuilds_the_phase_optimizer():
    m = make()
    for e in range(3):
        start(m, e)
        m.update(*batch(seed=e), ctx(e))
    state, opt = m.extra_state(), m.optimizer.state_dict()
    m2 = make()
    m2.load_extra_state(state)
    m2.optimizer.load_state_dict(opt)
    assert m2.model.members == m.model.members and m2.phase_key == m.phase_key
    assert len(m2.optimizer.param_groups[0]["params"]) == len(m.optimizer.param_groups[0]["params"])


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_hparams_rejected():
    hp = METHODS.get("reconboost").HParams
    for bad in ({"epochs_per_stage": 0}, {"weight1": -1.0}, {"lr_decay": 0.0}, {"ensemble_lr": 0.0}):
        with pytest.raises(ValidationError):
            hp(**bad)


def test_refuses_a_scheduler_and_other_fusions():
    cls = METHODS.get("reconboost")
    with pytest.raises(UserError, match="scheduler"):
        cls.check_train(TrainSpec(2, {"name": "sgd"}, {"name": "step"}), cls.HParams())
    with pytest.raises(UserError, match="fusion"):
        cls.check(ModelSpec("tiny", "concat", dict(SHAPES), 4), cls.HParams())


def test_cli_bad_parameters_exit_2(mm_env: Path, cli) -> None:
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods="[{name: reconboost, epochs_per_stage: 0}]"), "--dry-run")
    assert code == 2, out
    assert "epochs_per_stage" in out
    assert not (mm_env / "runs").exists() and not (mm_env / "results.db").exists()


# ---- end to end -----------------------------------------------------------------------------------
RECIPE = """
name: rb
dataset: {name: synthetic, protocol: tiny}
model: {backbone: tiny, fusion: sum}
train:
  epochs: 2
  batch_size: 32
  optimizer: {name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 5.0e-4}
methods: [{name: reconboost, epochs_per_stage: 1, correct_epochs: 1}]
seeds: [0]
"""


def test_end_to_end_two_epochs(mm_env: Path, cli) -> None:
    (mm_env / "r.yaml").write_text(RECIPE)
    code, out = cli("sweep", mm_env / "r.yaml")
    assert code == 0, out
    con = sqlite3.connect(mm_env / "results.db")
    status = con.execute("select status from run where method = 'reconboost'").fetchall()
    rows = con.execute("select epoch, name, value from epoch_metric where name like 'method/%'").fetchall()
    con.close()
    assert status == [("completed",)]
    got = {(e, n): v for e, n, v in rows}
    assert got[(0, "method/phase")] == 1 and got[(1, "method/phase")] == 2
    assert got[(0, "method/members")] == 0 and got[(1, "method/members")] == 1
    assert (1, "method/boost_rate") in got


def test_synthetic_three_end_to_end(mm_env: Path, cli) -> None:
    """Three modalities (audio, visual, 1-D text), one stage each, through the CLI."""
    (mm_env / "r3.yaml").write_text(RECIPE.replace("protocol: tiny", "protocol: three").replace("epochs: 2", "epochs: 6"))
    code, out = cli("sweep", mm_env / "r3.yaml")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as c:
        (status,) = c.execute("select status from run").fetchone()
        finals = {n for (n,) in c.execute("select name from final_metric where split='test' and selection='best-val'")}
        rows = c.execute("select epoch, name, value from epoch_metric where name like 'method/%'").fetchall()
    assert status == "completed"
    assert {"acc/audio", "acc/visual", "acc/text"} <= finals
    got = {(e, n): v for e, n, v in rows}
    assert [got[(e, "method/members")] for e in range(6)] == [0, 1, 1, 2, 2, 3]
    assert {(2 * s, f"method/train_{m}") for s, m in enumerate(("audio", "visual", "text"))} <= set(got)


@pytest.mark.parametrize("extra", ["", "\n  scheduler: {name: step, step_size: 30}"])
def test_cli_refuses_concat_or_a_scheduler(mm_env: Path, cli, extra: str) -> None:
    text = RECIPE.replace("fusion: sum", "fusion: concat") if not extra else RECIPE.replace(
        "weight_decay: 5.0e-4}", "weight_decay: 5.0e-4}" + extra)
    (mm_env / "r.yaml").write_text(text)
    code, out = cli("sweep", mm_env / "r.yaml", "--dry-run")
    assert code == 2, out
    assert ("fusion" if not extra else "scheduler") in out
    assert not (mm_env / "runs").exists() and not (mm_env / "results.db").exists()
