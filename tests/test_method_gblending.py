"""G-Blending (Wang, Tran & Feiszli, CVPR 2020): the blend weights from probe losses, the blended step, the schedule."""
from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_recipe
from method_util import SHAPES3, batch, epoch_ctx, make, step_ctx

from mmbench.methods.gblending import FUSED, blend_weights


def test_weights_are_gain_over_squared_overfitting_change_normalised():
    start = {"a": (1.0, 1.2), "v": (1.0, 1.1), FUSED: (1.0, 1.3)}
    end = {"a": (0.5, 0.9), "v": (0.8, 1.0), FUSED: (0.2, 1.5)}
    w, gain, d_over = blend_weights(start, end, "abs")
    assert gain == pytest.approx({"a": 0.3, "v": 0.1, FUSED: -0.2})
    assert d_over == pytest.approx({"a": 0.2, "v": 0.1, FUSED: 1.0})
    raw = {"a": 0.3 / 0.04, "v": 0.1 / 0.01, FUSED: 0.2 / 1.0}
    z = sum(raw.values())
    assert w == pytest.approx({k: r / z for k, r in raw.items()})
    w0, _, _ = blend_weights(start, end, "zero")
    assert w0[FUSED] == 0.0 and w0["a"] == pytest.approx(7.5 / 17.5)


def test_weights_fall_back_to_uniform_when_no_head_generalises():
    start = {"a": (1.0, 1.0), FUSED: (1.0, 1.0)}
    end = {"a": (0.5, 1.1), FUSED: (0.5, 1.2)}
    w, _, _ = blend_weights(start, end, "zero")
    assert w == {"a": 0.5, FUSED: 0.5}


@pytest.mark.parametrize("heads, fusion, shapes", [("own", "concat", None), ("split", "concat", None),
                                                   ("split", "sum", None), ("own", "gated", None), ("own", "concat", SHAPES3)])
def test_step_is_the_weighted_sum_of_head_losses(heads, fusion, shapes):
    m = make("gblending", fusion=fusion, shapes=shapes, heads=heads)
    mods = list(m.modalities)
    m.weights = {k: w for k, w in zip([*mods, FUSED], [0.5, 0.3, 0.2, 0.1][: len(mods) + 1])}
    inputs, y = batch(shapes)
    model, own = copy.deepcopy(m.model), copy.deepcopy(m.heads)
    out = model(inputs)
    if heads == "own":
        per = {k: own[k](out.features[k]) for k in mods}
    else:
        per = model.fusion.split_logits(out.features)
    loss = m.weights[FUSED] * F.cross_entropy(out.logits, y) + sum(m.weights[k] * F.cross_entropy(per[k], y) for k in mods)
    loss.backward()
    seen = {}
    m.optimizer.register_step_pre_hook(lambda *_: seen.update({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    logs = m.update(inputs, y, step_ctx())
    ref = {**{f"model.{n}": p.grad for n, p in model.named_parameters()}, **{f"heads.{n}": p.grad for n, p in own.named_parameters()}}
    for n, g in ref.items():
        if g is not None:
            torch.testing.assert_close(seen[n], g, rtol=1e-5, atol=1e-7)
    assert float(logs["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)


def test_probe_trains_a_copy_and_leaves_the_model_alone():
    m = make("gblending", probe_epochs=2)
    data = [batch(seed=s) for s in range(3)]
    ctx = epoch_ctx(data, val=[batch(seed=9)])
    before = copy.deepcopy(m.state_dict())
    (t0, v0), (t1, v1) = m.probe("audio", ctx)
    for n, t in m.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert t1 < t0  # two epochs on three batches fit the training data
    assert v0 == pytest.approx(m.mean_loss(m.model, m.heads, "audio", ctx.loaders["val"], ctx))
    assert m.model.training


def test_schedule_online_and_offline():
    on = make("gblending", super_epoch=3)
    assert [e for e in range(7) if on.due(e)] == [0, 3, 6]
    off = make("gblending", mode="offline")
    assert off.due(0)
    data = [batch(seed=s) for s in range(2)]
    logs = off.on_epoch_start(epoch_ctx(data, val=[batch(seed=9)]))
    assert not off.due(0) and not off.due(10)
    assert sum(off.weights.values()) == pytest.approx(1.0)
    assert {"gain_audio", "d_overfit_fused"} <= set(logs)
    state = off.extra_state()
    again = make("gblending", mode="offline")
    again.load_extra_state(state)
    assert again.weights == off.weights and not again.due(5)


def test_end_to_end_two_epochs(mm_env: Path, cli):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods="[{name: gblending, super_epoch: 1, probe_epochs: 1}]"))
    assert code == 0, out
    con = sqlite3.connect(mm_env / "results.db")
    rows = con.execute("select epoch, name, value from epoch_metric where name like 'method/w_%'").fetchall()
    status = con.execute("select status from run where method = 'gblending'").fetchall()
    con.close()
    assert status == [("completed",)]
    for e in (0, 1):
        ws = [v for ep, _, v in rows if ep == e]
        assert len(ws) == 3 and sum(ws) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("entry, needle", [
    ("{name: gblending, super_epoch: 0}", "super_epoch"),
    ("{name: gblending, probe_epochs: 0}", "probe_epochs"),
    ("{name: gblending, mode: sometimes}", "mode"),
])
def test_bad_parameters_exit_2(mm_env: Path, cli, entry: str, needle: str):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=f"[{entry}]"), "--dry-run")
    assert code == 2, out
    assert needle in out
    assert not (mm_env / "runs").exists()


def test_split_heads_need_concat_or_sum_exit_2(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml", methods="[{name: gblending, heads: split}]")
    r.write_text(r.read_text().replace("fusion: concat", "fusion: gated"))
    code, out = cli("sweep", r)
    assert code == 2, out
    assert "heads" in out and "gated" in out
    assert not (mm_env / "runs").exists()
