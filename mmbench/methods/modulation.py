"""Gradient modulation shared by OGM-GE (CVPR 2022) and the journal's OGM (TPAMI 2024, `opm` mode ogm):
scale a modality's encoder-weight gradients by its coefficient and, with GE, add Gaussian noise whose
std is taken from the unmodulated gradient. Which weights count differs between the two codes (CVPR
code after mmbench's M-modality generalisation: every weight of dim >= 2; journal code: 4-D kernels),
so the caller says which."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

NOISE_EPS = 1e-8  # the code's `std + 1e-8`: an all-zero gradient still gets (tiny) noise


def modulate_encoder_grads(encoders: nn.ModuleDict, coeffs: dict[str, Any], ge: bool,
                           selects: Callable[[torch.Tensor], bool]) -> None:
    """g <- g * k (+ N(0, (std(g) + 1e-8)^2) with GE) for every selected gradient of each modality's
    encoder, modalities in `coeffs` order, parameters in module order (the noise draws' order)."""
    for m, k in coeffs.items():
        for p in encoders[m].parameters():
            g = p.grad
            if g is None or not selects(g):
                continue
            p.grad = g * k + torch.randn_like(g) * (g.std() + NOISE_EPS) if ge else g * k
