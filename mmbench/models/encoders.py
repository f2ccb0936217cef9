"""Modality encoders: input tensor -> pooled feature (B, D).

ResNet18 as every method repo uses it (docs/README.md "Backbones"): BasicBlock [2,2,2,2], widths
64-128-256-512, no pretraining, no avgpool/fc inside; audio conv1 takes 1 channel, visual frames
are folded into the batch and pooled over time and space together. `tiny` is a 3-layer CNN with
the same input/output contract for CPU runs and tests; `small` a 4-layer one for real data on a CPU.

1-D modalities (pre-extracted features: a vector (D,) or a sequence (L, D), e.g. CMU-MOSEI's
word/COVAREP/Facet streams or synthetic/three's `text`) are recognised by their input rank (<= 2)
and get a feature encoder instead: `mlp` (per-token MLP, mean over tokens) or `transformer`
(a small pre-norm transformer encoder, mean over tokens). Each image backbone names the feature
encoder it pairs with (`tiny` -> 32-d mlp, `resnet18` -> 512-d transformer) so a recipe with
one `model.backbone` serves mixed datasets; `mlp` / `transformer` as the backbone serve
all-feature datasets and refuse image/video modalities.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mmbench.errors import UserError
from mmbench.registry import Registry

BackboneFactory = Callable[[str, int], "Encoder"]
BACKBONES: Registry[BackboneFactory] = Registry("backbone")


class Encoder(nn.Module):
    """Maps one modality's input to a pooled feature vector of size `out_dim`.

    Audio input is (B, C, F, T); visual input is (B, T, C, H, W) and its frames are encoded as
    images then averaged over time and space (the 3-D adaptive average pool of the repos).
    """

    out_dim: int

    def __init__(self, trunk: nn.Module, out_dim: int, video: bool) -> None:
        super().__init__()
        self.trunk = trunk
        self.out_dim = out_dim
        self.video = video

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.video:
            b, t = x.shape[:2]
            y = self.trunk(x.reshape(b * t, *x.shape[2:]))
            y = y.reshape(b, t, *y.shape[1:])  # (B, T, D, h, w)
            return y.mean(dim=(1, 3, 4))
        return self.trunk(x).mean(dim=(2, 3))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class ResNet18Trunk(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers = []
        cin = 64
        for i, w in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        # the backbone's own init (overridden by the model-level init of the recipes that use one)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TinyTrunk(nn.Module):
    def __init__(self, in_channels: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (width, width * 2, width * 2):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.net = nn.Sequential(*layers[:-1])  # no pool after the last block: keep some space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallTrunk(nn.Module):
    """Four conv blocks, widths w-2w-4w-4w (8-16-32-32), 2x2 max-pool after the first three.

    Why not `tiny` for real audio: its receptive field (~18 input pixels) sees ~0.2 s of a
    spectrogram, so after the global pool a spoken digit is a bag of short sounds; on AV-MNIST
    audio it stayed near 30-45 % while a linear model on the same features reaches 92 %. Four
    blocks see ~0.5 s (the mean FSDD recording is 0.44 s); at width 8 they cost about what tiny
    does (audio-only on AV-MNIST: ~96 % val with batch statistics after 5 epochs, as at width 16).
    """

    def __init__(self, in_channels: int, width: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate((width, width * 2, width * 4, width * 4)):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@BACKBONES.register("resnet18")
def resnet18(modality: str, in_channels: int) -> Encoder:
    """ResNet18 from scratch (512-d), as in OGM-GE, AGM, MMPareto, Re-learning and MIE."""
    return Encoder(ResNet18Trunk(in_channels), 512, video=modality_is_video(modality))


@BACKBONES.register("tiny")
def tiny(modality: str, in_channels: int) -> Encoder:
    """Three conv blocks (32-d): CPU-sized, for the synthetic data and tests."""
    return Encoder(TinyTrunk(in_channels), 32, video=modality_is_video(modality))


@BACKBONES.register("small")
def small(modality: str, in_channels: int) -> Encoder:
    """Four conv blocks (32-d): CPU-sized, wide enough in time to learn spoken digits (AV-MNIST)."""
    return Encoder(SmallTrunk(in_channels), 32, video=modality_is_video(modality))


VIDEO_MODALITIES = {"visual", "video", "flow", "rgb"}


def modality_is_video(modality: str) -> bool:
    return modality in VIDEO_MODALITIES


def build_encoder(backbone: str, modality: str, input_shape: list[int]) -> nn.Module:
    """`input_shape` excludes the batch: audio (C, F, T), visual (T, C, H, W), features (D,) or (L, D)."""
    if is_feature_input(input_shape):
        return build_feature_encoder(backbone, input_shape)
    in_channels = input_shape[1] if modality_is_video(modality) else input_shape[0]
    return BACKBONES.get(backbone)(modality, in_channels)


# ----- 1-D feature modalities ---------------------------------------------------------------
FeatureFactory = Callable[[int, int], "FeatureEncoder"]  # (feature dim, max tokens) -> encoder
FEATURE_ENCODERS: Registry[FeatureFactory] = Registry("feature encoder")
# the feature encoder each image backbone uses for a 1-D modality; a feature backbone is its own
FEATURE_PAIRING = {"tiny": "mlp", "small": "mlp", "resnet18": "transformer"}


def is_feature_input(input_shape: list[int]) -> bool:
    """A vector (D,) or a sequence of vectors (L, D): no channel/space axes to convolve."""
    return len(input_shape) <= 2


class FeatureEncoder(nn.Module):
    """Maps (B, D) or (B, L, D) features to a pooled (B, out_dim) vector; a vector is one token."""

    out_dim: int

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, None, :] if x.dim() == 2 else x


class MLPFeatureEncoder(FeatureEncoder):
    """Linear-ReLU-Linear-ReLU applied to every token, then the mean over tokens (a bag of
    features: order-free, the 1-D analogue of the CNNs' global average pool)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim),
                                 nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.tokens(x)).mean(dim=1)


class TransformerFeatureEncoder(FeatureEncoder):
    """Linear projection + learned positions, `layers` pre-norm transformer encoder layers
    (GELU, no dropout so train and eval passes agree), final LayerNorm, mean over tokens."""

    def __init__(self, in_dim: int, max_len: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.out_dim = width
        self.proj = nn.Linear(in_dim, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        if t.shape[1] > self.pos.shape[1]:
            raise ValueError(f"sequence of {t.shape[1]} tokens, longer than the {self.pos.shape[1]} this encoder was built for")
        h = self.blocks(self.proj(t) + self.pos[:, : t.shape[1]])
        return self.norm(h).mean(dim=1)


@FEATURE_ENCODERS.register("mlp")
def mlp_features(in_dim: int, max_len: int) -> FeatureEncoder:
    """Per-token MLP (64 hidden, 32-d out), mean over tokens: the `tiny` pairing."""
    return MLPFeatureEncoder(in_dim, 64, 32)


@FEATURE_ENCODERS.register("transformer")
def transformer_features(in_dim: int, max_len: int) -> FeatureEncoder:
    """2-layer transformer, width 512, 8 heads: the `resnet18` pairing (same 512-d output)."""
    return TransformerFeatureEncoder(in_dim, max_len, 512, 8, 2)


def _feature_only(name: str) -> BackboneFactory:
    def factory(modality: str, in_channels: int) -> Encoder:
        raise UserError(f"backbone '{name}' encodes 1-D feature modalities only, and '{modality}' is an "
                        "image/video input; set model.backbone to tiny or resnet18 (they encode images and "
                        "video, and pick a feature encoder for the 1-D modalities themselves)")
    factory.__doc__ = f"The `{name}` feature encoder for every modality (all must be 1-D features)."
    return factory


for _name in FEATURE_ENCODERS.names():
    BACKBONES.register(_name)(_feature_only(_name))


def feature_encoder_name(backbone: str) -> str:
    if backbone in FEATURE_ENCODERS:
        return backbone
    if backbone not in FEATURE_PAIRING:
        raise UserError(f"backbone '{backbone}' has no encoder for 1-D feature modalities; "
                        f"use one of: {', '.join(sorted({*FEATURE_PAIRING, *FEATURE_ENCODERS.names()}))}")
    return FEATURE_PAIRING[backbone]


def build_feature_encoder(backbone: str, input_shape: list[int]) -> FeatureEncoder:
    in_dim = input_shape[-1]
    max_len = input_shape[0] if len(input_shape) == 2 else 1
    return FEATURE_ENCODERS.get(feature_encoder_name(backbone))(in_dim, max_len)


def check_backbone(backbone: str, input_shapes: dict[str, list[int]]) -> None:
    """Raise UserError before training if `backbone` cannot encode one of the modalities."""
    for m, shape in input_shapes.items():
        if not shape:  # not known yet (a dry run before `prepare`): checked when the store exists
            continue
        if is_feature_input(shape):
            feature_encoder_name(backbone)
        elif backbone in FEATURE_ENCODERS:
            BACKBONES.get(backbone)(m, 0)
