"""MBSD (BalanceBenchmark's form): the pair weights, RS and "KL" terms on hand-made logits, the
step against a hand-written loss, three modalities (pairs averaged, RS on probabilities), the
modulation window, refusals and one run end to end."""
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
from mmbench.methods.mbsd import mbsd_loss, pair_terms


def test_pair_terms_by_hand():
    o = {"audio": torch.log(torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])),
         "visual": torch.log(torch.tensor([[0.4, 0.6], [0.9, 0.1], [0.5, 0.5]]))}
    p = {m: torch.softmax(v, 1) for m, v in o.items()}
    y = torch.tensor([0, 0, 1])
    w, rs, kl = pair_terms(o, p, y, "audio", "visual", rs_on_probs=False)
    # sample 0: audio right (0.7 vs 0.4) -> w 0.3; sample 1: visual right (0.9 vs 0.2) -> 0.7;
    # sample 2: both wrong (argmax 0, 0 with true 1) -> w 0
    assert torch.allclose(w, torch.tensor([0.3, 0.7, 0.0]), atol=1e-6)
    ps, pw = torch.tensor([0.7, 0.9, 0.5]), torch.tensor([0.4, 0.2, 0.4])
    assert torch.allclose(kl, pw * (torch.log(pw) - ps), atol=1e-6)  # kl_div on probabilities, as the code
    assert torch.allclose(rs, ((o["audio"] - o["visual"]) ** 2).sum(1) / 2, atol=1e-6)
    _, rs_p, _ = pair_terms(o, p, y, "audio", "visual", rs_on_probs=True)
    assert torch.allclose(rs_p, ((p["audio"] - p["visual"]) ** 2).sum(1) / 2, atol=1e-6)


def test_total_for_two_modalities():
    g = torch.Generator().manual_seed(0)
    split = {m: torch.randn(6, 3, generator=g) for m in ("audio", "visual")}
    fused = split["audio"] + split["visual"]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    total, parts = mbsd_loss(fused, split, y, ["audio", "visual"])
    p = {m: torch.softmax(v, 1) for m, v in split.items()}
    w, rs, kl = pair_terms(split, p, y, "audio", "visual", False)
    want = F.cross_entropy(fused, y) + F.cross_entropy(split["audio"], y) + F.cross_entropy(split["visual"], y) \
        + (w * rs).sum() / 6 + (w * kl).sum() / 6
    assert torch.allclose(total, want, atol=1e-6)
    assert math.isclose(float(parts["distilled"]), float((w > 0).float().mean()))


def test_three_modalities_average_pairs_and_compare_probabilities():
    g = torch.Generator().manual_seed(1)
    mods = ["audio", "visual", "depth"]
    split = {m: torch.randn(8, 4, generator=g) for m in mods}
    fused = sum(split.values())
    y = torch.randint(0, 4, (8,), generator=g)
    total, parts = mbsd_loss(fused, split, y, mods)
    p = {m: torch.softmax(v, 1) for m, v in split.items()}
    rs = kl = 0
    for a, b in (("audio", "visual"), ("audio", "depth"), ("visual", "depth")):
        w, r, k = pair_terms(split, p, y, a, b, True)
        rs, kl = rs + (w * r).sum() / 8, kl + (w * k).sum() / 8
    want = F.cross_entropy(fused, y) + sum(F.cross_entropy(split[m], y) for m in mods) + kl / 3 + rs / 3
    assert torch.allclose(total, want, atol=1e-6)
    t_logits, _ = mbsd_loss(fused, split, y, mods, rs_space="logits")
    assert not torch.allclose(t_logits, total)


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_step_is_sgd_on_the_hand_written_loss(fusion):
    m = make("mbsd", fusion=fusion)
    ref = copy.deepcopy(m.model)
    x, y = batch()
    before = params(m)
    logs = m.update(x, y, ctx())
    out = ref(x)
    split = ref.fusion.split_logits(out.features)
    p = {k: torch.softmax(v, 1) for k, v in split.items()}
    w, rs, kl = pair_terms(split, p, y, "audio", "visual", False)
    loss = F.cross_entropy(out.logits, y) + F.cross_entropy(split["audio"], y) + F.cross_entropy(split["visual"], y) \
        + (w * rs).sum() / len(y) + (w * kl).sum() / len(y)
    loss.backward()
    assert torch.allclose(logs["loss"], loss, atol=1e-5)
    after = params(m)
    for k, prm in ref.named_parameters():
        assert torch.allclose(after[k], before[k] - prm.grad, atol=1e-5, rtol=1e-4), k
    assert {"loss_rs", "loss_kl", "loss_audio", "loss_visual", "distilled"} <= set(logs)


def test_three_modalities_step_and_window():
    m = make("mbsd", shapes=THREE, modulation_starts=1)
    x, y = batch(THREE)
    ref = copy.deepcopy(m.model)
    logs = m.update(x, y, ctx(epoch=0))
    assert torch.allclose(logs["loss"], F.cross_entropy(ref(x).logits, y), atol=1e-6) and set(logs) == {"loss"}
    assert torch.isfinite(m.update(x, y, ctx(epoch=1))["loss"])
    assert m.describe_run()["mbsd_rs"] == "probabilities"


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_non_additive_fusions_refused(fusion):
    cls = METHODS.get("mbsd")
    with pytest.raises(UserError, match="additive"):
        cls.check(ModelSpec("tiny", fusion, {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}, 4), cls.HParams())


@pytest.mark.parametrize("entry,needle", [
    ("[{name: mbsd, rs_space: features}]", "rs_space"),
    ("[{name: mbsd, modulation_starts: 4, modulation_ends: 1}]", "modulation_ends"),
])
def test_cli_bad_parameters_exit_2(mm_env: Path, cli, entry, needle):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=entry))
    assert code == 2, out
    assert needle in out
    assert not list(mm_env.rglob("config.json"))


def test_end_to_end(mm_env: Path, cli):
    code, out = cli("train", write_recipe(mm_env / "r.yaml", methods="[mbsd]"), "--set", "train.eval_train=false")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as con:
        (status,), = con.execute("select status from run where method='mbsd'").fetchall()
        names = {n for (n,) in con.execute("select distinct name from epoch_metric")}
    assert status == "completed"
    assert {"method/loss_rs", "method/loss_kl", "method/distilled", "acc/audio"} <= names
