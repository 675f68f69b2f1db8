"""The regime study: MTP regimes over several seeds on the local example, then its record, report and figures.

::

    python -m verl_mtp_example.study --out runs/study                 # the stress study of docs/results.md
    python -m verl_mtp_example.study --out runs/study --reduced       # detach + rl_occ, 1 seed, 2 steps (CI)
    python -m verl_mtp_example.study --out runs/study --report-only   # the report of what has finished
    python -m verl_mtp_example.study --report-only --data docs/results/data --out docs/results \
        --doc docs/results.md docs/mtp_rl.md                          # the published report, from the repository

Each (regime, seed) is one launch of the main job (:mod:`.launch`) in ``<out>/<regime>/seed<s>``; the study is
resumable: a finished run is kept, an interrupted one continues from its last checkpoint (``--save-freq``),
and the settings are recorded in ``<out>/study.json`` so a second call with other settings is refused instead
of mixing runs. All runs start from the same SFT warm-up (``--prep-dir``, built once): a seed changes the
RL run (data order, rollout sampling, Megatron's seed), not the starting model, so regimes are compared from
one start and the seed spread is the RL noise alone.

The ``rl`` regimes log the exact-gradient diagnostics (``occ.diagnose_every``, docs/mtp_rl.md section 3), and
every launch records each mini-batch update's MTP metrics (``--record-updates``), so the report can set
``c = <g_RL, g_MTP>`` and ``v^2 = ||g_MTP||^2`` against the proxy's numerator and denominator update by update.
The finished runs go into the compact record ``<out>/data`` (:mod:`.study_data`), and :mod:`.study_report`
writes the report from the record alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from verl_mtp_example import study_data, study_figures, study_report
from verl_mtp_example.modes import MODES

MTP = "actor_rollout_ref.model.mtp"


def log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


@dataclass(frozen=True)
class Regime:
    """One column of the study: a launcher ``--mode`` and, for a fixed coefficient, its value (``--mtp-coef``: the
    cross-entropy weight of ``ce``, the policy-loss coefficient of ``rl``)."""

    name: str
    mode: str
    coef: float | None = None

    @property
    def diagnosed(self) -> bool:
        return MODES[self.mode].policy_loss


# --mtp-coef values a mode runs at, one column each (None: the mode's default); a mode not listed runs once
FIXED_COEFFICIENTS = {"ce": (None, 1.0, 3.0, 10.0), "rl": (0.1, 1.0, 3.0, 10.0)}


def _columns(mode) -> list[Regime]:
    return [Regime(mode.name if coef is None else f"{mode.name}_{coef}", mode.name, coef)
            for coef in FIXED_COEFFICIENTS.get(mode.name, (None,))]


# One column (or one per coefficient) for every launcher mode that trains the heads: verl-mtp's regimes and rl_occ.
REGIMES = {r.name: r for mode in MODES.values() if mode.regime is not None for r in _columns(mode)}


STRESS_REGIMES = ["detach", "ce_1.0", "ce_10.0", "rl_1.0", "rl_10.0", "rl_occ"]


@dataclass
class StudySettings:
    """What every run of the study shares; recorded in ``study.json``. The defaults are the stress study of
    docs/results.md: fixed coefficients of 1 and 10 (the pilot's exact lambda* had a median near 0.6, so 10 puts
    the second-order term far in front), a learning rate at which ``detach`` learns steadily and approaches a
    plateau within the run (1e-3 rose, then collapsed), and the seeds of the power calculation there."""

    regimes: list[str] = field(default_factory=lambda: list(STRESS_REGIMES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    steps: int = 60
    batch: int = 16
    n: int = 8
    algo: str = "dapo"
    diagnose_every: int = 2
    sft_steps: int = 100
    save_freq: int = 20
    lr: float = 3e-4

    @classmethod
    def reduced(cls) -> "StudySettings":
        """The CI form: two regimes, one seed, two steps, a small batch; it only proves the pipeline runs."""
        return cls(regimes=["detach", "rl_occ"], seeds=[0], steps=2, batch=8, n=4, sft_steps=40, save_freq=2)


def run_dir(out: str, regime: str, seed: int) -> str:
    return os.path.join(out, regime, f"seed{seed}")


def is_finished(workdir: str, steps: int) -> bool:
    """The launcher wrote a summary with exit code 0 and every step's metrics."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        summary = json.load(f)
    return summary.get("exit_code") == 0 and len(summary.get("steps_logged", [])) >= steps


def has_checkpoint(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, "checkpoints", "latest_checkpointed_iteration.txt"))


def launcher_argv(settings: StudySettings, regime: Regime, seed: int, workdir: str, prep_dir: str) -> list[str]:
    """The main job's switches for one run; the seed reaches the RL run only (see the module docstring)."""
    argv = ["--mode", regime.mode, "--algo", settings.algo, "--steps", str(settings.steps), "--seed", "0",
            "--batch", str(settings.batch), "--n", str(settings.n), "--sft-steps", str(settings.sft_steps),
            "--lr", str(settings.lr), "--save-freq", str(settings.save_freq), "--workdir", workdir,
            "--prep-dir", prep_dir, "--record-updates"]
    if regime.coef is not None:
        argv += ["--mtp-coef", str(regime.coef)]
    if has_checkpoint(workdir):
        argv.append("--resume")
    overrides = [f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}",
                 f"actor_rollout_ref.actor.megatron.seed={seed}"]
    if regime.diagnosed and settings.diagnose_every:
        overrides.append(f"{MTP}.occ.diagnose_every={settings.diagnose_every}")
    return argv + ["--", *overrides]


def check_settings(out: str, settings: StudySettings) -> None:
    """Record the settings on the first call; refuse a later call whose settings differ (runs would mix)."""
    path = os.path.join(out, "study.json")
    mine = asdict(settings)
    if os.path.isfile(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier != mine:
            diff = {k: (earlier.get(k), v) for k, v in mine.items() if earlier.get(k) != v}
            raise SystemExit(f"[study] error: {out} holds a study with other settings {diff} (earlier, now); "
                             f"use another --out, or the same switches to continue it")
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(mine, f, indent=2)


def pending_runs(out: str, settings: StudySettings) -> list[tuple[Regime, int]]:
    """The unfinished runs, seed-major, so an interrupted study has every regime at the same seeds."""
    return [(REGIMES[name], seed) for seed in settings.seeds for name in settings.regimes
            if not is_finished(run_dir(out, name, seed), settings.steps)]


WALL_TIME_FILE = "wall_time.json"
RAY_START_TIMEOUT = "The current node timed out during startup"  # Ray's fixed 30 s wait, hit under load
START_ATTEMPTS = 3


def ray_failed_to_start(workdir: str) -> bool:
    """The last trainer launch died in ``ray.init``: worth another attempt, unlike any other failure."""
    log_file = os.path.join(workdir, "train.log")
    if not os.path.isfile(log_file):
        return False
    with open(log_file, errors="replace") as f:
        last_launch = f.read().rpartition("===== verl PPO:")[2]  # the launcher's header of each trainer launch
    return RAY_START_TIMEOUT in last_launch


def launch_with_retries(settings: StudySettings, regime: Regime, seed: int, workdir: str, prep_dir: str) -> bool:
    """One run through the launcher; relaunched (at most :data:`START_ATTEMPTS` in all) when Ray did not start."""
    for attempt in range(1, START_ATTEMPTS + 1):
        cmd = [sys.executable, "-m", "verl_mtp_example.launch",
               *launcher_argv(settings, regime, seed, workdir, prep_dir)]
        if subprocess.run(cmd).returncode == 0:
            return True
        if attempt == START_ATTEMPTS or not ray_failed_to_start(workdir):
            return False
        log(f"Ray did not start (machine overloaded): attempt {attempt + 1} of {START_ATTEMPTS}")
    return False


def run_all(out: str, settings: StudySettings, prep_dir: str) -> list[str]:
    """Launch every pending run in turn (a failed one is reported and the study goes on); the failures."""
    todo = pending_runs(out, settings)
    total = len(settings.regimes) * len(settings.seeds)
    log(f"{total - len(todo)}/{total} runs finished earlier, {len(todo)} to go -> {out}")
    failed, t0 = [], time.time()
    for i, (regime, seed) in enumerate(todo, start=1):
        workdir = run_dir(out, regime.name, seed)
        eta = "" if i == 1 else f", about {(time.time() - t0) / (i - 1) * (len(todo) - i + 1) / 60:.0f} min left"
        log(f"run {i}/{len(todo)}: {regime.name} seed {seed}{eta}")
        t_run = time.time()
        if not launch_with_retries(settings, regime, seed, workdir, prep_dir):
            failed.append(f"{regime.name} seed {seed} (see {workdir}/train.log)")
        add_wall_time(out, time.time() - t_run)
    log(f"runs done in {(time.time() - t0) / 60:.1f} min" + (f"; failed: {failed}" if failed else ""))
    return failed


def wall_time(out: str) -> float:
    """Seconds the study's launches took in all, over every call that continued it."""
    path = os.path.join(out, WALL_TIME_FILE)
    if not os.path.isfile(path):
        return 0.0
    with open(path) as f:
        return json.load(f)["runs_wall_seconds"]


def add_wall_time(out: str, seconds: float) -> None:
    total = round(wall_time(out) + seconds, 1)
    with open(os.path.join(out, WALL_TIME_FILE), "w") as f:
        json.dump({"runs_wall_seconds": total}, f)


def export_finished(out: str, settings: StudySettings) -> str:
    """The record of the finished runs (:mod:`.study_data`) in ``<out>/data``, for the report."""
    finished = {(name, seed): run_dir(out, name, seed) for name in settings.regimes for seed in settings.seeds
                if is_finished(run_dir(out, name, seed), settings.steps)}
    record = {**asdict(settings), "runs_wall_seconds": wall_time(out)}
    return study_data.export(record, finished, os.path.join(out, "data"))


def settings_from(args) -> StudySettings:
    settings = StudySettings.reduced() if args.reduced else StudySettings()
    for name in ("regimes", "seeds", "steps", "batch", "n", "algo", "diagnose_every", "lr"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    unknown = [r for r in settings.regimes if r not in REGIMES]
    if unknown:
        raise SystemExit(f"[study] error: --regimes {unknown} unknown; choose from {list(REGIMES)}")
    check_diagnosis_fits(settings)
    return settings


def check_diagnosis_fits(settings: StudySettings) -> None:
    """The per-update record pairs each diagnosed update with its proxy values by its place in the step, which
    needs a whole number of diagnosed updates per step (the launcher makes 4 mini-batch updates per step)."""
    updates = settings.batch // max(1, settings.batch // 4)
    if settings.diagnose_every and updates % settings.diagnose_every:
        raise SystemExit(f"[study] error: --diagnose-every {settings.diagnose_every} does not divide the {updates} "
                         f"mini-batch updates of a step (--batch {settings.batch}); use 1, 2 or 4")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m verl_mtp_example.study", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/study", help="study directory (runs, table, figures)")
    ap.add_argument("--prep-dir", default=None, help="model / data / SFT cache (default <out>/prep)")
    ap.add_argument("--reduced", action="store_true", help="CI form: detach + rl_occ, one seed, two steps")
    ap.add_argument("--report-only", action="store_true", help="no runs: table and figures of finished runs")
    ap.add_argument("--data", default=None,
                    help="with --report-only: the report of this record (study_data) instead of <out>'s runs, "
                         "e.g. docs/results/data")
    ap.add_argument("--doc", nargs="+", default=(),
                    help="also write the report's blocks into these markdown files between their markers")
    ap.add_argument("--regimes", nargs="+", default=None, help=f"subset of {list(REGIMES)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="prompts per step")
    ap.add_argument("--n", type=int, default=None, help="samples per prompt")
    ap.add_argument("--algo", choices=("dapo", "gspo"), default=None)
    ap.add_argument("--diagnose-every", type=int, default=None, help="rl regimes: occ.diagnose_every")
    ap.add_argument("--lr", type=float, default=None, help="actor learning rate")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = os.path.abspath(args.out)
    failed = []
    if args.data is not None:
        if not args.report_only:
            raise SystemExit("[study] error: --data names a finished study's record: use it with --report-only")
        data_dir = os.path.abspath(args.data)
    else:
        settings = settings_from(args)
        check_settings(out, settings)
        if not args.report_only:
            failed = run_all(out, settings, os.path.abspath(args.prep_dir or f"{out}/prep"))
        data_dir = export_finished(out, settings)
    report = study_report.write_report(data_dir, out, docs=args.doc)
    figures = study_figures.draw_all(out, report["runs"], report["updates"], report["steps"])
    log(f"record {data_dir}, report {report['table']}, figures {', '.join(figures)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
