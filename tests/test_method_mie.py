"""MIE (METHODS.md §4, IGM code): flat projection, covariance pass, which gradients it touches,
one step against an independent reference, SAM variants, stages with restarts and per-stage
schedules, averaged-softmax prediction, bad input, one run end to end."""
from __future__ import annotations

import copy
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from conftest import write_recipe
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, EpochContext, ModelSpec, StepContext, TrainSpec
from mmbench.methods.mie import flat_projection, mean_softmax_logits, stage_at

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}
C = 4


def make(epoch_list=(1, 1), optimizer=None, scheduler=None, **hp: object):
    torch.manual_seed(0)
    cls = METHODS.get("mie")
    spec = ModelSpec(backbone="tiny", fusion="concat", input_shapes=dict(SHAPES), num_classes=C)
    opt = optimizer or {"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}
    m = cls(spec, cls.HParams(epoch_list=list(epoch_list), **hp),
            TrainSpec(epochs=sum(epoch_list), optimizer=opt, scheduler=scheduler or {"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, *s, generator=g) for k, s in SHAPES.items()}, torch.randint(0, C, (b,), generator=g)


def fake_ctx(epoch: int, seen: list | None = None) -> EpochContext:
    def prepare(raw, train):
        if seen is not None:
            seen.append(train)
        return {k: raw[k] for k in SHAPES}, raw["label"]

    loaders = {s: [dict(zip([*SHAPES, "label"], [*batch(seed=i)[0].values(), batch(seed=i)[1]])) for i in seeds]
               for s, seeds in (("train", (10, 11, 12)), ("val", (20, 21)))}
    return EpochContext(epoch=epoch, num_epochs=100, steps_per_epoch=1, device=torch.device("cpu"),
                        loaders=loaders, prepare_batch=prepare)


def random_p(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    return a @ a.T / d + torch.eye(d)


# ---- projection -----------------------------------------------------------------------------
def test_projection_of_a_diagonal_covariance():
    tau = 0.4
    p = flat_projection(torch.diag(torch.tensor([4.0, 1.0, 0.0])), tau)
    torch.testing.assert_close(p, torch.diag(torch.tensor([math.exp(-tau), math.exp(-tau / 4), 1.0])))


def test_projection_is_symmetric_with_eigenvalues_between_exp_minus_tau_and_one():
    g = torch.Generator().manual_seed(0)
    xbar = torch.randn(5, 12, generator=g) + 2.0  # five batch means, rank 5 in 12 dims
    p = flat_projection(xbar.T @ xbar, 0.7)
    torch.testing.assert_close(p, p.T)
    ev = torch.linalg.eigvalsh(p)
    assert float(ev.min()) == pytest.approx(math.exp(-0.7), abs=1e-5)
    assert float(ev.max()) == pytest.approx(1.0, abs=1e-5)
    # the most used direction is damped the most; an unused direction passes unchanged
    top = torch.linalg.svd(xbar.T @ xbar).Vh[0]
    assert float(top @ p @ top) == pytest.approx(math.exp(-0.7), abs=1e-4)
    null = torch.linalg.svd(xbar).Vh[-1]
    torch.testing.assert_close(p @ null, null, atol=1e-5, rtol=0)


def test_flat_spectrum_gives_identity():
    torch.testing.assert_close(flat_projection(torch.eye(3) * 2, 0.4), torch.eye(3))


def test_covariances_sum_batch_mean_inputs_of_linear_layers_in_eval_mode():
    m = make()
    seen: list[bool] = []
    ctx = fake_ctx(1, seen)
    covs = m.input_covariances("audio", ctx.loaders["train"], ctx.prepare_batch)
    assert seen == [True, True, True] and m.training
    assert len(covs) == 3  # the tiny encoder has no Linear; the MLP has three
    ref = copy.deepcopy(m.model).eval()
    want = [torch.zeros(32, 32), torch.zeros(256, 256), torch.zeros(64, 64)]
    with torch.no_grad():
        for raw in ctx.loaders["train"]:
            h0 = ref.encoders["audio"](raw["audio"])
            h1 = torch.relu(ref.classifiers["audio"][0](h0))
            h2 = ref.classifiers["audio"][2](h1)
            for i, h in enumerate((h0, h1, h2)):
                xbar = h.mean(0, keepdim=True)
                want[i] += xbar.T @ xbar
    for c, w in zip(covs, want):
        torch.testing.assert_close(c, w)


def test_projection_touches_only_the_classifier_linear_weights_by_position():
    m = make()
    lin = m.model.linears("audio")
    m.proj = [(list(layer.weight.shape), random_p(layer.weight.shape[1], i)) for i, layer in enumerate(lin)]
    g = torch.Generator().manual_seed(3)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = {n: p.grad.clone() for n, p in m.model.named_parameters()}
    m.project("visual")
    weights = {f"classifiers.visual.{i}.weight": k for k, i in enumerate((0, 2, 3))}
    for n, p in m.model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p.grad, before[n] @ m.proj[weights[n]][1])
        else:  # biases, convs, BatchNorm, the other branch
            torch.testing.assert_close(p.grad, before[n])
    # a shape mismatch at a position leaves that layer alone
    m.proj[0] = ([1, 32], m.proj[0][1])
    w0 = m.model.classifiers["visual"][0].weight
    g0 = w0.grad.clone()
    m.project("visual")
    torch.testing.assert_close(w0.grad, g0)


# ---- one step against an independent reference ----------------------------------------------
def reference_step(model, m: str, x, y, seed, rho, flat_ratio, proj):
    """The repo's step written out on a copy: mixup, two autograd calls, per-tensor perturbation
    (never undone), flat loss on the same features with hard labels, projection, SGD lr 1."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    lam = np.random.beta(1.0, 1.0)
    perm = torch.randperm(x.shape[0])
    ref = copy.deepcopy(model).train()
    enc, cls = ref.encoders[m], ref.classifiers[m]
    xm = lam * x + (1 - lam) * x[perm]
    feat = enc(xm)
    out = cls(feat)
    l_ori = lam * F.cross_entropy(out, y, reduction="none") + (1 - lam) * F.cross_entropy(out, y[perm], reduction="none")
    ge = torch.autograd.grad(l_ori.mean(), list(enc.parameters()), retain_graph=True)
    gh = torch.autograd.grad(l_ori.mean(), list(cls.parameters()), retain_graph=True)
    for p, g in zip([*enc.parameters(), *cls.parameters()], [*ge, *gh]):
        p.data = p.data + rho * g / torch.norm(g)
    l_flat = F.cross_entropy(cls(feat), y, reduction="none")
    loss = (1 - flat_ratio) * l_ori.mean() + flat_ratio * l_flat.mean()
    params = [*enc.parameters(), *cls.parameters()]
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
    if proj is not None:
        for layer, (_, p) in zip(ref.linears(m), proj):
            grads[id(layer.weight)] = grads[id(layer.weight)] @ p
    with torch.no_grad():
        for p in params:
            p -= grads[id(p)]
    return ref, float(loss.detach())


@pytest.mark.parametrize("epoch,branch", [(0, "audio"), (1, "visual")])
def test_code_step_matches_the_reference(epoch, branch):
    m = make(noise_ratio=1e-2, noise_ratio_cls=1e-2)
    x, y = batch()
    proj = None
    if epoch == 1:  # second stage: the projection from audio applies to the visual classifier
        proj = [(list(layer.weight.shape), random_p(layer.weight.shape[1], i)) for i, layer in enumerate(m.model.linears("audio"))]
        m.proj = proj
    ref, ref_loss = reference_step(m.model, branch, x[branch], y, 7, 1e-2, 0.3, proj)
    np.random.seed(7)
    torch.manual_seed(7)
    logs = m.update(x, y, StepContext(epoch, 0, 1, 2))
    assert float(logs["loss"]) == pytest.approx(ref_loss, rel=1e-5)
    for (n, p), (_, q) in zip(m.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    other = "visual" if branch == "audio" else "audio"
    for (n, p) in m.model.named_parameters():
        if f".{other}." in n:  # the idle branch gets no gradient and does not move
            assert p.grad is None


def test_code_perturbation_is_per_tensor_and_kept_faithful_is_undone():
    x, y = batch()
    zero_lr = {"name": "sgd", "lr": 0.0, "momentum": 0.0, "weight_decay": 0.0}
    for sam in ("code", "faithful"):
        m = make(optimizer=zero_lr, noise_ratio=0.05, noise_ratio_cls=0.05, sam=sam)
        before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
        m.update(x, y, StepContext(0, 0, 1, 2))
        for n, p in m.model.named_parameters():
            moved = float((p.detach() - before[n]).norm())
            if sam == "code" and ".audio." in n:
                assert moved == pytest.approx(0.05, rel=1e-3), n  # rho * g/|g| per tensor, never undone
            else:
                assert moved == 0.0, n


def test_faithful_step_blends_clean_and_perturbed_gradients():
    m = make(sam="faithful", noise_ratio=1e-2, noise_ratio_cls=2e-2)
    x, y = batch()
    ref = copy.deepcopy(m.model)
    once = copy.deepcopy(m.model)
    np.random.seed(3)
    torch.manual_seed(3)
    m.update(x, y, StepContext(0, 0, 1, 2))
    np.random.seed(3)
    torch.manual_seed(3)
    lam = np.random.beta(1.0, 1.0)
    perm = torch.randperm(8)
    xm = lam * x["audio"] + (1 - lam) * x["audio"][perm]
    enc, cls = ref.encoders["audio"], ref.classifiers["audio"]
    params = [*enc.parameters(), *cls.parameters()]
    theta = [p.detach().clone() for p in params]

    def mix_loss():
        out = cls(enc(xm))
        return (lam * F.cross_entropy(out, y, reduction="none") + (1 - lam) * F.cross_entropy(out, y[perm], reduction="none")).mean()

    g_clean = torch.autograd.grad(mix_loss(), params)
    n_e = len(list(enc.parameters()))
    with torch.no_grad():  # SAM's ascent step, normalised over each group (encoder, classifier)
        for group, rho in ((range(n_e), 1e-2), (range(n_e, len(params)), 2e-2)):
            norm = torch.sqrt(sum((g_clean[i] ** 2).sum() for i in group))
            for i in group:
                params[i] += rho * g_clean[i] / norm
    g_sam = torch.autograd.grad(mix_loss(), params)
    names = [f"encoders.audio.{n}" for n, _ in enc.named_parameters()] + \
            [f"classifiers.audio.{n}" for n, _ in cls.named_parameters()]
    new = dict(m.model.named_parameters())
    for name, t, a, b in zip(names, theta, g_clean, g_sam):
        torch.testing.assert_close(new[name].detach(), t - (0.7 * a + 0.3 * b), rtol=1e-4, atol=1e-6, msg=name)
    once.train()
    with torch.no_grad():
        once.encoders["audio"](xm)  # BatchNorm statistics of the clean forward only
    for (n, b), (_, w) in zip(m.model.named_buffers(), once.named_buffers()):
        torch.testing.assert_close(b, w, msg=n)


# ---- stages, schedules, restarts ------------------------------------------------------------
def test_stage_schedule():
    el = [2, 3, 1]
    assert [stage_at(e, el) for e in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)]
    with pytest.raises(ValueError):
        stage_at(6, el)
    m = make(epoch_list=el)
    assert [m.active(s) for s in range(3)] == ["audio", "visual", "audio"]


def test_scheduler_steps_at_epoch_start_and_resets_each_stage_with_a_new_optimizer():
    m = make(epoch_list=(3, 3), optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.9},
             scheduler={"name": "step", "step_size": 2, "gamma": 0.1})
    lrs, opts = [], []
    for e in range(6):
        logs = m.on_epoch_start(fake_ctx(e))
        lrs.append(logs["lr"])
        opts.append(m.optimizer)
        assert logs["stage"] == 1 + e // 3
        assert logs["active_audio"] == float(e < 3) and logs["active_visual"] == float(e >= 3)
        m.update(*batch(), StepContext(e, 0, 1, 6))
        m.scheduler_step(e)  # the trainer's end-of-epoch call changes nothing
        m.on_epoch_end(fake_ctx(e))
    assert lrs == pytest.approx([1.0, 0.1, 0.1, 1.0, 0.1, 0.1])
    assert opts[0] is opts[2] and opts[3] is not opts[2] and opts[3] is opts[5]


def test_stage_start_restores_the_best_state_and_computes_projections_from_the_previous_modality(monkeypatch):
    import mmbench.methods.mie as mie

    m = make(epoch_list=(3, 3))
    scores = iter([0.2, 0.1, 0.05])
    monkeypatch.setattr(mie, "macro_f1", lambda *a: next(scores))
    snaps = []
    for e in range(3):
        m.on_epoch_start(fake_ctx(e))
        m.update(*batch(seed=e), StepContext(e, 0, 1, 6))
        snaps.append({k: v.clone() for k, v in m.model.state_dict().items()})
        logs = m.on_epoch_end(fake_ctx(e))
    assert logs["best_val_f1"] == 0.2
    calls = []
    real = m.input_covariances
    monkeypatch.setattr(m, "input_covariances", lambda mod, *a: calls.append(mod) or real(mod, *a))
    m.on_epoch_start(fake_ctx(3))
    assert calls == ["audio"]
    for k, v in m.model.state_dict().items():
        torch.testing.assert_close(v, snaps[0][k])  # epoch 0 was the best
    assert [list(s) for s, _ in m.proj] == [[256, 32], [64, 256], [C, 64]]
    # the state needed to resume mid-stage travels in extra_state
    fresh = make(epoch_list=(3, 3))
    fresh.load_extra_state(copy.deepcopy(m.extra_state()))
    assert fresh.best_score == 0.2 and len(fresh.proj) == 3
    for k, v in snaps[0].items():
        torch.testing.assert_close(fresh.best_state[k], v)
    torch.testing.assert_close(fresh.proj[1][1], m.proj[1][1])


# ---- prediction -----------------------------------------------------------------------------
def test_prediction_averages_the_classifiers_softmaxes():
    m = make()
    m.eval()
    x, _ = batch()
    out = m.predict(x)
    with torch.no_grad():
        la = m.model.classifiers["audio"](m.model.encoders["audio"](x["audio"]))
        lv = m.model.classifiers["visual"](m.model.encoders["visual"](x["visual"]))
    torch.testing.assert_close(out.logits.softmax(1), (la.softmax(1) + lv.softmax(1)) / 2)
    torch.testing.assert_close(out.modality_logits["audio"], la)
    torch.testing.assert_close(out.modality_logits["visual"], lv)
    torch.testing.assert_close(mean_softmax_logits({"a": la}), la.log_softmax(1))


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"epoch_list": [3]}, {"epoch_list": [2, 0]}, {"sam": "exact"},
                                 {"flat_ratio": 1.5}, {"temperature": -1}, {"mixup": 1.0}])
def test_bad_parameters_rejected(bad):
    with pytest.raises(ValidationError):
        METHODS.get("mie").HParams(**bad)


def test_epoch_list_must_span_the_run():
    cls = METHODS.get("mie")
    with pytest.raises(UserError, match="sums to 3"):
        cls.check_train(TrainSpec(epochs=2, optimizer={}, scheduler={}), cls.HParams(epoch_list=[1, 2]))
    spec = ModelSpec(backbone="tiny", fusion="sum", input_shapes=dict(SHAPES), num_classes=C)
    with pytest.raises(UserError, match="no fusion layer"):
        cls.check(spec, cls.HParams())


@pytest.mark.parametrize("entry,sets,needle", [
    ("[{name: mie, epoch_list: [1, 2]}]", [], "sums to 3"),
    ("[{name: mie, epoch_list: [1, 1], sam: exact}]", [], "sam"),
    ("[{name: mie, epoch_list: [1, 1]}]", ["--set", "model.fusion=sum"], "no fusion layer"),
])
def test_cli_bad_input_exits_2_before_training(mm_env: Path, cli, entry, sets, needle):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", epochs=2, methods=entry), *sets)
    assert code == 2, out
    assert needle in out
    assert not list(mm_env.rglob("config.json"))  # no run was started


# ---- end to end -----------------------------------------------------------------------------
def test_end_to_end_alternates_stages(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml", epochs=2, methods="[{name: mie, epoch_list: [1, 1]}]")
    code, out = cli("train", r, "--set", "train.eval_train=false")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as con:
        (status, env), = con.execute("select status, env_json from run").fetchall()
        got = {(e, n): v for e, n, v in con.execute("select epoch, name, value from epoch_metric where name like 'method/%'")}
        accs = con.execute("select count(*) from epoch_metric where split='test' and name in ('acc/audio', 'acc/visual')").fetchone()
    assert status == "completed"
    assert (got[(0, "method/stage")], got[(0, "method/active_audio")], got[(0, "method/active_visual")]) == (1, 1, 0)
    assert (got[(1, "method/stage")], got[(1, "method/active_audio")], got[(1, "method/active_visual")]) == (2, 0, 1)
    assert (1, "method/best_val_f1") in got and (0, "method/loss_flat") in got
    assert accs == (4,)
    assert '"sam": "code"' in env


@pytest.mark.parametrize("cut", [1, 2])  # resume at a stage start / in the middle of stage 2
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, tiny_data_dir: Path, cut: int):
    from mmbench.config import Recipe, expand
    from mmbench.engine.trainer import Trainer

    c = expand(Recipe.model_validate({
        "name": "r", "dataset": {"name": "synthetic", "protocol": "tiny"},
        "train": {"epochs": 3, "batch_size": 64, "eval_train": False, "scheduler": {"name": "step", "step_size": 1}},
        "methods": [{"name": "mie", "epoch_list": [1, 2]}], "seeds": [0]}))[0]
    full = Trainer(c, tmp_path / "full", torch.device("cpu"), str(tiny_data_dir)).fit()

    class Stop(Exception):
        pass

    def stop(ev: dict) -> None:
        if ev["event"] == "epoch" and ev["epoch"] == cut:
            raise Stop

    with pytest.raises(Stop):
        Trainer(c, tmp_path / "cut", torch.device("cpu"), str(tiny_data_dir), progress=stop).fit()
    resumed = Trainer(c, tmp_path / "cut", torch.device("cpu"), str(tiny_data_dir)).fit()
    for e in range(cut, 3):
        for split in ("train", "val", "test"):
            for k, v in full.history[e]["metrics"][split].items():
                if not k.startswith("epoch_") or not k.endswith("seconds"):  # timings differ run to run
                    assert resumed.history[e]["metrics"][split][k] == pytest.approx(v, abs=1e-6), (e, split, k)
