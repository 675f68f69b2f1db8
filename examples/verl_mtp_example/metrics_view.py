"""Read the metrics verl's tracker writes (``trainer.logger`` backend ``file``: one JSON object per step,
``{"step": N, "data": {metric: value}}``), print one compact line per step, and plot the curves (PNG).

Run on finished work dirs of :mod:`.launch`::

    python -m verl_mtp_example.metrics_view runs/rl_occ                       # table + runs/rl_occ/curves.png
    python -m verl_mtp_example.metrics_view runs/detach runs/rl_occ --out cmp.png   # side by side

Metric names are verl's and verl-mtp's (docs/mtp_rl.md section 6): ``critic/score/mean`` (reward),
``actor/mtp_{k}/lambda``, ``actor/mtp_{k}/top1_agreement``, ``actor/mtp_pg_loss``,
``actor/mtp_losses/mtp_{k}_loss`` (Megatron's MTP cross-entropy in ``detach`` / ``ce``), ``timing_s/step``.
The exact-answer rate ``exact`` is not a verl metric: it is counted from the rollout dumps verl writes
with ``trainer.rollout_data_dir`` (``<step>.jsonl``, one line per sample with its ``score``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Iterable, Optional

__all__ = [
    "read_metrics",
    "merge_metric_files",
    "exact_rate",
    "num_heads",
    "format_step_line",
    "plot_runs",
    "REWARD",
    "STEP_TIME",
]

REWARD = "critic/score/mean"
STEP_TIME = "timing_s/step"
EXACT = "local/exact_rate"  # added by the launcher from the rollout dumps (not a verl metric)
_HEAD = re.compile(r"^actor/mtp_(\d+)/|^actor/mtp_losses/mtp_(\d+)_loss$")


def read_metrics(path: str) -> dict[int, dict]:
    """``{step: metrics}`` from a verl file-logger JSONL; a later line for a step updates the earlier one
    (a resumed run logs the steps after the checkpoint again). A partly written last line is skipped."""
    out: dict[int, dict] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = rec.get("step")
            if isinstance(step, int):
                out.setdefault(step, {}).update(rec.get("data") or {})
    return out


def merge_metric_files(paths: Iterable[str], out_path: str, extra: Optional[dict[int, dict]] = None) -> dict:
    """Merge per-invocation metric files (in order) into one JSONL in verl's file-logger format."""
    merged: dict[int, dict] = {}
    for path in paths:
        for step, data in read_metrics(path).items():
            merged.setdefault(step, {}).update(data)
    for step, data in (extra or {}).items():
        if step in merged:
            merged[step].update(data)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        for step in sorted(merged):
            f.write(json.dumps({"step": step, "data": merged[step]}) + "\n")
    os.replace(tmp, out_path)
    return merged


def exact_rate(rollout_dir: str, step: int) -> Optional[float]:
    """Fraction of the step's samples whose score is exactly 1.0 (the right integer), from verl's dump."""
    path = os.path.join(rollout_dir, f"{step}.jsonl")
    if not os.path.exists(path):
        return None
    scores = []
    with open(path) as f:
        for line in f:
            try:
                scores.append(float(json.loads(line)["score"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                return None  # still being written
    return sum(s == 1.0 for s in scores) / len(scores) if scores else None


def num_heads(metrics: dict) -> int:
    k = 0
    for name in metrics:
        m = _HEAD.match(name)
        if m:
            k = max(k, int(m.group(1) or m.group(2)))
    return k


def _num(x) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x


def fmt_num(x, spec: str = ".3f") -> str:
    x = _num(x)
    return f"{x:{spec}}" if x is not None else "-"


def _fmt(x, spec: str, width: int) -> str:
    x = _num(x)
    return f"{x:{spec}}".rjust(width) if x is not None else "-".rjust(width)


def mtp_loss(metrics: dict) -> Optional[float]:
    """The MTP term of the step: verl-mtp's ``actor/mtp_pg_loss`` (rl), else the sum of Megatron's MTP CE
    losses (detach / ce)."""
    if "actor/mtp_pg_loss" in metrics:
        return _num(metrics["actor/mtp_pg_loss"])
    ce = [_num(v) for k, v in metrics.items() if k.startswith("actor/mtp_losses/")]
    ce = [v for v in ce if v is not None]
    return sum(ce) if ce else None


def format_step_line(step: int, total: Optional[int], metrics: dict, heads: int) -> str:
    """One compact terminal line: step, reward, exact rate, per-head lambda and top-1 agreement, MTP loss,
    step time."""
    heads = max(heads, num_heads(metrics))
    lam = " ".join(_fmt(metrics.get(f"actor/mtp_{k}/lambda"), "+.3f", 6) for k in range(1, heads + 1))
    top1 = " ".join(_fmt(metrics.get(f"actor/mtp_{k}/top1_agreement"), ".2f", 4) for k in range(1, heads + 1))
    loss_name = "mtp_pg" if "actor/mtp_pg_loss" in metrics else "mtp_ce"
    total_s = f"/{total}" if total else ""
    return (
        f"step {step:>3}{total_s} | reward {_fmt(metrics.get(REWARD), '.3f', 5)}"
        f" exact {_fmt(metrics.get(EXACT), '.2f', 4)}"
        f" | lambda {lam or '-'} | top1 {top1 or '-'}"
        f" | {loss_name} {_fmt(mtp_loss(metrics), '+.2e', 9)}"
        f" | pg {_fmt(metrics.get('actor/pg_loss'), '+.3f', 6)}"
        f" | {_fmt(metrics.get(STEP_TIME), '.1f', 5)}s"
    )


def _series(metrics: dict[int, dict], key) -> tuple[list, list]:
    xs, ys = [], []
    for step in sorted(metrics):
        value = key(metrics[step]) if callable(key) else _num(metrics[step].get(key))
        if value is not None and math.isfinite(value):
            xs.append(step)
            ys.append(value)
    return xs, ys


def _running_mean(values: list, window: int) -> list:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _plot_run(axes, name: str, metrics: dict[int, dict], colour: str, single: bool) -> None:
    """One run's curves on the six panels: reward dots and running mean (and exact rate when alone), one line
    style per head for lambda, agreement and MTP CE."""
    (ax_r, ax_l, ax_t), (ax_m, ax_p, ax_s) = axes
    styles = ["-", "--", ":", "-."]
    heads = max([num_heads(m) for m in metrics.values()] or [0])
    x, y = _series(metrics, REWARD)
    ax_r.plot(x, y, "o", color=colour, ms=3, alpha=0.5, label=f"{name} reward (per step)" if single else None)
    if len(y) >= 3:
        ax_r.plot(x, _running_mean(y, 3), "-", color=colour, lw=2,
                  label=f"{name} reward (3-step mean)" if single else f"{name} (dots: per step, line: 3-step mean)")
    x, y = _series(metrics, EXACT)
    if x and single:
        ax_r.plot(x, y, ":", color=colour, label=f"{name} exact-answer rate")
    for k in range(1, heads + 1):
        ls = styles[(k - 1) % len(styles)]
        for ax, key, marker, label in ((ax_l, f"actor/mtp_{k}/lambda", "o", f"{name} head {k}"),
                                       (ax_t, f"actor/mtp_{k}/top1_agreement", "o", f"{name} head {k}"),
                                       (ax_m, f"actor/mtp_losses/mtp_{k}_loss", "s", f"{name} CE head {k}")):
            x, y = _series(metrics, key)
            if x:
                ax.plot(x, y, ls, marker=marker, ms=3, color=colour, label=label)
    x, y = _series(metrics, "actor/mtp_pg_loss")
    if x:
        ax_m.plot(x, y, "-", marker="o", ms=3, color=colour, label=f"{name} MTP pg (sum)")
    for ax, key in ((ax_p, "actor/pg_loss"), (ax_s, STEP_TIME)):
        x, y = _series(metrics, key)
        ax.plot(x, y, "-o", ms=3, color=colour, label=name)


_PANELS = (  # (title, y label), in the order of the 2x3 grid
    ("reward (critic/score/mean) and exact rate", "reward"),
    ("MTP coefficient lambda per head (actor/mtp_k/lambda)", "lambda"),
    ("top-1 agreement per head (actor/mtp_k/top1_agreement)", "agreement"),
    ("MTP loss (rl: pg sum; detach/ce: Megatron CE)", "loss"),
    ("main policy loss (actor/pg_loss)", "loss"),
    ("step time (timing_s/step)", "seconds"),
)


def _label_panels(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes[0][1].axhline(0.0, color="grey", lw=0.8)
    for ax, (title, ylabel) in zip([ax for row in axes for ax in row], _PANELS):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=7, loc="best")
        elif not ax.lines:
            ax.text(0.5, 0.5, "not logged in this regime", ha="center", va="center", transform=ax.transAxes,
                    color="grey")


def plot_runs(runs: dict[str, dict[int, dict]], out_png: str, title: str = "") -> str:
    """2x3 panels: reward (and exact rate), lambda per head, top-1 agreement per head, MTP loss,
    actor pg loss, step time; one colour per run, one line style per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, metrics) in enumerate(runs.items()):
        _plot_run(axes, name, metrics, colours[i % len(colours)], single=len(runs) == 1)
    _label_panels(axes)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Print and plot the metrics of launcher work dirs.")
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument("--out", default=None, help="PNG path (default: <workdir>/curves.png for one work dir)")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    runs = {}
    for wd in args.workdirs:
        metrics = read_metrics(os.path.join(wd, "metrics.jsonl"))
        runs[os.path.basename(os.path.normpath(wd))] = metrics
        heads = max([num_heads(m) for m in metrics.values()] or [0])
        print(f"== {wd}")
        for step in sorted(metrics):
            print(format_step_line(step, None, metrics[step], heads))
    out = args.out or (os.path.join(args.workdirs[0], "curves.png") if len(args.workdirs) == 1 else "curves.png")
    print(f"plot: {plot_runs(runs, out, args.title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
