"""One PNG of what each regime costs over ``detach``, drawn from the two benchmarks' printed output.

Left: the exact counts of ``benchmarks.mtp_flops`` (FLOPs, bytes moved, peak tensor memory) per model shape.
Right: the wall-clock ratios of ``benchmarks.mtp_actor_step``, each a median with its bootstrap 95 % interval,
so a bar whose interval crosses 1.0 reads as "not distinguishable from detach on this machine".

    python -m benchmarks.cost_figure docs/results/cost_counts.txt docs/results/cost_wallclock.txt \\
        --out docs/results/cost.png
"""

from __future__ import annotations

import argparse
import re

COUNT_LINE = re.compile(
    r"^(?P<model>\S+) seq=\d+ (?P<regime>\w+)/detach: flops (?P<flops>[\d.]+)x bytes (?P<bytes>[\d.]+)x "
    r"peak_mem (?P<peak>[\d.]+)x"
)
TIME_LINE = re.compile(
    r"^vocab=(?P<vocab>\d+) seq=(?P<seq>\d+) (?P<regime>\w+)/detach: step_time (?P<median>[\d.]+)x .*?"
    r"95% CI of the median (?P<low>[\d.]+)-(?P<high>[\d.]+)\)"
)


def parse_counts(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {regime: {"flops", "bytes", "peak"}}}`` from ``benchmarks.mtp_flops`` output."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in map(COUNT_LINE.match, text.splitlines()):
        if m:
            out.setdefault(m["model"], {})[m["regime"]] = {k: float(m[k]) for k in ("flops", "bytes", "peak")}
    return out


def parse_times(text: str) -> dict[str, dict[str, tuple[float, float, float]]]:
    """``{"vocab/seq": {regime: (median, low, high)}}`` from ``benchmarks.mtp_actor_step`` output."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for m in map(TIME_LINE.match, text.splitlines()):
        if m:
            shape = f"{int(m['vocab']) // 1000}k / {m['seq']}"
            out.setdefault(shape, {})[m["regime"]] = (float(m["median"]), float(m["low"]), float(m["high"]))
    return out


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], errors=None) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        # drawn from 1.0 (detach) up or down, so a bar's length is the regime's difference
        ax.bar(xs, [v - 1.0 for v in values], width, bottom=1.0, label=name,
               yerr=None if errors is None else errors[name], capsize=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.axhline(1.0, color="black", linewidth=0.8)


def draw(counts, times, out: str) -> None:
    """Write the two-panel figure to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    models = list(counts)
    series = {
        f"{regime} {measure}": [counts[m][regime][key] for m in models]
        for regime in ("rl_occ", "rl_materialised")
        for measure, key in (("FLOPs", "flops"), ("bytes", "bytes"), ("peak mem", "peak"))
        if all(regime in counts[m] for m in models)
    }
    _grouped_bars(left, models, series)
    left.set(title="exact counts, one actor step at sequence 8192 (FLOPs: no bar = equal)",
             ylabel="ratio over detach", ylim=(0.85, 1.1))
    left.legend(fontsize=7, ncol=2)
    shapes = list(times)
    regimes = [r for r in ("ce", "rl", "rl_occ", "rl_materialised") if all(r in times[s] for s in shapes)]
    medians = {r: [times[s][r][0] for s in shapes] for r in regimes}
    errors = {r: [[times[s][r][0] - times[s][r][1] for s in shapes], [times[s][r][2] - times[s][r][0] for s in shapes]]
              for r in regimes}
    _grouped_bars(right, shapes, medians, errors)
    right.set(title="CPU step time, toy model (median, 95 % interval)", xlabel="vocabulary / sequence",
              ylabel="ratio over detach", ylim=(0.7, 1.4))
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("counts", help="saved output of python -m benchmarks.mtp_flops")
    p.add_argument("times", help="saved output of python -m benchmarks.mtp_actor_step")
    p.add_argument("--out", default="cost.png")
    args = p.parse_args()
    with open(args.counts) as f:
        counts = parse_counts(f.read())
    with open(args.times) as f:
        times = parse_times(f.read())
    if not counts or not times:
        raise SystemExit(f"no benchmark lines found in {args.counts if not counts else args.times}")
    draw(counts, times, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
