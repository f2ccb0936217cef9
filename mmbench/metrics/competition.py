"""AGM's competition strength (docs/methods/agm.md, "Competition strength"), per modality: official and calibrated.

Official (`competition_official/<m>`, `competition_strength_official`): fit ridge regression
(alpha 120, with intercept) from the joint model's fused representation Z to modality m's
mono-modal concept Y_m (the pooled features of the `unimodal` run of the same dataset, protocol,
backbone and seed) on the validation split; on the test split take the residual R = Ŷ_m - Y_m and
the scatter B_m = N·Cov(Y_m) (unbiased covariance times N); strength = trace(RᵀR · pinv(B_m)) / d.
About "1 - R²" of recovering the competition-free representation from the joint one.

Why a calibrated version (`competition/<m>`, `competition_strength`): the official construction
has a fixed ridge strength, so its value follows the scale and width of the features as much as
the competition. On real AV-MNIST the concept itself, fed as Z (no competition at all), scored
0.76-0.90 and pure noise 1.11-1.15; features 40 % larger in scale scored lower. So:

1. Z is standardised per feature with the fit split's statistics (the residual measure is already
   invariant to affine maps of Y_m, through pinv(B_m)); the intercept absorbs the means.
2. The ridge strength is chosen on held-out data: efficient leave-one-out over a log grid on the
   fit split (sklearn RidgeCV, on whitened Y: see `raw_strength`), so neither a wide nor a
   small-scale representation is over- or under-regularised by a constant tuned for another encoder.
3. The same computation runs on two references in the same call: the floor (the concept itself as
   the representation: no competition) and the ceiling (independent Gaussian noise of Z's width:
   nothing of the concept). The value is reported on the 0-1 scale between them,
   (s(Z) - s(floor)) / (s(ceiling) - s(floor)): 0 = Z holds the concept as well as the concept
   does, 1 = no better than noise. Values slightly outside [0, 1] are estimation noise.

Two controls (`competition_concept/<m>`, `competition_noise/<m>`) put a randomly rotated copy of
the concept and a second, independent noise draw through the calibrated measure: they read ≈ 0
and ≈ 1 when the scale holds, which the run itself shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import Ridge, RidgeCV

RIDGE_ALPHA = 120.0
ALPHA_GRID = tuple(float(a) for a in np.logspace(-3, 5, 17))  # standardised features: 1e-3 .. 1e5
NOISE_SEED = 20231  # the ceiling's and the controls' noise: fixed, so a run's value is reproducible


def _residual_score(pred: np.ndarray, y: np.ndarray) -> float:
    """trace(RᵀR · pinv(N·Cov(Y))) / d, in float64, as the AGM code computes it."""
    r = torch.from_numpy(pred) - torch.from_numpy(y)
    n, d = y.shape
    scatter = torch.cov(torch.from_numpy(y).T) * n  # rows are variables, unbiased by default
    if scatter.ndim == 0:
        scatter = scatter.reshape(1, 1)
    return float(torch.trace(r.T @ r @ torch.linalg.pinv(scatter)) / d)


def competition_strength_official(
    z_fit: torch.Tensor, y_fit: torch.Tensor, z_eval: torch.Tensor, y_eval: torch.Tensor, alpha: float = RIDGE_ALPHA
) -> float:
    """The AGM code's value: fixed ridge alpha on the raw features."""
    reg = Ridge(alpha=alpha, fit_intercept=True)
    reg.fit(z_fit.double().numpy(), y_fit.double().numpy())
    return _residual_score(reg.predict(z_eval.double().numpy()), y_eval.double().numpy())


def _standardise(fit: np.ndarray, ev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = fit.mean(0), fit.std(0)
    sd = np.where(sd > 1e-12 * max(1.0, float(np.abs(fit).max(initial=0.0))), sd, 1.0)  # constant columns stay 0
    return (fit - mu) / sd, (ev - mu) / sd


def _whiten(fit: np.ndarray, ev: np.ndarray, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Y in the coordinates where the fit split's covariance is the identity (directions without
    variance dropped)."""
    mu = fit.mean(0)
    cov = np.atleast_2d(np.cov(fit - mu, rowvar=False))
    vals, vecs = np.linalg.eigh(cov)
    keep = vals > rtol * max(float(vals.max(initial=0.0)), 1e-300)
    w = vecs[:, keep] / np.sqrt(vals[keep])
    return (fit - mu) @ w, (ev - mu) @ w


def raw_strength(z_fit: np.ndarray, y_fit: np.ndarray, z_eval: np.ndarray, y_eval: np.ndarray) -> tuple[float, float]:
    """(residual score, chosen alpha): standardised Z, whitened Y, one ridge strength chosen by
    leave-one-out on the fit split. Y is whitened because the score is: its leave-one-out squared
    error is then the score's own weighting, so the alpha chosen is the one that serves the score
    (on the raw Y the error is dominated by the high-variance concept dimensions, while the score
    weighs the low-variance ones as much). The score itself is invariant to this linear map of Y."""
    zf, ze = _standardise(z_fit, z_eval)
    yf, ye = _whiten(y_fit, y_eval)
    reg = RidgeCV(alphas=ALPHA_GRID, fit_intercept=True)
    reg.fit(zf, yf)
    return _residual_score(reg.predict(ze), ye), float(reg.alpha_)


@dataclass
class Calibrated:
    value: float  # on the floor-ceiling scale: 0 = holds the concept, 1 = noise
    raw: float  # residual score of Z before calibration
    floor: float  # residual score of the concept itself
    ceiling: float  # residual score of independent noise of Z's width
    alpha: float  # ridge strength chosen for Z
    concept_control: float  # a rotated concept through the calibrated measure (≈ 0)
    noise_control: float  # a second noise draw through the calibrated measure (≈ 1)


def competition_strength(
    z_fit: torch.Tensor, y_fit: torch.Tensor, z_eval: torch.Tensor, y_eval: torch.Tensor, seed: int = NOISE_SEED
) -> Calibrated:
    """Calibrated competition strength of representation Z for concept Y (see the module doc)."""
    zf, ze = z_fit.double().numpy(), z_eval.double().numpy()
    yf, ye = y_fit.double().numpy(), y_eval.double().numpy()
    rng = np.random.default_rng(seed)
    width = zf.shape[1]

    def noise() -> tuple[np.ndarray, np.ndarray]:
        return rng.standard_normal((len(zf), width)), rng.standard_normal((len(ze), width))

    raw, alpha = raw_strength(zf, yf, ze, ye)
    floor, _ = raw_strength(yf, yf, ye, ye)
    ceiling, _ = raw_strength(*_pair(noise(), yf, ye))
    span = ceiling - floor

    def scaled(s: float) -> float:
        return (s - floor) / span if span > 0 else float("nan")

    q, _ = np.linalg.qr(rng.standard_normal((yf.shape[1], yf.shape[1])))
    concept_c, _ = raw_strength(yf @ q, yf, ye @ q, ye)
    noise_c, _ = raw_strength(*_pair(noise(), yf, ye))
    return Calibrated(scaled(raw), raw, floor, ceiling, alpha, scaled(concept_c), scaled(noise_c))


def competition_metrics(
    z_fit: torch.Tensor, y_fit: torch.Tensor, z_eval: torch.Tensor, y_eval: torch.Tensor, modality: str
) -> dict[str, float]:
    """Every competition metric of one modality, as logged (DESIGN.md §4.6)."""
    c = competition_strength(z_fit, y_fit, z_eval, y_eval)
    return {
        f"competition/{modality}": c.value,
        f"competition_official/{modality}": competition_strength_official(z_fit, y_fit, z_eval, y_eval),
        f"competition_concept/{modality}": c.concept_control,
        f"competition_noise/{modality}": c.noise_control,
    }


def _pair(z: tuple[np.ndarray, np.ndarray], yf: np.ndarray, ye: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return z[0], yf, z[1], ye


__all__ = ["competition_metrics", "competition_strength", "competition_strength_official", "Calibrated", "RIDGE_ALPHA"]
