"""MSLR (Yao & Mihalcea, 2022, as the AGM repo runs it): the ratio memory, which gradients are scaled and by how much."""
from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_recipe
from method_util import SHAPES3, batch, epoch_ctx, make, step_ctx

from mmbench.methods.mslr import rate_ratios


def test_memory_fills_then_ratio_against_the_previous_five():
    mem: dict[str, list[float]] = {"a": []}
    for acc in (0.1, 0.2, 0.3, 0.4, 0.5):
        r, mem = rate_ratios(mem, {"a": acc}, 5)
        assert r is None
    r, mem = rate_ratios(mem, {"a": 0.6}, 5)
    assert r == {"a": pytest.approx(0.6 / 0.3)}
    assert mem == {"a": [0.2, 0.3, 0.4, 0.5, 0.6]}
    r, mem = rate_ratios(mem, {"a": 0.2}, 5)
    assert r == {"a": pytest.approx(0.2 / 0.4)}


def used_grads(m, inputs, labels, epoch=0):
    seen = {}
    h = m.optimizer.register_step_pre_hook(lambda *_: seen.update(
        {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}))
    m.update(inputs, labels, step_ctx(epoch))
    h.remove()
    return seen


def plain(model, inputs, labels):
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(inputs).logits, labels).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("fusion, shapes", [("concat", None), ("sum", None), ("concat", SHAPES3), ("gated", None)])
def test_encoder_and_own_head_gradients_scaled_by_c0_times_r(fusion, shapes):
    m = make("mslr", fusion=fusion, shapes=shapes, init_coeffs={"audio": 0.9, "visual": 1.1})
    m.ratios["audio"] = 2.0
    c = {"audio": 1.8, "visual": 1.1, "depth": 1.0}
    inputs, y = batch(shapes)
    ref = plain(m.model, inputs, y)
    got = used_grads(m, inputs, y)
    for n, g in ref.items():
        if n.startswith("encoders."):
            want = g * c[n.split(".")[1]]
        elif n.startswith("fusion.heads."):
            want = g * c[n.split(".")[2]]
        elif n == "fusion.fc.weight" and fusion == "concat":
            want = g.clone()
            for mod, sl in m.model.fusion.weight_slices().items():
                want[:, sl] *= c[mod]
        else:  # shared head parts (concat bias, film/gated heads) are not any modality's own
            want = g
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-8)


def test_outside_the_window_nothing_is_scaled():
    m = make("mslr", init_coeffs={"audio": 0.5}, modulation_starts=3)
    inputs, y = batch()
    ref = plain(m.model, inputs, y)
    got = used_grads(m, inputs, y, epoch=0)
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=1e-6, atol=1e-8)


def test_epoch_end_feeds_the_split_accuracy_into_the_memory():
    m = make("mslr", window=1)
    val = [batch(seed=s) for s in range(2)]
    logs = m.on_epoch_end(epoch_ctx([], val=val))
    assert m.ratios == {"audio": 1.0, "visual": 1.0} and len(m.memory["audio"]) == 1
    first = m.memory["audio"][0]
    assert logs["acc_audio"] == first
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    logs = m.on_epoch_end(epoch_ctx([], val=val))
    if first > 0:
        assert m.ratios["audio"] == pytest.approx(logs["acc_audio"] / first)
    state = m.extra_state()
    m2 = make("mslr", window=1)
    m2.load_extra_state(state)
    assert m2.ratios == m.ratios and m2.memory == m.memory


def test_end_to_end_two_epochs(mm_env: Path, cli):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods="[{name: mslr, init_coeffs: {audio: 0.9, visual: 1.1}, window: 1}]"))
    assert code == 0, out
    con = sqlite3.connect(mm_env / "results.db")
    names = {n for (n,) in con.execute("select distinct name from epoch_metric where name like 'method/%'")}
    status = con.execute("select status from run where method = 'mslr'").fetchall()
    con.close()
    assert status == [("completed",)]
    assert {"method/coeff_audio", "method/ratio_visual", "method/acc_audio"} <= names


@pytest.mark.parametrize("entry, needle", [
    ("{name: mslr, init_coeffs: {audio: -1}}", "init_coeffs"),
    ("{name: mslr, window: 0}", "window"),
    ("{name: mslr, modulation_starts: 9, modulation_ends: 3}", "modulation_ends"),
])
def test_bad_parameters_exit_2(mm_env: Path, cli, entry: str, needle: str):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=f"[{entry}]"), "--dry-run")
    assert code == 2, out
    assert needle in out
    assert not (mm_env / "runs").exists()


def test_unknown_modality_in_init_coeffs_exit_2_before_training(mm_env: Path, cli):
    """Checked against the prepared dataset's modalities (check_methods), so not in --dry-run."""
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods="[{name: mslr, init_coeffs: {text: 1.2}}]"))
    assert code == 2, out
    assert "text" in out and "audio" in out
    assert not (mm_env / "runs").exists() and not (mm_env / "results.db").exists()


def test_official_bug_option_feeds_the_visual_accuracy_to_audio():
    m = make("mslr", window=1, audio_as_visual=True)
    val = [batch(seed=s) for s in range(2)]
    logs = m.on_epoch_end(epoch_ctx([], val=val))
    assert logs["acc_audio"] == logs["acc_visual"]
    assert m.memory["audio"] == m.memory["visual"]
    assert m.describe_run()["mslr_accuracy"].startswith("audio-as-visual")
