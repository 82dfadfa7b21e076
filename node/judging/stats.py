"""Per-dimension score summaries with confidence intervals, and disagreement tests."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

# Beyond this many degrees of freedom the Cornish-Fisher expansion is exact to ~1e-7,
# and the exact series would cost O(df) per step of the root search.
_EXACT_T_MAX_DF = 200
_BISECTION_STEPS = 200
_SLACK = 1e-9


@dataclass(frozen=True)
class DimensionScore:
    """A judged mean score on one dimension, over `n` items, with its confidence interval."""

    dimension: str
    mean: float
    n: int
    ci_low: float
    ci_high: float

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if not all(math.isfinite(v) for v in (self.mean, self.ci_low, self.ci_high)):
            raise ValueError("mean and interval must be finite")
        ordered = (
            -_SLACK <= self.ci_low <= self.mean + _SLACK
            and self.mean <= self.ci_high + _SLACK
            and self.ci_high <= 1 + _SLACK
        )
        if not ordered:
            raise ValueError(
                f"need 0 <= ci_low <= mean <= ci_high <= 1, got {self.ci_low}, {self.mean}, {self.ci_high}"
            )


def z_quantile(confidence: float) -> float:
    """Two-sided standard normal critical value for `confidence` (0.95 -> 1.96)."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        series, term, power = 0.0, math.cos(theta), 1
        while power <= df - 2:
            series += term
            term *= cos2 * (power + 1) / (power + 2)
            power += 2
        return 2 / math.pi * (theta + math.sin(theta) * series)
    series, term, power = 0.0, 1.0, 0
    while power <= df - 2:
        series += term
        term *= cos2 * (power + 1) / (power + 2)
        power += 2
    return math.sin(theta) * series


def t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student's t critical value for `confidence` with `df` degrees of freedom."""
    _check_confidence(confidence)
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df > _EXACT_T_MAX_DF:
        z = z_quantile(confidence)
        return (
            z
            + (z**3 + z) / (4 * df)
            + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
        )
    low, high = 0.0, 1.0
    while _t_central_mass(high, df) < confidence:
        low, high = high, high * 2
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if _t_central_mass(mid, df) < confidence:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return (low + high) / 2


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for `successes` out of `n` 0/1 trials."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")
    z = z_quantile(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def summarize(dimension: str, scores: Sequence[float], confidence: float = 0.95) -> DimensionScore:
    """Mean and interval: Wilson for all-0/1 scores, Student's t otherwise (clipped to [0, 1])."""
    _check_confidence(confidence)
    values = [float(s) for s in scores]
    if any(not math.isfinite(v) or not 0.0 <= v <= 1.0 for v in values):
        raise ValueError("scores must be finite and within [0, 1]")
    n = len(values)
    if n == 0:
        # No evidence: the widest interval, which disagrees with nothing.
        return DimensionScore(dimension, 0.0, 0, 0.0, 1.0)
    mean = math.fsum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        low, high = wilson_interval(round(math.fsum(values)), n, confidence)
        return DimensionScore(dimension, mean, n, low, high)
    if n == 1:
        return DimensionScore(dimension, mean, 1, 0.0, 1.0)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile(confidence, n - 1) * math.sqrt(variance / n)
    return DimensionScore(dimension, mean, n, max(0.0, mean - half), min(1.0, mean + half))


def disagrees(a: DimensionScore, b: DimensionScore) -> bool:
    """Whether two scores of one dimension have intervals that do not overlap."""
    if a.dimension != b.dimension:
        raise ValueError(f"cannot compare dimension {a.dimension!r} with {b.dimension!r}")
    return a.ci_high < b.ci_low or b.ci_high < a.ci_low


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
