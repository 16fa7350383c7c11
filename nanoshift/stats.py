"""
Statistics over seeds: a group's mean, standard deviation and 95% interval, and paired differences
against a baseline group. A library module; the t distribution is scipy.stats.t.

    from nanoshift.stats import describe, paired_difference, minimal_detectable_difference
    describe([3.301, 3.296, 3.299])                        # {"n": 3, "mean": ..., "std": ..., "ci95": [lo, hi]}
    paired_difference({1: 3.28, 2: 3.27, 3: 3.29},         # gate, by seed
                      {1: 3.30, 2: 3.29, 3: 3.30})         # baseline, by seed: differences, interval, p-value

Which test, and why: runs of different modes with the same seed share their data order and the
initial weights of every shared parameter, so most seed-to-seed variation cancels in the per-seed
difference. The comparison is therefore paired by seed, and the differences get a two-sided paired
t-test (Student's t with n - 1 degrees of freedom) and a t interval. With the 3-5 seeds a study can
afford, a bootstrap has too few points to estimate its own tails (3 seeds have 10 distinct resamples; its
percentile interval is too narrow: in a simulation with normal data it covered the mean 76% of the time
at 3 seeds and 84% at 5, not 95%), and an exact sign-flip
permutation test cannot reach p < 0.05 below 6 seeds (its smallest two-sided p-value is 2 / 2^n: 0.25 at
3 seeds, 0.0625 at 5); the t-test can, at the price of assuming roughly normal differences (reasonable
for averages over many tokens, and the t interval widens honestly with few seeds). An interval that
contains 0, or p >= 0.05, is reported as "no significant difference", not as a win.

Every difference equal (zero spread): the t statistic is mean / 0. With a nonzero mean, p = 0.0 and
significant, as scipy.stats.ttest_rel gives (t = +-inf). With every difference exactly 0 (e.g. two groups of
the same checkpoints), scipy's t is 0 / 0 and its p nan; here p = 1.0, not significant: no difference at all
is the weakest evidence of one, and a number keeps the JSON outputs valid and every reader of p_value working
(tests/test_stats.py checks both against scipy).
"""

import math

import scipy.stats

from nanoshift.common import InputError


def describe(values, level=0.95):
    """n, mean, sample standard deviation and the t interval of the mean (None where n < 2)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise InputError("no values to describe")
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def paired_difference(group, baseline):
    """group - baseline, paired by seed: both are {seed: value}. The differences' describe() plus the
    two-sided paired t-test's p-value and whether it is significant at 5%. Seeds present in one group but
    not the other are an InputError (a paired comparison needs every seed in both)."""
    only_group, only_baseline = sorted(set(group) - set(baseline)), sorted(set(baseline) - set(group))
    if only_group or only_baseline:  # name only the side(s) that lack something
        lacking = "; ".join(f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} "
                            f"{'have' if len(seeds) > 1 else 'has'} no {what}"
                            for seeds, what in ((only_group, "baseline run"), (only_baseline, "run in the group"))
                            if seeds)
        raise InputError(f"a paired comparison needs the same seeds in both groups: {lacking}")
    diffs = [group[seed] - baseline[seed] for seed in sorted(group)]
    out = describe(diffs)
    if out["n"] < 2:
        return dict(out, p_value=None, significant=False)
    if out["std"] == 0:  # every difference equal (module docstring): scipy's p for a nonzero mean, 1.0 for none
        p = 1.0 if out["mean"] == 0 else 0.0
    else:
        t = out["mean"] / (out["std"] / math.sqrt(out["n"]))
        p = float(2 * scipy.stats.t.sf(abs(t), out["n"] - 1))
    return dict(out, p_value=p, significant=p < 0.05)


def minimal_detectable_difference(sd, n, alpha=0.05, power=0.8):
    """The smallest true mean difference that a two-sided paired t-test at level alpha finds significant with
    the given power, for n pairs whose differences have standard deviation sd:

        mdd = (t_{1 - alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)

    the standard t approximation to the noncentral-t power equation (Student's t quantiles, scipy.stats.t;
    tests/test_reproduce.py checks it against scipy.stats.t and that scipy.stats.nct gives about this power).
    A study design's resolution: a true difference smaller than mdd is more likely missed than found."""
    if n < 2:
        raise InputError(f"a paired t-test needs n >= 2 pairs, got n={n}")
    if not sd >= 0 or not 0 < alpha < 1 or not 0 < power < 1:
        raise InputError(f"need sd >= 0, 0 < alpha < 1 and 0 < power < 1, got sd={sd}, alpha={alpha}, power={power}")
    return float(scipy.stats.t.ppf(1 - alpha / 2, n - 1) + scipy.stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)
