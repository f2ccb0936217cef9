"""Diagnosing & Re-learning (docs/methods/relearn.md): purity, k-means diagnosis on scaled features,
tanh weights, soft re-init of encoders only, schedule, resumable state, bad input, one run."""
from __future__ import annotations

import copy
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import write_recipe
from mmbench.methods.base import METHODS, EpochContext, ModelSpec, StepContext, TrainSpec
from mmbench.methods.relearn import is_diagnosis_epoch, kmeans_purity, purity, reinit_weight

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(seed: int = 0, **hp: object):
    torch.manual_seed(seed)
    cls = METHODS.get("relearn")
    spec = ModelSpec(backbone="tiny", fusion="concat", input_shapes=dict(SHAPES), num_classes=3)
    m = cls(spec, cls.HParams(**hp), TrainSpec(epochs=4, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
                                               scheduler={"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def raw_batches(n_batches: int = 3, b: int = 10, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{**{k: torch.randn(b, *s, generator=g) for k, s in SHAPES.items()},
             "label": torch.arange(b) % 3} for _ in range(n_batches)]


def fake_ctx(epoch: int, seen: list | None = None) -> EpochContext:
    def prepare(raw, train):
        if seen is not None:
            seen.append(train)
        return {k: raw[k] for k in SHAPES}, raw["label"]

    return EpochContext(epoch=epoch, num_epochs=100, steps_per_epoch=1, device=torch.device("cpu"),
                        loaders={"train": raw_batches(seed=1), "val": raw_batches(seed=2)}, prepare_batch=prepare)


# ---- purity and diagnosis -------------------------------------------------------------------
def test_purity_of_a_known_clustering():
    labels = np.array([3, 3, 3, 10, 10, 7])
    clusters = np.array([5, 5, 1, 1, 1, 9])  # {3,3} -> 2, {3,10,10} -> 2, {7} -> 1
    assert purity(labels, clusters) == pytest.approx(5 / 6)
    assert purity(labels, np.zeros(6, dtype=int)) == pytest.approx(3 / 6)
    assert purity(labels, np.arange(6)) == 1.0


def test_kmeans_purity_scales_features_to_minus_one_one():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    centres = np.array([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    informative = centres[y] + 0.05 * rng.standard_normal((120, 2))
    noise = rng.uniform(0, 1e4, size=(120, 1))  # a huge-range useless dimension
    x = np.concatenate([informative, noise], axis=1).astype(np.float32)
    # unscaled, k-means would cut along the noise dimension; scaled per dimension, the classes separate
    assert kmeans_purity(x, y, 3, "auto") == 1.0
    assert kmeans_purity(x[:, 2:], y, 3, "auto") < 0.6


@pytest.mark.parametrize("gap", [0.0, 0.1, -0.2, 0.5])
def test_weight_is_tanh_lambda_abs_gap(gap):
    assert reinit_weight(gap, 3.0) == pytest.approx(math.tanh(3.0 * abs(gap)))


def test_diagnose_uses_augmented_train_and_plain_val_in_eval_mode():
    m = make()
    seen: list[bool] = []
    bn = {n: b.clone() for n, b in m.named_buffers() if "running" in n}
    logs = m.diagnose(fake_ctx(20, seen))
    assert seen == [True] * 3 + [False] * 3
    assert m.training  # restored
    for n, b in m.named_buffers():
        if "running" in n:
            torch.testing.assert_close(b, bn[n])  # eval mode: no statistics update
    for mod in SHAPES:
        assert 0 < logs[f"purity_train_{mod}"] <= 1 and 0 < logs[f"purity_val_{mod}"] <= 1
        gap = abs(logs[f"purity_train_{mod}"] - logs[f"purity_val_{mod}"])
        assert logs[f"gap_{mod}"] == pytest.approx(gap)
        assert logs[f"w_{mod}"] == pytest.approx(math.tanh(3 * gap))


# ---- re-initialisation ----------------------------------------------------------------------
def test_soft_reinit_moves_encoders_only_and_keeps_bn_buffers_and_momentum():
    m = make()
    theta0 = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    x = {k: torch.randn(6, *s) for k, s in SHAPES.items()}
    for _ in range(2):
        m.update(x, torch.tensor([0, 1, 2, 0, 1, 2]), StepContext(0, 0, 1, 4))
    now = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    buffers = {n: b.clone() for n, b in m.model.named_buffers()}
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in m.optimizer.state.items()}
    assert momentum
    m.apply_reinit({"audio": 0.25, "visual": 0.5})
    for n, p in m.model.named_parameters():
        if n.startswith("encoders.audio."):
            want = 0.25 * theta0[n] + 0.75 * now[n]
        elif n.startswith("encoders.visual."):
            want = 0.5 * theta0[n] + 0.5 * now[n]
        else:
            want = now[n]  # the fusion head is untouched
        torch.testing.assert_close(p.detach(), want)
    assert any(not torch.equal(theta0[n], now[n]) for n in now if n.startswith("encoders.audio."))
    for n, b in m.model.named_buffers():
        torch.testing.assert_close(b, buffers[n])
    for p, s in m.optimizer.state.items():
        torch.testing.assert_close(s["momentum_buffer"], momentum[id(p)])


def test_init_snapshot_is_part_of_the_state_so_resume_reinits_toward_it():
    a = make(seed=0)
    b = make(seed=123)  # different random init
    b.load_state_dict(a.state_dict())
    b.load_extra_state(copy.deepcopy(a.extra_state()))
    for n, _ in a.model.encoders["audio"].named_parameters():
        torch.testing.assert_close(b.theta0.get("audio", n), a.theta0.get("audio", n))
    with torch.no_grad():
        for p in b.model.encoders["audio"].parameters():
            p.add_(1.0)
    b.apply_reinit({"audio": 1.0})  # w = 1: exactly theta0
    for n, p in b.model.encoders["audio"].named_parameters():
        torch.testing.assert_close(p.detach(), a.theta0.get("audio", n))


# ---- schedule -------------------------------------------------------------------------------
def test_schedule_defaults_reinit_after_epochs_20_40_60():
    assert [e for e in range(90) if is_diagnosis_epoch(e, 20, 3)] == [20, 40, 60]
    assert [e for e in range(90) if is_diagnosis_epoch(e, 15, 2)] == [15, 30]
    assert [e for e in range(90) if is_diagnosis_epoch(e, 20, 0)] == []


def test_reinit_is_applied_before_the_next_epoch_and_survives_a_checkpoint(monkeypatch):
    m = make(reinit_epoch=2, reinit_num=1)
    events: list[tuple[str, int]] = []
    monkeypatch.setattr(m, "diagnose", lambda ctx: events.append(("diagnose", ctx.epoch)) or
                        {"w_audio": 0.5, "w_visual": 0.25, "gap_audio": 0.1})
    monkeypatch.setattr(m, "apply_reinit", lambda w: events.append(("reinit", dict(w))))
    logs = {}
    for e in range(5):
        m.on_epoch_start(fake_ctx(e))
        logs[e] = m.on_epoch_end(fake_ctx(e))
        if e == 2:  # what the trainer checkpoints after epoch 2
            state = copy.deepcopy(m.extra_state())
    assert events == [("diagnose", 2), ("reinit", {"audio": 0.5, "visual": 0.25})]
    assert logs[2]["w_audio"] == 0.5 and logs[2]["reinit"] == 1.0
    assert all(logs[e] == {} for e in (0, 1, 3, 4))
    # a run resumed from epoch 2's checkpoint applies the pending re-init before epoch 3
    r = make(reinit_epoch=2, reinit_num=1)
    applied = []
    monkeypatch.setattr(r, "apply_reinit", lambda w: applied.append(dict(w)))
    r.load_extra_state(state)
    r.on_epoch_start(fake_ctx(3))
    assert applied == [{"audio": 0.5, "visual": 0.25}]


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"move_lambda": -1}, {"reinit_epoch": 0}, {"reinit_num": -1},
                                 {"kmeans_n_init": 0}, {"kmeans_n_init": "many"}, {"lambda": 3}])
def test_bad_parameters_rejected(bad):
    with pytest.raises(ValidationError):
        METHODS.get("relearn").HParams(**bad)


def test_kmeans_n_init_accepts_int_and_auto():
    hp = METHODS.get("relearn").HParams
    assert hp(kmeans_n_init=10).kmeans_n_init == 10 and hp().kmeans_n_init == "auto"


@pytest.mark.parametrize("entry,needle", [("[{name: relearn, reinit_every: 5}]", "unknown parameter"),
                                          ("[{name: relearn, reinit_epoch: 0}]", "reinit_epoch")])
def test_cli_bad_parameters_exit_2(mm_env: Path, cli, entry, needle):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=entry))
    assert code == 2 and needle in out
    assert not list(mm_env.rglob("config.json"))  # no run was started


# ---- end to end -----------------------------------------------------------------------------
def test_end_to_end_logs_the_diagnosis(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml", epochs=3, methods="[{name: relearn, reinit_epoch: 1, reinit_num: 1}]")
    code, out = cli("train", r, "--set", "train.eval_train=false")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as con:
        (rid, status, cfg), = con.execute("select id, status, config_json from run").fetchall()
        rows = con.execute("select epoch, name, value from epoch_metric where name like 'method/%'").fetchall()
        env = con.execute("select env_json from run").fetchone()[0]
    assert status == "completed"
    got = {(e, n): v for e, n, v in rows}
    assert {e for e, _ in got} == {1}  # one event, after epoch 1
    for mod in SHAPES:
        gap = got[(1, f"method/gap_{mod}")]
        assert gap == pytest.approx(abs(got[(1, f"method/purity_train_{mod}")] - got[(1, f"method/purity_val_{mod}")]))
        assert got[(1, f"method/w_{mod}")] == pytest.approx(math.tanh(3 * gap))
    assert '"kmeans_n_init": "auto"' in cfg and "kmeans_n_init" in env
    ck = torch.load(mm_env / "runs" / rid / "checkpoint.pt", weights_only=False)
    assert ck["extra"] == {"pending": {}}  # applied at the start of epoch 2
    assert any(k.startswith("theta0.audio__") for k in ck["method"])


def test_resume_across_a_pending_reinit_matches_an_uninterrupted_run(tmp_path: Path, tiny_data_dir: Path):
    """Cut after epoch 1 (diagnosed, re-init pending): the resumed run applies it from the checkpoint."""
    from mmbench.config import Recipe, expand
    from mmbench.engine.trainer import Trainer

    c = expand(Recipe.model_validate({
        "name": "r", "dataset": {"name": "synthetic", "protocol": "tiny"},
        "train": {"epochs": 3, "batch_size": 64, "eval_train": False},
        "methods": [{"name": "relearn", "reinit_epoch": 1, "reinit_num": 1}], "seeds": [0]}))[0]
    full = Trainer(c, tmp_path / "full", torch.device("cpu"), str(tiny_data_dir)).fit()

    class Stop(Exception):
        pass

    def stop(ev: dict) -> None:
        if ev["event"] == "epoch" and ev["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        Trainer(c, tmp_path / "cut", torch.device("cpu"), str(tiny_data_dir), progress=stop).fit()
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["extra"]["pending"]
    resumed = Trainer(c, tmp_path / "cut", torch.device("cpu"), str(tiny_data_dir)).fit()
    for split in ("val", "test"):
        for k, v in full.history[2]["metrics"][split].items():
            assert resumed.history[2]["metrics"][split][k] == pytest.approx(v, abs=1e-6), (split, k)
