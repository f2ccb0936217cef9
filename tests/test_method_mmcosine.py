"""MMCosine: per-modality cosine logits on hand-made tensors, norm invariance, the step's loss and
gradients against a hand-written cosine loss, the unused bias, M = 3, the official evaluation
head, refusals and one run end to end."""
from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_recipe
from method_helpers import THREE, batch, ctx, make, params
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec
from mmbench.models.fusion import ConcatFusion, SumFusion
from mmbench.models.heads import CosineHead, cosine_logits, shared_bias, weight_blocks


def test_cosine_logits_by_hand():
    feat = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])  # (C=3, D=2)
    got = cosine_logits(feat, w, 10.0)
    r = 2 ** -0.5
    want = 10 * torch.tensor([[0.6, 0.8, -(0.6 + 0.8) * r], [0.0, -1.0, r]])
    assert torch.allclose(got, want, atol=1e-6)


def test_concat_blocks_are_the_weight_columns_and_the_bias_is_shared():
    head = ConcatFusion({"audio": 2, "visual": 3}, 4)
    w = weight_blocks(head)
    assert torch.equal(w["audio"], head.fc.weight[:, :2]) and torch.equal(w["visual"], head.fc.weight[:, 2:])
    assert shared_bias(head) is head.fc.bias
    s = SumFusion({"audio": 2, "visual": 3}, 4)
    assert weight_blocks(s)["visual"] is s.heads["visual"].weight and shared_bias(s) is None


def test_cosine_head_is_the_sum_of_its_parts_and_blind_to_norms():
    torch.manual_seed(0)
    head = CosineHead(ConcatFusion({"audio": 3, "visual": 3}, 4), 7.0)
    f = {"audio": torch.randn(5, 3), "visual": torch.randn(5, 3)}
    parts = head.split_logits(f)
    assert torch.allclose(head(f), parts["audio"] + parts["visual"])
    scaled = {"audio": f["audio"] * 50.0, "visual": f["visual"] * 0.01}
    assert torch.allclose(head(scaled), head(f), atol=1e-5)
    assert head(f).abs().max() <= 2 * 7.0 + 1e-5  # |cos| <= 1 per modality
    assert head.modality_logits(f, {}) .keys() == parts.keys()


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_step_is_sgd_on_the_hand_written_cosine_loss(fusion):
    m = make("mmcosine", fusion=fusion, scaling=10.0)
    ref = copy.deepcopy(m.model)
    x, y = batch()
    before = params(m)
    logs = m.update(x, y, ctx())
    feats = ref.encode(x)
    base = ref.fusion.base
    blocks = {"audio": base.fc.weight[:, :ref.fusion.dims["audio"]], "visual": base.fc.weight[:, ref.fusion.dims["audio"]:]} \
        if fusion == "concat" else {k: base.heads[k].weight for k in ("audio", "visual")}
    logits = sum(10.0 * F.normalize(feats[k], dim=1) @ F.normalize(blocks[k], dim=1).t() for k in ("audio", "visual"))
    loss = F.cross_entropy(logits, y)
    loss.backward()
    assert torch.allclose(logs["loss"], loss, atol=1e-6)
    after = params(m)
    for k, p in ref.named_parameters():
        if p.grad is None:
            assert torch.equal(after[k], before[k]), k  # the bias of the linear head is unused
            continue
        assert torch.allclose(after[k], before[k] - p.grad, atol=1e-5, rtol=1e-4), k
    bias = "fusion.base.fc.bias" if fusion == "concat" else "fusion.base.heads.audio.bias"
    assert torch.equal(after[bias], before[bias])
    assert set(logs) == {"loss", "logit_audio", "logit_visual"}
    assert abs(float(logs["logit_audio"])) <= 10.0


def test_three_modalities():
    m = make("mmcosine", shapes=THREE)
    x, y = batch(THREE)
    out = m.predict(x)
    parts = m.model.fusion.split_logits(out.features)
    assert set(parts) == set(THREE)
    assert torch.allclose(out.logits, parts["audio"] + parts["visual"] + parts["depth"], atol=1e-6)
    assert torch.isfinite(m.update(x, y, ctx())["loss"])


def test_outside_the_window_trains_the_linear_head():
    m = make("mmcosine", modulation_starts=1, modulation_ends=3)
    ref = copy.deepcopy(m.model)
    x, y = batch()
    logs = m.update(x, y, ctx(epoch=0))
    assert torch.allclose(logs["loss"], F.cross_entropy(ref.fusion.base(ref.encode(x)), y), atol=1e-6)
    assert set(logs) == {"loss"}


def test_eval_head_linear_is_the_official_valid():
    m = make("mmcosine", eval_head="linear")
    m.eval()
    x, _ = batch()
    out = m.predict(x)
    assert torch.allclose(out.logits, m.model.fusion.base(m.model.encode(x)))
    assert m.describe_run()["estimator"] == "cosine-branch"


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_non_additive_fusions_refused(fusion):
    cls = METHODS.get("mmcosine")
    with pytest.raises(UserError, match="block"):
        cls.check(ModelSpec("tiny", fusion, {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}, 4), cls.HParams())


@pytest.mark.parametrize("entry,needle", [
    ("[{name: mmcosine, scaling: 0}]", "scaling"),
    ("[{name: mmcosine, eval_head: fused}]", "eval_head"),
    ("[{name: mmcosine, modulation_starts: 4, modulation_ends: 1}]", "modulation_ends"),
])
def test_cli_bad_parameters_exit_2(mm_env: Path, cli, entry, needle):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=entry))
    assert code == 2, out
    assert needle in out
    assert not list(mm_env.rglob("config.json"))


def test_end_to_end(mm_env: Path, cli):
    code, out = cli("train", write_recipe(mm_env / "r.yaml", methods="[{name: mmcosine, scaling: 10}]"),
                    "--set", "train.eval_train=false")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as con:
        (status, env), = con.execute("select status, env_json from run where method='mmcosine'").fetchall()
        names = {n for (n,) in con.execute("select distinct name from epoch_metric")}
    assert status == "completed"
    assert "cosine-branch" in (env or "")
    assert {"method/logit_audio", "method/logit_visual", "acc/audio", "acc/visual"} <= names


@pytest.mark.parametrize("method", ["mmcosine", "cml", "mbsd", "lfm"])
def test_cli_refuses_film_before_training(mm_env: Path, cli, method):
    """The four methods that read each modality's block of the head refuse film with the reason."""
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=f"[{method}]"), "--set", "model.fusion=film")
    assert code == 2, out
    assert "film" in out and "additive" in out
    assert not list(mm_env.rglob("config.json"))
