"""The regime study's record: what the report is computed from, small enough to commit.

* ``steps.csv``: one row per (regime, seed, step) with the step metrics the report reads (verl's step values);
* ``updates.csv``: one row per (regime, seed, step, update) of the ``rl`` regimes with head 1's per-update
  metrics (``coef_applied`` is logged on every update; ``lambda`` leaves out each step's first, whose dRL is 0
  by construction, so it cannot be placed by position) (:mod:`.update_metrics` records them; verl's logger keeps only their step mean). On a diagnosed update
  (``occ.diagnose_every``) the row also holds the exact gradient statistics and the proxy's lambda of the same
  update, so the proxy's numerator and denominator sit next to ``c`` and ``v^2``;
* ``study.json``: the study's settings and each run's wall time.

:mod:`.study_report` reads only this record, so ``--report-only --data docs/results/data`` rebuilds the
published table, figures and numbers from the repository. Numbers are written with Python's shortest
round-trip ``repr``: the record holds exactly what the runs logged.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional

from verl_mtp_example import metrics_view as mv
from verl_mtp_example import run_dir

HEAD = "actor/mtp_1/"
STEP_COLUMNS = {  # column -> verl metric
    "reward": mv.REWARD,
    "exact": mv.EXACT,
    "step_seconds": mv.STEP_TIME,
    "top1_agreement": HEAD + "top1_agreement",
    "lambda": HEAD + "lambda",
    "mtp_ce": "actor/mtp_losses/mtp_1_loss",
    "entropy": "actor/entropy",
    "ppo_kl": "actor/ppo_kl",
}
EVERY_UPDATE = ("coef_applied", "occ_cross_sum", "occ_dmtp_sq_sum", "top1_agreement")
DIAGNOSED = ("occ_grad_c", "occ_grad_v2", "occ_grad_cos", "occ_grad_lambda", "occ_grad_proxy_lambda")
KEYS = ("regime", "seed", "step")
# OCC's proxy lambda = lambda_plus * cross / (dmtp_sq + eps) with the config's defaults, which the study keeps;
# used only to check that a diagnosed update's row is the update the estimator ran on
LAMBDA_PLUS, EPS = 1.0, 1e-8


def _num(value) -> Optional[float]:
    x = mv._num(value)
    return x if x is not None and math.isfinite(x) else None


def step_rows(regime: str, seed: int, metrics: dict[int, dict]) -> list[dict]:
    return [{"regime": regime, "seed": seed, "step": step,
             **{col: _num(metrics[step].get(key)) for col, key in STEP_COLUMNS.items()}} for step in sorted(metrics)]


def diagnosed_positions(updates: int, diagnosed: int) -> list[int]:
    """Which of a step's updates (0-based) the estimator ran on: the engine counts updates from 1 and diagnoses
    every ``updates // diagnosed``-th, and the study keeps a whole number of them per step (see
    :func:`.study.check_diagnosis_fits`), so every step's diagnosed updates are the same positions."""
    if diagnosed == 0:
        return []
    every = updates // diagnosed
    if every * diagnosed != updates:
        raise ValueError(f"{updates} updates per step with {diagnosed} diagnosed: occ.diagnose_every must divide "
                         "the number of mini-batches per step")
    return [u for u in range(updates) if (u + 1) % every == 0]


def _check_pairing(cross: float, dmtp_sq: float, proxy: Optional[float], where: str) -> None:
    expected = LAMBDA_PLUS * cross / (dmtp_sq + EPS)
    if proxy is not None and math.isfinite(expected) and not math.isclose(proxy, expected, rel_tol=1e-6,
                                                                           abs_tol=1e-12):
        raise ValueError(f"{where}: the diagnosed update's proxy lambda {proxy} is not that of the update it is "
                         f"paired with ({expected}); the per-update record is misaligned")


def update_rows(regime: str, seed: int, updates: dict[int, dict]) -> list[dict]:
    """Per-update rows of one run from its ``updates.jsonl`` steps (head 1)."""
    rows = []
    for step in sorted(updates):
        lists = {name: updates[step].get(HEAD + name, []) for name in EVERY_UPDATE + DIAGNOSED}
        n = len(lists["occ_cross_sum"])
        positions = diagnosed_positions(n, len(lists["occ_grad_c"]))
        for u in range(n):
            row = {"regime": regime, "seed": seed, "step": step, "update": u + 1,
                   **{name: _num(lists[name][u]) if u < len(lists[name]) else None for name in EVERY_UPDATE}}
            j = positions.index(u) if u in positions else None
            row.update({name: None if j is None else _num(lists[name][j]) for name in DIAGNOSED})
            if j is not None:
                _check_pairing(lists["occ_cross_sum"][u], lists["occ_dmtp_sq_sum"][u], row["occ_grad_proxy_lambda"],
                               f"{regime} seed {seed} step {step} update {u + 1}")
            rows.append(row)
    return rows


def _write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                             for c in columns])


def run_metrics(workdir: str) -> dict[int, dict]:
    """A run's step metrics: the launcher's merged file, or, for a launch stopped before it merged them, its
    per-launch parts (without the exact-answer rate the merge adds)."""
    merged = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(merged):
        return mv.read_metrics(merged)
    metrics: dict[int, dict] = {}
    for part in run_dir.metrics_parts(workdir):
        for step, data in mv.read_metrics(part).items():
            metrics.setdefault(step, {}).update(data)
    return metrics


def _summary(workdir: str) -> dict:
    path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def export(settings: dict, runs: dict[tuple[str, int], str], data_dir: str) -> str:
    """Write the record of ``runs`` (``(regime, seed) -> work dir``) to ``data_dir``."""
    os.makedirs(data_dir, exist_ok=True)
    steps, updates, seconds, model = [], [], {}, None
    for (regime, seed), workdir in runs.items():
        steps += step_rows(regime, seed, run_metrics(workdir))
        updates += update_rows(regime, seed, mv.read_metrics(os.path.join(workdir, run_dir.UPDATE_METRICS)))
        summary = _summary(workdir)
        seconds[f"{regime}/seed{seed}"] = summary.get("seconds")
        model = model or model_facts(summary.get("paths", {}).get("model"))
    _write_csv(os.path.join(data_dir, "steps.csv"), steps, [*KEYS, *STEP_COLUMNS])
    _write_csv(os.path.join(data_dir, "updates.csv"), updates, [*KEYS, "update", *EVERY_UPDATE, *DIAGNOSED])
    with open(os.path.join(data_dir, "study.json"), "w") as f:
        json.dump({"settings": settings, "model": model, "run_seconds": seconds}, f, indent=2)
    return data_dir


MODEL_FACTS = ("num_hidden_layers", "num_nextn_predict_layers", "hidden_size", "vocab_size")


def model_facts(model_dir: Optional[str]) -> Optional[dict]:
    """The trained model's size, from its HF config and weights (the report states it; nothing is typed in)."""
    if not model_dir or not os.path.isfile(os.path.join(model_dir, "config.json")):
        return None
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    facts = {key: config.get(key) for key in MODEL_FACTS}
    weights = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(weights):
        from safetensors import safe_open

        with safe_open(weights, framework="np") as f:
            facts["parameters"] = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return facts


def _read_csv(path: str) -> list[dict]:
    def value(column: str, text: str):
        if column in ("regime",):
            return text
        if column in ("seed", "step", "update"):
            return int(text)
        return float(text) if text else None

    with open(path, newline="") as f:
        return [{c: value(c, t) for c, t in row.items()} for row in csv.DictReader(f)]


def load(data_dir: str) -> tuple[dict, dict, dict]:
    """``(study.json, runs, updates)``: ``runs[regime][seed][step]`` holds the step metrics under their verl
    names (as :func:`.metrics_view.read_metrics` gives them), ``updates[regime][seed]`` the per-update rows."""
    with open(os.path.join(data_dir, "study.json")) as f:
        study = json.load(f)
    runs, updates = {}, {}
    for row in _read_csv(os.path.join(data_dir, "steps.csv")):
        metrics = {STEP_COLUMNS[c]: v for c, v in row.items() if c in STEP_COLUMNS and v is not None}
        runs.setdefault(row["regime"], {}).setdefault(row["seed"], {})[row["step"]] = metrics
    for row in _read_csv(os.path.join(data_dir, "updates.csv")):
        updates.setdefault(row["regime"], {}).setdefault(row["seed"], []).append(row)
    return study, runs, updates


def main(argv=None) -> int:
    """Record launcher work dirs that are not a study's (the pilot runs), each as ``NAME=WORKDIR`` (seed 0)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m verl_mtp_example.study_data", description=main.__doc__)
    ap.add_argument("--data", required=True, help="record directory to write")
    ap.add_argument("runs", nargs="+", help="NAME=WORKDIR")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, workdir = item.partition("=")
        if not sep or not os.path.isdir(workdir):
            raise SystemExit(f"[study_data] error: {item!r} is not NAME=WORKDIR with an existing work dir")
        runs[(name, 0)] = os.path.abspath(workdir)
    export({"regimes": [name for name, _ in runs], "seeds": [0]}, runs, args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
