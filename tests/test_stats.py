"""spacedkd_fast.stats: the paired tests of python -m spacedkd_fast.repro's report."""

import math

import pytest

from spacedkd_fast import stats


@pytest.mark.parametrize("t, df, p", [
    (2.7764451051977987, 4, 0.05),  # the two-sided 95 % critical values of Student's t
    (12.706204736174698, 1, 0.05),
    (2.228138851986274, 10, 0.05),
    (4.604094871415897, 4, 0.01),
    (0.0, 3, 1.0),
    (-2.7764451051977987, 4, 0.05),  # two-sided: the sign does not matter
    (math.inf, 4, 0.0),
])
def test_t_two_sided_p_at_known_quantiles(t, df, p):
    assert stats.t_two_sided_p(t, df) == pytest.approx(p, abs=1e-9)


def test_t_two_sided_p_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 9, 30, 200):
        for t in (0.01, 0.5, 1.0, 1.96, 3.0, 7.5, 25.0):
            assert stats.t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-14)


def test_a_clear_gain_is_better_and_the_t_test_is_the_textbook_one():
    # per-seed differences 1.0, 1.2, 0.9, 1.1, 1.3: mean 1.1, sd 0.158..., t = 1.1 / (sd / sqrt 5) = 15.56, df 4
    base = {0: 90.0, 1: 91.0, 2: 89.5, 3: 90.5, 4: 90.2}
    kd = {s: v + d for (s, v), d in zip(base.items(), (1.0, 1.2, 0.9, 1.1, 1.3))}
    test = stats.paired_test(kd, base)
    assert test.n == 5 and test.seeds == (0, 1, 2, 3, 4) and test.df == 4
    assert test.mean == pytest.approx(1.1) and test.sd == pytest.approx(math.sqrt(0.025))
    assert test.t == pytest.approx(1.1 / (math.sqrt(0.025) / math.sqrt(5)))
    assert test.p == pytest.approx(9.96e-5, rel=0.01)
    assert 0.9 <= test.ci_low < 1.1 < test.ci_high <= 1.3
    assert test.verdict == stats.BETTER
    # the same numbers where lower is better (a Hessian trace): worse; and B against A: worse
    assert stats.paired_test(kd, base, higher_is_better=False).verdict == stats.WORSE
    assert stats.paired_test(base, kd).verdict == stats.WORSE


def test_a_ci_containing_zero_is_no_difference():
    a = {0: 0.91, 1: 0.93, 2: 0.90, 3: 0.92, 4: 0.94}
    b = {0: 0.92, 1: 0.91, 2: 0.91, 3: 0.93, 4: 0.92}  # differences -1, +2, -1, -1, +2 points
    test = stats.paired_test(a, b)
    assert test.ci_low < 0 < test.ci_high and test.p > 0.05
    assert test.verdict == stats.NO_DIFFERENCE == "no difference at this budget"


def test_two_seeds_of_the_same_sign_are_not_enough_for_a_verdict():
    # the percentile bootstrap of 2 differences is their range (0 excluded), the t-test with df = 1 is not fooled
    test = stats.paired_test({0: 0.95, 1: 0.97}, {0: 0.94, 1: 0.93})
    assert test.ci_low > 0 and test.p > 0.05 and test.verdict == stats.NO_DIFFERENCE


def test_the_bootstrap_ci_is_reproducible():
    d = [0.3, -0.1, 0.5, 0.2, 0.05, 0.4]
    first = stats.bootstrap_ci(d)
    assert stats.bootstrap_ci(d) == first  # seeded: the same interval every time
    assert stats.bootstrap_ci(d, seed=1) != first
    a = {s: 1.0 + v for s, v in enumerate(d)}
    b = {s: 1.0 for s in range(len(d))}
    t1, t2 = stats.paired_test(a, b), stats.paired_test(a, b)
    assert (t1.ci_low, t1.ci_high) == (t2.ci_low, t2.ci_high) == pytest.approx(first)


def test_pairs_are_the_common_seeds_and_one_seed_needs_more():
    test = stats.paired_test({0: 1.0, 1: 2.0, 5: 3.0}, {1: 1.5, 5: 2.0, 7: 0.0})
    assert test.seeds == (1, 5) and test.differences == (0.5, 1.0)
    single = stats.paired_test({0: 0.9}, {0: 0.8})
    assert single.n == 1 and single.verdict == stats.TOO_FEW == "needs ≥ 2 seeds"
    assert single.mean == pytest.approx(0.1) and math.isnan(single.p)
    assert single.to_dict()["p"] is None and single.to_dict()["ci_low"] is None  # JSON-safe
    none = stats.paired_test({}, {0: 0.8})
    assert none.n == 0 and none.verdict == stats.TOO_FEW


def test_identical_differences_and_nan_values():
    same = stats.paired_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # both +1: no spread
    assert same.t == math.inf and same.p == 0.0 and same.verdict == stats.BETTER
    assert same.to_dict()["t"] == "inf"
    zero = stats.paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert zero.t == 0.0 and zero.p == 1.0 and zero.verdict == stats.NO_DIFFERENCE
    skipped = stats.paired_test({0: math.nan, 1: 1.0, 2: None}, {0: 1.0, 1: 0.5, 2: 0.1})
    assert skipped.seeds == (1,) and skipped.verdict == stats.TOO_FEW


def test_incomplete_beta_edges():
    assert stats.regularized_incomplete_beta(2.0, 3.0, 0.0) == 0.0
    assert stats.regularized_incomplete_beta(2.0, 3.0, 1.0) == 1.0
    # I_x(1, 1) = x; I_x(a, b) = 1 - I_{1-x}(b, a)
    assert stats.regularized_incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3)
    assert stats.regularized_incomplete_beta(2.5, 0.5, 0.7) == pytest.approx(
        1 - stats.regularized_incomplete_beta(0.5, 2.5, 0.3))
    with pytest.raises(ValueError, match="needs a, b > 0"):
        stats.regularized_incomplete_beta(0.0, 1.0, 0.5)
