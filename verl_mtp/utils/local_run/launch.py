"""The main job: a real verl RL run with MTP heads on CPU, from nothing to curves, in a few minutes.

::

    python -m verl_mtp.utils.local_run.launch --mode rl_occ --algo dapo --steps 8 --workdir runs/rl_occ

Stages (each cached, so a second launch with the same settings starts training at once):

1. **prepare** (under ``--prep-dir``, default ``<workdir>/prep``): the tiny MiMo-style model with ``--mtp-layers``
   MTP heads and its tokenizer (:func:`.tiny_model.make_tiny_mimo`), the arithmetic task's train/val parquet
   files (:func:`.arithmetic_task.write_dataset`) and an SFT parquet;
2. **SFT warm-up** (``--sft-steps``, 0 to skip): verl's SFT trainer with the Megatron engine trains the model,
   MTP heads included, for a few dozen steps and exports HF weights through the bridge
   (:mod:`.sft_warmup`). From random weights the model never answers, every GRPO group has the same reward
   and RL has no signal; after the warm-up about 10-20 % of sampled answers are exact, so reward can move;
3. **RL**: ``python -m verl_mtp.trainer.main_ppo`` (verl's Ray PPO trainer on verl-mtp's config) as a
   subprocess on the CPU platform (:mod:`verl_mtp.utils.cpu`: Megatron actor on gloo, ``hf_cpu`` rollout),
   with GRPO group advantages and DAPO's or GSPO's policy loss, and the MTP regime of ``--mode``:

   ========  =====================================================================================
   detach    ``mtp_loss_type=detach``: MTP heads trained with Megatron's CE on detached trunk inputs
   ce        ``mtp_loss_type=ce``: the same CE, back-propagated into the trunk
   rl        ``mtp_loss_type=rl``: the heads get the policy loss, fixed coefficient
             ``mtp_loss_scaling_factor / K`` (``--mtp-coef``)
   rl_occ    ``mtp_loss_type=rl`` + ``occ.enable=True``: the paper's OCC sets the coefficient (default)
   frozen    ``mtp.enable=True``, ``enable_train=False``: MTP layers loaded and saved, never run or
             trained (the reference for "detach leaves the trunk alone")
   ========  =====================================================================================

   verl's file logger writes every step's metrics to ``<workdir>/metrics.jsonl``; the launcher prints one
   line per step (reward, exact-answer rate, lambda and top-1 agreement per head, MTP loss, policy loss,
   step time) and draws ``<workdir>/curves.png`` at the end. verl's full output is in
   ``<workdir>/train.log``, the exact trainer command in ``<workdir>/command.txt``.

Mini-batches: ``--mini-batch`` defaults to a quarter of ``--batch`` (the paper's 128 / 32), so each step makes
4 optimizer updates. OCC's lambda uses ``log pi_theta - log pi_old``, which is exactly 0 until the step's first
update: on a single mini-batch per step lambda would be 0 by construction. With 4 mini-batches the first
carries no signal (lambda = 0 there, so the step's mean lambda is about 3/4 of the informative ones) and the
other 3 calibrate. ``--carry-last-lambda`` additionally reuses the last informative lambda on signal-free
micro-batches (verl-mtp's option, not the paper's).

Checkpoints: verl's checkpoint manager saves every ``--save-freq`` steps (default: at the last step) under
``<workdir>/checkpoints/global_step_N/actor`` (Megatron ``dist_ckpt`` with the MTP layers, optimizer, the HF
export ``huggingface/`` through the bridge, and OCC's ``mtp_occ_state_rank0.json``). ``--resume`` continues
from the latest one (``trainer.resume_mode=auto``) up to ``--steps`` in total. Without ``--resume`` an
existing run in the work dir is moved aside first (``<workdir>/previous/``).

Anything after ``--`` goes to the trainer as Hydra overrides, e.g. ``-- actor_rollout_ref.actor.optim.lr=5e-4``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Optional

from verl_mtp.utils.local_run import metrics_view as mv

MODES = ("detach", "ce", "rl", "rl_occ", "frozen")
ALGOS = ("dapo", "gspo")
CPU_PLUGIN = "verl_mtp.utils.cpu.plugin"
MTP = "actor_rollout_ref.model.mtp"
ACTOR = "actor_rollout_ref.actor"
ROLLOUT = "actor_rollout_ref.rollout"


def _log(msg: str) -> None:
    print(f"[launch] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------
# 1. preparation (idempotent, cached)
# ------------------------------------------------------------------------------------------------------
def _atomic_dir(path: str, build) -> str:
    """Build ``path`` with ``build(tmp_dir)`` unless it exists complete (marker ``.done``)."""
    if os.path.exists(os.path.join(path, ".done")):
        return path
    tmp = path.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    build(tmp)
    open(os.path.join(tmp, ".done"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def prepare(prep_dir: str, mtp_layers: int = 1, seed: int = 0, sft_steps: int = 100, sft_lr: float = 3e-3,
            sft_batch: int = 32, max_operand: int = 9, env: Optional[dict] = None,
            log_file: Optional[str] = None) -> dict:
    """Base model, data and (``sft_steps > 0``) the SFT'd model under ``prep_dir``; returns their paths.
    Everything is a pure function of the arguments and is built once."""
    from verl_mtp.utils.local_run.arithmetic_task import write_dataset
    from verl_mtp.utils.local_run.sft_warmup import write_sft_dataset
    from verl_mtp.utils.local_run.tiny_model import make_tiny_mimo

    os.makedirs(prep_dir, exist_ok=True)
    base = _atomic_dir(os.path.join(prep_dir, f"model_k{mtp_layers}_s{seed}"),
                       lambda d: make_tiny_mimo(d, num_mtp_layers=mtp_layers, seed=seed))

    def _data(d):
        write_dataset(d, n_train=2048, n_val=64, seed=seed, max_operand=max_operand)
        write_sft_dataset(os.path.join(d, "sft.parquet"), n=4096, seed=seed, max_operand=max_operand)

    data = _atomic_dir(os.path.join(prep_dir, f"data_s{seed}_op{max_operand}"), _data)
    out = {"base_model": base, "data": data, "model": base, "sft": None}
    if sft_steps > 0:
        sft_dir = os.path.join(prep_dir, f"sft_k{mtp_layers}_s{seed}_op{max_operand}_n{sft_steps}_lr{sft_lr:g}_b{sft_batch}")
        if not os.path.exists(os.path.join(sft_dir, "sft_warmup.json")):
            _log(f"SFT warm-up: {sft_steps} steps of verl's SFT trainer (Megatron engine, MTP CE on) -> {sft_dir}")
            t0 = time.time()
            cmd = [sys.executable, "-m", "verl_mtp.utils.local_run.sft_warmup", "--model", base,
                   "--train-file", os.path.join(data, "sft.parquet"), "--out", sft_dir,
                   "--workdir", sft_dir + ".work", "--steps", str(sft_steps), "--lr", str(sft_lr),
                   "--batch-size", str(sft_batch), "--seed", str(seed)]
            with open(log_file or os.devnull, "a") as log:
                log.write(f"\n===== SFT warm-up: {shlex.join(cmd)}\n")
                log.flush()
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise RuntimeError(f"SFT warm-up failed (exit {rc}); see {log_file}")
            shutil.rmtree(sft_dir + ".work", ignore_errors=True)
            with open(os.path.join(sft_dir, "sft_warmup.json")) as f:
                info = json.load(f)
            _log(f"SFT warm-up done in {time.time() - t0:.0f}s: loss {mv.fmt_num(info.get('loss_first'))} -> "
                 f"{mv.fmt_num(info.get('loss_last'))}, MTP-1 CE {mv.fmt_num(info.get('mtp_1_ce_first'))} -> "
                 f"{mv.fmt_num(info.get('mtp_1_ce_last'))}")
        else:
            _log(f"SFT warm-up: cached {sft_dir}")
        out["model"] = out["sft"] = sft_dir
    return out


# ------------------------------------------------------------------------------------------------------
# 2. trainer overrides
# ------------------------------------------------------------------------------------------------------
def mode_overrides(mode: str, mtp_coef: Optional[float] = None, carry_last_lambda: bool = False) -> list[str]:
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    if mode == "frozen":
        return [f"{MTP}.enable=True", f"{MTP}.enable_train=False"]
    loss_type = {"detach": "detach", "ce": "ce", "rl": "rl", "rl_occ": "rl"}[mode]
    ov = [f"{MTP}.enable=True", f"{MTP}.mtp_loss_type={loss_type}"]
    if mtp_coef is not None:
        ov.append(f"{MTP}.mtp_loss_scaling_factor={mtp_coef}")
    if mode == "rl_occ":
        ov.append(f"{MTP}.occ.enable=True")
        if carry_last_lambda:
            ov.append(f"{MTP}.occ.carry_last_lambda=True")
    return ov


def algo_overrides(algo: str) -> list[str]:
    """DAPO: clip-higher (0.2 / 0.28, dual clip 10), token-mean. GSPO: sequence-level ratio, clip 3e-4 / 4e-4,
    seq-mean-token-mean. Both with GRPO group advantages (set in :func:`trainer_overrides`)."""
    if algo == "dapo":
        return [f"{ACTOR}.policy_loss.loss_mode=vanilla", f"{ACTOR}.clip_ratio_low=0.2",
                f"{ACTOR}.clip_ratio_high=0.28", f"{ACTOR}.clip_ratio_c=10.0", f"{ACTOR}.loss_agg_mode=token-mean"]
    if algo == "gspo":
        return [f"{ACTOR}.policy_loss.loss_mode=gspo", f"{ACTOR}.clip_ratio_low=0.0003",
                f"{ACTOR}.clip_ratio_high=0.0004", f"{ACTOR}.loss_agg_mode=seq-mean-token-mean"]
    raise ValueError(f"--algo must be one of {ALGOS}, got {algo!r}")


def trainer_overrides(args, model: str, data: str, workdir: str) -> list[str]:
    from verl_mtp.utils.local_run import arithmetic_task
    from verl_mtp.utils.local_run.sft_warmup import megatron_cpu_overrides

    mini = args.mini_batch or max(1, args.batch // 4)
    if args.batch % mini:
        raise ValueError(f"--batch {args.batch} must be a multiple of --mini-batch {mini}")
    micro = args.micro_batch or mini * args.n
    save_freq = args.save_freq if args.save_freq is not None else args.steps
    return [
        "algorithm.adv_estimator=grpo",
        "algorithm.use_kl_in_reward=False",
        f"data.train_files={data}/train.parquet",
        f"data.val_files={data}/val.parquet",
        f"data.train_batch_size={args.batch}",
        "data.max_prompt_length=32",
        f"data.max_response_length={args.max_response_length}",
        "data.dataloader_num_workers=0",
        f"data.seed={args.seed}",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.model.use_remove_padding=True",
        "actor_rollout_ref.model.external_lib=verl_mtp.utils.local_run",
        "actor_rollout_ref.model.trust_remote_code=True",
        *megatron_cpu_overrides(f"{ACTOR}.megatron"),
        f"{ACTOR}.megatron.seed={args.seed}",
        f"{ACTOR}.ppo_mini_batch_size={mini}",
        f"{ACTOR}.ppo_micro_batch_size_per_gpu={micro}",
        f"{ACTOR}.use_dynamic_bsz=False",
        f"{ACTOR}.use_kl_loss=False",
        f"{ACTOR}.entropy_coeff=0",
        f"{ACTOR}.optim.lr={args.lr}",
        f"{ACTOR}.optim.lr_warmup_steps={args.lr_warmup_steps}",
        f"{ACTOR}.optim.lr_warmup_init={args.lr * 0.1 if args.lr_warmup_steps > 0 else 0.0}",
        # resume the LR schedule too: verl's default (False) restarts the scheduler (warm-up included) on
        # resume, while the optimizer's param groups bring back the saved lr for the first step
        f"{ACTOR}.optim.use_checkpoint_opt_param_scheduler=True",
        f"{ACTOR}.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        *algo_overrides(args.algo),
        f"{ROLLOUT}.name=hf_cpu",
        f"{ROLLOUT}.n={args.n}",
        f"{ROLLOUT}.temperature={args.temperature}",
        f"{ROLLOUT}.top_k={args.top_k}",
        f"{ROLLOUT}.seed={args.seed}",
        f"{ROLLOUT}.log_prob_micro_batch_size_per_gpu={args.batch * args.n}",
        f"{ROLLOUT}.tensor_model_parallel_size=1",
        f"{ROLLOUT}.agent.num_workers=1",
        f"reward.custom_reward_function.path={os.path.abspath(arithmetic_task.__file__)}",
        "reward.custom_reward_function.name=compute_score",
        "trainer.device=cpu",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        f"trainer.total_training_steps={args.steps}",
        "trainer.total_epochs=1000",
        "trainer.logger=[console,file]",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        f"trainer.save_freq={save_freq}",
        *_resume_overrides(args),
        f"trainer.default_local_dir={os.path.join(workdir, 'checkpoints')}",
        f"trainer.rollout_data_dir={os.path.join(workdir, 'rollouts')}",
        "trainer.project_name=verl_mtp_local",
        f"trainer.experiment_name={args.algo}_{args.mode}",
        "trainer.use_v1=False",
        "+ray_kwargs.ray_init.num_gpus=1",
        "+ray_kwargs.ray_init.num_cpus=8",
        "+ray_kwargs.ray_init.include_dashboard=False",
        *mode_overrides(args.mode, args.mtp_coef, args.carry_last_lambda),
    ]


def _resume_overrides(args) -> list[str]:
    if args.resume_from:
        path = os.path.abspath(args.resume_from)
        if "global_step_" not in os.path.basename(path.rstrip("/")):
            raise ValueError(f"--resume-from must be a .../global_step_N checkpoint directory, got {path}")
        return ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={path}"]
    return [f"trainer.resume_mode={'auto' if args.resume else 'disable'}"]


def trainer_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env["VERL_PLATFORM"] = "cpu"
    mods = [m for m in env.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    env["VERL_USE_EXTERNAL_MODULES"] = ",".join([CPU_PLUGIN] + [m for m in mods if m != CPU_PLUGIN])
    env.setdefault("PYTHONUNBUFFERED", "1")
    # One intra-op thread per process: the tensors are tiny, and with several processes (Ray workers,
    # rollout server) on 2 cores, OpenMP's spinning threads made steps up to 5x slower under load.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HYDRA_FULL_ERROR", "1")
    env.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------------------
# 3. run + progress
# ------------------------------------------------------------------------------------------------------
class _Progress:
    """Tails verl's file-logger JSONL while the trainer runs and prints one line per new step."""

    def __init__(self, metrics_file: str, rollout_dir: str, total: int, heads: int):
        self.metrics_file, self.rollout_dir, self.total, self.heads = metrics_file, rollout_dir, total, heads
        self.printed: set[int] = set()
        self.exact: dict[int, dict] = {}
        self.stop = threading.Event()
        self.t0 = time.time()
        self.last_output = time.time()

    def poll(self, final: bool = False) -> None:
        metrics = mv.read_metrics(self.metrics_file)
        for step in sorted(metrics):
            if step in self.printed:
                continue
            rate = mv.exact_rate(self.rollout_dir, step)
            if rate is None and not final and time.time() - self.last_output < 3:
                return  # the rollout dump is written by a background thread: give it a moment
            if rate is not None:
                self.exact[step] = {mv.EXACT: rate}
            data = dict(metrics[step], **self.exact.get(step, {}))
            print(mv.format_step_line(step, self.total, data, self.heads), flush=True)
            self.printed.add(step)
            self.last_output = time.time()

    def run(self) -> None:
        announced = 0.0
        while not self.stop.wait(0.5):
            self.poll()
            idle = time.time() - self.last_output
            if not self.printed and idle - announced >= 30:
                announced = idle
                _log(f"... trainer starting (Ray workers, model build, first rollout): {time.time() - self.t0:.0f}s")


def _next_part(workdir: str) -> str:
    parts = glob.glob(os.path.join(workdir, "metrics.part*.jsonl"))
    return os.path.join(workdir, f"metrics.part{len(parts) + 1}.jsonl")


def _set_aside_previous(workdir: str) -> None:
    names = ["checkpoints", "rollouts", "metrics.jsonl", "curves.png", "summary.json", "command.txt", "train.log"]
    names += [os.path.basename(p) for p in glob.glob(os.path.join(workdir, "metrics.part*.jsonl"))]
    present = [n for n in names if os.path.exists(os.path.join(workdir, n))]
    if not present:
        return
    dest = os.path.join(workdir, "previous")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for n in present:
        os.replace(os.path.join(workdir, n), os.path.join(dest, n))
    _log(f"moved the previous run in {workdir} to {dest} (use --resume to continue it instead)")


def _print_log_tail(log_file: str, n: int = 40) -> None:
    """The last ``n`` lines of the log that are not warnings (verl prints many)."""
    _log(f"last lines of {log_file}:")
    with open(log_file, errors="replace") as f:
        lines = [ln for ln in f.readlines() if "warn" not in ln.lower()]
    sys.stdout.write("".join(lines[-n:]))
    sys.stdout.flush()


def run(args) -> int:
    t_start = time.time()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    if not (args.resume or args.resume_from):
        _set_aside_previous(workdir)
    log_file = os.path.join(workdir, "train.log")
    prep_dir = os.path.abspath(args.prep_dir or os.path.join(workdir, "prep"))
    env = trainer_env()

    t0 = time.time()
    try:
        paths = prepare(prep_dir, args.mtp_layers, args.seed, args.sft_steps, args.sft_lr, args.sft_batch,
                        args.max_operand, env=env, log_file=log_file)
    except RuntimeError as exc:
        _log(str(exc))
        _print_log_tail(log_file)
        return 1
    t_prep = time.time() - t0

    overrides = trainer_overrides(args, paths["model"], paths["data"], workdir) + list(args.overrides)
    metrics_part = _next_part(workdir)
    cmd = [sys.executable, "-m", "verl_mtp.trainer.main_ppo", *overrides]
    with open(os.path.join(workdir, "command.txt"), "a") as f:
        f.write(f"VERL_PLATFORM=cpu VERL_USE_EXTERNAL_MODULES={CPU_PLUGIN} VERL_FILE_LOGGER_PATH={metrics_part} \\\n"
                + " \\\n    ".join(shlex.quote(c) for c in cmd) + "\n\n")
    _log(f"verl PPO: algo={args.algo} mode={args.mode} K={args.mtp_layers} steps={args.steps} "
         f"batch={args.batch}x{args.n} mini-batch={args.mini_batch or max(1, args.batch // 4)} lr={args.lr} "
         f"model={paths['model']}")
    _log(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}  full log: {log_file}")

    progress = _Progress(metrics_part, os.path.join(workdir, "rollouts"), args.steps, args.mtp_layers)
    thread = threading.Thread(target=progress.run, daemon=True)
    t0 = time.time()
    with open(log_file, "a") as log:
        log.write(f"\n===== verl PPO: {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=dict(env, VERL_FILE_LOGGER_PATH=metrics_part), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        thread.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _log(f"timeout after {args.timeout}s: stopping the trainer")
            os.killpg(proc.pid, 15)
            rc = proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, 15)
            proc.wait()
            raise
        finally:
            progress.stop.set()
            thread.join()
    t_train = time.time() - t0
    progress.poll(final=True)

    parts = sorted(glob.glob(os.path.join(workdir, "metrics.part*.jsonl")),
                   key=lambda p: int(p.rsplit("part", 1)[1].split(".")[0]))
    exact = {}
    for step in mv.read_metrics(metrics_part):
        rate = mv.exact_rate(os.path.join(workdir, "rollouts"), step)
        if rate is not None:
            exact[step] = {mv.EXACT: rate}
    previous = mv.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    merged = mv.merge_metric_files(parts, os.path.join(workdir, "metrics.jsonl"),
                                   extra={**{s: {mv.EXACT: m[mv.EXACT]} for s, m in previous.items() if mv.EXACT in m},
                                          **exact})
    png = None
    if merged:
        png = mv.plot_runs({f"{args.algo} {args.mode}": merged}, os.path.join(workdir, "curves.png"),
                           title=f"verl PPO on CPU, tiny MiMo K={args.mtp_layers}: {args.algo} / {args.mode}")
    summary = {
        "mode": args.mode, "algo": args.algo, "steps_logged": sorted(merged), "exit_code": rc,
        "seconds": {"prepare": round(t_prep, 1), "trainer": round(t_train, 1), "total": round(time.time() - t_start, 1)},
        "paths": {**paths, "workdir": workdir, "metrics": os.path.join(workdir, "metrics.jsonl"), "plot": png,
                  "checkpoints": os.path.join(workdir, "checkpoints"), "log": log_file},
        "final": {k: v for k, v in (merged[max(merged)] if merged else {}).items()
                  if k.startswith(("critic/score", "actor/mtp", "timing_s/step", "local/"))},
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if rc != 0:
        _log(f"trainer exited with code {rc}")
        _print_log_tail(log_file)
        return rc
    _log(f"done: {len(merged)} steps logged; prepare {t_prep:.0f}s, trainer {t_train:.0f}s, "
         f"total {time.time() - t_start:.0f}s")
    if png:
        _log(f"plot: {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m verl_mtp.utils.local_run.launch",
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
    ap.add_argument("--micro-batch", type=int, default=None, help="samples per micro-batch (default: a mini-batch)")
    ap.add_argument("--lr", type=float, default=1e-3, help="actor learning rate")
    ap.add_argument("--lr-warmup-steps", type=int, default=3, help="linear warm-up from lr/10 over N steps")
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
    ap.add_argument("--timeout", type=float, default=None, help="seconds before the trainer is stopped")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the trainer (after --)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
