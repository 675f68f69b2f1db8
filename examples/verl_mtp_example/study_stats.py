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
    """Mean of per-seed differences, its two-sided t interval, the spread, the detectable difference and how many
    differences are negative (a collapse in some seeds only makes the t interval wide, not the count)."""
    d = np.asarray(differences, float)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "ci": (None, None), "sd": None, "mde": None}
    mean = float(d.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "ci": (None, None), "sd": None, "mde": None}
    sd = float(d.std(ddof=1))
    half = t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "ci": (mean - half, mean + half), "sd": sd, "mde": detectable_difference(sd, n),
            "below": int(np.sum(d < 0))}


def pool(clusters: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The clusters' columns concatenated."""
    return {key: np.concatenate([c[key] for c in clusters]) for key in clusters[0]}


def cluster_bootstrap(clusters: Sequence[dict[str, np.ndarray]], statistics: dict[str, Callable[[dict], Optional[float]]],
                      seed: int, draws: int = BOOTSTRAP_DRAWS, alpha: float = ALPHA) -> dict[str, dict]:
    """Each of ``statistics`` on the pooled clusters (runs: dicts of equally long columns) and its percentile
    interval over ``draws`` resamples of whole clusters with replacement (updates of one run are not
    independent, runs are); all statistics share the resamples."""
    clusters = [c for c in clusters if len(next(iter(c.values())))]
    estimates = {name: (f(pool(clusters)) if clusters else None) for name, f in statistics.items()}
    values: dict[str, list] = {name: [] for name in statistics}
    if len(clusters) >= 2:
        rng = np.random.default_rng(seed)
        for _ in range(draws):
            sample = pool([clusters[i] for i in rng.integers(0, len(clusters), len(clusters))])
            for name, f in statistics.items():
                value = f(sample)
                if value is not None and math.isfinite(value):
                    values[name].append(value)
    out = {}
    for name, estimate in estimates.items():
        ci = (None, None)
        if estimate is not None and values[name]:
            low, high = np.quantile(values[name], [alpha / 2, 1 - alpha / 2])
            ci = (float(low), float(high))
        out[name] = {"estimate": estimate, "ci": ci, "clusters": len(clusters)}
    return out


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0; tied values share the mean of the ranks they span (Spearman's convention). Ties are the
    rule, not the exception, here: a bootstrap resample repeats whole runs."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    new = np.empty(len(x), bool)
    new[:1] = True
    new[1:] = ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(x)))
    r = np.empty(len(x))
    r[order] = (starts + (counts - 1) / 2)[np.cumsum(new) - 1]
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Spearman's rank correlation of paired values; None below 3 pairs or without spread."""
    if len(x) < 3:
        return None
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / norm if norm > 0 else None


def sign_agreement(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Share of pairs whose two values have the same sign."""
    return float(np.mean(np.sign(x) == np.sign(y))) if len(x) else None


def chance_agreement(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """The sign agreement two independent values with these sign frequencies would reach by chance:
    ``P(x>0) P(y>0) + P(x<0) P(y<0) + P(x=0) P(y=0)`` (e.g. 0.82 when 90 % of each are positive)."""
    if not len(x):
        return None
    sx, sy = np.sign(x), np.sign(y)
    return float(sum(np.mean(sx == s) * np.mean(sy == s) for s in (-1.0, 0.0, 1.0)))


def agreement_above_chance(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Sign agreement minus its chance rate: 0 when the signs are unrelated, > 0 when they go together."""
    return sign_agreement(x, y) - chance_agreement(x, y) if len(x) else None


def median(values: np.ndarray) -> Optional[float]:
    """The median (numpy's, by sorting: ``np.median``'s overhead dominates the bootstrap on short columns)."""
    n = len(values)
    if not n:
        return None
    x = np.sort(values)
    return float((x[(n - 1) // 2] + x[n // 2]) / 2)
