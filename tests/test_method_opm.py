"""OPM / journal OGM (docs/methods/opm.md): drop probabilities, masks, scaling, warm-up, the OGM branch."""
from __future__ import annotations

import copy
import math
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import method_util
from conftest import run_cli, write_recipe
from pydantic import ValidationError

from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec, StepContext
from mmbench.methods.opm import drop_masks, drop_probabilities, drop_scale, lead_ratios

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(shapes: dict | None = None, fusion: str = "concat", **hp: object):
    return method_util.make("opm", fusion, shapes or SHAPES, epochs=10,
                            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, **hp)


def batch(shapes: dict | None = None, b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return ({k: torch.randn(b, *s, generator=g) for k, s in (shapes or SHAPES).items()},
            torch.randint(0, 4, (b,), generator=g))


def ctx(epoch: int) -> StepContext:
    return StepContext(epoch=epoch, step=0, steps_per_epoch=4, num_epochs=10)


# ---- the rule -------------------------------------------------------------------------------
def test_drop_probability_only_for_the_leader():
    s = {"audio": torch.tensor(6.0), "visual": torch.tensor(2.0)}
    q = drop_probabilities(s, q_base=0.5, lam=0.5)
    assert float(q[0]) == pytest.approx(0.5 * (1 + 0.5 * math.tanh(2.0)))  # 6/2 - 1 = 2
    assert float(q[1]) == 0.0


def test_drop_probability_is_clipped_and_tied_scores_drop_nothing():
    q = drop_probabilities({"a": torch.tensor(100.0), "v": torch.tensor(1.0)}, q_base=0.9, lam=1.0)
    assert float(q[0]) == 1.0
    assert drop_probabilities({"a": torch.tensor(3.0), "v": torch.tensor(3.0)}, 0.5, 0.5).tolist() == [0.0, 0.0]


def test_three_modalities_compare_with_the_sum_of_the_others():
    r = lead_ratios({"a": torch.tensor(5.0), "v": torch.tensor(1.0), "t": torch.tensor(2.0)})
    assert float(r["a"]) == pytest.approx(math.tanh(5 / 3 - 1))
    assert float(r["v"]) == 0.0 and float(r["t"]) == 0.0


def test_masks_follow_the_codes_draw_order():
    q = torch.tensor([0.3, 0.6])
    torch.manual_seed(5)
    masks = drop_masks(q, 6)
    torch.manual_seed(5)
    raw = torch.distributions.Bernoulli(1 - q).sample([6, 1])  # (B, 1, M) as the code draws it
    assert torch.equal(masks, raw[:, 0, :].t())


def test_drop_scale():
    q = torch.tensor([0.5, 0.0])
    assert drop_scale(q, [512, 512]) == pytest.approx(0.75)
    assert drop_scale(q, [100, 300]) == pytest.approx(1 - 50 / 400)


# ---- the step -------------------------------------------------------------------------------
def test_warmup_is_plain_joint_training():
    m = make(warmup_epochs=2)
    ref = copy.deepcopy(m.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    inputs, y = batch()
    F.cross_entropy(ref(inputs).logits, y).backward()
    opt.step()
    logs = m.update(inputs, y, ctx(1))
    assert "q_audio" not in logs
    for (n, a), (_, b) in zip(m.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, msg=n)


def test_step_drops_features_of_the_sampled_modalities():
    """Hand-derived: masks from the same generator state, scaled kept features, lost samples removed."""
    m = make(warmup_epochs=0, p_exe=1.0, q_base=0.9, lam=1.0)
    ref = copy.deepcopy(m.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    inputs, y = batch(b=16)
    np.random.seed(0)
    torch.manual_seed(3)
    logs = m.update(inputs, y, ctx(0))
    # the reference
    feats = ref.encode(inputs)
    with torch.no_grad():
        split = ref.fusion.split_logits({k: f.detach() for k, f in feats.items()})
        s = {k: torch.softmax(split[k], 1).gather(1, y[:, None]).sum() for k in ("audio", "visual")}
    q = drop_probabilities(s, 0.9, 1.0)
    assert q.max() > 0
    torch.manual_seed(3)
    keep = drop_masks(q, 16)
    alive = keep.sum(0) > 0
    scale = 1 - float((q * torch.tensor([f.shape[1] for f in feats.values()])).sum() / sum(f.shape[1] for f in feats.values()))
    kept = {k: (feats[k] * keep[i][:, None] / scale)[alive] for i, k in enumerate(("audio", "visual"))}
    F.cross_entropy(ref.fusion(kept), y[alive]).backward()
    opt.step()
    for (n, a), (_, b) in zip(m.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, msg=n)
    assert float(logs["drop_executed"]) == 1.0 and 0 < float(logs["kept_samples"]) <= 1


def test_no_drop_when_the_draw_says_so():
    m = make(warmup_epochs=0, p_exe=0.0)
    logs = m.update(*batch(), ctx(0))
    assert logs["drop_executed"] == 0.0 and "kept_samples" not in logs


def test_step_skipped_when_every_sample_lost_every_modality():
    m = make(warmup_epochs=0, p_exe=1.0, q_base=1.0, lam=0.0)
    m.model.fusion.fc.weight.data.zero_()
    before = copy.deepcopy(m.model.state_dict())
    # make both modalities "lead": impossible for two, so force q = 1 for both through a patched rule
    import mmbench.methods.opm as opm

    orig = opm.drop_probabilities
    opm.drop_probabilities = lambda *a, **k: torch.ones(2)
    try:
        logs = m.update(*batch(), ctx(0))
    finally:
        opm.drop_probabilities = orig
    assert logs.get("skipped") == 1.0 and "loss" not in logs
    after = m.model.state_dict()
    for k, v in before.items():
        if "running" not in k and "num_batches" not in k:  # BN saw the forward, as in the code
            assert torch.equal(v, after[k]), k


def test_ogm_mode_modulates_after_warmup_only():
    inputs, y = batch()
    for epoch, modulated in ((0, False), (6, True), (61, False)):
        m = make(mode="ogm", ge=False, alpha=2.0)
        ref = copy.deepcopy(m.model)
        F.cross_entropy(ref(inputs).logits, y).backward()
        plain = {n: p.grad.clone() for n, p in ref.named_parameters()}
        grads: dict[str, torch.Tensor] = {}
        h = m.optimizer.register_step_pre_hook(lambda o, *a: grads.update({n: p.grad.clone() for n, p in m.model.named_parameters()}))
        logs = m.update(inputs, y, ctx(epoch))
        h.remove()
        conv = [n for n, g in plain.items() if g.dim() == 4]
        changed = any(not torch.allclose(grads[n], plain[n], rtol=1e-5, atol=1e-7) for n in conv)
        assert changed == modulated, epoch
        assert {"k_audio", "k_visual", "ratio"} <= set(logs)


def test_ogm_plus_boosts_the_weaker_modality():
    m = make(mode="ogm", ge=False, plus=True)
    logs = m.update(*batch(), ctx(6))
    assert sorted([logs["k_audio"], logs["k_visual"]]) == [1.0, 4.0]


# ---- bad input ------------------------------------------------------------------------------
def test_bad_parameters_and_unsupported_settings():
    cls = METHODS.get("opm")
    with pytest.raises(ValidationError):
        cls.HParams(q_base=1.5)
    with pytest.raises(ValidationError):
        cls.HParams(modulation_starts=5, modulation_ends=2)
    with pytest.raises(UserError, match="cannot serve fusion"):
        cls.check(ModelSpec("tiny", "film", dict(SHAPES), 4), cls.HParams())
    three = {**SHAPES, "depth": [1, 8, 8]}
    with pytest.raises(UserError, match="two"):
        cls.check(ModelSpec("tiny", "concat", three, 4), cls.HParams(mode="ogm"))
    cls.check(ModelSpec("tiny", "concat", three, 4), cls.HParams())  # opm itself serves three


def test_three_modality_step():
    three = {**SHAPES, "depth": [1, 8, 8]}
    m = make(three, warmup_epochs=0, p_exe=1.0)
    logs = m.update(*batch(three), ctx(0))
    assert {"q_audio", "q_visual", "q_depth"} <= set(logs)


def test_cli_bad_parameter_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: opm, p_exe: 2}]")
    assert run_cli(monkeypatch, "sweep", str(recipe), "--dry-run", "--db", f"sqlite:///{tmp_path / 'r.db'}") == 2


# ---- end to end -----------------------------------------------------------------------------
def test_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: opm, warmup_epochs: 1}, {name: opm, mode: ogm, warmup_epochs: 1}]")
    db = tmp_path / "results.db"
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu") == 0
    con = sqlite3.connect(db)
    n = con.execute("select count(*) from run where method = 'opm' and status = 'completed'").fetchone()[0]
    names = {r[0] for r in con.execute("select distinct name from epoch_metric where name like 'method/%'")}
    con.close()
    assert n == 2
    assert {"method/q_audio", "method/drop_executed", "method/k_audio"} <= names


def test_official_theta_gradient_is_theta_times_its_derivative():
    """`theta_grad: official` adds exactly theta * d(theta)/d(params) to the fused loss's gradient."""
    inputs, y = batch(b=16)
    grads = {}
    for tg in ("none", "official"):
        m = make(warmup_epochs=0, p_exe=1.0, q_base=0.5, lam=1.0, theta_grad=tg)
        h = m.optimizer.register_step_pre_hook(lambda o, *a, tg=tg, m=m: grads.__setitem__(
            tg, {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}))
        np.random.seed(0)
        torch.manual_seed(3)
        m.update(inputs, y, ctx(0))
        h.remove()
    # the analytic extra term on a fresh copy
    m = make(warmup_epochs=0, p_exe=1.0, q_base=0.5, lam=1.0)
    feats = m.model.encode(inputs)
    from mmbench.methods.opm import detached_split, drop_theta

    split = detached_split(m.model.fusion, feats)
    s = {k: torch.softmax(split[k], 1).gather(1, y[:, None]).sum() for k in ("audio", "visual")}
    theta = drop_theta(drop_probabilities(s, 0.5, 1.0), [feats[k].shape[1] for k in ("audio", "visual")])
    assert theta.requires_grad and float(theta) > 0
    (theta * theta.detach()).backward()
    extra = {n: p.grad for n, p in m.model.named_parameters() if p.grad is not None}
    name = "encoders.audio.trunk.net.0.weight"
    torch.testing.assert_close(grads["official"][name] - grads["none"][name], extra[name], rtol=1e-4, atol=1e-7)
    assert extra[name].abs().max() > 0
