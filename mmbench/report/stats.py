"""Statistics over seeds: summaries with 95 % confidence intervals, paired tests against a baseline,
and which way each metric is better.

Comparisons are paired by seed: a method's run with seed s against the baseline's run with seed
s (same data order and initialisation seed), which removes the seed-to-seed variance both share.
Only seeds present on both sides count. Two tests, because with the 3-5 seeds of a typical
comparison the paired t-test assumes normal differences and the Wilcoxon signed-rank test (exact
for small n) does not, but cannot reach p < 0.05 with fewer than 6 seeds; both are reported.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
T_MARK, W_MARK = "*", "†"
HIGHER_BETTER = ("acc", "macro_f1", "score", "probe_acc", "acc_split")
LOWER_BETTER = ("loss", "train_loss", "imbalance_ratio")


@dataclass
class Summary:
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for one seed
    n: int
    ci: float  # half-width of the 95 % t interval of the mean; nan for one seed

    @property
    def ci_low(self) -> float:
        return self.mean - self.ci

    @property
    def ci_high(self) -> float:
        return self.mean + self.ci


@dataclass
class Paired:
    n: int  # seeds on both sides
    diff: float  # mean of (method - baseline) over those seeds
    p_ttest: float
    p_wilcoxon: float

    @property
    def marker(self) -> str:
        return significance_marker(self.p_ttest, self.p_wilcoxon)


def summarize(values: list[float] | np.ndarray) -> Summary:
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(mean, 0.0, 1, math.nan)
    std = float(x.std(ddof=1))
    return Summary(mean, std, n, float(sps.t.ppf(0.975, n - 1) * std / math.sqrt(n)))


def paired(method: dict[int, float], baseline: dict[int, float]) -> Paired | None:
    """Paired comparison over the seeds both have; None when they share none."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    x = np.array([method[s] for s in seeds], dtype=float)
    y = np.array([baseline[s] for s in seeds], dtype=float)
    d = x - y
    diff = float(d.mean())
    n = len(seeds)
    if n < 2:
        return Paired(n, diff, math.nan, math.nan)
    if np.allclose(d, d[0]):
        # no variance in the differences: a t statistic does not exist (0/0 or x/0)
        p_t = 1.0 if np.allclose(d, 0) else math.nan
    else:
        p_t = float(sps.ttest_rel(x, y).pvalue)
    if np.allclose(d, 0):
        p_w = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_w = float(sps.wilcoxon(x, y).pvalue)
    return Paired(n, diff, p_t, p_w)


def significance_marker(p_t: float, p_w: float, alpha: float = ALPHA) -> str:
    return (T_MARK if p_t < alpha else "") + (W_MARK if p_w < alpha else "")  # nan compares False


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when neither (diagnostics, costs)."""
    head = metric.split("/")[0]
    if head in HIGHER_BETTER:
        return 1
    if head in LOWER_BETTER:
        return -1
    return 0


def best(means: list[float], metric: str, decimals: int) -> set[int]:
    """Indices of the best mean at the precision shown (ties all count); empty when the metric has
    no better direction or fewer than two rows have a value."""
    sign = direction(metric)
    vals = [(i, round(m, decimals)) for i, m in enumerate(means) if m is not None and not math.isnan(m)]
    if sign == 0 or len(vals) < 2:
        return set()
    top = max(v * sign for _, v in vals)
    return {i for i, v in vals if v * sign == top}
