"""Three modalities: the `synthetic/three` protocol, the 1-D feature encoders, and every
per-modality metric (accuracy, imbalance ratio, competition strength, probes) with M = 3."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbench.data.datasets.synthetic import PROTOCOLS, Synthetic, generate, recorded_params
from mmbench.errors import UserError
from mmbench.metrics.imbalance import imbalance_ratio
from mmbench.models.classifier import build_classifier
from mmbench.models.encoders import (
    MLPFeatureEncoder, TransformerFeatureEncoder, build_encoder, check_backbone,
)
from mmbench.models.fusion import ConcatFusion

THREE_RECIPE = """
name: {name}
dataset: {{name: synthetic, protocol: three}}
model: {{backbone: {backbone}, fusion: concat}}
train:
  epochs: 2
  batch_size: 32
  optimizer: {{name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 1.0e-4}}
methods: [joint]
seeds: [0]
"""


# ----- the data ------------------------------------------------------------------------------
def test_three_adds_text_and_keeps_tiny_audio_visual_bitwise() -> None:
    three, y3 = generate(PROTOCOLS["three"], "val")
    tiny, yt = generate(PROTOCOLS["tiny"], "val")
    assert set(three) == {"audio", "visual", "text"} and set(tiny) == {"audio", "visual"}
    assert three["text"].shape == (120, 8, 16) and three["text"].dtype == np.float32
    np.testing.assert_array_equal(y3, yt)
    np.testing.assert_array_equal(three["audio"], tiny["audio"])
    np.testing.assert_array_equal(three["visual"], tiny["visual"])


def test_text_carries_its_class_on_the_marked_tokens_only_for_informative_items() -> None:
    p = PROTOCOLS["three"]
    x, y = generate(p, "train")
    tmpl = np.random.default_rng([p.seed, 7]).standard_normal((p.num_classes, p.text_dim))
    # the token that best matches each template; the best-matching class = the shown class
    match = np.einsum("nld,cd->nlc", x["text"], tmpl).max(1).argmax(1)
    agree = float(np.mean(match == y))
    # 70 % informative, plus chance hits of the random 30 %; noise costs a few
    assert 0.6 < agree < 0.85, agree


def test_two_modality_protocols_record_no_text_parameters() -> None:
    """A store prepared before `text` existed must still count as up to date."""
    assert not any(k.startswith("text_") for k in recorded_params(PROTOCOLS["default"]))
    assert recorded_params(PROTOCOLS["three"])["text_len"] == 8
    assert Synthetic.modalities_of("three") == ("audio", "visual", "text")
    assert Synthetic.modalities_of("tiny") == ("audio", "visual")


# ----- the 1-D encoders ------------------------------------------------------------------------
@pytest.mark.parametrize("backbone, cls, dim", [("tiny", MLPFeatureEncoder, 32), ("resnet18", TransformerFeatureEncoder, 512),
                                                ("mlp", MLPFeatureEncoder, 32), ("transformer", TransformerFeatureEncoder, 512)])
def test_backbones_pick_a_feature_encoder_for_1d_modalities(backbone: str, cls: type, dim: int) -> None:
    seq = build_encoder(backbone, "text", [8, 16])
    vec = build_encoder(backbone, "audio", [74])  # e.g. a pre-extracted audio feature vector
    assert isinstance(seq, cls) and isinstance(vec, cls) and seq.out_dim == dim
    assert seq(torch.randn(3, 8, 16)).shape == (3, dim)
    assert vec(torch.randn(3, 74)).shape == (3, dim)


def test_mlp_encoder_is_a_bag_of_tokens_and_transformer_is_order_aware() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    perm = x[:, torch.randperm(8)]
    mlp = build_encoder("tiny", "text", [8, 16]).eval()
    torch.testing.assert_close(mlp(x), mlp(perm))
    tr = build_encoder("resnet18", "text", [8, 16]).eval()
    assert not torch.allclose(tr(x), tr(perm))  # learned positions
    with pytest.raises(ValueError, match="longer"):
        tr(torch.randn(1, 9, 16))


def test_image_backbones_still_encode_images_and_feature_backbones_refuse_them() -> None:
    assert build_encoder("tiny", "audio", [1, 16, 16]).out_dim == 32
    check_backbone("tiny", {"audio": [1, 16, 16], "visual": [2, 3, 16, 16], "text": [8, 16]})
    with pytest.raises(UserError, match="1-D feature modalities only.*'audio'"):
        check_backbone("mlp", {"audio": [1, 16, 16], "text": [8, 16]})
    check_backbone("transformer", {"audio": [20, 74], "text": [8, 300]})  # an all-feature dataset


# ----- per-modality metrics with three modalities ------------------------------------------------
def test_imbalance_ratio_is_max_over_min_of_three() -> None:
    assert imbalance_ratio({"audio": 0.6, "visual": 0.2, "text": 0.3}) == pytest.approx(3.0)


def test_concat_estimators_with_three_modalities() -> None:
    torch.manual_seed(0)
    dims = {"audio": 4, "visual": 3, "text": 2}
    f = ConcatFusion(dims, 5)
    x = {m: torch.randn(6, d) for m, d in dims.items()}
    split = f.split_logits(x)
    torch.testing.assert_close(sum(split.values()), f(x))  # bias split in thirds
    torch.testing.assert_close(split["text"], x["text"] @ f.fc.weight[:, 7:].T + f.fc.bias / 3)
    means = {m: v.mean(0, keepdim=True) for m, v in x.items()}
    est = f.modality_logits(x, means)
    held = {"audio": means["audio"].expand(6, 4), "visual": means["visual"].expand(6, 3), "text": x["text"]}
    torch.testing.assert_close(est["text"], f(held))


def test_plan_adds_a_unimodal_reference_per_modality_of_an_unprepared_protocol(tmp_path: Path) -> None:
    from mmbench.config import Recipe
    from mmbench.sweep.plan import plan

    rec = Recipe.model_validate({"name": "c", "dataset": {"name": "synthetic", "protocol": "three"},
                                 "metrics": {"competition": True}, "methods": ["joint"], "seeds": [0]})
    joint = [r for r in plan(rec, data_dir=str(tmp_path / "empty")) if r.cfg["method"]["name"] == "joint"]
    assert set(joint[0].deps) == {"audio", "visual", "text"}


def test_three_modality_sweep_logs_every_per_modality_metric(mm_env: Path, cli) -> None:
    r = mm_env / "r.yaml"
    r.write_text(THREE_RECIPE.format(name="three", backbone="tiny") + "metrics: {competition: true, probe: true}\n")
    code, out = cli("sweep", r)
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as c:
        names = {n for (n,) in c.execute(
            "select distinct f.name from final_metric f join run r on r.id=f.run_id "
            "where r.method='joint' and f.split='test' and f.selection='best-val'")}
        n_uni = c.execute("select count(*) from run where method='unimodal'").fetchone()[0]
    for m in ("audio", "visual", "text"):
        assert {f"acc/{m}", f"score/{m}", f"competition/{m}", f"probe_acc/{m}"} <= names, (m, sorted(names))
    assert "imbalance_ratio" in names
    assert n_uni == 3


def test_feature_backbone_on_image_modalities_is_refused_before_training(mm_env: Path, cli) -> None:
    r = mm_env / "r.yaml"
    r.write_text(THREE_RECIPE.format(name="bad", backbone="mlp"))
    code, out = cli("sweep", r)
    assert code == 2, out
    assert "1-D feature modalities only" in out
    assert not (mm_env / "runs").exists() or not any((mm_env / "runs").rglob("checkpoint.pt"))


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_two_modality_fusions_are_refused_for_three_before_training(fusion: str) -> None:
    from mmbench.methods.base import METHODS, ModelSpec

    shapes = {"audio": [1, 16, 16], "visual": [2, 3, 16, 16], "text": [8, 16]}
    cls = METHODS.get("joint")
    with pytest.raises(UserError, match=f"fusion '{fusion}' needs exactly two modalities.*concat or sum"):
        cls.check(ModelSpec("tiny", fusion, shapes, 6), cls.HParams())
    cls.check(ModelSpec("tiny", fusion, {k: shapes[k] for k in ("audio", "visual")}, 6), cls.HParams())
    uni = METHODS.get("unimodal")  # one modality: the fusion does not apply
    uni.check(ModelSpec("tiny", fusion, shapes, 6), uni.HParams(modality="text"))
    with pytest.raises(UserError, match="1-D feature modalities only"):
        uni.check(ModelSpec("mlp", "concat", shapes, 6), uni.HParams(modality="audio"))
