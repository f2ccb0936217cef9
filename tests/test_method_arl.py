"""ARL (docs/methods/arl.md): variance / bias statistics, the coefficients, the gradient scaling, the loss."""
from __future__ import annotations

import copy
import math
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, write_recipe
from pydantic import ValidationError

from mmbench.errors import UserError
from mmbench.methods.arl import auxiliary_logits, coefficients, variance_and_bias
from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(shapes: dict | None = None, fusion: str = "concat", **hp: object):
    torch.manual_seed(0)
    cls = METHODS.get("arl")
    spec = ModelSpec(backbone="tiny", fusion=fusion, input_shapes=dict(shapes or SHAPES), num_classes=4)
    m = cls(spec, cls.HParams(**hp), TrainSpec(epochs=10, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
                                               scheduler={"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(shapes: dict | None = None, b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return ({k: torch.randn(b, *s, generator=g) for k, s in (shapes or SHAPES).items()},
            torch.randint(0, 4, (b,), generator=g))


def ctx(epoch: int, step: int = 0) -> StepContext:
    return StepContext(epoch=epoch, step=step, steps_per_epoch=4, num_epochs=10)


def test_variance_is_mean_entropy_and_bias_is_mean_abs_logit():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    ent, bias = variance_and_bias({"audio": z, "visual": -2 * z})
    h1 = math.log(2.0)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ent["audio"] == pytest.approx((h1 + h2) / 2, rel=1e-6)
    assert float(bias["audio"]) == pytest.approx(math.log(3.0) / 2, rel=1e-6)
    assert float(bias["visual"]) == pytest.approx(math.log(3.0), rel=1e-6)
    assert bias["audio"].dtype == np.float32


def test_coefficients_by_hand():
    # normalised entropies 0.25 / 0.75 -> floor 0.3 -> inverse-variance dependences 5/7, 2/7;
    # biases 0.75 / 0.25; s_audio = B_visual a_audio T, s_visual = B_audio a_visual T
    w, a = coefficients({"audio": 1.0, "visual": 3.0}, {"audio": np.float32(3.0), "visual": np.float32(1.0)}, 8.0, 0.3)
    assert a["audio"] == pytest.approx(5 / 7, rel=1e-6) and a["visual"] == pytest.approx(2 / 7, rel=1e-6)
    s_a, s_v = 0.25 * 5 / 7 * 8, 0.75 * 2 / 7 * 8
    assert w["audio"] == pytest.approx(1 / (1 + math.exp(s_v - s_a)), rel=1e-5)
    assert w["audio"] + w["visual"] == pytest.approx(1.0, rel=1e-6)


def test_coefficients_three_modalities_use_the_others_bias():
    ent = {"audio": 1.0, "visual": 1.0, "text": 1.0}
    bias = {"audio": np.float32(2.0), "visual": np.float32(1.0), "text": np.float32(1.0)}
    w, a = coefficients(ent, bias, 1.0, 0.3)
    assert all(x == pytest.approx(1 / 3, rel=1e-6) for x in a.values())
    s = {"audio": 0.5 / 3, "visual": 0.75 / 3, "text": 0.75 / 3}
    total = sum(math.exp(x) for x in s.values())
    for m in ent:
        assert w[m] == pytest.approx(math.exp(s[m]) / total, rel=1e-5)


def test_auxiliary_logits_share_the_concat_head():
    m = make()
    inputs, _ = batch()
    with torch.no_grad():
        feats = m.model.encode(inputs)
        aux = auxiliary_logits(m.model.fusion, feats)
        fc = m.model.fusion.fc
        d = feats["audio"].shape[1]
    torch.testing.assert_close(aux["audio"], feats["audio"] @ fc.weight[:, :d].t() + fc.bias)
    torch.testing.assert_close(aux["visual"], feats["visual"] @ fc.weight[:, d:].t() + fc.bias)


def reference_grads(model, inputs, y, gamma: float, scale: dict[str, float]):
    """Gradients of CE(fused) + gamma * sum CE(aux) with each encoder's gradient scaled by (1 + scale)."""
    model.zero_grad()
    feats = model.encode(inputs)
    for k, f in feats.items():
        f.register_hook(lambda g, s=scale[k]: g * (1 + s))
    fused = model.fusion(feats)
    d = feats["audio"].shape[1]
    fc = model.fusion.fc
    aux = {"audio": feats["audio"] @ fc.weight[:, :d].t() + fc.bias,
           "visual": feats["visual"] @ fc.weight[:, d:].t() + fc.bias}
    loss = F.cross_entropy(fused, y) + gamma * (F.cross_entropy(aux["audio"], y) + F.cross_entropy(aux["visual"], y))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, aux


def grads_of_update(m, inputs, y, c):
    m.optimizer_step = lambda: None  # keep the gradients the step would use
    logs = m.update(inputs, y, c)
    return {n: p.grad.clone() for n, p in m.model.named_parameters()}, logs


@pytest.mark.parametrize("weights", ["paper", "code"])
def test_warm_up_is_plain_unimodal_losses_without_scaling(weights):
    m = make(weights=weights, start=2, clip_norm=None)
    ref = copy.deepcopy(m.model)
    inputs, y = batch()
    got, logs = grads_of_update(m, inputs, y, ctx(2))
    want, _ = reference_grads(ref, inputs, y, 1.0, {"audio": 0.0, "visual": 0.0})
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert logs["scale_audio"] == 0.0 and m.scale == {"audio": 0.5, "visual": 0.5}


def test_paper_applies_the_previous_steps_coefficients():
    m = make(weights="paper", start=0, clip_norm=None, gamma=4.0)
    inputs, y = batch()
    # first step after warm-up: the encoders still read 0.5 (what the warm-up set)
    ref = copy.deepcopy(m.model)
    got, logs = grads_of_update(m, inputs, y, ctx(1))
    want, aux = reference_grads(ref, inputs, y, 4.0, {"audio": 0.5, "visual": 0.5})
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    w, _ = coefficients(*variance_and_bias(aux), 8.0, 0.3)
    assert m.scale == pytest.approx(w) and logs["coef_audio"] == pytest.approx(w["audio"])
    assert w["audio"] != pytest.approx(0.5, abs=1e-3)  # the coefficients really differ from the code's 0.5
    # next step: those coefficients scale the encoders' gradients
    ref = copy.deepcopy(m.model)
    got, logs = grads_of_update(m, inputs, y, ctx(1, 1))
    want, _ = reference_grads(ref, inputs, y, 4.0, w)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert logs["scale_audio"] == pytest.approx(w["audio"])


def test_code_keeps_one_and_a_half_whatever_the_coefficients():
    m = make(weights="code", start=0, clip_norm=None)
    inputs, y = batch()
    for step in range(2):
        ref = copy.deepcopy(m.model)
        got, logs = grads_of_update(m, inputs, y, ctx(1, step))
        want, _ = reference_grads(ref, inputs, y, 4.0, {"audio": 0.5, "visual": 0.5})
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
        assert logs["scale_audio"] == 0.5 and logs["coef_audio"] != pytest.approx(0.5, abs=1e-3)
    assert m.describe_run()["weights"].startswith("code")


def test_clipping_bounds_the_gradient_norm():
    m = make(start=0, clip_norm=1e-3)
    got, _ = grads_of_update(m, *batch(), ctx(1))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in got.values()]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-4)


def test_state_round_trip():
    m = make(start=0)
    m.update(*batch(), ctx(1))
    state = m.extra_state()
    n = make(start=0)
    n.load_extra_state(state)
    assert n.scale == m.scale


@pytest.mark.parametrize("fusion", ["sum", "shared"])
def test_branch_head_fusions(fusion):
    m = make(fusion=fusion, start=0)
    logs = m.update(*batch(), ctx(1))
    assert math.isfinite(logs["coef_visual"]) and m.describe_run()["auxiliary"] == "branch-head"


def test_three_modalities():
    three = {**SHAPES, "depth": [1, 8, 8]}
    m = make(three, start=0)
    m.update(*batch(three), ctx(1))
    logs = m.update(*batch(three), ctx(1, 1))
    assert {"coef_audio", "coef_visual", "coef_depth", "loss_depth"} <= set(logs)
    assert sum(logs[f"scale_{k}"] for k in three) == pytest.approx(1.0, rel=1e-5)


def test_bad_parameters():
    cls = METHODS.get("arl")
    for bad in ({"weights": "released"}, {"gamma": -1}, {"temperature": 0}, {"entropy_floor": 1.0}, {"start": -1},
                {"clip_norm": 0}):
        with pytest.raises(ValidationError):
            cls.HParams(**bad)
    with pytest.raises(UserError, match="cannot serve fusion"):
        cls.check(ModelSpec("tiny", "film", dict(SHAPES), 4), cls.HParams())


def test_cli_bad_parameter_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: arl, weights: official}]")
    assert run_cli(monkeypatch, "sweep", str(recipe), "--dry-run", "--db", f"sqlite:///{tmp_path / 'r.db'}") == 2


def test_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: arl, start: 0}, {name: arl, start: 0, weights: code}]")
    db = tmp_path / "results.db"
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu") == 0
    con = sqlite3.connect(db)
    status = con.execute("select status from run where method = 'arl'").fetchall()
    names = {r[0] for r in con.execute("select distinct name from epoch_metric")}
    con.close()
    assert status == [("completed",), ("completed",)]
    assert {"acc/audio", "acc/visual", "method/coef_audio", "method/scale_visual", "method/loss_audio"} <= names


THREE = """
name: three
dataset: {name: synthetic, protocol: three}
model: {backbone: tiny, fusion: concat}
train:
  epochs: 2
  batch_size: 32
  optimizer: {name: sgd, lr: 0.01, momentum: 0.9}
methods: [{name: arl, start: 0}]
seeds: [0]
"""


def test_synthetic_three(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(THREE)
    db = tmp_path / "r.db"
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu") == 0
    con = sqlite3.connect(db)
    status = con.execute("select status from run where method = 'arl'").fetchall()
    names = {n for (n,) in con.execute("select distinct name from epoch_metric")}
    con.close()
    assert status == [("completed",)]
    assert {"acc/text", "method/coef_text", "method/scale_text", "imbalance_ratio"} <= names


def test_official_recipe_dry_runs(cli, mm_env):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "arl.yaml"
    code, out = cli("sweep", str(recipe), "--dry-run")
    assert code == 0, out
    assert "weights=paper" in out and "weights=code" in out
