"""Paired comparisons over seeds: is setting A better than setting B, or is the difference noise?

``python -m spacedkd_fast.repro`` runs every setting with the same seeds (the same initializations, data order and
augmentations wherever two settings share a network), so each seed gives one difference ``A − B``; the question is
whether the mean of those differences is away from 0. :func:`paired_test` answers it two ways over the same
differences:

* a **paired bootstrap** 95 % confidence interval of the mean difference: the seeds' differences resampled with
  replacement (``resamples`` times, from a generator seeded with ``seed``, so the interval is reproducible), the
  2.5th and 97.5th percentiles of the resampled means;
* a **paired t-test**: ``t = mean / (sd / √n)`` with ``n − 1`` degrees of freedom and its two-sided p-value from
  Student's t distribution (:func:`t_two_sided_p`, through the regularized incomplete beta function; no scipy).

The verdict is ``"better"`` / ``"worse"`` only when both agree: the bootstrap interval excludes 0 *and* p < 0.05.
The percentile bootstrap alone is too optimistic with few seeds (with 2 seeds its interval is the range of the two
differences, so two differences of the same sign always "exclude 0"); the t-test accounts for how few they are.
Anything else is ``"no difference at this budget"``. Fewer than 2 paired seeds give ``"needs ≥ 2 seeds"``.
Each comparison is tested on its own (no correction for making several): with k comparisons at 95 %, about
0.05·k of them can come out "better" or "worse" by chance alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

BETTER, WORSE, NO_DIFFERENCE, TOO_FEW = "better", "worse", "no difference at this budget", "needs ≥ 2 seeds"
LEVEL = 0.95  # the confidence level of the interval; the t-test's threshold is 1 − LEVEL
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PairedTest:
    """The comparison of A with B over the seeds both ran (differences ``A − B``, in the metric's unit)."""

    n: int  # paired seeds
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float  # mean difference A − B (nan with no pairs)
    sd: float  # standard deviation of the differences (nan below 2 pairs)
    ci_low: float  # paired bootstrap CI of the mean difference (nan below 2 pairs)
    ci_high: float
    t: float  # paired t statistic (±inf when every difference is the same non-zero number; nan below 2)
    df: int
    p: float  # two-sided p-value of the t-test (nan below 2 pairs)
    higher_is_better: bool
    verdict: str  # BETTER / WORSE / NO_DIFFERENCE / TOO_FEW, for A against B

    def to_dict(self) -> dict:
        record = asdict(self)
        # JSON has no inf/nan: None stands for "not defined", a signed string for an infinite t
        for key in ("mean", "sd", "ci_low", "ci_high", "t", "p"):
            value = record[key]
            if isinstance(value, float) and math.isnan(value):
                record[key] = None
            elif isinstance(value, float) and math.isinf(value):
                record[key] = "inf" if value > 0 else "-inf"
        record["seeds"], record["differences"] = list(self.seeds), list(self.differences)
        return record


def paired_differences(a: dict[int, float], b: dict[int, float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The seeds present in both ``a`` and ``b`` (seed → value; missing or nan values skipped), sorted, and the
    differences ``a[seed] − b[seed]``."""
    seeds = tuple(sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s])))
    return seeds, tuple(float(a[s]) - float(b[s]) for s in seeds)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def bootstrap_ci(differences: Sequence[float], *, level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``differences`` (reproducible: numpy's PCG64 seeded with
    ``seed``)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, evaluated by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        # the even term m (b − m) x / ((a + 2m − 1)(a + 2m)), the odd −(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            step = c * d
            h *= step
        if abs(step - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)``, the regularized incomplete beta function, for ``a, b > 0`` and ``0 ≤ x ≤ 1``."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"regularized_incomplete_beta: needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast; otherwise use the symmetry
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| ≥ |t|)`` for Student's t with ``df`` degrees of freedom: ``I_{df/(df+t²)}(df/2, 1/2)``."""
    if df <= 0:
        raise ValueError(f"t_two_sided_p: df must be > 0, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return min(1.0, regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t)))


def paired_test(a: dict[int, float], b: dict[int, float], *, higher_is_better: bool = True, level: float = LEVEL,
                resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> PairedTest:
    """Compare A with B over their common seeds (``a``, ``b``: seed → metric). See the module docstring."""
    seeds, d = paired_differences(a, b)
    n = len(d)
    nan = math.nan
    if n < 2:
        return PairedTest(n, seeds, d, statistics.fmean(d) if d else nan, nan, nan, nan, nan, max(n - 1, 0), nan,
                          higher_is_better, TOO_FEW)
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    low, high = bootstrap_ci(d, level=level, resamples=resamples, seed=seed)
    if sd > 0:
        t = mean / (sd / math.sqrt(n))
    else:  # every seed gave the same difference
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    p = t_two_sided_p(t, n - 1)
    verdict = NO_DIFFERENCE
    if (low > 0 or high < 0) and p < 1 - level:
        verdict = BETTER if (mean > 0) == higher_is_better else WORSE
    return PairedTest(n, seeds, d, mean, sd, low, high, t, n - 1, p, higher_is_better, verdict)
