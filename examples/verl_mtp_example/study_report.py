"""The regime study's report (:mod:`.study`): one table and three figures from the runs' verl metric files.

* ``table.md`` / ``results.json``: per regime, mean +- std over seeds of the final reward, the reward over the
  last :data:`LAST_N` steps, the exact-answer rate and head-1 top-1 agreement over the same steps, the
  paired difference of the last-N reward to ``detach`` (same seed), and the median step time;
* ``reward.png``: reward and top-1 agreement per regime over training, mean with a +-std band over seeds;
* the second table of ``table.md``: ``c``, ``v^2`` and their cosine over the first and the second half of training
  (does the first-order term decay while the second-order one persists?);
* ``decomposition.png``: the paper's two terms over training for the ``rl`` regimes, ``c = <g_RL, g_MTP>``
  and ``v^2 = ||g_MTP||^2`` (exact, from the gradient diagnostics), their cosine, and lambda;
* ``lambda_scatter.png``: the proxy's lambda against the exact one of the same updates, with their Pearson
  and Spearman correlations.

Metrics are verl's step values (``trainer.logger`` file backend), read with :func:`.metrics_view.read_metrics`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np

from verl_mtp_example import metrics_view as mv

LAST_N = 5
TOP1 = "actor/mtp_1/top1_agreement"
EXACT_LAMBDA = "actor/mtp_1/occ_grad_lambda"
PROXY_LAMBDA = "actor/mtp_1/occ_grad_proxy_lambda"
GRAD_C, GRAD_V2, GRAD_COS = "actor/mtp_1/occ_grad_c", "actor/mtp_1/occ_grad_v2", "actor/mtp_1/occ_grad_cos"


def load_runs(out: str, regimes: list[str], seeds: list[int]) -> dict[str, dict[int, dict[int, dict]]]:
    """``{regime: {seed: {step: metrics}}}`` for the runs that logged anything."""
    runs = {}
    for regime in regimes:
        for seed in seeds:
            metrics = mv.read_metrics(os.path.join(out, regime, f"seed{seed}", "metrics.jsonl"))
            if metrics:
                runs.setdefault(regime, {})[seed] = metrics
    return runs


def series(run: dict[int, dict], key: str) -> dict[int, float]:
    """``{step: value}`` of one metric, finite values only."""
    values = {step: mv._num(m.get(key)) for step, m in run.items()}
    return {s: v for s, v in values.items() if v is not None and math.isfinite(v)}


def last_n_mean(run: dict[int, dict], key: str, n: int = LAST_N) -> Optional[float]:
    values = series(run, key)
    tail = [values[s] for s in sorted(values)[-n:]]
    return float(np.mean(tail)) if tail else None


def mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """Mean, sample std (0 for one value) and count of the defined values."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs)


def regime_row(name: str, seeds: dict[int, dict[int, dict]], detach: Optional[dict[int, dict[int, dict]]]) -> dict:
    """One table row: every quantity as (mean, std, number of seeds)."""
    final = [mv._num(run[max(run)].get(mv.REWARD)) for run in seeds.values()]
    paired = [last_n_mean(run, mv.REWARD) - last_n_mean(detach[seed], mv.REWARD)
              for seed, run in seeds.items() if detach and seed in detach]
    step_times = [float(np.median(list(series(run, mv.STEP_TIME).values())[1:] or [np.nan])) for run in seeds.values()]
    return {
        "regime": name,
        "steps": min(len(run) for run in seeds.values()),
        "final_reward": mean_std(final),
        "reward_last_n": mean_std([last_n_mean(run, mv.REWARD) for run in seeds.values()]),
        "exact_last_n": mean_std([last_n_mean(run, mv.EXACT) for run in seeds.values()]),
        "top1_last_n": mean_std([last_n_mean(run, TOP1) for run in seeds.values()]),
        "reward_last_n_minus_detach": mean_std(paired) if paired else (None, None, 0),
        "seconds_per_step": mean_std([t for t in step_times if math.isfinite(t)]),
    }


def _cell(stat: tuple, spec: str = ".3f") -> str:
    mean, std, _ = stat
    return "-" if mean is None else f"{mean:{spec}} +- {std:{spec.lstrip('+')}}"


def table_markdown(rows: list[dict], seeds: list[int]) -> str:
    head = (f"| regime | seeds | steps | final reward | reward, last {LAST_N} | exact, last {LAST_N} | "
            f"top-1 agreement, last {LAST_N} | last-{LAST_N} reward - detach (paired) | s/step |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['final_reward'][2]} | {r['steps']} | {_cell(r['final_reward'])} | "
                     f"{_cell(r['reward_last_n'])} | "
                     f"{_cell(r['exact_last_n'])} | {_cell(r['top1_last_n'])} | "
                     f"{_cell(r['reward_last_n_minus_detach'], '+.3f')} | {_cell(r['seconds_per_step'], '.1f')} |")
    lines.append(f"\nmean +- std over seeds {seeds} (sample std); the paired difference subtracts detach's run of "
                 "the same seed.")
    return "\n".join(lines) + "\n"


def halves(seeds: dict[int, dict[int, dict]], key: str) -> tuple[Optional[float], Optional[float]]:
    """Mean of a metric over the first and the second half of the steps, all seeds pooled: does it decay?"""
    steps = sorted({s for run in seeds.values() for s in run})
    if not steps:
        return None, None
    middle = steps[len(steps) // 2]
    early = [v for run in seeds.values() for s, v in series(run, key).items() if s < middle]
    late = [v for run in seeds.values() for s, v in series(run, key).items() if s >= middle]
    return (float(np.mean(early)) if early else None), (float(np.mean(late)) if late else None)


def decomposition_rows(runs: dict) -> list[dict]:
    """Per diagnosed regime, ``c``, ``v^2`` and their cosine over the first and the second half of training."""
    rows = []
    for regime, seeds in runs.items():
        if any(series(run, GRAD_C) for run in seeds.values()):
            rows.append({"regime": regime, **{name: halves(seeds, key) for name, key in
                                               (("c", GRAD_C), ("v2", GRAD_V2), ("cos", GRAD_COS))}})
    return rows


def decomposition_markdown(rows: list[dict]) -> str:
    def pair(x):
        return " -> ".join("-" if v is None else f"{v:.3g}" for v in x)

    lines = ["| regime | c = <g_RL, g_MTP>, first half -> second half | v^2, squared norm of g_MTP "
             "| cos(g_RL, g_MTP) |",
             "|---|---|---|---|"]
    lines += [f"| {r['regime']} | {pair(r['c'])} | {pair(r['v2'])} | {pair(r['cos'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def lambda_pairs(runs: dict) -> dict[str, tuple[list[float], list[float]]]:
    """Per regime, (exact, proxy) lambda of every diagnosed step of every seed."""
    pairs = {}
    for regime, seeds in runs.items():
        exact, proxy = [], []
        for run in seeds.values():
            e, p = series(run, EXACT_LAMBDA), series(run, PROXY_LAMBDA)
            for step in sorted(set(e) & set(p)):
                exact.append(e[step])
                proxy.append(p[step])
        if exact:
            pairs[regime] = (exact, proxy)
    return pairs


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def correlations(exact: list[float], proxy: list[float]) -> dict:
    """Pearson and Spearman correlation of the two estimators (None below 3 points or without spread), and the
    share of updates where they agree in sign (whether the MTP term should push or pull at all)."""
    x, y = np.asarray(exact, float), np.asarray(proxy, float)
    sign = float(np.mean(np.sign(x) == np.sign(y))) if len(x) else None
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return {"n": len(x), "pearson": None, "spearman": None, "sign_agreement": sign}
    return {"n": len(x), "pearson": float(np.corrcoef(x, y)[0, 1]),
            "spearman": float(np.corrcoef(_ranks(x), _ranks(y))[0, 1]), "sign_agreement": sign}


def write_report(out: str, regimes: list[str], seeds: list[int], steps: int, seconds: Optional[float]) -> dict:
    """Table and results of the finished (or partly finished) study in ``out``; the runs and lambda pairs they
    came from, for the figures (:func:`.study_figures.draw_all`)."""
    runs = load_runs(out, regimes, seeds)
    rows = [regime_row(name, runs[name], runs.get("detach")) for name in regimes if name in runs]
    pairs = lambda_pairs(runs)
    all_exact = [x for e, _ in pairs.values() for x in e]
    all_proxy = [y for _, p in pairs.values() for y in p]
    lam = {"all": correlations(all_exact, all_proxy), **{r: correlations(*p) for r, p in pairs.items()}}
    decomposition = decomposition_rows(runs)
    table = table_markdown(rows, seeds) + "\n" + decomposition_markdown(decomposition)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    results = {"rows": rows, "decomposition": decomposition, "lambda_correlation": lam, "seeds": seeds,
               "steps": steps, "study_seconds": seconds}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table, flush=True)
    print(f"proxy vs exact lambda: {json.dumps(lam)}", flush=True)
    return {"table": os.path.join(out, "table.md"), "results": results, "runs": runs, "pairs": pairs}
