"""The trainer's command line: verl-mtp's PPO entry point, the tiny MiMo example's config, the launcher's switches.

The fixed settings of the example live in YAML (``config/tiny_mimo_example/``): ``ppo.yaml`` composes the CPU
platform's Megatron engine group (``verl_cpu/config/cpu_engine``) and one option of the example's group ``algo``
(policy loss) on top of verl-mtp's primary config ``mtp_ppo_megatron_trainer``. This module only turns the
launcher's switches into Hydra overrides on top of that: the policy loss, the MTP regime's keys (:mod:`.modes`,
derived from verl-mtp's regimes), paths, batch sizes, learning rate, seeds, steps, parallel layout. The user's own
overrides (after ``--``) come last and win.
"""

from __future__ import annotations

import os
import sys

from verl_mtp_example.modes import MODES, MTP

TRAINER_MODULE = "verl_mtp.trainer.main_ppo"
# verl-mtp's primary config stays the primary one; the example is an appended group of the same composition.
EXAMPLE_CONFIG = [
    "hydra.searchpath=[pkg://verl.trainer.config,pkg://verl_cpu.config,pkg://verl_mtp_example.config]",
    "+tiny_mimo_example=ppo",
]
ALGO_GROUP = "tiny_mimo_example/algo"
ALGOS = ("dapo", "gspo")
DEFAULT_LR_WARMUP_STEPS = 3
ACTOR = "actor_rollout_ref.actor"
ROLLOUT = "actor_rollout_ref.rollout"


def mini_batch(args) -> int:
    """Prompts per mini-batch: ``--mini-batch``, else a quarter of ``--batch`` (the paper's 128 / 32)."""
    return args.mini_batch or max(1, args.batch // 4)


def world_size(args) -> int:
    """Trainer processes: ``--tp`` x ``--dp`` Megatron actor ranks (each also drives one rollout replica)."""
    return args.tp * args.dp


def rank_samples(args) -> int:
    """Samples of one mini-batch that each data-parallel rank trains on."""
    return mini_batch(args) * args.n // args.dp


def micro_batch(args) -> int:
    """Samples per micro-batch and rank: ``--micro-batch``, else a rank's whole share of a mini-batch."""
    return args.micro_batch or rank_samples(args)


def parallel_overrides(args) -> list[str]:
    """The layout: ``--tp`` x ``--dp`` ranks on gloo, each a Ray logical "GPU" slot of the CPU platform, the
    actor's tensor-parallel size, and OCC's sums all-reduced over the data-parallel group when there is one
    (``occ.scope=data_parallel``: one lambda per micro-batch step for all ranks, as on one rank)."""
    world = world_size(args)
    overrides = [f"trainer.n_gpus_per_node={world}", f"ray_kwargs.ray_init.num_gpus={world}",
                 f"{ACTOR}.megatron.tensor_model_parallel_size={args.tp}"]
    if args.dp > 1 and MODES[args.mode].occ:
        overrides.append(f"{MTP}.occ.scope=data_parallel")
    return overrides


def default_lr_warmup_steps(steps: int) -> int:
    """3 steps, shortened to ``steps - 1``: Megatron's scheduler needs the warm-up to end before the last step
    (``lr_warmup_steps < lr_decay_steps``, and verl decays over the whole run)."""
    return max(0, min(DEFAULT_LR_WARMUP_STEPS, steps - 1))


def lr_warmup_steps(args) -> int:
    return args.lr_warmup_steps if args.lr_warmup_steps is not None else default_lr_warmup_steps(args.steps)


def mode_overrides(args) -> list[str]:
    """The mode's MTP keys (:mod:`.modes`), plus the switches that tune it."""
    overrides = MODES[args.mode].overrides()
    if args.mtp_coef is not None:
        overrides.append(f"{MTP}.mtp_loss_scaling_factor={args.mtp_coef}")
    if args.carry_last_lambda:
        overrides.append(f"{MTP}.occ.carry_last_lambda=True")
    return overrides


def resume_overrides(args) -> list[str]:
    if args.resume_from:
        return ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={os.path.abspath(args.resume_from)}"]
    return [f"trainer.resume_mode={'auto' if args.resume else 'disable'}"]


def switch_overrides(args, model: str, data: str, workdir: str) -> list[str]:
    """Every launcher switch as the Hydra override(s) it stands for."""
    warmup = lr_warmup_steps(args)
    return [
        f"{ALGO_GROUP}={args.algo}",
        *mode_overrides(args),
        *parallel_overrides(args),
        f"data.train_files={data}/train.parquet",
        f"data.val_files={data}/val.parquet",
        f"data.train_batch_size={args.batch}",
        f"data.max_response_length={args.max_response_length}",
        f"data.seed={args.seed}",
        f"actor_rollout_ref.model.path={model}",
        f"{ACTOR}.megatron.seed={args.seed}",
        f"{ACTOR}.ppo_mini_batch_size={mini_batch(args)}",
        f"{ACTOR}.ppo_micro_batch_size_per_gpu={micro_batch(args)}",
        f"{ACTOR}.optim.lr={args.lr}",
        f"{ACTOR}.optim.lr_warmup_steps={warmup}",
        f"{ACTOR}.optim.lr_warmup_init={args.lr * 0.1 if warmup > 0 else 0.0}",
        f"{ROLLOUT}.n={args.n}",
        f"{ROLLOUT}.temperature={args.temperature}",
        f"{ROLLOUT}.top_k={args.top_k}",
        f"{ROLLOUT}.seed={args.seed}",
        f"{ROLLOUT}.log_prob_micro_batch_size_per_gpu={args.batch * args.n // args.dp}",
        f"trainer.total_training_steps={args.steps}",
        f"trainer.save_freq={args.save_freq if args.save_freq is not None else args.steps}",
        *resume_overrides(args),
        f"trainer.default_local_dir={os.path.join(workdir, 'checkpoints')}",
        f"trainer.rollout_data_dir={os.path.join(workdir, 'rollouts')}",
        f"trainer.experiment_name={args.algo}_{args.mode}",
    ]


def trainer_command(args, model: str, data: str, workdir: str) -> list[str]:
    """``python -m verl_mtp.trainer.main_ppo`` with the example's config, the switches and the user's overrides."""
    return [sys.executable, "-m", TRAINER_MODULE, *EXAMPLE_CONFIG, *switch_overrides(args, model, data, workdir),
            *args.overrides]
