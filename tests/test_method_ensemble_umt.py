"""ensemble / UME / UMT: the combination, the distillation, and the unimodal reference runs the
planner schedules for them."""
from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_recipe
from method_util import SHAPES2, SHAPES3, batch, make, step_ctx

from mmbench.errors import UserError
from mmbench.methods.ensemble import combine_predictions
from mmbench.methods.umt import distillation_losses


def references(shapes, seed=5):
    """Hand-built unimodal models (random weights), one per modality, in eval mode."""
    refs = {}
    for i, m in enumerate(shapes):
        torch.manual_seed(seed + i)
        refs[m] = make("unimodal", shapes=shapes, modality=m).eval()
    return refs


def test_combine_softmax_is_log_of_the_mean_probability():
    a = torch.tensor([[2.0, 0.0]])
    v = torch.tensor([[0.0, 0.0]])
    got = combine_predictions({"a": a, "v": v}, "softmax")
    p = (torch.softmax(a, 1) + torch.softmax(v, 1)) / 2
    torch.testing.assert_close(got.exp(), p)
    torch.testing.assert_close(combine_predictions({"a": a, "v": v}, "logits"), torch.tensor([[1.0, 0.0]]))


def test_softmax_and_logit_averages_can_disagree():
    # one saturated model outvotes two moderate ones in logit space, not in probability space
    outs = {"a": torch.tensor([[20.0, 0.0]]), "b": torch.tensor([[0.0, 3.0]]), "c": torch.tensor([[0.0, 3.0]])}
    assert combine_predictions(outs, "logits").argmax().item() == 0
    assert combine_predictions(outs, "softmax").argmax().item() == 1


@pytest.mark.parametrize("name, how", [("ensemble", "softmax"), ("ume", "logits")])
@pytest.mark.parametrize("shapes", [SHAPES2, SHAPES3])
def test_ensemble_predicts_from_its_references(name, how, shapes):
    m = make(name, shapes=shapes)
    assert m.hp.combine == how and m.optimizer is None and not list(m.parameters())
    refs = references(shapes)
    m.attach_references(refs)
    inputs, y = batch(shapes)
    with torch.no_grad():
        own = {k: r.model({k: inputs[k]}).logits for k, r in refs.items()}
    out = m.predict(inputs)
    torch.testing.assert_close(out.logits, combine_predictions(own, how))
    for k in shapes:
        torch.testing.assert_close(out.modality_logits[k], own[k])
        assert out.features[k].shape == (16, refs[k].model.encoders[k].out_dim)
    before = {k: copy.deepcopy(r.state_dict()) for k, r in refs.items()}
    logs = m.update(inputs, y, step_ctx())
    assert float(logs["loss"]) == pytest.approx(float(F.cross_entropy(out.logits, y)))
    for k, r in refs.items():  # nothing trained, BN statistics untouched
        for n, t in r.state_dict().items():
            assert torch.equal(t, before[k][n]), n
    assert m.state_dict() == {} or all(not k.startswith("references") for k in m.state_dict())


def test_distillation_loss_is_mean_squared_feature_error():
    s = {"a": torch.tensor([[1.0, 2.0], [0.0, 0.0]])}
    t = {"a": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}
    assert float(distillation_losses(s, t)["a"]) == pytest.approx((1 + 4 + 0 + 4) / 4)


@pytest.mark.parametrize("shapes", [SHAPES2, SHAPES3])
def test_umt_gradient_is_ce_plus_lambda_times_feature_mse(shapes):
    m = make("umt", shapes=shapes, scaling=3.0)
    refs = references(shapes)
    m.attach_references(refs)
    inputs, y = batch(shapes)
    with torch.no_grad():
        teach = {k: r.model({k: inputs[k]}).features[k] for k, r in refs.items()}
    ref = copy.deepcopy(m.model)
    out = ref(inputs)
    loss = F.cross_entropy(out.logits, y) + sum(3.0 * ((out.features[k] - teach[k]) ** 2).mean() for k in shapes)
    loss.backward()
    seen = {}
    h = m.optimizer.register_step_pre_hook(lambda *_: seen.update({n: p.grad.clone() for n, p in m.model.named_parameters()}))
    before = {k: copy.deepcopy(r.state_dict()) for k, r in refs.items()}
    logs = m.update(inputs, y, step_ctx())
    h.remove()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(seen[n], p.grad, rtol=1e-5, atol=1e-7)
    assert {f"distill_{k}" for k in shapes} <= set(logs)
    for k, r in refs.items():  # frozen teachers in eval mode: weights and BN statistics unchanged
        assert not r.training
        for n, t in r.state_dict().items():
            assert torch.equal(t, before[k][n]), n
    assert not any(k.startswith("teachers") for k in m.state_dict())


def test_umt_teacher_bn_train_uses_batch_statistics_and_window_switches_off():
    m = make("umt", teacher_bn="train", modulation_ends=0)
    refs = references(SHAPES2)
    m.attach_references(refs)
    assert all(r.training for r in refs.values())
    inputs, y = batch()
    ref = copy.deepcopy(m.model)
    F.cross_entropy(ref(inputs).logits, y).backward()
    seen = {}
    m.optimizer.register_step_pre_hook(lambda *_: seen.update({n: p.grad.clone() for n, p in m.model.named_parameters()}))
    logs = m.update(inputs, y, step_ctx(epoch=1))  # outside the window: plain joint training
    assert "distill_audio" not in logs
    for n, p in ref.named_parameters():
        torch.testing.assert_close(seen[n], p.grad, rtol=1e-5, atol=1e-7)


def test_planner_schedules_unimodal_references(tmp_path: Path):
    from mmbench.config import load_recipe
    from mmbench.sweep.plan import plan

    r = write_recipe(tmp_path / "r.yaml", methods="[joint, ensemble, {name: umt, scaling: 5}]")
    runs = plan(load_recipe(r, [])[0], str(r))
    by_id = {x.id: x for x in runs}
    uni = [x for x in runs if x.cfg["method"]["name"] == "unimodal"]
    assert sorted(x.cfg["method"]["modality"] for x in uni) == ["audio", "visual"]
    assert all(not x.requested for x in uni) and runs[:2] == uni  # dependencies first
    for x in runs:
        want = {"ensemble": True, "umt": True}.get(x.cfg["method"]["name"], False)
        assert bool(x.deps) == want
        if want:
            assert set(x.deps) == {"audio", "visual"}
            for m, d in x.deps.items():
                assert by_id[d].cfg["seed"] == x.cfg["seed"] and by_id[d].cfg["train"] == x.cfg["train"]


def test_end_to_end_ensemble_reports_its_references(mm_env: Path, cli):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods="[ensemble, {name: umt, scaling: 5}]"))
    assert code == 0, out
    con = sqlite3.connect(mm_env / "results.db")
    runs = con.execute("select id, method, status from run").fetchall()
    acc = {(rid, n): v for rid, n, v in con.execute(
        "select run_id, name, value from epoch_metric where split = 'test' and name like 'acc%'")}
    con.close()
    assert sorted(m for _, m, _ in runs) == ["ensemble", "umt", "unimodal", "unimodal"]
    assert {s for _, _, s in runs} == {"completed"}
    ens = next(rid for rid, m, _ in runs if m == "ensemble")
    for rid, m, _ in runs:
        if m == "unimodal":
            mod = json.loads((mm_env / "runs" / rid / "config.json").read_text())["method"]["modality"] \
                if (mm_env / "runs" / rid / "config.json").is_file() else None
            if mod is not None:  # acc/<m> of the ensemble is its unimodal reference's accuracy (selected epoch)
                assert acc[(ens, f"acc/{mod}")] in {v for (r, n), v in acc.items() if r == rid and n == "acc"}
    assert (ens, "acc") in acc


def test_without_its_references_the_run_refuses(mm_env: Path, cli):
    from mmbench.engine.trainer import Trainer

    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods="[ensemble]"))
    assert code == 0, out
    cfg_path = next(p for p in (mm_env / "runs").glob("*/config.json") if json.loads(p.read_text())["method"]["name"] == "ensemble")
    cfg = json.loads(cfg_path.read_text())
    with pytest.raises(UserError, match="unimodal reference"):
        Trainer(cfg, mm_env / "x", torch.device("cpu")).fit()


@pytest.mark.parametrize("entry, needle", [
    ("{name: umt, scaling: -1}", "scaling"),
    ("{name: umt, modulation_starts: 9, modulation_ends: 3}", "modulation_ends"),
    ("{name: ensemble, combine: median}", "combine"),
    ("{name: ume, combine: vote}", "combine"),
])
def test_bad_parameters_exit_2(mm_env: Path, cli, entry: str, needle: str):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=f"[{entry}]"), "--dry-run")
    assert code == 2, out
    assert needle in out
    assert not (mm_env / "runs").exists()
