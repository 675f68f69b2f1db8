"""The main job: a real verl RL run with MTP heads on CPU, from nothing to curves, in a few minutes.

::

    python -m verl_mtp_example.launch --mode rl_occ --algo dapo --steps 8 --workdir runs/rl_occ

Stages (each cached, so a second launch with the same settings starts training at once):

0. **check** every switch against the others and against the chosen mode (:mod:`.validation`), before anything
   starts: a contradiction fails at once with the switch, its value and the fix;
1. **prepare** (under ``--prep-dir``, default ``<workdir>/prep``; :mod:`.preparation`): the tiny MiMo-style model
   with ``--mtp-layers`` MTP heads and its tokenizer (:mod:`.tiny_model`), the arithmetic task's parquet files
   (:mod:`.arithmetic_task`) and an SFT parquet;
2. **SFT warm-up** (``--sft-steps``, 0 to skip; :mod:`.sft_warmup`): verl's SFT trainer with the Megatron engine
   trains the model, MTP heads included, and exports HF weights through the bridge. From random weights the
   model never answers, every GRPO group has the same reward and RL has no signal; after the warm-up part of
   the sampled answers are exact, so reward can move;
3. **RL**: ``python -m verl_mtp.trainer.main_ppo`` (verl's Ray PPO trainer on verl-mtp's config) with the tiny
   MiMo example's config (:mod:`.trainer_command`), as a subprocess on the CPU platform (``verl_cpu``: Megatron
   actor on gloo, ``hf_cpu`` rollout), with GRPO group advantages, DAPO's or GSPO's policy loss and the MTP
   regime of ``--mode`` (:mod:`.modes`: verl-mtp's regimes, plus ``rl_occ`` and ``frozen``):

   ========  =====================================================================================
   detach    ``mtp_loss_type=detach``: MTP heads trained with Megatron's CE on detached trunk inputs
   ce        ``mtp_loss_type=ce``: the same CE, back-propagated into the trunk
   rl        ``mtp_loss_type=rl``: the heads get the policy loss, fixed coefficient
             ``mtp_loss_scaling_factor / K`` (``--mtp-coef``)
   rl_occ    ``mtp_loss_type=rl`` + ``occ.enable=True``: the paper's OCC sets the coefficient (default)
   frozen    ``mtp.enable=True``, ``enable_train=False``: MTP layers loaded and saved, never run or
             trained (the reference for "detach leaves the trunk alone")
   ========  =====================================================================================

   verl's file logger writes every step's metrics to ``<workdir>/metrics.jsonl`` (with ``--record-updates``
   also each update's ``actor/mtp_*`` values to ``<workdir>/updates.jsonl``, :mod:`.update_metrics`); the
   launcher prints one
   line per step (reward, exact-answer rate, lambda and top-1 agreement per head, MTP loss, policy loss,
   step time) and draws ``<workdir>/curves.png`` at the end. verl's full output is in
   ``<workdir>/train.log``, the exact trainer command in ``<workdir>/command.txt``.

Mini-batches: ``--mini-batch`` defaults to a quarter of ``--batch`` (the paper's 128 / 32), so each step makes
4 optimizer updates. OCC's lambda uses ``log pi_theta - log pi_old``, which is exactly 0 until the step's first
update: on a single mini-batch per step lambda would be 0 by construction (the launcher warns). With 4
mini-batches the first carries no signal and the other 3 calibrate. ``--carry-last-lambda`` additionally
reuses the last informative lambda on signal-free micro-batches (verl-mtp's option, not the paper's).

Parallel layout: ``--tp N`` (the actor's Megatron tensor parallelism) and ``--dp N`` (data-parallel ranks) run
``tp x dp`` actor processes on gloo, each with its own ``hf_cpu`` rollout replica that receives the gathered
weights (MTP layers included) at every sync; ``--dump-rollout-weights`` has each replica write what it serves
after every sync to ``<workdir>/rollout_weights/replica<R>_step<N>.safetensors``, to check that against the
checkpoints. A mini-batch's samples are split evenly over the ``dp`` ranks; with
``--dp 2`` and ``--mode rl_occ``, OCC's sums are all-reduced over them (``occ.scope=data_parallel``).

Learning rate: linear warm-up from lr/10 over ``--lr-warmup-steps`` (default 3, shortened to ``steps - 1`` for
shorter runs, as the scheduler needs the warm-up to end before the last step).

Checkpoints: verl's checkpoint manager saves every ``--save-freq`` steps (default: at the last step) under
``<workdir>/checkpoints/global_step_N/actor`` (Megatron ``dist_ckpt`` with the MTP layers, optimizer, the HF
export ``huggingface/`` through the bridge, and OCC's ``mtp_occ_state_rank0.json``). ``--resume`` continues
from the latest one (``trainer.resume_mode=auto``) up to ``--steps`` in total. Without ``--resume`` an
existing run in the work dir is moved aside first (``<workdir>/previous/``).

Anything after ``--`` goes to the trainer as Hydra overrides, e.g. ``-- actor_rollout_ref.actor.optim.lr=5e-4``;
they come last and win, except where they contradict ``--mode`` / ``--algo`` (refused up front).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from verl_cpu.environment import ROLLOUT_WEIGHTS_DIR, cpu_child_env, cpu_process_env
from verl_mtp_example import metrics_view as mv
from verl_mtp_example import run_dir, update_metrics
from verl_mtp_example.preparation import PreparationError, SftSettings, prepare
from verl_mtp_example.progress import StepPrinter, log
from verl_mtp_example.trainer_command import ALGOS, MODES, mini_batch, trainer_command
from verl_mtp_example.validation import UsageError, validate

# launcher conveniences on top of the CPU platform's variables (values already set win)
LAUNCHER_ENV_DEFAULTS = {"PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "RAY_DISABLE_IMPORT_WARNING": "1"}


@dataclass
class Run:
    """One launch: where it writes, what it trains on, how long each stage took."""

    workdir: str
    log_file: str
    env: dict
    paths: dict = field(default_factory=dict)
    metrics_part: str = ""
    seconds: dict = field(default_factory=dict)


def trainer_env() -> dict:
    """The environment of the SFT and trainer processes (and, through them, of every Ray worker)."""
    env = cpu_child_env()
    for key, value in LAUNCHER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def _print_log_tail(log_file: str, n: int = 40) -> None:
    """The last ``n`` lines of the log that are not warnings (verl prints many)."""
    log(f"last lines of {log_file}:")
    with open(log_file, errors="replace") as f:
        lines = [ln for ln in f.readlines() if "warn" not in ln.lower()]
    sys.stdout.write("".join(lines[-n:]))
    sys.stdout.flush()


def prepare_run(args) -> Run:
    """Work dir (an earlier run set aside unless resuming), then model, data and SFT warm-up (cached)."""
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    if not (args.resume or args.resume_from):
        moved = run_dir.set_aside_previous(workdir)
        if moved:
            log(f"moved the previous run in {workdir} to {moved} (use --resume to continue it instead)")
    run = Run(workdir=workdir, log_file=os.path.join(workdir, "train.log"), env=trainer_env())
    if args.dump_rollout_weights:
        run.env[ROLLOUT_WEIGHTS_DIR] = os.path.join(workdir, "rollout_weights")
    if args.record_updates:
        run.env[update_metrics.UPDATE_METRICS_FILE] = os.path.join(workdir, run_dir.UPDATE_METRICS)
        run.env["VERL_USE_EXTERNAL_MODULES"] += f",{update_metrics.MODULE}"
    prep_dir = os.path.abspath(args.prep_dir or os.path.join(workdir, "prep"))
    t0 = time.time()
    run.paths = prepare(prep_dir, args.mtp_layers, args.seed, SftSettings(args.sft_steps, args.sft_lr, args.sft_batch),
                        args.max_operand, env=run.env, log_file=run.log_file)
    run.seconds["prepare"] = round(time.time() - t0, 1)
    return run


def _record_command(run: Run, cmd: list[str]) -> None:
    cpu = cpu_process_env()
    env = (f"VERL_PLATFORM={cpu['VERL_PLATFORM']} VERL_USE_EXTERNAL_MODULES={cpu['VERL_USE_EXTERNAL_MODULES']} "
           f"VERL_FILE_LOGGER_PATH={run.metrics_part}")
    with open(os.path.join(run.workdir, "command.txt"), "a") as f:
        f.write(env + " \\\n" + " \\\n    ".join(shlex.quote(c) for c in cmd) + "\n\n")


def _wait(proc: subprocess.Popen, timeout) -> int:
    """The trainer's exit code; on timeout or Ctrl-C its whole process group (Ray included) is stopped."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"timeout after {timeout}s: stopping the trainer")
        os.killpg(proc.pid, 15)
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, 15)
        proc.wait()
        raise


def train(args, run: Run) -> int:
    """verl's PPO trainer as a subprocess, one printed line per finished step; returns its exit code."""
    run.metrics_part = run_dir.next_metrics_part(run.workdir)
    cmd = trainer_command(args, run.paths["model"], run.paths["data"], run.workdir)
    _record_command(run, cmd)
    log(f"verl PPO: algo={args.algo} mode={args.mode} K={args.mtp_layers} steps={args.steps} "
        f"batch={args.batch}x{args.n} mini-batch={mini_batch(args)} tp={args.tp} dp={args.dp} lr={args.lr} "
        f"model={run.paths['model']}")
    log(f"metrics: {os.path.join(run.workdir, 'metrics.jsonl')}  full log: {run.log_file}")
    printer = StepPrinter(run.metrics_part, os.path.join(run.workdir, "rollouts"), args.steps, args.mtp_layers)
    thread = threading.Thread(target=printer.watch, daemon=True)
    t0 = time.time()
    with open(run.log_file, "a") as out:
        out.write(f"\n===== verl PPO: {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, env=dict(run.env, VERL_FILE_LOGGER_PATH=run.metrics_part), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        thread.start()
        try:
            rc = _wait(proc, args.timeout)
        finally:
            printer.stop.set()
            thread.join()
    run.seconds["trainer"] = round(time.time() - t0, 1)
    printer.poll(final=True)
    return rc


def _merge_metrics(run: Run) -> dict:
    """All launches' metrics in ``metrics.jsonl``, with the exact-answer rates counted from the rollout dumps
    (this launch's) or carried from the earlier merged file."""
    merged_file = os.path.join(run.workdir, "metrics.jsonl")
    rollouts = os.path.join(run.workdir, "rollouts")
    exact = {s: {mv.EXACT: m[mv.EXACT]} for s, m in mv.read_metrics(merged_file).items() if mv.EXACT in m}
    for step in mv.read_metrics(run.metrics_part):
        rate = mv.exact_rate(rollouts, step)
        if rate is not None:
            exact[step] = {mv.EXACT: rate}
    return mv.merge_metric_files(run_dir.metrics_parts(run.workdir), merged_file, extra=exact)


def summarise(args, run: Run, rc: int, t_start: float) -> int:
    """Merged metrics, ``curves.png`` and ``summary.json``; the log's tail when the trainer failed."""
    merged = _merge_metrics(run)
    png = None
    if merged:
        png = mv.plot_runs({f"{args.algo} {args.mode}": merged}, os.path.join(run.workdir, "curves.png"),
                           title=f"verl PPO on CPU, tiny MiMo K={args.mtp_layers}: {args.algo} / {args.mode}")
    run.seconds["total"] = round(time.time() - t_start, 1)
    summary = {
        "mode": args.mode, "algo": args.algo, "mtp_layers": args.mtp_layers, "steps_logged": sorted(merged),
        "exit_code": rc, "seconds": run.seconds,
        "paths": {**run.paths, "workdir": run.workdir, "metrics": os.path.join(run.workdir, "metrics.jsonl"),
                  "plot": png, "checkpoints": os.path.join(run.workdir, "checkpoints"), "log": run.log_file},
        "final": {k: v for k, v in (merged[max(merged)] if merged else {}).items()
                  if k.startswith(("critic/score", "actor/mtp", "timing_s/step", "local/"))},
    }
    with open(os.path.join(run.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if rc != 0:
        log(f"trainer exited with code {rc}")
        _print_log_tail(run.log_file)
        return rc
    log(f"done: {len(merged)} steps logged; prepare {run.seconds['prepare']:.0f}s, "
        f"trainer {run.seconds['trainer']:.0f}s, total {run.seconds['total']:.0f}s")
    if png:
        log(f"plot: {png}")
    return 0


def run(args) -> int:
    t_start = time.time()
    try:
        for warning in validate(args):
            log(f"warning: {warning}")
    except UsageError as exc:
        print(f"[launch] error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        prepared = prepare_run(args)
    except PreparationError as exc:
        log(str(exc))
        _print_log_tail(os.path.join(os.path.abspath(args.workdir), "train.log"))
        return 1
    return summarise(args, prepared, train(args, prepared), t_start)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m verl_mtp_example.launch",
        description="verl PPO (DAPO / GSPO) with joint MTP training on CPU with a tiny MiMo model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--mode", choices=MODES, default="rl_occ", help="MTP regime")
    ap.add_argument("--algo", choices=ALGOS, default="dapo", help="policy loss")
    ap.add_argument("--steps", type=int, default=20, help="total RL steps (with --resume: including the earlier ones)")
    ap.add_argument("--workdir", default="runs/main", help="metrics, plot, log, checkpoints, rollout dumps")
    ap.add_argument("--prep-dir", default=None, help="cache of model / data / SFT warm-up (None: <workdir>/prep)")
    ap.add_argument("--mtp-layers", type=int, default=1, help="MTP heads K of the tiny model")
    ap.add_argument("--seed", type=int, default=0, help="model init, data, SFT, trainer seeds")
    ap.add_argument("--max-operand", type=int, default=9, help="task: a+b with a, b in [0, max_operand]")
    ap.add_argument("--sft-steps", type=int, default=100, help="SFT warm-up steps (0: RL from random weights)")
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="prompts per step (data.train_batch_size)")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (GRPO group size)")
    ap.add_argument("--mini-batch", type=int, default=None, help="prompts per mini-batch (default batch/4)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="samples per micro-batch and rank (default: a rank's share of a mini-batch)")
    ap.add_argument("--tp", type=int, default=1, help="actor tensor-parallel size (Megatron; world size tp x dp)")
    ap.add_argument("--dp", type=int, default=1,
                    help="data-parallel ranks (world size tp x dp; rl_occ then sums OCC over them)")
    ap.add_argument("--lr", type=float, default=1e-3, help="actor learning rate")
    ap.add_argument("--lr-warmup-steps", type=int, default=None,
                    help="linear warm-up from lr/10 over N steps (default: 3, at most steps - 1)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=-1, help="rollout top-k (1 = greedy, deterministic rollouts)")
    ap.add_argument("--max-response-length", type=int, default=8)
    ap.add_argument("--mtp-coef", type=float, default=None,
                    help="mtp_loss_scaling_factor (CE weight for detach/ce, fixed coefficient x K for rl)")
    ap.add_argument("--carry-last-lambda", action="store_true", help="rl_occ: occ.carry_last_lambda=True")
    ap.add_argument("--save-freq", type=int, default=None, help="checkpoint every N steps (default: last step)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the work dir")
    ap.add_argument("--resume-from", default=None,
                    help="continue from this .../global_step_N checkpoint (any work dir's) instead")
    ap.add_argument("--dump-rollout-weights", action="store_true",
                    help="each rollout replica writes the weights it serves after every sync to "
                         "<workdir>/rollout_weights/")
    ap.add_argument("--record-updates", action="store_true",
                    help="also write every mini-batch update's actor/mtp_* metrics (verl logs their step mean) to "
                         "<workdir>/updates.jsonl")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before the trainer is stopped")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the trainer (after --)")
    return ap


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
