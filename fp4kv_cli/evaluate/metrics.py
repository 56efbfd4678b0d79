"""Accuracy with confidence intervals, and the paired difference of two formats on the same questions.

- ``stderr``: lm-eval's ``mean_stderr``, the sample standard deviation (``n - 1``) over ``sqrt(n)``.
- ``ci95``: the Wilson score interval at 95 %, which stays inside [0, 1] for small ``n``.
- Paired difference ``a - b`` over the same questions: mean of ``d_i = a_i - b_i`` in {-1, 0, 1}
  with the normal 95 % interval ``mean +- 1.96 * sd(d) / sqrt(n)``; ``a_only`` / ``b_only`` count
  the questions only ``a`` / only ``b`` got right (McNemar's discordant pairs).
- ``mdd80``: the minimum detectable difference of that comparison, the true difference a
  two-sided 5 % test detects with 80 % power, ``(z_0.975 + z_0.8) * sd(d) / sqrt(n)``.
- Sampled runs (K generations per question): a question's score is its fraction of correct
  samples; accuracy is the mean of those over questions, its interval the normal one of that mean
  (questions are the independent units), and the paired difference is the mean of the
  per-question differences of those fractions, with the same interval and ``mdd80``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

Z95 = NormalDist().inv_cdf(0.975)
#: z of 80 % power (one side): the minimum detectable difference is (Z95 + Z80) standard errors.
Z80 = NormalDist().inv_cdf(0.8)


@dataclass(frozen=True)
class Accuracy:
    """Fraction correct of ``n`` questions, with lm-eval's stderr and the Wilson 95 % interval."""

    n: int
    correct: int
    mean: float
    stderr: float | None
    ci95: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a_i - b_i`` over ``n`` shared questions with its normal 95 % interval and the
    minimum detectable difference (None for a single question); ``a_only`` / ``b_only``: the
    questions where ``a`` / ``b`` scored higher."""

    n: int
    mean: float
    ci95: tuple[float, float] | None
    a_only: int
    b_only: int
    mdd80: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def accuracy(flags: Sequence[bool]) -> Accuracy:
    """Accuracy of per-question correctness ``flags`` (needs at least one)."""
    n = len(flags)
    if n == 0:
        raise ValueError("accuracy needs at least one question")
    correct = sum(bool(f) for f in flags)
    mean = correct / n
    stderr = math.sqrt(mean * (1 - mean) * n / (n - 1)) / math.sqrt(n) if n > 1 else None
    return Accuracy(n, correct, mean, stderr, wilson_interval(correct, n))


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    The bounds always hold ``p``: exactly 0 for no successes and exactly 1 for all (rounding
    would otherwise give e.g. 1.4e-17 for 0 of 20).
    """
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if successes == n else max(p, min(1.0, centre + half))
    return low, high


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> PairedDifference:
    """``a - b`` on the same questions (``a[i]`` and ``b[i]`` score question ``i``)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs two equal non-empty lists, got {len(a)} and {len(b)}")
    return paired_values([int(bool(x)) - int(bool(y)) for x, y in zip(a, b)])


@dataclass(frozen=True)
class SampledAccuracy:
    """Mean over ``n`` questions of each question's fraction of correct samples (``samples`` per
    question), with the standard error and normal 95 % interval of that mean."""

    n: int
    samples: int
    mean: float
    stderr: float | None
    ci95: tuple[float, float] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def sampled_accuracy(flags: Sequence[Sequence[bool]]) -> SampledAccuracy:
    """Accuracy of per-question lists of per-sample correctness ``flags`` (each non-empty, as
    many samples for every question)."""
    scores = _fractions(flags)
    mean, ci = mean_interval(scores)
    stderr = None if ci is None else (ci[1] - mean) / Z95
    return SampledAccuracy(len(scores), len(flags[0]), mean, stderr, ci)


def sampled_paired_difference(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> PairedDifference:
    """``a - b`` of per-question fractions of correct samples on the same questions."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs two equal non-empty lists, got {len(a)} and {len(b)}")
    return paired_values([x - y for x, y in zip(_fractions(a), _fractions(b))])


@dataclass(frozen=True)
class SamplePlan:
    """Variance of a sampled paired difference split into its parts, and what more samples buy.

    ``d_ik`` is sample ``k`` of question ``i`` (the two formats share the noise of sample ``k``):
    ``within`` is the mean over questions of the variance of ``d_ik`` over ``k``, ``between``
    the variance over questions of the per-question mean difference that is left when the
    sampling noise ``within / K`` is taken out. With ``K`` samples the 95 % half-width is
    ``Z95 * sqrt((between + within / K) / n)``; ``samples_for`` maps a target half-width to
    the smallest ``K`` that reaches it (None: the between part alone is wider)."""

    n: int
    samples: int
    within: float
    between: float
    samples_for: dict[str, int | None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def sample_plan(
    a: Sequence[Sequence[bool]],
    b: Sequence[Sequence[bool]],
    half_widths: Sequence[float] = (0.01, 0.007, 0.005),
) -> SamplePlan | None:
    """The :class:`SamplePlan` of ``a - b`` (None with fewer than 2 samples or questions)."""
    _fractions(a), _fractions(b)  # validates
    n, k = len(a), len(a[0])
    if n < 2 or k < 2 or len(b) != n or len(b[0]) != k:
        return None
    diffs = [[int(bool(x)) - int(bool(y)) for x, y in zip(row_a, row_b)] for row_a, row_b in zip(a, b)]
    means = [sum(row) / k for row in diffs]
    within = sum(sum((d - m) ** 2 for d in row) / (k - 1) for row, m in zip(diffs, means)) / n
    grand = sum(means) / n
    between = max(0.0, sum((m - grand) ** 2 for m in means) / (n - 1) - within / k)
    needed: dict[str, int | None] = {}
    for half in half_widths:
        room = (half / Z95) ** 2 * n - between
        needed[f"{half:g}"] = None if room <= 0 else max(1, math.ceil(within / room))
    return SamplePlan(n, k, within, between, needed)


def _fractions(flags: Sequence[Sequence[bool]]) -> list[float]:
    if not flags or any(len(row) != len(flags[0]) or not row for row in flags):
        raise ValueError("sampled accuracy needs the same non-zero number of samples for every question")
    return [sum(bool(f) for f in row) / len(row) for row in flags]


def paired_values(diffs: Sequence[float]) -> PairedDifference:
    """Paired difference from the per-question differences ``diffs`` (e.g. of per-document
    metric values); ``a_only`` / ``b_only`` count the positive / negative ones."""
    mean, ci = mean_interval(diffs)
    mdd = None if ci is None else (ci[1] - mean) / Z95 * (Z95 + Z80)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return PairedDifference(len(diffs), mean, ci, wins, losses, mdd)


def mean_interval(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean of per-question ``values`` and its normal 95% interval (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    half = Z95 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    return mean, (mean - half, mean + half)
