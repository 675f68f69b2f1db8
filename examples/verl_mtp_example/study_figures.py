"""The regime study's figures (:mod:`.study_report` says what each shows): curves with a +-std band over seeds,
and the proxy-against-exact lambda scatter."""

from __future__ import annotations

import os

import numpy as np

from verl_mtp_example import metrics_view as mv
from verl_mtp_example.study_report import EXACT_LAMBDA, GRAD_C, GRAD_COS, GRAD_V2, PROXY_LAMBDA, TOP1, series


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
    ax.plot(steps, mean, style, color=colour, label=f"{label} (n={len(values)})", lw=1.6)
    ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.15, lw=0)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    titles = ("reward (critic/score/mean)", "exact-answer rate", "head 1 top-1 agreement with the sampled token")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MTP regimes on the local example: mean +- std over seeds")
    return _save(fig, os.path.join(out, "reward.png"))


def decomposition_figure(out: str, runs: dict) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    diagnosed = {r: s for r, s in runs.items() if any(series(run, GRAD_C) for run in s.values())}
    colours = _colours(runs)
    for regime, seeds in diagnosed.items():
        _band(axes[0], seeds, GRAD_C, regime, colours[regime])
        _band(axes[1], seeds, GRAD_V2, regime, colours[regime])
        _band(axes[2], seeds, GRAD_COS, regime, colours[regime])
        _band(axes[3], seeds, EXACT_LAMBDA, f"{regime} exact", colours[regime])
        _band(axes[3], seeds, PROXY_LAMBDA, f"{regime} proxy", colours[regime], "--")
    titles = ("c = <g_RL, g_MTP> (first-order term)", "v^2 = ||g_MTP||^2 (second-order term)",
              "cos(g_RL, g_MTP)", "lambda: exact c / v^2 (solid) and proxy (dashed)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_yscale("symlog", linthresh=1.0)  # per-update gradient statistics have heavy tails
    axes[1].set_yscale("log")
    axes[3].set_yscale("symlog", linthresh=0.1)
    fig.suptitle("The paper's decomposition measured: exact gradient statistics of head 1 on diagnosed updates")
    return _save(fig, os.path.join(out, "decomposition.png"))


def scatter_figure(out: str, pairs: dict, lam: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    colours = _colours(pairs)
    for regime, (exact, proxy) in pairs.items():
        r = lam[regime]["pearson"]
        label = f"{regime} (n={len(exact)}, r={r:.2f})" if r is not None else f"{regime} (n={len(exact)})"
        ax.scatter(exact, proxy, s=14, alpha=0.7, color=colours[regime], label=label)
    everything = lam["all"]
    if everything["pearson"] is not None:
        ax.set_title(f"proxy vs exact lambda, same updates: Pearson {everything['pearson']:.2f}, "
                     f"Spearman {everything['spearman']:.2f}, same sign {everything['sign_agreement']:.0%}",
                     fontsize=9)
    ax.set_xscale("symlog", linthresh=1.0)  # c / v^2 has heavy tails where v^2 is small
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel("exact lambda = c / v^2 (gradient estimator; symlog)")
    ax.set_ylabel("proxy lambda (OCC, log-probabilities)")
    ax.grid(alpha=0.3)
    if pairs:
        ax.legend(fontsize=8)
    return _save(fig, os.path.join(out, "lambda_scatter.png"))


def draw_all(out: str, runs: dict, pairs: dict, lam: dict) -> list[str]:
    return [reward_figure(out, runs), decomposition_figure(out, runs), scatter_figure(out, pairs, lam)]
