"""Statistics over seeds: summaries with 95 % confidence intervals, paired tests against a baseline,
and which way each metric is better.

Comparisons are paired by seed: a method's run with seed s against the baseline's run with seed
s (same data order and initialisation seed), which removes the seed-to-seed variance both share.
Only seeds present on both sides count. What runs depends on n, the number of paired seeds, and
every table says which:

- n < 3: no test. The paired t-test has n - 1 = 1 degree of freedom at n = 2 (a "significant"
  p then says nothing about the methods) and Wilcoxon cannot reach p < 0.05; no markers.
- 3 <= n < 6: the paired t-test (assumes roughly normal differences). Wilcoxon's exact two-sided
  p is at least 2 / 2^n = 0.0625 at n = 5, so it is not run.
- n >= 6: both, the t-test and the Wilcoxon signed-rank test (exact for small n, no normality).

The paired difference also gets a percentile bootstrap 95 % interval (n >= 3; fixed seed, so a
report is reproducible): a range, not a test.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
T_MARK, W_MARK = "*", "†"
MIN_TEST_SEEDS = 3  # below: no significance test at all
MIN_WILCOXON_SEEDS = 6  # below: Wilcoxon cannot reach p < 0.05 (min exact two-sided p = 2 / 2^n)
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
# Only metrics whose better direction holds whatever the run: a lower imbalance_ratio is not
# better when both branches collapsed (it reads 1.0 then), and competition strength or a method
# diagnostic describe a model, they do not rank it.
HIGHER_BETTER = ("acc", "macro_f1", "score", "probe_acc", "acc_split")
LOWER_BETTER = ("loss", "train_loss")


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
    p_ttest: float  # nan when the t-test did not run
    p_wilcoxon: float  # nan when Wilcoxon did not run
    diff_ci_low: float = math.nan  # percentile bootstrap 95 % interval of the mean difference
    diff_ci_high: float = math.nan

    @property
    def tests(self) -> tuple[str, ...]:
        """The tests that ran at this n (see the module doc)."""
        return tests_for(self.n)

    @property
    def marker(self) -> str:
        if not self.tests:
            return ""
        return significance_marker(self.p_ttest, self.p_wilcoxon)


def tests_for(n: int) -> tuple[str, ...]:
    if n < MIN_TEST_SEEDS:
        return ()
    if n < MIN_WILCOXON_SEEDS:
        return ("t",)
    return ("t", "wilcoxon")


def significance_note(ns: list[int]) -> str:
    """One sentence on what the markers of a table mean at the paired seed counts it has."""
    if not ns:
        return ""
    lo, hi = min(ns), max(ns)
    parts = []
    if lo < MIN_TEST_SEEDS:
        which = f"n = {lo}" if hi < MIN_TEST_SEEDS and lo == hi else f"n < {MIN_TEST_SEEDS}"
        parts.append(f"no significance test at {which} paired seeds (a t-test with 1 degree of freedom "
                     f"and Wilcoxon cannot support a claim; no markers)")
    if any(MIN_TEST_SEEDS <= n < MIN_WILCOXON_SEEDS for n in ns):
        parts.append(f"{T_MARK} paired t-test p < {ALPHA} at {MIN_TEST_SEEDS}-{MIN_WILCOXON_SEEDS - 1} seeds "
                     f"(Wilcoxon not run: it cannot reach p < {ALPHA} below {MIN_WILCOXON_SEEDS} seeds)")
    if hi >= MIN_WILCOXON_SEEDS:
        parts.append(f"{T_MARK} paired t-test p < {ALPHA}, {W_MARK} Wilcoxon signed-rank p < {ALPHA} "
                     f"at >= {MIN_WILCOXON_SEEDS} seeds")
    return "; ".join(parts)


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
    """Paired comparison over the seeds both have; None when they share none. Only the tests
    valid at that n run (`tests_for`); the others stay nan."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    x = np.array([method[s] for s in seeds], dtype=float)
    y = np.array([baseline[s] for s in seeds], dtype=float)
    d = x - y
    diff = float(d.mean())
    n = len(seeds)
    run = tests_for(n)
    p_t = p_w = math.nan
    if "t" in run:
        if np.allclose(d, d[0]):
            # no variance in the differences: a t statistic does not exist (0/0 or x/0)
            p_t = 1.0 if np.allclose(d, 0) else math.nan
        else:
            p_t = float(sps.ttest_rel(x, y).pvalue)
    if "wilcoxon" in run:
        if np.allclose(d, 0):
            p_w = 1.0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p_w = float(sps.wilcoxon(x, y).pvalue)
    lo, hi = bootstrap_ci(d) if n >= MIN_TEST_SEEDS else (math.nan, math.nan)
    return Paired(n, diff, p_t, p_w, lo, hi)


def bootstrap_ci(d: np.ndarray, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences `d` (seeds resampled with
    replacement); deterministic for a given seed."""
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


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
