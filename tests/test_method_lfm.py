"""LFM: the fitted weights, the code's "JS" alignment on hand-made logits, the step against a
hand-written loss, the learnt-alpha hyper-gradient against finite differences, its schedule and
clipping, three modalities, refusals and one run end to end."""
from __future__ import annotations

import copy
import math
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_recipe
from method_helpers import THREE, batch, ctx, make, params
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec
from mmbench.methods.lfm import alignment, fitted_alpha, lfm_terms


def test_fitted_weights():
    a0, a1 = fitted_alpha(0)
    assert math.isclose(a0, 0.204623704) and math.isclose(a1, 0.795376296)
    for e in (0, 10, 50, 100, 199):
        assert math.isclose(sum(fitted_alpha(e)), 1.0, abs_tol=1e-9)
    assert fitted_alpha(60)[0] > fitted_alpha(0)[0]  # supervision gains weight over training


def test_alignment_by_hand():
    p = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q = torch.log(torch.tensor([[0.5, 0.5], [0.1, 0.9]]))
    # sample 0 agrees (0); sample 1: m = (0.5, 0.5), KL(m||p) = KL(m||q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert math.isclose(alignment(p, q).item(), 0.5 * (kl + kl) / 2, rel_tol=1e-5)
    assert alignment(p, p).abs().item() < 1e-7


def test_three_modalities_average_pairs():
    g = torch.Generator().manual_seed(0)
    z = {m: torch.randn(5, 3, generator=g) for m in THREE}
    y = torch.tensor([0, 1, 2, 0, 1])
    ce, al = lfm_terms(z, y, list(THREE))
    assert torch.allclose(ce, F.cross_entropy((z["audio"] + z["visual"] + z["depth"]) / 3, y), atol=1e-6)
    want = (alignment(z["audio"], z["visual"]) + alignment(z["audio"], z["depth"]) + alignment(z["visual"], z["depth"])) / 3
    assert torch.allclose(al, want)


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_step_is_sgd_on_the_hand_written_loss(fusion):
    m = make("lfm", fusion=fusion)
    m.alpha = [0.3, 0.7]
    ref = copy.deepcopy(m.model)
    x, y = batch()
    before = params(m)
    logs = m.update(x, y, ctx())
    out = ref(x)
    z = ref.fusion.split_logits(out.features)
    loss = 2 * (0.3 * F.cross_entropy(0.5 * z["visual"] + 0.5 * z["audio"], y) + 0.7 * alignment(z["audio"], z["visual"]))
    loss.backward()
    assert torch.allclose(logs["loss"], loss, atol=1e-6)
    after = params(m)
    for k, p in ref.named_parameters():
        assert torch.allclose(after[k], before[k] - p.grad, atol=1e-5, rtol=1e-4), k


def test_fitted_strategy_sets_the_epochs_weights():
    m = make("lfm")
    logs = m.on_epoch_start(type("C", (), {"epoch": 30})())  # fitted needs no loaders
    assert (logs["alpha_cls"], logs["alpha_align"]) == pytest.approx(fitted_alpha(30))


def test_learnable_alpha_step_is_the_hessian_vector_product_of_the_first_tensor():
    m = make("lfm", strategy="learnable")
    m.model.double().eval()
    x, y = batch(b=6)
    x = {k: v.double() for k, v in x.items()}
    params_ = list(m.model.parameters())

    def grads(which: str) -> list[torch.Tensor]:
        z = m.per_modality(m.model.encode(x))
        ce, al = lfm_terms(z, y, m.modalities)
        loss = ce if which == "cls" else 0.05 * ce + 0.95 * al
        return [g.detach() for g in torch.autograd.grad(loss, params_)]

    g_cls = grads("cls")
    eps = 1e-4
    with torch.no_grad():
        for p, g in zip(params_, g_cls):
            p.add_(eps * g)
    plus = grads("total")[0]
    with torch.no_grad():
        for p, g in zip(params_, g_cls):
            p.sub_(2 * eps * g)
    minus = grads("total")[0]
    with torch.no_grad():
        for p, g in zip(params_, g_cls):
            p.add_(eps * g)
    want = ((plus - minus) / (2 * eps)).mean().item()
    got = m.alpha_step(x, y, epoch=1)
    assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-9)
    assert math.isclose(m.alpha[1], min(0.95, max(0.05, 0.95 - 1e-4 * got)))
    assert math.isclose(m.alpha[0], 1 - m.alpha[1])


def test_learnable_schedule_halves_the_rate_and_clips():
    m = make("lfm", strategy="learnable", lr_alpha=1.0)
    x, y = batch(b=4)
    m.eval()
    m.alpha_step(x, y, epoch=20)
    assert m.lr_alpha == 0.5
    m.alpha_step(x, y, epoch=21)
    assert m.lr_alpha == 0.5
    m.lr_alpha = 1e9
    m.alpha_step(x, y, epoch=3)
    assert m.alpha[1] in (0.05, 0.95) and math.isclose(sum(m.alpha), 1.0)
    m2 = make("lfm", strategy="learnable")
    m2.load_extra_state(m.extra_state())
    assert m2.alpha == m.alpha and m2.lr_alpha == m.lr_alpha


def test_prediction_is_the_mean_of_the_modalities_logits():
    m = make("lfm", fusion="sum", shapes=THREE)
    m.eval()
    x, y = batch(THREE)
    out = m.predict(x)
    z = m.model.fusion.split_logits(out.features)
    assert torch.allclose(out.logits, (z["audio"] + z["visual"] + z["depth"]) / 3, atol=1e-6)
    assert torch.isfinite(m.update(x, y, ctx())["loss"])


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_non_additive_fusions_refused(fusion):
    cls = METHODS.get("lfm")
    with pytest.raises(UserError, match="additive"):
        cls.check(ModelSpec("tiny", fusion, {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}, 4), cls.HParams())


@pytest.mark.parametrize("entry,needle", [
    ("[{name: lfm, strategy: heuristic}]", "strategy"),
    ("[{name: lfm, lr_alpha: 0}]", "lr_alpha"),
    ("[{name: lfm, alpha_samples: 0}]", "alpha_samples"),
])
def test_cli_bad_parameters_exit_2(mm_env: Path, cli, entry, needle):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=entry))
    assert code == 2, out
    assert needle in out
    assert not list(mm_env.rglob("config.json"))


def test_end_to_end_learnable(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml", methods="[{name: lfm, strategy: learnable}]").read_text()
    (mm_env / "r.yaml").write_text(r.replace("fusion: concat", "fusion: sum"))
    code, out = cli("train", mm_env / "r.yaml", "--set", "train.eval_train=false")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as con:
        (status,), = con.execute("select status from run where method='lfm'").fetchall()
        rows = dict(((e, n), v) for e, n, v in con.execute(
            "select epoch, name, value from epoch_metric where name like 'method/%'"))
    assert status == "completed"
    for e in (0, 1):
        assert (e, "method/alpha_grad") in rows and (e, "method/loss_align") in rows
        assert math.isclose(rows[(e, "method/alpha_cls")] + rows[(e, "method/alpha_align")], 1.0, rel_tol=1e-6)
