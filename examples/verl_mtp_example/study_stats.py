"""The regime study's statistics: paired differences with t intervals, the minimum detectable difference, a
run-level (cluster) bootstrap, rank correlation, and sign agreement against its chance rate.

Numpy only (the environment has no scipy): Student's t quantiles are computed from the density here. Every
random draw comes from a generator seeded by the caller, so the report is the same number for number on every
machine.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

ALPHA = 0.05  # two-sided level of every interval and test
POWER = 0.8  # power of the minimum detectable difference
BOOTSTRAP_DRAWS = 2000


def t_cdf(x: float, dof: int) -> float:
    """Student's t distribution function, by integrating the density on a fine grid (exact to ~1e-9)."""
    if x < 0:
        return 1.0 - t_cdf(-x, dof)
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    grid = np.linspace(0.0, x, 20001)
    density = np.exp(log_norm - (dof + 1) / 2 * np.log1p(grid ** 2 / dof))
    return 0.5 + float(np.trapezoid(density, grid))


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"t_quantile: p must be in [0.5, 1), got {p}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2


def detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> Optional[float]:
    """The smallest true mean difference a two-sided paired t-test on ``n`` pairs with difference spread ``sd``
    detects with probability ``power`` (the usual approximation that ignores the far tail)."""
    if n < 2 or sd is None:
        return None
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def seeds_needed(sd: float, effect: float, alpha: float = ALPHA, power: float = POWER, most: int = 64) -> int:
    """The fewest pairs whose detectable difference is at most ``effect``."""
    for n in range(2, most + 1):
        if detectable_difference(sd, n, alpha, power) <= effect:
            return n
    return most


def paired(differences: Sequence[float], alpha: float = ALPHA) -> dict:
    """Mean of per-seed differences, its two-sided t interval, the spread and the detectable difference."""
    d = np.asarray(differences, float)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "ci": (None, None), "sd": None, "mde": None}
    mean = float(d.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "ci": (None, None), "sd": None, "mde": None}
    sd = float(d.std(ddof=1))
    half = t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "ci": (mean - half, mean + half), "sd": sd, "mde": detectable_difference(sd, n)}


def cluster_bootstrap(clusters: Sequence[Sequence], statistic: Callable[[list], Optional[float]], seed: int,
                      draws: int = BOOTSTRAP_DRAWS, alpha: float = ALPHA) -> dict:
    """``statistic`` of the pooled clusters (runs) and its percentile interval over ``draws`` resamples of whole
    clusters with replacement: updates of one run are not independent, runs are."""
    clusters = [list(c) for c in clusters if len(c)]
    estimate = statistic([x for c in clusters for x in c]) if clusters else None
    if estimate is None or len(clusters) < 2:
        return {"estimate": estimate, "ci": (None, None), "clusters": len(clusters)}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        picked = rng.integers(0, len(clusters), len(clusters))
        value = statistic([x for i in picked for x in clusters[i]])
        if value is not None and math.isfinite(value):
            values.append(value)
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2]) if values else (None, None)
    return {"estimate": estimate, "ci": (float(low), float(high)) if values else (None, None),
            "clusters": len(clusters)}


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(pairs: list[tuple[float, float]]) -> Optional[float]:
    """Spearman's rank correlation of (x, y) pairs; None below 3 pairs or without spread."""
    if len(pairs) < 3:
        return None
    x, y = (np.asarray(v, float) for v in zip(*pairs, strict=True))
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def sign_agreement(pairs: list[tuple[float, float]]) -> Optional[float]:
    """Share of pairs whose two values have the same sign."""
    if not pairs:
        return None
    x, y = (np.asarray(v, float) for v in zip(*pairs, strict=True))
    return float(np.mean(np.sign(x) == np.sign(y)))


def chance_agreement(pairs: list[tuple[float, float]]) -> Optional[float]:
    """The sign agreement two independent values with these sign frequencies would reach by chance:
    ``P(x>0) P(y>0) + P(x<0) P(y<0) + P(x=0) P(y=0)`` (e.g. 0.82 when 90 % of each are positive)."""
    if not pairs:
        return None
    x, y = (np.asarray(v, float) for v in zip(*pairs, strict=True))
    return float(sum(np.mean(np.sign(x) == s) * np.mean(np.sign(y) == s) for s in (-1.0, 0.0, 1.0)))


def agreement_above_chance(pairs: list[tuple[float, float]]) -> Optional[float]:
    """Sign agreement minus its chance rate: 0 when the signs are unrelated, > 0 when they go together."""
    if not pairs:
        return None
    return sign_agreement(pairs) - chance_agreement(pairs)


def median(values: list[float]) -> Optional[float]:
    return float(np.median(values)) if len(values) else None
