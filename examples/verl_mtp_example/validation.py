"""Every switch of the main job checked up front, against the others and against the chosen mode.

A run starts the SFT warm-up, Ray and a Megatron model before the trainer reads its first setting, so a bad
value found there costs the whole start-up and may end in a bare assertion deep inside Megatron. These rules run in the
launcher's own process before any of that starts (verl is imported only for OCC's one-update rule, which is
the product's) and refuse with the switch -- flag and the
environment variable of ``scripts/run_main.sh`` where there is one --, its value and the fix. Settings that
are legal but make a regime meaningless (OCC with one optimizer update per step) are warnings.

Overrides after ``--`` win over the switches (verl's own semantics), except where they contradict the regime
or policy loss chosen by ``--mode`` / ``--algo`` or the keys the launcher needs to find its own output.
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from typing import Any, Callable, Optional

from verl_mtp_example import run_dir
from verl_mtp_example.modes import MODES, MTP
from verl_mtp_example.trainer_command import ACTOR, ALGO_GROUP, default_lr_warmup_steps, mini_batch, rank_samples

# switches that scripts/run_main.sh also takes from the environment
_ENV_NAMES = {"steps": "STEPS", "mode": "MODE", "algo": "ALGO", "seed": "SEED", "workdir": "WORKDIR",
              "prep_dir": "PREP_DIR"}
# trainer keys the launcher derives from its switches: the layout, and what it reads back (checkpoints, rollout
# dumps, progress)
_LAUNCHER_KEYS = {
    "trainer.n_gpus_per_node": "--tp / --dp",
    "ray_kwargs.ray_init.num_gpus": "--tp / --dp",
    f"{ACTOR}.megatron.tensor_model_parallel_size": "--tp",
    "trainer.total_training_steps": "--steps",
    "trainer.resume_mode": "--resume / --resume-from",
    "trainer.resume_from_path": "--resume-from",
    "trainer.default_local_dir": "--workdir",
    "trainer.rollout_data_dir": "--workdir",
}


class UsageError(ValueError):
    """A switch or override the launcher refuses; the message names it, its value and the fix."""


def switch(name: str) -> str:
    """``--flag`` of an ``args`` attribute, with its environment variable when run_main.sh has one."""
    flag = "--" + name.replace("_", "-")
    return f"{flag} ({_ENV_NAMES[name]})" if name in _ENV_NAMES else flag


def setting(name: str, value: Any) -> str:
    """How to set a switch: ``--mode rl (MODE=rl)``."""
    flag = f"--{name.replace('_', '-')} {value}"
    return f"{flag} ({_ENV_NAMES[name]}={value})" if name in _ENV_NAMES else flag


def parse_overrides(texts: list[str]) -> dict[str, tuple[str, Any]]:
    """``{key: (text, value)}`` of the overrides after ``--``, parsed by Hydra's own override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = {}
    for text in texts:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as exc:
            raise UsageError(f"'{text}' after -- is not a Hydra override ({exc}); write key=value, e.g. "
                             "actor_rollout_ref.actor.optim.lr=5e-4") from None
        parsed[override.get_key_element()] = (text, None if override.is_delete() else override.value())
    return parsed


def option_settings(group: str, option: str) -> dict[str, Any]:
    """The flattened ``{dotted key: value}`` of one option YAML of the example's config groups."""
    from omegaconf import OmegaConf

    path = files("verl_mtp_example.config").joinpath(*group.split("/"), f"{option}.yaml")
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(OmegaConf.load(str(path))), "")
    return flat


# ---------------------------------------------------------------------------------------------------------
# rules on the switches alone
# ---------------------------------------------------------------------------------------------------------
_MINIMUMS = (  # (switch, smallest legal value, why)
    ("steps", 1, "a run needs at least one step"),
    ("mtp_layers", 1, "every regime trains or loads MTP heads"),
    ("batch", 1, "prompts per step"),
    ("n", 1, "samples per prompt"),
    ("seed", 0, "seeds are non-negative"),
    ("max_operand", 0, "operands are drawn from [0, max_operand]"),
    ("sft_steps", 0, "0 skips the warm-up"),
    ("sft_batch", 1, "prompts per SFT step"),
    ("save_freq", 1, "steps between checkpoints"),
    ("tp", 1, "tensor-parallel size"),
    ("dp", 1, "data-parallel ranks"),
)


def check_ranges(args) -> None:
    for name, minimum, why in _MINIMUMS:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UsageError(f"{switch(name)} must be >= {minimum} ({why}), got {value}")
    for name in ("lr", "sft_lr", "temperature", "timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"{switch(name)} must be > 0, got {value}")
    if args.top_k == 0 or args.top_k < -1:
        raise UsageError(f"{switch('top_k')} must be -1 (no top-k) or >= 1 (1 = greedy), got {args.top_k}")
    if args.mtp_coef is not None and args.mtp_coef < 0:
        raise UsageError(f"{switch('mtp_coef')} must be >= 0, got {args.mtp_coef}")


def check_batches(args) -> None:
    mini = mini_batch(args)
    if args.mini_batch is not None and not 1 <= args.mini_batch <= args.batch:
        raise UsageError(f"--mini-batch {args.mini_batch} must be between 1 and --batch {args.batch}")
    if args.batch % mini:
        raise UsageError(f"--batch {args.batch} must be a multiple of the mini-batch {mini} (--mini-batch, "
                         f"default batch/4): e.g. --batch {mini * max(1, args.batch // mini)}")
    samples = mini * args.n
    if samples % args.dp:
        raise UsageError(f"--dp {args.dp} must divide the {samples} samples of a mini-batch (--mini-batch {mini} x "
                         f"--n {args.n}): each data-parallel rank trains an equal share; e.g. --n "
                         f"{args.n * args.dp}, or a --dp that divides {samples}")
    per_rank = rank_samples(args)
    if args.micro_batch is not None and (args.micro_batch < 1 or per_rank % args.micro_batch):
        share = f" per data-parallel rank (--dp {args.dp})" if args.dp > 1 else ""
        raise UsageError(f"--micro-batch {args.micro_batch} must divide the {per_rank} samples of a mini-batch"
                         f"{share} (--mini-batch {mini} x --n {args.n}), e.g. --micro-batch {per_rank}")


def check_tensor_parallel(args) -> None:
    """Megatron splits attention heads (query and key/value) over the tensor-parallel ranks."""
    if args.tp == 1:
        return
    from verl_mtp_example.tiny_model import tiny_mimo_config

    config = tiny_mimo_config(args.mtp_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % args.tp or kv_heads % args.tp:
        fits = [tp for tp in range(1, kv_heads + 1) if kv_heads % tp == 0 and heads % tp == 0]
        raise UsageError(f"--tp {args.tp} must divide the tiny model's {heads} attention heads and {kv_heads} "
                         f"key/value heads (Megatron splits them over the tensor-parallel ranks): use --tp in {fits}")


def check_schedule(args) -> None:
    if args.lr_warmup_steps is None:
        return
    if not 0 <= args.lr_warmup_steps < args.steps:
        raise UsageError(
            f"--lr-warmup-steps {args.lr_warmup_steps} must be between 0 and {switch('steps')} - 1 = {args.steps - 1}"
            " (Megatron's scheduler ends the warm-up before the last step); leave it out to get "
            f"{default_lr_warmup_steps(args.steps)} for a {args.steps}-step run")


def check_answer_length(args) -> None:
    needed = len(str(2 * args.max_operand)) + 1  # the longest sum's digits, then EOS
    if args.max_response_length < needed:
        raise UsageError(
            f"--max-response-length {args.max_response_length} cannot hold the answer to "
            f"{args.max_operand}+{args.max_operand} and the end token ({needed} tokens, --max-operand "
            f"{args.max_operand}): use --max-response-length {needed} or more")


def check_mode_switches(args) -> None:
    mode = MODES[args.mode]
    if args.mtp_coef is not None and not mode.fixed_coefficient:
        why = (f"OCC sets the coefficient; scale it with -- {MTP}.occ.lambda_plus=..." if mode.occ
               else "frozen MTP layers have no loss")
        fixed = _modes_where(lambda m: m.policy_loss and m.fixed_coefficient)
        raise UsageError(f"--mtp-coef {args.mtp_coef} has no effect with {switch('mode')} {args.mode} ({why}); "
                         f"drop --mtp-coef, or use --mode {fixed[0]} for a fixed coefficient")
    if args.carry_last_lambda and not mode.occ:
        raise UsageError(f"--carry-last-lambda only applies to OCC, not to {switch('mode')} {args.mode}: "
                         f"use --mode {_modes_where(lambda m: m.occ)[0]} or drop --carry-last-lambda")


def check_dirs(args) -> None:
    for name in ("workdir", "prep_dir"):
        path = getattr(args, name)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"{switch(name)} {path} is a file, not a directory: choose another path")


# ---------------------------------------------------------------------------------------------------------
# resuming
# ---------------------------------------------------------------------------------------------------------
def _check_more_steps(args, step: int, where: str) -> None:
    if step >= args.steps:
        raise UsageError(f"{where} is at step {step} but {switch('steps')} is {args.steps} (the total, earlier "
                         f"steps included): nothing left to train; use {setting('steps', step + 1)} or more")


def _check_same_run(args, workdir: str) -> None:
    """A resumed run must train what the checkpoint holds: same regime, policy loss and number of heads."""
    summary = os.path.join(workdir, "summary.json")
    if not os.path.isfile(summary):
        return
    with open(summary) as f:
        earlier = json.load(f)
    for name in ("mode", "algo", "mtp_layers"):
        if name in earlier and earlier[name] != getattr(args, name):
            raise UsageError(f"--resume: the run in {workdir} used {switch(name)} {earlier[name]}, this launch asks "
                             f"for {getattr(args, name)}; use the same value, or another --workdir without --resume")


def _check_same_heads(args, checkpoint: str) -> None:
    """The checkpoint's HF export says how many MTP heads its model has; the run's model must have as many."""
    config = os.path.join(checkpoint, "actor", "model", "huggingface", "config.json")
    if not os.path.isfile(config):
        return
    with open(config) as f:
        heads = json.load(f).get("num_nextn_predict_layers")
    if heads is not None and heads != args.mtp_layers:
        raise UsageError(f"{checkpoint} holds a model with {heads} MTP heads, but --mtp-layers is "
                         f"{args.mtp_layers}: use --mtp-layers {heads}")


def check_resume(args) -> None:
    if args.resume and args.resume_from:
        raise UsageError("--resume and --resume-from exclude each other: --resume continues the work dir's own "
                         "latest checkpoint, --resume-from a given one; pass one of them")
    if args.resume_from:
        step = run_dir.checkpoint_step(args.resume_from)
        if step is None or not os.path.isdir(args.resume_from):
            raise UsageError(f"--resume-from {args.resume_from} is not an existing .../global_step_N checkpoint "
                             "directory (see <workdir>/checkpoints/)")
        _check_more_steps(args, step, f"--resume-from {args.resume_from}")
        _check_same_heads(args, args.resume_from)
    elif args.resume:
        workdir = os.path.abspath(args.workdir)
        step = run_dir.latest_checkpoint_step(workdir)
        if step is None:
            raise UsageError(f"--resume: no checkpoint in {switch('workdir')} {workdir} (no "
                             f"checkpoints/{run_dir.LATEST_STEP_FILE}); drop --resume to start a new run there, "
                             "or point --workdir at the run to continue")
        _check_more_steps(args, step, f"--resume: the latest checkpoint in {workdir}")
        _check_same_run(args, workdir)
        _check_same_heads(args, os.path.join(workdir, "checkpoints", f"global_step_{step}"))


# ---------------------------------------------------------------------------------------------------------
# overrides after --, against the switches
# ---------------------------------------------------------------------------------------------------------
def _modes_where(predicate: Callable) -> list[str]:
    return [name for name, mode in MODES.items() if predicate(mode)]


def check_overrides(args, overrides: dict[str, tuple[str, Any]]) -> None:
    if ALGO_GROUP in overrides:
        raise UsageError(f"'{overrides[ALGO_GROUP][0]}' after --: choose it with {switch('algo')} instead")
    for key, owner in _LAUNCHER_KEYS.items():
        if key in overrides:
            raise UsageError(f"'{overrides[key][0]}' after --: the launcher sets {key} from {owner} (and reads "
                             f"back what it needs of its own output); use {owner} instead")
    chosen = {"mode": MODES[args.mode].settings, "algo": option_settings(ALGO_GROUP, args.algo)}
    for name, settings in chosen.items():
        for key, expected in settings.items():
            if key in overrides and overrides[key][1] != expected:
                hint = ""
                if name == "mode":
                    fits = _modes_where(lambda mode: mode.settings[key] == overrides[key][1])
                    hint = f", e.g. {setting(name, fits[0])}," if fits else ""
                raise UsageError(
                    f"{switch(name)} {getattr(args, name)} sets {key}={expected}, but '{overrides[key][0]}' after -- "
                    f"contradicts it: choose the {name} with {switch(name)}{hint} instead of overriding the key")


# ---------------------------------------------------------------------------------------------------------
# warnings
# ---------------------------------------------------------------------------------------------------------
def _effective(args, overrides: dict, key: str, default: Any) -> Any:
    return overrides[key][1] if key in overrides and overrides[key][1] is not None else default


def occ_updates_warning(args, overrides: dict) -> Optional[str]:
    """OCC's lambda needs an optimizer update earlier in the same step: the product's rule (the trainer's
    ``--check`` applies the same one), on the switches' effective values."""
    occ = _effective(args, overrides, f"{MTP}.occ.enable", MODES[args.mode].occ)
    if not occ:
        return None
    from verl_mtp.workers.config.mtp_run_checks import occ_single_update_warning  # imports verl: only with OCC

    return occ_single_update_warning(
        occ_enabled=True,
        train_batch_size=_effective(args, overrides, "data.train_batch_size", args.batch),
        ppo_mini_batch_size=_effective(args, overrides, f"{ACTOR}.ppo_mini_batch_size", mini_batch(args)),
        ppo_epochs=_effective(args, overrides, f"{ACTOR}.ppo_epochs", 1),
        mini_batch_setting=lambda size: f"--mini-batch {size}",
    )


RULES: tuple[Callable, ...] = (check_ranges, check_batches, check_tensor_parallel, check_schedule,
                               check_answer_length, check_mode_switches, check_dirs, check_resume)
WARNINGS: tuple[Callable, ...] = (occ_updates_warning,)


def validate(args) -> list[str]:
    """Raise :class:`UsageError` on the first refused switch; return the warnings."""
    for rule in RULES:
        rule(args)
    overrides = parse_overrides(list(args.overrides))
    check_overrides(args, overrides)
    return [message for check in WARNINGS if (message := check(args, overrides))]
