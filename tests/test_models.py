"""Encoders, fusions and the per-modality logit estimators (DESIGN.md §4.3)."""
from __future__ import annotations

import pytest
import torch

from mmbench.errors import UserError
from mmbench.models.classifier import build_classifier
from mmbench.models.encoders import build_encoder
from mmbench.models.fusion import ConcatFusion, SumFusion, build_fusion

DIMS = {"audio": 5, "visual": 3}


def feats(n: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {m: torch.randn(n, d, generator=g) for m, d in DIMS.items()}


def test_concat_raw_split_sums_to_fused_logits() -> None:
    torch.manual_seed(0)
    f = ConcatFusion(DIMS, 4)
    x = feats()
    split = f.split_logits(x)
    torch.testing.assert_close(split["audio"] + split["visual"], f(x))
    # audio columns come first, each half of the bias
    w, b = f.fc.weight, f.fc.bias
    torch.testing.assert_close(split["audio"], x["audio"] @ w[:, :5].T + b / 2)


def test_concat_mean_feature_estimator_holds_the_other_modality_at_its_mean() -> None:
    torch.manual_seed(0)
    f = ConcatFusion(DIMS, 4)
    x = feats()
    means = {m: v.mean(0, keepdim=True) for m, v in x.items()}
    est = f.modality_logits(x, means)
    w, b = f.fc.weight, f.fc.bias
    torch.testing.assert_close(est["audio"], x["audio"] @ w[:, :5].T + means["visual"] @ w[:, 5:].T + b)
    # differs from the raw split only by a per-class constant: the centred estimate
    diff = est["audio"] - f.split_logits(x)["audio"]
    torch.testing.assert_close(diff, diff[:1].expand_as(diff))
    assert not torch.allclose(diff, torch.zeros_like(diff))


def test_sum_fusion_uses_each_branch_head() -> None:
    torch.manual_seed(0)
    f = SumFusion(DIMS, 4)
    x = feats()
    est = f.modality_logits(x, {m: v.mean(0, keepdim=True) for m, v in x.items()})
    torch.testing.assert_close(est["audio"], f.heads["audio"](x["audio"]))
    torch.testing.assert_close(est["audio"] + est["visual"], f(x))
    assert f.estimator == "branch-head"


@pytest.mark.parametrize("name", ["film", "gated"])
def test_film_and_gated_estimate_with_other_at_mean(name: str) -> None:
    torch.manual_seed(0)
    f = build_fusion(name, DIMS, 4)
    x = feats()
    means = {m: v.mean(0, keepdim=True) for m, v in x.items()}
    est = f.modality_logits(x, means)
    torch.testing.assert_close(est["visual"], f({"audio": means["audio"].expand(7, 5), "visual": x["visual"]}))
    assert f(x).shape == (7, 4)


@pytest.mark.parametrize("name", ["film", "gated"])
def test_two_modality_fusions_reject_three(name: str) -> None:
    with pytest.raises(UserError, match="exactly two"):
        build_fusion(name, {"a": 2, "b": 2, "c": 2}, 3)


@pytest.mark.parametrize("backbone, dim", [("tiny", 32), ("resnet18", 512)])
def test_encoders_pool_audio_and_video(backbone: str, dim: int) -> None:
    a = build_encoder(backbone, "audio", [1, 32, 24])
    v = build_encoder(backbone, "visual", [2, 3, 32, 32])
    assert a(torch.randn(2, 1, 32, 24)).shape == (2, dim)
    assert v(torch.randn(2, 2, 3, 32, 32)).shape == (2, dim)


def test_video_encoder_averages_frames() -> None:
    torch.manual_seed(0)
    v = build_encoder("tiny", "visual", [2, 3, 16, 16]).eval()
    x = torch.randn(1, 2, 3, 16, 16)
    both = v(x)
    each = (v(x[:, :1]) + v(x[:, 1:])) / 2
    torch.testing.assert_close(both, each)


def test_resnet18_layout_matches_the_repos() -> None:
    m = build_encoder("resnet18", "audio", [1, 257, 188])
    n_params = sum(p.numel() for p in m.parameters())
    assert m.trunk.conv1.in_channels == 1 and m.trunk.conv1.weight.shape == (64, 1, 7, 7)
    assert n_params == 11_170_240  # torchvision resnet18 minus fc, conv1 with one input channel
    # 257x188 spectrogram -> 512 x 9 x 6 map, as docs/README.md "Backbones" states
    assert m.trunk(torch.randn(1, 1, 257, 188)).shape == (1, 512, 9, 6)


def test_repo_init_overrides_backbone_bn_init() -> None:
    model = build_classifier("tiny", "concat", {"audio": [1, 16, 16], "visual": [1, 3, 16, 16]}, 3, init="repo")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) for b in bns)
    assert torch.all(model.fusion.fc.bias == 0)
