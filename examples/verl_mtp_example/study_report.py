"""The regime study's report, computed from its record (:mod:`.study_data`) alone, so that the published report is
rebuilt number for number from the repository (``--report-only --data docs/results/data``).

It writes ``report.md`` (every block below) and ``results.json`` (the same numbers unformatted; the figures of
:mod:`.study_figures` are drawn from what it returns); with ``docs`` it also writes each block into those markdown files between the markers
``<!-- study:NAME -->`` and ``<!-- /study:NAME -->`` they hold (docs/results.md: the study; docs/mtp_rl.md: the
metric ranges), where a test checks them against a fresh report.

Blocks:

* ``settings``: what was run and how long it took;
* ``pilot`` (when the record has a ``pilot/`` record of single launches): how the learning rate and the larger
  coefficient were chosen;
* ``table``: per regime, reward over the first and the last window of steps (:func:`window`), exact-answer
  rate and head-1 top-1 agreement over the last window, and the paired difference of the last-window reward to
  ``detach`` (same seed) with its t interval and minimum detectable difference;
* ``learning``: does ``detach`` learn (last window minus first, paired by seed, against the step noise), and
  the reward by quarter of training (is it near a plateau?);
* ``power``: the seeds, chosen from the step noise of an earlier study (``planning.json`` in the record: that
  study's ``results.json``), and the difference this study can detect;
* ``decomposition``: per ``rl`` regime and phase of training (thirds of the steps), the medians of the exact
  ``c = <g_RL, g_MTP>``, ``v^2 = ||g_MTP||^2``, their cosine and ``c / v^2`` over diagnosed updates, with run-level
  bootstrap intervals;
* ``proxy``: per ``rl`` regime and phase, the proxy's lambda against the exact one update by update (Spearman,
  sign agreement against its chance rate), and its numerator and denominator against ``c`` and ``v^2``;
* ``claims``: each of the paper's claims, reproduced / not reproduced / not resolvable (:func:`verdict`).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Optional

import numpy as np

from verl_mtp_example import metrics_view as mv
from verl_mtp_example import study_data
from verl_mtp_example.metric_ranges import metric_ranges, ranges_block
from verl_mtp_example import study_stats as st

TOP1 = study_data.STEP_COLUMNS["top1_agreement"]
PHASES = ("early", "middle", "late")
BOOTSTRAP_SEED = 20  # every interval is drawn from this generator seed: the report is deterministic


def window(steps: int) -> int:
    """Steps averaged at each end of training: a fifth of the run, at least 5."""
    return max(5, steps // 5)


def phase(step: int, steps: int) -> str:
    """Which third of training a step is in."""
    return PHASES[min(2, (step - 1) * 3 // steps)]


def series(run: dict[int, dict], key: str) -> dict[int, float]:
    """``{step: value}`` of one metric, finite values only."""
    values = {step: mv._num(m.get(key)) for step, m in run.items()}
    return {s: v for s, v in values.items() if v is not None and math.isfinite(v)}


def window_mean(run: dict[int, dict], key: str, n: int, last: bool = True) -> Optional[float]:
    values = series(run, key)
    steps = sorted(values)
    chosen = steps[-n:] if last else steps[:n]
    return float(np.mean([values[s] for s in chosen])) if chosen else None


def mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """Mean, sample std (0 for one value) and count of the defined values."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs)


def paired_to(runs: dict, regime: str, baseline: str, n: int) -> dict:
    """Last-window reward of ``regime`` minus ``baseline``'s run of the same seed, over the seeds both have."""
    seeds = sorted(set(runs.get(regime, {})) & set(runs.get(baseline, {})))
    diffs = [window_mean(runs[regime][s], mv.REWARD, n) - window_mean(runs[baseline][s], mv.REWARD, n)
             for s in seeds]
    return st.paired(diffs)


def regime_row(name: str, seeds: dict[int, dict[int, dict]], runs: dict, n: int) -> dict:
    step_times = [float(np.median(list(series(run, mv.STEP_TIME).values())[1:] or [np.nan])) for run in seeds.values()]
    return {
        "regime": name,
        "seeds": len(seeds),
        "steps": min(len(run) for run in seeds.values()),
        "reward_first": mean_std([window_mean(run, mv.REWARD, n, last=False) for run in seeds.values()]),
        "reward_last": mean_std([window_mean(run, mv.REWARD, n) for run in seeds.values()]),
        "exact_last": mean_std([window_mean(run, mv.EXACT, n) for run in seeds.values()]),
        "top1_last": mean_std([window_mean(run, TOP1, n) for run in seeds.values()]),
        "minus_detach": paired_to(runs, name, "detach", n) if name != "detach" else None,
        "seconds_per_step": mean_std([t for t in step_times if math.isfinite(t)]),
    }


# ---------------------------------------------------------------------------------------------- formatting


def fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None else f"{x:{spec}}"


def fmt_ci(ci: tuple, spec: str = ".3f") -> str:
    return "-" if ci[0] is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _ms(stat: tuple, spec: str = ".3f") -> str:
    mean, std, _ = stat
    return "-" if mean is None else f"{mean:{spec}} +- {std:{spec.lstrip('+')}}"


def _paired_cell(p: Optional[dict]) -> str:
    if not p or p["mean"] is None:
        return "-"
    return f"{p['mean']:+.3f} {fmt_ci(p['ci'], '+.3f')}"


def table_block(rows: list[dict], n: int) -> str:
    lines = [f"| regime | seeds | steps | reward, first {n} | reward, last {n} | exact, last {n} | "
             f"top-1 agreement, last {n} | last-{n} reward - detach, paired [95% CI] | detectable difference | "
             "seeds below detach | s/step |",
             "|" + "---|" * 11]
    for r in rows:
        paired = r["minus_detach"] or {}
        below = f"{paired['below']} of {paired['n']}" if paired.get("n", 0) > 1 else "-"
        lines.append(f"| {r['regime']} | {r['seeds']} | {r['steps']} | {_ms(r['reward_first'])} | "
                     f"{_ms(r['reward_last'])} | {_ms(r['exact_last'])} | {_ms(r['top1_last'])} | "
                     f"{_paired_cell(r['minus_detach'])} | {fmt(paired.get('mde'))} | {below} | "
                     f"{_ms(r['seconds_per_step'], '.1f')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- learning


def step_noise(run: dict[int, dict], n: int) -> Optional[float]:
    """Standard deviation of the reward around its own trend over the last ``n`` steps (a straight line fitted
    to them): the step-to-step noise at the end of training."""
    values = series(run, mv.REWARD)
    steps = sorted(values)[-n:]
    if len(steps) < 3:
        return None
    y = np.array([values[s] for s in steps])
    residual = y - np.polyval(np.polyfit(steps, y, 1), steps)
    return float(residual.std(ddof=2))


def learning(runs: dict, steps: int, n: int) -> dict:
    """``detach``'s rise from the first to the last window (paired by seed), its step noise, and its mean reward
    by quarter of training."""
    detach = runs.get("detach", {})
    rise = st.paired([window_mean(r, mv.REWARD, n) - window_mean(r, mv.REWARD, n, last=False)
                      for r in detach.values()])
    noise = mean_std([step_noise(r, n) for r in detach.values()])
    quarters = []
    for q in range(4):
        lo, hi = q * steps / 4, (q + 1) * steps / 4
        per_seed = [[v for s, v in series(r, mv.REWARD).items() if lo < s <= hi] for r in detach.values()]
        means = [np.mean(values) for values in per_seed if values]
        quarters.append(float(np.mean(means)) if means else None)
    return {"rise": rise, "step_noise": noise, "quarters": quarters}


def learning_block(info: dict, n: int) -> str:
    rise, noise = info["rise"], info["step_noise"]
    ratio = rise["mean"] / noise[0] if rise["mean"] is not None and noise[0] else None
    quarters = " | ".join(fmt(q) for q in info["quarters"])
    return ("| detach: last " f"{n} - first {n} steps, paired [95% CI] | step noise (sd around the trend, last {n}) "
            "| rise / noise | mean reward by quarter of training: 1st | 2nd | 3rd | 4th |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {_paired_cell(rise)} | {_ms(noise)} | {fmt(ratio, '.1f')} | {quarters} |\n")


# ---------------------------------------------------------------------------------------------- power


def planning(path: str) -> Optional[dict]:
    """The seeds' power calculation from the earlier study's ``results.json``: the pooled spread of its paired
    last-window differences to ``detach`` and the difference each number of seeds detects with that spread."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        earlier = json.load(f)
    sds = {r["regime"]: r["reward_last_n_minus_detach"][1] for r in earlier["rows"]
           if r["regime"] != "detach" and r["reward_last_n_minus_detach"][2] > 1}
    pooled = math.sqrt(float(np.mean([sd ** 2 for sd in sds.values()])))
    return {"earlier_steps": earlier["steps"], "earlier_seeds": len(earlier["seeds"]), "paired_sd": sds,
            "pooled_sd": pooled, "mde": {n: st.detectable_difference(pooled, n) for n in range(3, 11)}}


def observed_spread(rows: list[dict]) -> Optional[float]:
    """This study's pooled spread of the paired differences to ``detach``."""
    sds = [r["minus_detach"]["sd"] for r in rows if r["minus_detach"] and r["minus_detach"]["sd"] is not None]
    return math.sqrt(float(np.mean([sd ** 2 for sd in sds]))) if sds else None


PAPER_DETACH, PAPER_CE = 58.9, 47.7  # the paper's avg@32 on MiMo-7B: detach, CE into the trunk


def power_block(plan: Optional[dict], seeds: int, observed: Optional[float], detach_last: Optional[float]) -> str:
    lines = []
    if plan:
        spreads = ", ".join(f"{r} {sd:.3f}" for r, sd in plan["paired_sd"].items())
        lines += [f"Planning spread (the earlier {plan['earlier_steps']}-step study, {plan['earlier_seeds']} seeds, "
                  f"sd of the paired last-window differences to detach): {spreads}; pooled "
                  f"{plan['pooled_sd']:.4f}.", "",
                  "| seeds | " + " | ".join(str(n) for n in plan["mde"]) + " |",
                  "|---|" + "---|" * len(plan["mde"]),
                  "| detectable difference (two-sided 5 %, power 80 %, paired t) | "
                  + " | ".join(f"{m:.3f}" for m in plan["mde"].values()) + " |", ""]
        if seeds in plan["mde"]:
            lines.append(f"Planned with {seeds} seeds: detectable difference {plan['mde'][seeds]:.3f}.")
    relative = (PAPER_CE - PAPER_DETACH) / PAPER_DETACH
    if detach_last is not None:
        lines.append(f"The paper's CE effect relative to detach ({PAPER_CE} vs {PAPER_DETACH}) is {relative:+.1%}; "
                     f"at detach's last-window reward here ({detach_last:.3f}) that is {relative * detach_last:+.3f}.")
    if observed is not None:
        lines.append(f"Observed here: pooled sd of the paired differences {observed:.4f}, so {seeds} seeds detect "
                     f"{st.detectable_difference(observed, seeds):.3f}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- pilot

PILOT_WINDOW = 5


def pilot_rows(pilot_dir: str) -> list[dict]:
    """Per pilot run (a record of single launches, ``pilot/`` in the study's record): where its reward started,
    its best, lowest and last 5-step mean, the largest step's policy change (``actor/ppo_kl``), and for an ``rl``
    run the spread of the exact lambda* = c / v^2 it measured."""
    study, runs, updates = study_data.load(pilot_dir)
    rows = []
    for name in study["settings"]["regimes"]:
        run = runs[name][0]
        reward = [v for _, v in sorted(series(run, mv.REWARD).items())]
        rolling = np.convolve(reward, np.ones(PILOT_WINDOW) / PILOT_WINDOW, mode="valid")
        lam = np.array([r["occ_grad_lambda"] for r in updates.get(name, {}).get(0, [])
                        if r["occ_grad_lambda"] is not None])
        rows.append({"run": name, "steps": len(reward), "first": float(rolling[0]), "best": float(rolling.max()),
                     "lowest": float(rolling.min()), "last": float(rolling[-1]), "ppo_kl": max(series(run, study_data.STEP_COLUMNS["ppo_kl"]).values()),
                     "lambda": [float(q) for q in np.quantile(lam, [0.25, 0.5, 0.75])] if len(lam) else None})
    return rows


def pilot_block(rows: list[dict]) -> str:
    lines = [f"| pilot run (seed 0) | steps | reward, first {PILOT_WINDOW} | best {PILOT_WINDOW}-step mean | "
             f"lowest | last {PILOT_WINDOW} | largest step KL (actor/ppo_kl) | exact lambda* = c / v^2: median "
             "[quartiles] |",
             "|" + "---|" * 8]
    for r in rows:
        lam = "-" if r["lambda"] is None else f"{r['lambda'][1]:.2f} [{r['lambda'][0]:.2f}, {r['lambda'][2]:.2f}]"
        lines.append(f"| {r['run']} | {r['steps']} | {r['first']:.3f} | {r['best']:.3f} | {r['lowest']:.3f} | "
                     f"{r['last']:.3f} | "
                     f"{r['ppo_kl']:.3f} | {lam} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- per update


COLUMNS = {"c": "occ_grad_c", "v2": "occ_grad_v2", "cos": "occ_grad_cos", "lambda": "occ_grad_lambda",
           "proxy": "occ_grad_proxy_lambda", "numerator": "occ_cross_sum", "denominator": "occ_dmtp_sq_sum"}


def diagnosed(updates: dict, regime: str, steps: int) -> list[dict[str, np.ndarray]]:
    """The diagnosed updates of a regime as columns (:data:`COLUMNS`, NaN where not logged, plus ``step`` and
    ``phase``, the index in :data:`PHASES`), one dict per run: the bootstrap's clusters."""
    clusters = []
    for seed in sorted(updates.get(regime, {})):
        rows = [r for r in updates[regime][seed] if r["occ_grad_c"] is not None and r["occ_grad_v2"] is not None]
        if rows:
            cluster = {name: np.array([np.nan if r[key] is None else r[key] for r in rows])
                       for name, key in COLUMNS.items()}
            cluster["step"] = np.array([r["step"] for r in rows])
            cluster["phase"] = np.array([PHASES.index(phase(r["step"], steps)) for r in rows])
            clusters.append(cluster)
    return clusters


def _mask(columns: dict, name: Optional[str], *keys: str) -> np.ndarray:
    """The updates of phase ``name`` (all when None) where every one of ``keys`` is logged."""
    keep = np.ones(len(columns["step"]), bool) if name is None else columns["phase"] == PHASES.index(name)
    for key in keys:
        keep &= np.isfinite(columns[key])
    return keep


def _median_of(key: str, name: Optional[str]) -> Callable[[dict], Optional[float]]:
    return lambda cols: st.median(cols[key][_mask(cols, name, key)])


def _share_positive(key: str, name: Optional[str]) -> Callable[[dict], Optional[float]]:
    def statistic(cols: dict) -> Optional[float]:
        values = cols[key][_mask(cols, name, key)]
        return float(np.mean(values > 0)) if len(values) else None
    return statistic


def _change(key: str, ratio: bool) -> Callable[[dict], Optional[float]]:
    """Median of ``key`` over the late third against the early third: their ratio or their difference."""
    def statistic(cols: dict) -> Optional[float]:
        early, late = (_median_of(key, p)(cols) for p in ("early", "late"))
        if early is None or late is None or (ratio and early <= 0):
            return None
        return late / early if ratio else late - early
    return statistic


def _between(x: str, y: str, measure: Callable, name: Optional[str]) -> Callable[[dict], Optional[float]]:
    def statistic(cols: dict) -> Optional[float]:
        keep = _mask(cols, name, x, y)
        return measure(cols[x][keep], cols[y][keep])
    return statistic


def decomposition(updates: dict, regimes: list[str], steps: int) -> list[dict]:
    """Per regime and phase, the medians of the exact statistics (and the share of c > 0); then the late third
    against the early one."""
    rows = []
    for i, regime in enumerate(regimes):
        clusters = diagnosed(updates, regime, steps)
        if not clusters:
            continue
        statistics = {}
        for name in (*PHASES, None):
            statistics.update({(name, key): _median_of(key, name) for key in ("c", "v2", "cos", "lambda")})
            statistics[(name, "c_positive")] = _share_positive("c", name)
        statistics.update({("late / early", key): _change(key, key in ("c", "v2"))
                           for key in ("c", "v2", "cos", "lambda")})
        found = st.cluster_bootstrap(clusters, statistics, seed=BOOTSTRAP_SEED + i)
        for name in (*PHASES, None):
            rows.append({"regime": regime, "phase": name or "all",
                         "n": int(sum(_mask(c, name, "c").sum() for c in clusters)),
                         **{key: found[(name, key)] for key in ("c", "c_positive", "v2", "cos", "lambda")}})
        rows.append({"regime": regime, "phase": "late / early", "n": None, "c_positive": None,
                     **{key: found[("late / early", key)] for key in ("c", "v2", "cos", "lambda")}})
    return rows


def _b(x: Optional[dict], spec: str = ".3g") -> str:
    if not x or x["estimate"] is None:
        return "-"
    return f"{x['estimate']:{spec}} {fmt_ci(x['ci'], spec)}"


def decomposition_block(rows: list[dict]) -> str:
    lines = ["| regime | phase | diagnosed updates | median c [95% CI] | share c > 0 | median v^2 | "
             "median cos(g_RL, g_MTP) | median exact lambda = c / v^2 |",
             "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['phase']} | {fmt(r['n'], 'd') if r['n'] is not None else '-'} | "
                     f"{_b(r['c'])} | {_b(r['c_positive'], '.2f')} | {_b(r['v2'])} | {_b(r['cos'])} | "
                     f"{_b(r['lambda'])} |")
    return ("\n".join(lines) + "\n\nIn the `late / early` rows: c and v^2 as the ratio of the late third's median "
            "to the early third's, the cosine and lambda as their difference.\n")


def proxy_rows(updates: dict, regimes: list[str], steps: int) -> list[dict]:
    """Per regime and phase: the proxy's lambda against the exact one (rank correlation, sign agreement against
    its chance rate), its numerator against c and its denominator against v^2, update by update."""
    rows = []
    for i, regime in enumerate(regimes):
        clusters = diagnosed(updates, regime, steps)
        if not clusters:
            continue
        statistics = {}
        for name in (*PHASES, None):
            statistics.update({(name, "spearman"): _between("proxy", "lambda", st.spearman, name),
                               (name, "above_chance"): _between("proxy", "lambda", st.agreement_above_chance, name),
                               (name, "numerator_c"): _between("numerator", "c", st.spearman, name),
                               (name, "median_proxy"): _median_of("proxy", name),
                               (name, "denominator_v2"): _between("denominator", "v2", st.spearman, name)})
        found = st.cluster_bootstrap(clusters, statistics, seed=BOOTSTRAP_SEED + 100 + i)
        pooled = st.pool(clusters)
        for name in (*PHASES, None):
            keep = _mask(pooled, name, "proxy", "lambda")
            x, y = pooled["proxy"][keep], pooled["lambda"][keep]
            rows.append({"regime": regime, "phase": name or "all", "n": int(keep.sum()),
                         "sign_agreement": st.sign_agreement(x, y), "chance": st.chance_agreement(x, y),
                         **{key: found[(name, key)] for key in ("median_proxy", "spearman", "above_chance",
                                                                "numerator_c", "denominator_v2")}})
    return rows


def proxy_block(rows: list[dict]) -> str:
    lines = ["| regime | phase | updates | median proxy lambda | Spearman(proxy, exact lambda) [95% CI] | same sign | "
             "by chance | same sign - chance [95% CI] | Spearman(proxy numerator, c) | Spearman(proxy denominator, "
             "v^2) |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['phase']} | {r['n']} | {_b(r['median_proxy'])} | "
                     f"{_b(r['spearman'], '.2f')} | {fmt(r['sign_agreement'], '.2f')} | {fmt(r['chance'], '.2f')} | "
                     f"{_b(r['above_chance'], '+.2f')} | {_b(r['numerator_c'], '.2f')} | "
                     f"{_b(r['denominator_v2'], '.2f')} |")
    return ("\n".join(lines) + "\n\nBoth denominators are positive, so the sign columns also compare the proxy's "
            "numerator with c. `by chance`: the agreement two unrelated values with these sign frequencies reach.\n")


# ---------------------------------------------------------------------------------------------- claims

FIXED = re.compile(r"^(ce|rl)_([0-9.]+)$")


def fixed_regimes(regimes: list[str], mode: str) -> list[str]:
    """The regimes of ``mode`` with a fixed coefficient, smallest coefficient first."""
    chosen = [(float(m.group(2)), r) for r in regimes if (m := FIXED.match(r)) and m.group(1) == mode]
    return [r for _, r in sorted(chosen)]


def verdict(side: str, ci: tuple, mde: Optional[float] = None) -> str:
    """The claim's verdict from a 95 % interval: ``side`` is where the claim puts the quantity (``below`` or
    ``above`` 0, or ``not below`` 0: no worse).

    Reproduced: the interval lies on the claim's side. Not reproduced: the interval lies on the other side, or,
    for a difference with a detectable size ``mde``, it excludes every effect of that size on the claim's side
    (an effect the study could see is ruled out). Otherwise not resolvable.
    """
    low, high = ci
    if low is None:
        return "not resolvable"
    if side == "not below":
        if mde is not None and low > -mde:
            return "reproduced"
        return "not reproduced" if high < 0 else "not resolvable"
    sign = -1 if side == "below" else 1
    near, far = (high, low) if sign < 0 else (low, high)
    if sign * near > 0:
        return "reproduced"
    if sign * far < 0 or (mde is not None and sign * far < mde):
        return "not reproduced"
    return "not resolvable"


PAPER = {  # the paper's numbers (MiMo-7B, avg@32), quoted next to each claim
    "ce": "CE into the trunk hurts (paper: CE 47.7 vs detach 58.9)",
    "fixed": "a fixed coefficient large enough for the second-order term to dominate hurts (paper: fixed 57.4)",
    "occ_detach": "OCC is never worse than detach (paper: OCC 61.7 vs detach 58.9)",
    "occ_fixed": "OCC beats a fixed coefficient (paper: 61.7 vs 57.4)",
    "c": "the MTP policy gradient is aligned with the RL gradient (first-order term c > 0)",
    "decay": "c decays while v^2 persists, so lambda* = c / v^2 falls during training",
    "proxy": "OCC's log-probability proxy tracks lambda* = c / v^2",
}


def _reward_claim(key: str, runs: dict, regime: str, baseline: str, side: str, n: int) -> dict:
    p = paired_to(runs, regime, baseline, n)
    return {"claim": PAPER[key], "measure": f"last-{n} reward, {regime} - {baseline} (paired)", "value": p["mean"],
            "ci": p["ci"], "mde": p["mde"], "verdict": verdict(side, p["ci"], p["mde"])}


def reward_claims(runs: dict, regimes: list[str], n: int) -> list[dict]:
    present = [r for r in regimes if r in runs]
    fixed_rl = fixed_regimes(present, "rl")
    claims = [_reward_claim("ce", runs, r, "detach", "below", n) for r in fixed_regimes(present, "ce")]
    claims += [_reward_claim("fixed", runs, r, "detach", "below", n) for r in fixed_rl]
    if "rl_occ" in present:
        claims.append(_reward_claim("occ_detach", runs, "rl_occ", "detach", "not below", n))
        claims += [_reward_claim("occ_fixed", runs, "rl_occ", r, "above", n) for r in fixed_rl]
    return [c for c in claims if c["value"] is not None]


def gradient_claims(decomposition_rows: list[dict], proxy: list[dict]) -> list[dict]:
    claims = []
    for r in decomposition_rows:
        if r["phase"] == "all":
            claims.append({"claim": PAPER["c"], "measure": f"median c over diagnosed updates, {r['regime']}",
                           "value": r["c"]["estimate"], "ci": r["c"]["ci"], "mde": None,
                           "verdict": verdict("above", r["c"]["ci"])})
        if r["phase"] == "late / early":
            claims.append({"claim": PAPER["decay"],
                           "measure": f"median exact lambda, late - early third, {r['regime']}",
                           "value": r["lambda"]["estimate"], "ci": r["lambda"]["ci"], "mde": None,
                           "verdict": verdict("below", r["lambda"]["ci"])})
    for r in proxy:
        if r["phase"] == "all":
            claims.append({"claim": PAPER["proxy"], "measure": f"Spearman(proxy, exact lambda) per update, "
                                                               f"{r['regime']}",
                           "value": r["spearman"]["estimate"], "ci": r["spearman"]["ci"], "mde": None,
                           "verdict": verdict("above", r["spearman"]["ci"])})
    return claims


def claims_block(claims: list[dict]) -> str:
    lines = ["| the paper's claim | measured here | value [95% CI] | detectable difference | verdict |",
             "|---|---|---|---|---|"]
    for c in claims:
        spec = "+.3f" if c["mde"] is not None else ".3g"
        lines.append(f"| {c['claim']} | {c['measure']} | {fmt(c['value'], spec)} {fmt_ci(c['ci'], spec)} | "
                     f"{fmt(c['mde'])} | **{c['verdict']}** |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the report


def settings_block(study: dict, runs: dict) -> str:
    s, model = study["settings"], study.get("model") or {}
    n_runs = sum(len(seeds) for seeds in runs.values())
    wall = s.get("runs_wall_seconds") or 0.0
    size = (f"A MiMo-style model with {model['num_hidden_layers']} decoder layers of width {model['hidden_size']} "
            f"and {model['num_nextn_predict_layers']} MTP head ({model['parameters']:,} parameters, vocabulary "
            f"{model['vocab_size']}). " if model else "")
    return (f"{size}Regimes {', '.join(f'`{r}`' for r in s['regimes'])}; seeds {s['seeds']}; {s['steps']} steps "
            f"of {s['batch']} prompts x {s['n']} samples, {s['algo']} policy loss, learning rate {s['lr']}, after "
            f"{s['sft_steps']} SFT warm-up steps; the `rl` regimes run the exact gradient diagnostics "
            f"(`occ.diagnose_every={s['diagnose_every']}`). {n_runs} runs, {wall / 3600:.2f} h of launcher time in "
            f"all on the shared machine; at the fastest run of each regime (the least disturbed by other work) the "
            f"study takes {unloaded_hours(study):.2f} h.\n")


def unloaded_hours(study: dict) -> float:
    """The study's length if every run took as long as its regime's fastest run: an estimate for a quiet
    machine from a shared one, where other jobs slow some runs down."""
    fastest: dict[str, float] = {}
    for key, seconds in study.get("run_seconds", {}).items():
        if seconds:
            regime = key.rsplit("/", 1)[0]
            fastest[regime] = min(fastest.get(regime, math.inf), seconds["total"])
    return sum(fastest.values()) * len(study["settings"]["seeds"]) / 3600


def blocks_of(study: dict, runs: dict, updates: dict, plan: Optional[dict]) -> tuple[dict, dict]:
    """Every block's markdown and the numbers behind them."""
    s = study["settings"]
    regimes, steps = [r for r in s["regimes"] if r in runs], s["steps"]
    n = window(steps)
    rows = [regime_row(name, runs[name], runs, n) for name in regimes]
    learned = learning(runs, steps, n) if "detach" in runs else None
    rl = [r for r in regimes if updates.get(r)]
    decomposition_rows = decomposition(updates, rl, steps)
    proxy = proxy_rows(updates, rl, steps)
    claims = reward_claims(runs, regimes, n) + gradient_claims(decomposition_rows, proxy)
    ranges = metric_ranges(runs, updates, regimes)
    blocks = {"settings": settings_block(study, runs), "table": table_block(rows, n),
              "power": power_block(plan, len(s["seeds"]), observed_spread(rows),
                                   next((r["reward_last"][0] for r in rows if r["regime"] == "detach"), None)),
              "decomposition": decomposition_block(decomposition_rows), "proxy": proxy_block(proxy),
              "claims": claims_block(claims),
              "metric_ranges": ranges_block(ranges, study)}
    if learned:
        blocks["learning"] = learning_block(learned, n)
    results = {"settings": s, "window": n, "rows": rows, "learning": learned, "planning": plan,
               "decomposition": decomposition_rows, "proxy": proxy, "claims": claims, "metric_ranges": ranges}
    return blocks, results


def begin_marker(name: str) -> str:
    return f"<!-- study:{name} -->"


def end_marker(name: str) -> str:
    return f"<!-- /study:{name} -->"


def doc_blocks(text: str) -> dict[str, str]:
    """The blocks a markdown file holds between its study markers."""
    found = re.findall(r"<!-- study:([\w-]+) -->\n(.*?)<!-- /study:\1 -->", text, flags=re.S)
    return dict(found)


def fill_doc(path: str, blocks: dict[str, str]) -> list[str]:
    """Write each block into ``path`` between its markers; the names of the doc's markers with no block."""
    with open(path) as f:
        text = f.read()
    for name in doc_blocks(text):
        if name in blocks:
            text = re.sub(re.escape(begin_marker(name)) + r"\n.*?" + re.escape(end_marker(name)),
                          lambda _m, n=name: f"{begin_marker(n)}\n{blocks[n]}{end_marker(n)}", text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)
    return [name for name in doc_blocks(text) if name not in blocks]


def report_markdown(blocks: dict[str, str]) -> str:
    return "\n".join(f"{begin_marker(name)}\n{text}{end_marker(name)}\n" for name, text in blocks.items())


def write_report(data_dir: str, out: str, docs: tuple[str, ...] = ()) -> dict:
    """``report.md`` and ``results.json`` of the record in ``data_dir``, written to ``out``; the runs and updates
    they came from, for the figures (:func:`.study_figures.draw_all`, which reads this module's helpers)."""
    study, runs, updates = study_data.load(data_dir)
    blocks, results = blocks_of(study, runs, updates, planning(os.path.join(data_dir, "planning.json")))
    if os.path.isdir(os.path.join(data_dir, "pilot")):
        results["pilot"] = pilot_rows(os.path.join(data_dir, "pilot"))
        blocks["pilot"] = pilot_block(results["pilot"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(blocks))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    for doc in docs:
        unknown = fill_doc(doc, blocks)
        if unknown:
            raise SystemExit(f"[study] error: {doc} has markers with no block of the report: {unknown}")
    print(report_markdown(blocks), flush=True)
    return {"table": os.path.join(out, "report.md"), "results": results, "blocks": blocks, "runs": runs,
            "updates": updates, "steps": study["settings"]["steps"]}
