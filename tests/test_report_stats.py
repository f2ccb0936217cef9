"""Report statistics against values computed by hand: mean/std/95 % CI, the paired t-test, the exact
Wilcoxon signed-rank test, significance markers, and which row is best."""
from __future__ import annotations

import math

import pytest

import numpy as np

from mmbench.report.stats import best, bootstrap_ci, direction, paired, summarize, significance_note

JOINT = {0: 0.60, 1: 0.62, 2: 0.64, 3: 0.61, 4: 0.63}
METHOD = {0: 0.65, 1: 0.66, 2: 0.70, 3: 0.64, 4: 0.69}  # differences .05 .04 .06 .03 .06


def test_summary_mean_std_and_ci_by_hand() -> None:
    s = summarize(list(JOINT.values()))
    assert s.mean == pytest.approx(0.62)
    # deviations -.02 0 .02 -.01 .01 -> sum of squares .001 -> var .00025 (ddof 1)
    assert s.std == pytest.approx(math.sqrt(0.00025))
    # t_{0.975, 4} = 2.776445 (table value)
    assert s.ci == pytest.approx(2.776445 * math.sqrt(0.00025) / math.sqrt(5), rel=1e-5)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.62 - s.ci, 0.62 + s.ci))
    one = summarize([0.5])
    assert one.n == 1 and one.std == 0 and math.isnan(one.ci)


def test_paired_t_test_and_wilcoxon_by_hand() -> None:
    p = paired(METHOD, JOINT)
    assert p is not None and p.n == 5
    assert p.diff == pytest.approx(0.048)
    # d = .05 .04 .06 .03 .06: mean .048, deviations .002 -.008 .012 -.018 .012, sum sq 6.8e-4, var 1.7e-4
    t = 0.048 / (math.sqrt(1.7e-4) / math.sqrt(5))
    assert t == pytest.approx(8.2319, rel=1e-4)
    # Student's t CDF for 4 degrees of freedom in closed form, u = 1 + t^2/4:
    # F(t) = 1/2 + (3/8) (t / sqrt(u)) (1 - t^2 / (12 u)); two-sided p = 2 (1 - F(t))
    u = 1 + t * t / 4
    p_two = 2 * (1 - (0.5 + 3 / 8 * (t / math.sqrt(u)) * (1 - t * t / (12 * u))))
    assert p.p_ttest == pytest.approx(p_two, rel=1e-6)
    assert p.p_ttest == pytest.approx(0.00119, abs=2e-5)
    # Wilcoxon at 5 seeds: the exact two-sided p is at least 2/32 > 0.05, so it is not run at all
    assert math.isnan(p.p_wilcoxon) and p.tests == ("t",)
    assert p.marker == "*"


def test_wilcoxon_marker_needs_six_seeds() -> None:
    base = {s: 0.5 for s in range(6)}
    better = {s: 0.5 + 0.01 * (s + 1) for s in range(6)}
    p = paired(better, base)
    # exact Wilcoxon: all 6 differences positive -> the most extreme of 2^6 sign patterns, two-sided 2/64
    assert p is not None and p.p_wilcoxon == pytest.approx(2 / 64)
    assert p.marker == "*†" and p.tests == ("t", "wilcoxon")


def test_no_markers_below_three_paired_seeds_even_when_p_is_small() -> None:
    # the case that overclaimed: 2 seeds, a t-test with 1 degree of freedom gave p = 0.047
    p = paired({0: 0.70, 1: 0.801}, {0: 0.50, 1: 0.60})
    assert p is not None and p.n == 2 and p.tests == ()
    assert math.isnan(p.p_ttest) and math.isnan(p.p_wilcoxon) and p.marker == ""
    assert math.isnan(p.diff_ci_low) and p.diff == pytest.approx(0.2005)
    assert "no significance test at n = 2" in significance_note([2, 2])
    assert "Wilcoxon not run" in significance_note([3, 5]) and "no significance" not in significance_note([3, 5])
    assert "Wilcoxon signed-rank" in significance_note([6])


def test_bootstrap_interval_of_the_paired_difference() -> None:
    p = paired(METHOD, JOINT)
    assert p is not None
    # differences .03 .04 .05 .06 .06: the bootstrap means lie within [min, max] and cover the mean
    assert 0.03 <= p.diff_ci_low < 0.048 < p.diff_ci_high <= 0.06
    again = paired(METHOD, JOINT)
    assert again is not None and (again.diff_ci_low, again.diff_ci_high) == (p.diff_ci_low, p.diff_ci_high)
    lo, hi = bootstrap_ci(np.array([0.01, 0.01, 0.01]))
    assert lo == pytest.approx(0.01) and hi == pytest.approx(0.01)


def test_pairing_uses_shared_seeds_only_and_degenerate_cases() -> None:
    p = paired({0: 0.7, 1: 0.8, 9: 0.1}, {0: 0.6, 1: 0.6, 5: 0.9})
    assert p is not None and p.n == 2 and p.diff == pytest.approx(0.15)
    assert paired({0: 0.5}, {1: 0.5}) is None
    same = paired({s: 0.5 + s / 10 for s in range(6)}, {s: 0.5 + s / 10 for s in range(6)})
    assert same is not None and same.p_ttest == 1.0 and same.p_wilcoxon == 1.0 and same.marker == ""
    const = paired({0: 0.6, 1: 0.7, 2: 0.8}, {0: 0.5, 1: 0.6, 2: 0.7})  # identical non-zero differences: no t statistic
    assert const is not None and math.isnan(const.p_ttest) and "*" not in const.marker
    single = paired({0: 0.9}, {0: 0.5})
    assert single is not None and single.n == 1 and math.isnan(single.p_ttest) and single.marker == ""


def test_direction_and_best_at_shown_precision() -> None:
    assert direction("acc") == 1 and direction("acc/audio") == 1 and direction("macro_f1") == 1
    assert direction("loss") == -1
    # lower imbalance is not better when both branches collapsed: never ranked
    assert direction("imbalance_ratio") == 0 and direction("bn_gap") == 0
    assert direction("competition/audio") == 0 and direction("method/k_audio") == 0
    assert best([80.004, 80.001, 79.0], "acc", 2) == {0, 1}  # equal as shown (80.00): both bold
    assert best([1.2, 1.1, float("nan")], "loss", 3) == {1}
    assert best([1.2, 1.0], "imbalance_ratio", 3) == set()
    assert best([0.3, 0.5], "competition/audio", 3) == set()
    assert best([0.3], "acc", 2) == set()
