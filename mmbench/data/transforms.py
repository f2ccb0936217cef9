"""Per-batch input transforms, applied on the training device after the batch is loaded.

Deterministic preprocessing happens once in `prepare`; only random augmentation (crops, flips)
and dtype/normalisation happen here, on the GPU when there is one, so loader workers only copy
memory.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BatchTransform = Callable[[torch.Tensor, bool, torch.Generator | None], torch.Tensor]


def identity(x: torch.Tensor, train: bool, gen: torch.Generator | None = None, **_: Any) -> torch.Tensor:
    return x.float()


def _random_resized_boxes(
    n: int, h: int, w: int, gen: torch.Generator | None, device: torch.device,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling, vectorised: 10 tries, centre-crop fallback."""
    area = h * w
    tries = 10
    log_r = torch.log(torch.tensor(ratio))
    s = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=gen) * area
    r = torch.exp(torch.empty(n, tries).uniform_(float(log_r[0]), float(log_r[1]), generator=gen))
    cw = torch.sqrt(s * r).round()
    ch = torch.sqrt(s / r).round()
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    boxes = torch.empty(n, 4)
    u = torch.rand(n, 2, generator=gen)
    for i in range(n):
        j = int(first[i])
        if j >= 0:
            bw, bh = float(cw[i, j]), float(ch[i, j])
        else:  # fallback: whole image clipped to the ratio range
            in_ratio = w / h
            if in_ratio < ratio[0]:
                bw, bh = float(w), float(round(w / ratio[0]))
            elif in_ratio > ratio[1]:
                bh, bw = float(h), float(round(h * ratio[1]))
            else:
                bw, bh = float(w), float(h)
        x0 = float(torch.floor(u[i, 0] * (w - bw + 1)))
        y0 = float(torch.floor(u[i, 1] * (h - bh + 1)))
        boxes[i] = torch.tensor([x0, y0, x0 + bw, y0 + bh])
    return boxes.to(device)


def frames(
    x: torch.Tensor, train: bool, gen: torch.Generator | None = None, size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD, augment: bool = True, **_: Any,
) -> torch.Tensor:
    """uint8 frames (B, T, 3, H, W) -> normalised float (B, T, 3, size, size).

    Train: RandomResizedCrop(size) + RandomHorizontalFlip per clip (the same crop for all of a
    clip's frames, as the method repos apply one transform to a clip's frames); eval: Resize((size,
    size)). Bilinear resampling via roi_align on a GPU, so a whole batch is cropped in one kernel;
    uint8 interpolation per clip on a CPU (see `_crop_resize_cpu`).
    Frames stored at `size` already (the prepared stores) skip the resize, which is then exact;
    `augment=False` (digits: a flipped 2 is no 2) trains on the eval view.
    """
    b, t, c, h, w = x.shape
    train = train and augment
    if not train and h == size and w == size:
        return _normalize(x.to(torch.float32, copy=True), mean, std)
    if train:
        boxes = _random_resized_boxes(b, h, w, gen, x.device)
    else:
        boxes = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=x.device).expand(b, 4)
    if x.device.type == "cpu":
        out = _crop_resize_cpu(x.reshape(b, t * c, h, w), boxes, size)  # uint8
    else:
        xf = x.float().reshape(b, t * c, h, w)
        rois = torch.cat([torch.arange(b, device=x.device, dtype=xf.dtype)[:, None], boxes.to(xf.dtype)], 1)
        # a box no larger than the output is upsampled: one sample per output pixel is exact bilinear
        # interpolation; larger boxes average 2x2 samples (some antialiasing)
        up = bool(((boxes[:, 2] - boxes[:, 0]).max() <= size) and ((boxes[:, 3] - boxes[:, 1]).max() <= size))
        out = roi_align(xf, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=1 if up else 2, aligned=True)
    if train:
        flip = torch.rand(b, generator=gen) < 0.5
        if flip.any():
            idx = flip.nonzero().squeeze(1).to(x.device)
            out[idx] = out[idx].flip(-1)
    return _normalize(out.reshape(b, t, c, size, size), mean, std)


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Values on the 0-255 scale (B, T, C, H, W) -> (x / 255 - mean) / std, as one in-place multiply-add
    (3x faster on a CPU than three separate passes). `x` must be uint8 or a float32 tensor of our own."""
    c = x.shape[2]
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 1, c, 1, 1)
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 1, c, 1, 1)
    y = x if x.dtype == torch.float32 else x.float()
    return y.mul_(1.0 / (255.0 * s)).add_(-m / s)


def _crop_resize_cpu(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Per-clip crop + bilinear resize of uint8 frames with PyTorch's vectorised uint8 CPU kernel
    (about 4x faster than roi_align on a CPU), antialiased when shrinking as PIL/torchvision resize;
    like the repos' PIL pipeline the resized frame is uint8 before normalisation."""
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        crop = x[i : i + 1, :, y0:y1, x0:x1]
        shrink = (x1 - x0) > size or (y1 - y0) > size
        out[i] = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                                 antialias=shrink)[0]
    return out


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {"identity": identity, "frames": frames}


def get_transform(name: str, **kwargs: Any) -> BatchTransform:
    if name not in TRANSFORMS:
        raise KeyError(f"unknown transform '{name}'; known: {sorted(TRANSFORMS)}")
    fn = TRANSFORMS[name]
    return lambda x, train, gen=None: fn(x, train, gen, **kwargs)
