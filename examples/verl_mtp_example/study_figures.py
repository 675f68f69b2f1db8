"""The regime study's figures (:mod:`.study_report` computes the numbers they show): reward curves with a +-std
band over seeds, the exact gradient statistics of every diagnosed update over training, and the proxy against
the exact estimator update by update (lambda, and its numerator and denominator against ``c`` and ``v^2``)."""

from __future__ import annotations

import os

import numpy as np

from verl_mtp_example import metrics_view as mv
from verl_mtp_example.study_report import PHASES, TOP1, diagnosed, series
from verl_mtp_example.study_stats import pool


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, seeds: dict, key: str, label: str, colour, style: str = "-") -> None:
    """Mean over seeds at each step they all logged, with a +-std band."""
    per_seed = [series(run, key) for run in seeds.values()]
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    if not steps:
        return
    values = np.array([[s[step] for step in steps] for s in per_seed])
    mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
    ax.plot(steps, mean, style, color=colour, label=f"{label} (n={len(values)})", lw=1.4)
    ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.12, lw=0)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _colours(names) -> dict:
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def reward_figure(out: str, runs: dict) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = _colours(runs)
    for regime, seeds in runs.items():
        _band(axes[0], seeds, mv.REWARD, regime, colours[regime])
        _band(axes[1], seeds, mv.EXACT, regime, colours[regime])
        _band(axes[2], seeds, TOP1, regime, colours[regime])
    titles = ("reward (critic/score/mean)", "exact-answer rate", "head 1 top-1 agreement (rl regimes)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MTP regimes on the local example: mean +- std over seeds")
    return _save(fig, os.path.join(out, "reward.png"))


def _per_step_median(columns: dict, key: str) -> tuple[np.ndarray, list]:
    steps = np.unique(columns["step"])
    return steps, [float(np.nanmedian(columns[key][columns["step"] == s])) for s in steps]


def decomposition_figure(out: str, updates: dict, steps: int) -> str:
    """Every diagnosed update's exact statistics (dots) and their median per step over seeds (line)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    colours = _colours(updates)
    for regime in updates:
        clusters = diagnosed(updates, regime, steps)
        if not clusters:
            continue
        columns = pool(clusters)
        for ax, key in zip(axes, ("c", "v2", "cos", "lambda"), strict=True):
            ax.scatter(columns["step"], columns[key], s=3, alpha=0.25, color=colours[regime])
            ax.plot(*_per_step_median(columns, key), color=colours[regime], lw=1.2, label=regime)
    titles = ("c = <g_RL, g_MTP> (first-order term)", "v^2 = ||g_MTP||^2 (second-order term)",
              "cos(g_RL, g_MTP)", "exact lambda = c / v^2")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for boundary in (steps / 3, 2 * steps / 3):  # the report's phases of training
            ax.axvline(boundary + 0.5, color="grey", lw=0.6, ls=":")
    axes[0].legend(fontsize=8)
    axes[0].set_yscale("symlog", linthresh=1.0)  # per-update gradient statistics have heavy tails
    axes[1].set_yscale("log")
    axes[3].set_yscale("symlog", linthresh=0.1)
    fig.suptitle("The paper's decomposition, exact, on every diagnosed update (dots; line: median per step); "
                 f"dotted: the {' / '.join(PHASES)} thirds")
    return _save(fig, os.path.join(out, "decomposition.png"))


def proxy_figure(out: str, updates: dict, steps: int) -> str:
    """Proxy against exact, update by update: lambda, the numerator against c, the denominator against v^2."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    colours = _colours(updates)
    panels = (("lambda", "proxy", "exact lambda = c / v^2", "proxy lambda"),
              ("c", "numerator", "exact c = <g_RL, g_MTP>", "proxy numerator (occ_cross_sum)"),
              ("v2", "denominator", "exact v^2 = ||g_MTP||^2", "proxy denominator (occ_dmtp_sq_sum)"))
    for regime in updates:
        clusters = diagnosed(updates, regime, steps)
        if not clusters:
            continue
        columns = pool(clusters)
        for ax, (x, y, _, _) in zip(axes, panels, strict=True):
            keep = np.isfinite(columns[x]) & np.isfinite(columns[y])
            ax.scatter(columns[x][keep], columns[y][keep], s=5, alpha=0.35, color=colours[regime],
                       label=f"{regime} (n={int(keep.sum())})")
    for ax, (_, _, xlabel, ylabel) in zip(axes, panels, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.axhline(0, color="grey", lw=0.6)
        ax.axvline(0, color="grey", lw=0.6)
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("OCC's proxy against the exact gradient estimator on the same updates (rank statistics: "
                 "report.md)")
    return _save(fig, os.path.join(out, "lambda_scatter.png"))


def draw_all(out: str, runs: dict, updates: dict, steps: int) -> list[str]:
    return [reward_figure(out, runs), decomposition_figure(out, updates, steps), proxy_figure(out, updates, steps)]
