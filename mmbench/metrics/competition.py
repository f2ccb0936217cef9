"""AGM's competition strength (docs/methods/agm.md, "Competition strength"), per modality.

Fit ridge regression (alpha 120, with intercept) from the joint model's fused representation Z
to modality m's mono-modal concept Y_m (the pooled features of the `unimodal` run of the same
dataset, protocol, backbone and seed) on the validation split; on the test split take the
residual R = Ŷ_m - Y_m and the scatter B_m = N·Cov(Y_m) (unbiased covariance times N);
strength = trace(RᵀR · pinv(B_m)) / d. About "1 - R²" of recovering the competition-free
representation from the joint one: near 0 when Z contains the concept, large when unrelated.
"""
from __future__ import annotations

import torch
from sklearn.linear_model import Ridge

RIDGE_ALPHA = 120.0


def competition_strength(
    z_fit: torch.Tensor, y_fit: torch.Tensor, z_eval: torch.Tensor, y_eval: torch.Tensor, alpha: float = RIDGE_ALPHA
) -> float:
    reg = Ridge(alpha=alpha, fit_intercept=True)
    reg.fit(z_fit.double().numpy(), y_fit.double().numpy())
    pred = torch.from_numpy(reg.predict(z_eval.double().numpy()))
    y = y_eval.double()
    r = pred - y
    n, d = y.shape
    scatter = torch.cov(y.T) * n  # torch.cov: rows are variables, unbiased by default
    if scatter.ndim == 0:
        scatter = scatter.reshape(1, 1)
    value = torch.trace(r.T @ r @ torch.linalg.pinv(scatter)) / d
    return float(value)


__all__ = ["competition_strength", "RIDGE_ALPHA"]
