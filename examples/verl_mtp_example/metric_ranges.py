"""What each MTP metric of docs/mtp_rl.md read in the project's own runs: the study's record, metric by metric.

A user watching ``actor/mtp_1/*`` in a tracker wants to know whether a value is ordinary. The study's committed
record (:mod:`.study_data`) holds every step of every regime and, for the ``rl`` regimes, every mini-batch update,
so the ranges are computed from it and published beside the metric table (the report's ``metric_ranges`` block).
The record holds each update's ``coef_applied``; ``lambda`` is the same values without each step's first
mini-batch, where ``pi == pi_old`` makes ``dRL`` (and so OCC's ``lambda``) zero by construction. (The study's
runs predate the split of the metric into the two: their per-update ``lambda`` was what ``coef_applied`` is now.)
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from verl_mtp_example import metrics_view as mv
from verl_mtp_example.study_data import HEAD

FIRST_UPDATE = 1  # the update of each step whose dRL is 0 by construction (one PPO epoch)


def _informative(row: dict) -> bool:
    return row["update"] != FIRST_UPDATE


def _every(row: dict) -> bool:
    return True


# (metric as logged, where the record holds it, the regimes it is shown for, which rows count)
UPDATE_METRICS: tuple[tuple[str, str, Callable[[str], bool], Callable[[dict], bool]], ...] = (
    ("lambda", "coef_applied", lambda r: r.endswith("_occ"), _informative),
    ("coef_applied", "coef_applied", lambda r: r.endswith("_occ"), _every),
    ("occ_cross_sum", "occ_cross_sum", lambda r: True, _informative),
    ("occ_dmtp_sq_sum", "occ_dmtp_sq_sum", lambda r: True, _every),
    ("occ_grad_c", "occ_grad_c", lambda r: True, _every),
    ("occ_grad_v2", "occ_grad_v2", lambda r: True, _every),
    ("occ_grad_cos", "occ_grad_cos", lambda r: True, _every),
    ("occ_grad_lambda", "occ_grad_lambda", lambda r: True, _every),
)
STEP_METRICS = (HEAD + "top1_agreement", "actor/mtp_losses/mtp_1_loss")


def summary(values: list[float]) -> Optional[dict]:
    """Median, 5th and 95th percentile and count of the finite values (None when there are none)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if not len(x):
        return None
    p5, median, p95 = np.percentile(x, [5, 50, 95])
    return {"n": int(len(x)), "median": float(median), "p5": float(p5), "p95": float(p95)}


def update_ranges(updates: dict, regimes: list[str]) -> list[dict]:
    rows = []
    for metric, column, shown_for, counts in UPDATE_METRICS:
        for regime in regimes:
            if regime in updates and shown_for(regime):
                found = summary([r[column] for seed in updates[regime].values() for r in seed if counts(r)])
                if found:
                    rows.append({"metric": HEAD + metric, "regime": regime, "unit": "update", **found})
    return rows


def step_ranges(runs: dict, regimes: list[str]) -> list[dict]:
    rows = []
    for metric in STEP_METRICS:
        for regime in regimes:
            values = [mv._num(m.get(metric)) for seed in runs.get(regime, {}).values() for m in seed.values()]
            found = summary(values)
            if found:
                rows.append({"metric": metric, "regime": regime, "unit": "step", **found})
    return rows


def metric_ranges(runs: dict, updates: dict, regimes: list[str]) -> list[dict]:
    """One row per (metric, regime) with a value in the record: median and 5-95 % range over its updates/steps."""
    return update_ranges(updates, regimes) + step_ranges(runs, regimes)


def ranges_block(rows: list[dict], study: dict) -> str:
    s = study["settings"]
    lines = [f"Seen in the stress study (docs/results.md: the tiny MiMo, {len(s['seeds'])} seeds x {s['steps']} "
             f"steps per regime, DAPO): the median and the 5th-95th percentile of every logged value.",
             "",
             "| metric | regime | values (per) | median | 5th-95th percentile |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['metric']}` | {r['regime']} | {r['n']} ({r['unit']}) | {r['median']:.3g} | "
                     f"{r['p5']:.3g} to {r['p95']:.3g} |")
    return "\n".join(lines) + "\n"
