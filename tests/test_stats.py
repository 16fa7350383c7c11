"""stats.py against scipy on synthetic numbers: group summaries, paired differences."""
import warnings

import numpy as np
import pytest
import scipy.stats

from nanoshift.common import InputError
from nanoshift.stats import describe, paired_difference


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
    with pytest.raises(InputError, match=r"seed 4 has no baseline run; seed 2 has no run in the group$"):
        paired_difference({1: 3.0, 3: 3.1, 4: 3.2}, {1: 3.0, 2: 3.1, 3: 3.2})
    with pytest.raises(InputError, match=r"groups: seeds 2, 3 have no run in the group$"):  # never "seeds []"
        paired_difference({1: 3.0}, {1: 3.0, 2: 3.1, 3: 3.2})


def test_equal_differences_p_value_against_scipy():
    """Zero spread: a nonzero mean gives scipy's p = 0.0; all-zero differences, where scipy's p is nan (0 / 0),
    give p = 1.0 (documented in stats.py); differences equal only up to rounding follow scipy's huge t."""
    seeds = [1, 2, 3]
    base = np.array([3.25, 3.5, 3.75])  # binary fractions: base + 0.25 - base is exactly 0.25 for every seed
    for shift in (0.25, -0.5):
        got = paired_difference(dict(zip(seeds, base + shift)), dict(zip(seeds, base)))
        assert got["std"] == 0 and got["p_value"] == scipy_p(base + shift, base) == 0.0 and got["significant"]
    same = paired_difference(dict(zip(seeds, base)), dict(zip(seeds, base)))
    assert np.isnan(scipy_p(base, base))
    assert same["p_value"] == 1.0 and not same["significant"] and same["mean"] == 0.0
    noisy = np.array([0.1, 0.2, 0.7])  # + 0.01 - x is 0.01 only up to the last bits: a tiny, nonzero spread
    got = paired_difference(dict(zip(seeds, noisy + 0.01)), dict(zip(seeds, noisy)))
    assert got["std"] > 0 and got["p_value"] == pytest.approx(scipy_p(noisy + 0.01, noisy), abs=1e-12)
    assert got["significant"]


def scipy_p(a, b):
    """scipy's paired t-test p-value, its warnings about (nearly) identical data silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy.stats.ttest_rel(a, b).pvalue
