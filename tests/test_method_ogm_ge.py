"""OGM / OGM-GE (docs/methods/ogm_ge.md): coefficient, which gradients change, noise scale, window."""
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
from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec
from mmbench.methods.ogm_ge import modality_scores, ogm_coefficients, ogm_coefficients_multi

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(fusion: str = "concat", **hp: object):
    torch.manual_seed(0)
    cls = METHODS.get("ogm_ge")
    spec = ModelSpec(backbone="tiny", fusion=fusion, input_shapes=dict(SHAPES), num_classes=4)
    m = cls(spec, cls.HParams(**hp), TrainSpec(epochs=2, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9},
                                               scheduler={"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(b: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    inputs = {"audio": torch.randn(b, *SHAPES["audio"], generator=g), "visual": torch.randn(b, *SHAPES["visual"], generator=g)}
    return inputs, torch.randint(0, 4, (b,), generator=g)


def ctx(epoch: int = 0) -> StepContext:
    return StepContext(epoch=epoch, step=0, steps_per_epoch=10, num_epochs=100)


def plain_grads(model: torch.nn.Module, inputs, labels) -> dict[str, torch.Tensor]:
    """Gradients of the fused cross-entropy on an untouched copy: what joint training would use."""
    ref = copy.deepcopy(model)
    ref.train()
    F.cross_entropy(ref(inputs).logits, labels).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def step_grads(m, inputs, labels, epoch: int = 0):
    """Run one update; return (plain grads before it, the grads the optimizer used, logs)."""
    plain = plain_grads(m.model, inputs, labels)
    logs = m.update(inputs, labels, ctx(epoch))
    used = {n: p.grad.clone() for n, p in m.model.named_parameters()}
    return plain, used, {k: float(v) for k, v in logs.items()}


# ---- the coefficient ------------------------------------------------------------------------
def test_first_modality_ahead_is_slowed():
    k_a, k_v, rho = ogm_coefficients(30.0, 20.0, 0.8)
    assert float(rho) == pytest.approx(2 / 3)
    assert float(k_a) == pytest.approx(1 - math.tanh(0.8 * 1.5))  # 0.16634...
    assert float(k_a) == pytest.approx(0.166345, abs=1e-6)
    assert float(k_v) == 1.0


def test_second_modality_ahead_is_slowed():
    k_a, k_v, rho = ogm_coefficients(10.0, 20.0, 0.8)
    assert float(rho) == pytest.approx(2.0)
    assert float(k_v) == pytest.approx(0.078331, abs=1e-6)  # 1 - tanh(1.6)
    assert float(k_a) == 1.0


def test_tie_slows_the_first_modality():
    k_a, k_v, _ = ogm_coefficients(12.5, 12.5, 0.8)
    assert float(k_a) == pytest.approx(0.335963, abs=1e-6)  # 1 - tanh(0.8)
    assert float(k_v) == 1.0


def test_alpha_zero_is_plain_training():
    k_a, k_v, _ = ogm_coefficients(30.0, 20.0, 0.0)
    assert float(k_a) == 1.0 and float(k_v) == 1.0


# ---- per-modality outputs for the ratio -----------------------------------------------------
def test_concat_ratio_uses_weight_split_with_half_bias():
    m = make("concat", alpha=0.8)
    with torch.no_grad():
        m.model.fusion.fc.bias.copy_(torch.tensor([2.0, -1.0, 0.5, -3.0]))  # the init zeroes it: make bias/2 visible
    inputs, y = batch()
    ref = copy.deepcopy(m.model)
    with torch.no_grad():
        out = ref(inputs)  # train mode, as the update's forward
    w, b = ref.fusion.fc.weight.detach(), ref.fusion.fc.bias.detach()
    d = out.features["audio"].shape[1]
    out_a = out.features["audio"] @ w[:, :d].t() + b / 2
    out_v = out.features["visual"] @ w[:, d:].t() + b / 2
    s_a = torch.softmax(out_a, 1).gather(1, y[:, None]).sum()
    s_v = torch.softmax(out_v, 1).gather(1, y[:, None]).sum()
    logs = m.update(inputs, y, ctx())
    assert float(logs["ratio"]) == pytest.approx(float(s_v / s_a), rel=1e-5)
    k_a, k_v, _ = ogm_coefficients(s_a, s_v, 0.8)
    assert float(logs["k_audio"]) == pytest.approx(float(k_a), rel=1e-5)
    assert float(logs["k_visual"]) == pytest.approx(float(k_v), rel=1e-5)
    assert m.describe_run()["ogm_estimator"] == "weight-split-bias/2"


def test_sum_ratio_uses_each_branch_head_with_full_bias():
    m = make("sum")
    with torch.no_grad():
        for head in m.model.fusion.heads.values():
            head.bias.copy_(torch.tensor([2.0, -1.0, 0.5, -3.0]))
    inputs, y = batch()
    out = m.model(inputs)
    got = m.modality_outputs(inputs, out)
    for mod in ("audio", "visual"):
        head = m.model.fusion.heads[mod]
        torch.testing.assert_close(got[mod], out.features[mod] @ head.weight.t() + head.bias)


@pytest.mark.parametrize("estimator", ["shapley", "zero"])
def test_film_estimators_use_eval_mode_zero_inputs(estimator):
    m = make("film", film_gated_estimator=estimator)
    inputs, y = batch()
    out = m.model(inputs)
    bn = [(mod.running_mean.clone(), mod.num_batches_tracked.clone()) for mod in m.model.modules()
          if isinstance(mod, torch.nn.BatchNorm2d)]
    got = m.modality_outputs(inputs, out)
    after = [(mod.running_mean, mod.num_batches_tracked) for mod in m.model.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    for (rm0, n0), (rm1, n1) in zip(bn, after):
        assert torch.equal(rm0, rm1) and torch.equal(n0, n1)  # the extra passes leave BN statistics alone
    assert m.model.training
    ref = copy.deepcopy(m.model).eval()
    with torch.no_grad():
        f_a = ref({"audio": inputs["audio"], "visual": torch.zeros_like(inputs["visual"])}).logits
        f_v = ref({"audio": torch.zeros_like(inputs["audio"]), "visual": inputs["visual"]}).logits
    if estimator == "zero":
        want = {"audio": f_a, "visual": f_v}
    else:
        full = out.logits.detach()
        want = {"audio": 0.5 * (full - f_v + f_a), "visual": 0.5 * (full - f_a + f_v)}
    for mod in want:
        torch.testing.assert_close(got[mod], want[mod])
    assert m.describe_run()["ogm_estimator"] == {"shapley": "shapley-zero-input", "zero": "zero-input"}[estimator]


def test_gated_runs_a_step():
    m = make("gated")
    logs = m.update(*batch(), ctx())
    assert {"k_audio", "k_visual", "ratio", "loss"} <= set(logs)


# ---- which gradients change, and how ---------------------------------------------------------
def is_conv(name: str, grad: torch.Tensor) -> bool:
    return name.startswith("encoders.") and grad.dim() == 4


def test_ogm_scales_only_conv_kernels_by_k():
    m = make(ge=False, alpha=0.8)
    inputs, y = batch()
    plain, used, logs = step_grads(m, inputs, y)
    assert min(logs["k_audio"], logs["k_visual"]) < 0.9  # one modality really is slowed
    n_conv = 0
    for name, g in plain.items():
        if is_conv(name, g):
            k = logs["k_audio"] if name.startswith("encoders.audio.") else logs["k_visual"]
            torch.testing.assert_close(used[name], g * k)
            n_conv += 1
        else:  # BatchNorm affine parameters and the fusion head: untouched
            torch.testing.assert_close(used[name], g, rtol=0, atol=0)
    assert n_conv == 6  # three conv kernels per tiny encoder


def test_ge_noise_only_on_conv_kernels_with_std_of_the_unmodulated_grad():
    m = make(ge=True, alpha=6.0)  # the slowed modality gets k < 1e-4: its modulated grad is ~0
    inputs, y = batch()
    torch.manual_seed(123)
    plain, used, logs = step_grads(m, inputs, y)
    slowed = "audio" if logs["k_audio"] < 1 else "visual"
    assert logs[f"k_{slowed}"] < 1e-3 and logs[f"k_{'visual' if slowed == 'audio' else 'audio'}"] == 1.0
    checked = set()
    for name, g in plain.items():
        if not is_conv(name, g):
            torch.testing.assert_close(used[name], g, rtol=0, atol=0)
            continue
        mod = name.split(".")[1]
        noise = used[name] - g * logs[f"k_{mod}"]
        assert noise.abs().sum() > 0
        if g.numel() >= 1000:  # enough elements for a sample std within a few percent
            assert noise.std().item() == pytest.approx(g.std().item() + 1e-8, rel=0.1)
            assert abs(noise.mean().item()) < 0.2 * g.std().item()
            checked.add(mod)
    assert checked == {"audio", "visual"}  # noise on both modalities, also the one with k = 1


@pytest.mark.parametrize("epoch,modulated", [(1, False), (2, True), (5, True), (6, False)])
def test_window_is_inclusive_and_zero_based(epoch, modulated):
    m = make(ge=True, alpha=2.0, modulation_starts=2, modulation_ends=5)
    inputs, y = batch()
    plain, used, logs = step_grads(m, inputs, y, epoch=epoch)
    assert "k_audio" in logs and "ratio" in logs  # the coefficient is computed every step
    changed = any(not torch.equal(used[n], g) for n, g in plain.items() if is_conv(n, g))
    assert changed == modulated
    if not modulated:
        for n, g in plain.items():
            torch.testing.assert_close(used[n], g, rtol=1e-6, atol=1e-7)


def test_describe_run_records_variant():
    assert make(ge=True).describe_run()["ogm_variant"] == "OGM-GE"
    assert make(ge=False).describe_run()["ogm_variant"] == "OGM"


# ---- bad input ------------------------------------------------------------------------------
def test_bad_hparams_rejected():
    hp = METHODS.get("ogm_ge").HParams
    with pytest.raises(ValidationError):
        hp(alpha=-0.1)
    with pytest.raises(ValidationError, match="before modulation_starts"):
        hp(modulation_starts=10, modulation_ends=5)
    with pytest.raises(ValidationError):
        hp(film_gated_estimator="mean")


# ---- three modalities (BalanceBenchmark's rule: ratio to the weakest) -------------------------
SHAPES3 = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8], "text": [5, 6]}


def make3(**hp: object):
    torch.manual_seed(0)
    cls = METHODS.get("ogm_ge")
    spec = ModelSpec(backbone="tiny", fusion="concat", input_shapes=dict(SHAPES3), num_classes=4)
    m = cls(spec, cls.HParams(**hp), TrainSpec(epochs=2, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9},
                                               scheduler={"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def test_three_modality_coefficients_slow_every_modality_above_the_weakest():
    k, rho = ogm_coefficients_multi({"audio": 30.0, "visual": 10.0, "text": 15.0}, 0.8)
    assert float(rho["audio"]) == pytest.approx(30 / (10 + 1e-5))
    assert float(k["audio"]) == pytest.approx(1 - math.tanh(0.8 * 30 / (10 + 1e-5)))
    assert float(k["text"]) == pytest.approx(1 - math.tanh(0.8 * 15 / (10 + 1e-5)))
    assert float(k["visual"]) == 1.0  # the weakest is never slowed
    k2, _ = ogm_coefficients_multi({"audio": 12.0, "visual": 12.0, "text": 12.0}, 0.8)
    assert all(float(v) == 1.0 for v in k2.values())  # all tied: nobody is ahead


def test_ratio_to_the_weakest_is_the_official_rule_for_two_modalities():
    for sa, sv in ((30.0, 20.0), (10.0, 20.0)):
        k_a, k_v, _ = ogm_coefficients(sa, sv, 0.8)
        k, _ = ogm_coefficients_multi({"audio": sa, "visual": sv}, 0.8)
        assert float(k["audio"]) == pytest.approx(float(k_a), rel=1e-5)
        assert float(k["visual"]) == pytest.approx(float(k_v), rel=1e-5)


def test_balancebench_score_counts_only_correct_items_through_cos_softmax():
    lg = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 0.5, 0.0]])
    y = torch.tensor([0, 0, 0])  # items 0 and 2 correct, item 1 wrong
    want = sum(float(torch.softmax(torch.cos(lg[i]), 0)[0]) for i in (0, 2))
    got = modality_scores({"a": lg}, y, "balancebench")["a"]
    assert float(got) == pytest.approx(want)
    assert float(modality_scores({"a": lg}, y, "probability")["a"]) == pytest.approx(float(torch.softmax(lg, 1)[:, 0].sum()))


def test_three_modalities_scale_each_encoders_weights_including_the_feature_encoder():
    m = make3(ge=False, alpha=0.8)
    g = torch.Generator().manual_seed(1)
    inputs = {k: torch.randn(16, *s, generator=g) for k, s in SHAPES3.items()}
    y = torch.randint(0, 4, (16,), generator=g)
    with torch.no_grad():
        split = m.model.fusion.split_logits(m.model(inputs).features)
    plain, used, logs = step_grads(m, inputs, y)
    assert {"k_audio", "k_visual", "k_text", "ratio_audio", "ratio_visual", "ratio_text"} <= set(logs)
    assert sum(logs[f"k_{x}"] == 1.0 for x in SHAPES3) >= 1 and min(logs[f"k_{x}"] for x in SHAPES3) < 1
    scores = {x: float(torch.softmax(split[x], 1).gather(1, y[:, None]).sum()) for x in SHAPES3}  # bias/3 split
    weakest = min(scores.values())
    for x in SHAPES3:
        assert logs[f"ratio_{x}"] == pytest.approx(scores[x] / (weakest + 1e-5), rel=1e-4)
    n_text = 0
    for name, g_ in plain.items():
        mod = name.split(".")[1] if name.startswith("encoders.") else None
        if mod is not None and g_.dim() >= 2:
            torch.testing.assert_close(used[name], g_ * logs[f"k_{mod}"])
            n_text += mod == "text"
        else:
            torch.testing.assert_close(used[name], g_, rtol=0, atol=0)
    assert n_text == 2  # the text MLP's two weight matrices; its biases untouched
    assert make3().describe_run()["ogm_estimator"] == "weight-split-bias/3"


def write_recipe(path: Path, method: str, epochs: int = 2) -> Path:
    """A tiny synthetic recipe with one method entry (the suite's shared template)."""
    return tiny_recipe(path, epochs=epochs, methods=f"[{method}]")


# ---- end to end -----------------------------------------------------------------------------
def test_end_to_end_logs_coefficients(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = tmp_path / "r.yaml"
    write_recipe(recipe, "{name: ogm_ge, alpha: 0.8}")
    db = tmp_path / "results.db"
    code = run_cli(monkeypatch, "train", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu")
    assert code == 0
    con = sqlite3.connect(db)
    status = con.execute("select status from run where method = 'ogm_ge'").fetchall()
    rows = con.execute("select epoch, name, value from epoch_metric where name like 'method/%' order by epoch, name").fetchall()
    con.close()
    assert status == [("completed",)]
    names = {n for _, n, _ in rows}
    assert {"method/k_audio", "method/k_visual", "method/ratio"} <= names
    ks = [v for _, n, v in rows if n.startswith("method/k_")]
    assert len(ks) == 4 and all(0 < v <= 1 for v in ks)
    assert any(v < 1 for v in ks)
