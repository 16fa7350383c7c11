"""stats.py against scipy on synthetic numbers: group summaries, t quantiles, paired differences."""
import numpy as np
import pytest
import scipy.stats

from nanoshift.common import InputError
from nanoshift.stats import describe, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 30])
def test_t_distribution_matches_scipy(df):
    for t in (-7.3, -2.0, -0.4, 0.0, 0.9, 2.5, 11.0):
        assert t_cdf(t, df) == pytest.approx(scipy.stats.t.cdf(t, df), abs=1e-12)
    for p in (0.025, 0.5, 0.9, 0.975):
        assert t_quantile(p, df) == pytest.approx(scipy.stats.t.ppf(p, df), abs=1e-9)


def test_group_summary_equals_numpy_and_scipy():
    values = np.random.default_rng(0).normal(3.3, 0.01, size=5)
    got = describe(values)
    assert got["n"] == 5 and got["mean"] == pytest.approx(values.mean(), abs=1e-15)
    assert got["std"] == pytest.approx(values.std(ddof=1), abs=1e-15)
    lo, hi = scipy.stats.t.interval(0.95, 4, loc=values.mean(), scale=scipy.stats.sem(values))
    assert got["ci95"] == pytest.approx([lo, hi], abs=1e-10)
    assert describe([3.0]) == {"n": 1, "mean": 3.0, "std": None, "ci95": None}


def test_paired_difference_equals_scipy_ttest_rel():
    rng = np.random.default_rng(1)
    baseline = rng.normal(3.30, 0.02, size=4)
    gate = baseline - 0.015 + rng.normal(0, 0.004, size=4)  # a paired, consistent improvement
    got = paired_difference(dict(zip([3, 1, 4, 2], gate)), dict(zip([3, 1, 4, 2], baseline)))
    want = scipy.stats.ttest_rel(gate, baseline)
    assert got["p_value"] == pytest.approx(want.pvalue, abs=1e-12) and got["significant"]
    assert got["mean"] == pytest.approx((gate - baseline).mean(), abs=1e-15)
    noise = paired_difference({1: 3.30, 2: 3.27, 3: 3.31}, {1: 3.29, 2: 3.30, 3: 3.29})
    assert noise["p_value"] > 0.05 and not noise["significant"]
    assert noise["ci95"][0] < 0 < noise["ci95"][1]


def test_unmatched_seeds_are_a_clear_error():
    with pytest.raises(InputError, match=r"seeds \[4\] have no baseline run, seeds \[2\] no run in the group"):
        paired_difference({1: 3.0, 3: 3.1, 4: 3.2}, {1: 3.0, 2: 3.1, 3: 3.2})
