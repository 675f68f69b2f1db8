"""``python -m verl_mtp.trainer.main_ppo --check <overrides>`` (the recipes' ``DRY_RUN=1``): the start-up of a run
without the run.

A bad setting of a verl job usually surfaces after Ray has started and every GPU is allocated: verl builds its
config dataclasses inside the workers, Megatron asserts its layout when the process groups form, the MTP engine
refuses its layouts when the model is built. This module does all of that on the driver's CPU in seconds, with no
GPU and no Ray: it composes the same Hydra config, runs verl's ``validate_config``, builds every config object
verl and verl-mtp build at start-up through verl's own ``omega_conf_to_dataclass`` (algorithm, actor, reference,
critic, rollout, checkpoint engine, distillation, model with its ``MtpRLConfig`` block), runs the MTP checks of
:mod:`verl_mtp.workers.config.mtp_run_checks`, reads the model's config and the data files' columns when they are
on this machine, and prints the parallel layout. A refusal exits 2 with the key and the fix; warnings do not stop.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from verl_mtp.trainer.parallel_layout import ParallelLayout

__all__ = ["ConfigRefused", "CheckReport", "check_config", "check_before_start", "compose_trainer_config", "main"]

# columns verl's RLHFDataset and its rule-based reward managers (naive, dapo) read
REWARD_COLUMNS = ("data_source", "reward_model")
PREPARE_COMMAND = "python -m verl_mtp.utils.dataset.prepare_math"
NODE_COUNTS = (1, 2, 4, 8, 16, 32)


class ConfigRefused(ValueError):
    """A setting the run would fail on; the message names the key and the fix."""


@dataclass
class CheckReport:
    """What ``--check`` found: the layout, the config objects built, what it could not check here, warnings."""

    layout: ParallelLayout
    summary: list[str] = field(default_factory=list)
    built: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def render(self, title: str = "verl-mtp --check: OK (no GPU, no Ray)") -> str:
        lines = [title, self.layout.describe(), *self.summary]
        lines.append("scaling: " + ", ".join(_scaled(self.layout, n) for n in _node_counts(self.layout.nnodes)))
        lines.append("built:   " + ", ".join(self.built))
        lines += [f"not checked here: {item}" for item in self.not_checked]
        lines += [f"WARNING: {item}" for item in self.warnings]
        return "\n".join(lines)


def _node_counts(configured: int) -> list[int]:
    return sorted({n for n in NODE_COUNTS if n <= max(configured, 16)} | {configured})


def _scaled(layout: ParallelLayout, nnodes: int) -> str:
    """``2 node(s) -> DP 2``, or that the layout does not divide that many GPUs."""
    scaled = replace(layout, nnodes=nnodes)
    return f"{nnodes} node(s) -> " + ("does not divide" if scaled.problems() else f"DP {scaled.dp}")


def compose_trainer_config(overrides: list[str]) -> DictConfig:
    """The config ``python -m verl_mtp.trainer.main_ppo <overrides>`` runs with (Hydra's compose API)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl_mtp.trainer.config", version_base=None):
        return compose(config_name="mtp_ppo_megatron_trainer", overrides=overrides)


def _cause(error: BaseException) -> str:
    """The original message of an error Hydra's ``instantiate`` wrapped."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _build(config, key: str, built: list[str], block: Optional[DictConfig] = None) -> Any:
    """``omega_conf_to_dataclass`` of the block at ``key`` (or of ``block``), as verl's workers call it; a failure
    is refused with the key."""
    from verl.utils.config import omega_conf_to_dataclass

    block = OmegaConf.select(config, key) if block is None else block
    try:
        obj = omega_conf_to_dataclass(block)
    except Exception as error:
        raise ConfigRefused(f"{key}: {_cause(error)}") from error
    built.append(f"{type(obj).__name__} ({key})")
    return obj


def _reference_block(config) -> DictConfig:
    """``actor_rollout_ref.ref`` with the key renames verl's ``ActorRolloutRefWorker.init_model`` (0.9.1) applies
    before building its ``ActorConfig``."""
    ref = copy.deepcopy(config.actor_rollout_ref.ref)
    with open_dict(ref):
        ref.ppo_mini_batch_size = config.actor_rollout_ref.actor.ppo_mini_batch_size
        ref.ppo_micro_batch_size = ref.pop("log_prob_micro_batch_size", None)
        ref.ppo_micro_batch_size_per_gpu = ref.pop("log_prob_micro_batch_size_per_gpu", None)
        ref.use_dynamic_bsz = ref.pop("log_prob_use_dynamic_bsz", False)
        ref.ppo_max_token_len_per_gpu = ref.pop("log_prob_max_token_len_per_gpu", None)
    return ref


def _verl_validate_config(config) -> None:
    """verl's own ``validate_config`` (what ``verl.trainer.main_ppo.main`` runs first); its print goes to stderr."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    try:
        with contextlib.redirect_stdout(sys.stderr):
            validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    except ConfigRefused:
        raise
    except Exception as error:
        raise ConfigRefused(f"verl's validate_config: {_cause(error)}") from error


def build_start_up_configs(config, report: CheckReport) -> dict[str, Any]:
    """Every config object verl's trainer and workers build at start-up, in their order, through verl's helper."""
    from verl.trainer.distillation.losses import is_distillation_enabled
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    built = {
        "algorithm": _build(config, "algorithm", report.built),
        "actor": _build(config, "actor_rollout_ref.actor", report.built),
        "rollout": _build(config, "actor_rollout_ref.rollout", report.built),
        "checkpoint_engine": _build(config, "actor_rollout_ref.rollout.checkpoint_engine", report.built),
        "mtp": _build(config, "actor_rollout_ref.model.mtp", report.built),
    }
    if need_reference_policy(config):
        built["ref"] = _build(config, "actor_rollout_ref.ref", report.built, _reference_block(config))
    if need_critic(config):
        built["critic"] = _build(config, "critic", report.built)
    if is_distillation_enabled(config.get("distillation")):
        built["distillation"] = _build(config, "distillation", report.built)
    built["model"] = _build_model(config, report)
    return built


def _local_dir(path: Optional[str]) -> Optional[str]:
    """``path`` when it is a directory on this machine (not a hub id, not HDFS)."""
    if not path:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isdir(path) else None


def _build_model(config, report: CheckReport):
    """verl's ``HFModelConfig`` (reads the model's config and tokenizer) when the model is on this machine."""
    path = config.actor_rollout_ref.model.path
    if _local_dir(path) is None:
        report.not_checked.append(
            f"actor_rollout_ref.model.path={path} is not a directory on this machine: the model's MTP layer count "
            "and positions were not checked"
        )
        return None
    return _build(config, "actor_rollout_ref.model", report.built)


def check_config(config: DictConfig, run_verl_validation: bool = True) -> CheckReport:
    """Refuse (:class:`ConfigRefused`) what the run would fail on; return the layout, what was built, warnings."""
    from verl_mtp.workers.config.mtp import check_distillation_settings, check_fused_main_head_settings

    layout = ParallelLayout.from_config(config)
    problems = layout.problems()
    if problems:
        raise ConfigRefused("; ".join(problems))
    report = CheckReport(layout=layout)
    if run_verl_validation:
        _verl_validate_config(config)
    built = build_start_up_configs(config, report)
    _refuse_on(check_distillation_settings, built["mtp"], built.get("distillation"))
    fused = config.actor_rollout_ref.model.get("use_fused_kernels", False)
    _refuse_on(check_fused_main_head_settings, fused, built["mtp"], built.get("distillation"))
    _check_mtp(config, built, report)
    _check_plugin_policy(built["mtp"])
    _check_context_length(config, built.get("model"))
    _check_checkpoint(built["actor"], report)
    _check_reward_manager(config)
    _check_data(config, report)
    report.summary += _summaries(config, built)
    return report


def _refuse_on(check, *args) -> None:
    """Run one of the product's checks; its ``ValueError`` becomes a refusal with the same message."""
    try:
        check(*args)
    except ConfigRefused:
        raise
    except (ValueError, NotImplementedError) as error:
        raise ConfigRefused(str(error)) from error


def _check_mtp(config, built: dict, report: CheckReport) -> None:
    """The MTP block against the actor, the layout, the model and the rollout."""
    from verl.utils.megatron_utils import _get_mtp_num_layers, check_mtp_config

    from verl_mtp.workers.config import mtp_run_checks as checks

    mtp, actor, rollout = built["mtp"], config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout
    _refuse_on(checks.check_mtp_actor_strategy, mtp, actor.strategy)
    _refuse_on(checks.check_mtp_megatron_layout, mtp, built["actor"].megatron, report.layout.dp)
    _refuse_on(checks.check_speculative_decoding, mtp, rollout.name)
    num_mtp_layers = None
    model = built.get("model")
    if model is not None:
        try:  # verl's own check, on a copy of the engine config it would mutate
            check_mtp_config(model, copy.deepcopy(built["actor"].megatron))
        except ValueError as error:
            raise ConfigRefused(
                f"actor_rollout_ref.model.mtp.enable=True, but the model at {model.path} declares no MTP layer "
                f"(verl: {error}); use a checkpoint with MTP layers or set mtp.enable=False"
            ) from error
        num_mtp_layers = _get_mtp_num_layers(model.hf_config) if mtp.enable else 0
    warning = checks.occ_single_update_warning(
        mtp.is_rl and mtp.occ.enable, config.data.train_batch_size, actor.ppo_mini_batch_size, actor.ppo_epochs
    )
    report.warnings += [warning] if warning else []
    report.warnings += checks.speculative_decoding_warnings(mtp, rollout.name, num_mtp_layers)
    if num_mtp_layers is not None:
        report.summary.append(f"model:   {num_mtp_layers} MTP layer(s) loaded ({model.architectures[0]})")


def _check_plugin_policy(mtp) -> None:
    """verl loads verl-mtp's engine in every process through its plugin discovery; a policy that excludes it
    leaves the Ray workers on verl's own engine, which ignores the regime."""
    policy = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    allowed = {name.strip() for name in policy.split(",")}
    if mtp.mtp_loss_type is not None and policy != "auto" and "verl_mtp" not in allowed:
        raise ConfigRefused(
            f"VERL_USE_EXTERNAL_PLUGINS={policy} keeps verl from loading the verl_mtp plugin, so the Ray workers "
            f"would train with verl's own Megatron engine and ignore actor_rollout_ref.model.mtp.mtp_loss_type="
            f"{mtp.mtp_loss_type}: unset it (here and where each node ran ray start) or add verl_mtp to it"
        )


def _check_context_length(config, model) -> None:
    """vLLM and SGLang refuse a context beyond the model's positions when the rollout starts on the cluster."""
    positions = getattr(getattr(model, "hf_config", None), "max_position_embeddings", None)
    if positions is None:
        return
    rollout, data = config.actor_rollout_ref.rollout, config.data
    if rollout.name not in ("vllm", "sglang"):  # the engines that refuse a context beyond the model's positions
        return
    needed = rollout.get("max_model_len") or data.max_prompt_length + data.max_response_length
    if needed > positions:
        raise ConfigRefused(
            f"data.max_prompt_length + data.max_response_length (or actor_rollout_ref.rollout.max_model_len) = "
            f"{needed} exceeds the {positions} positions of the model at {model.path} (max_position_embeddings): "
            "shorten the lengths, or use a checkpoint whose config.json allows them (e.g. with rope scaling)"
        )


def _check_checkpoint(actor, report: CheckReport) -> None:
    """The bridge verl's engine needs, and whether the checkpoints will hold a Hugging Face export (MTP layers
    included) to serve."""
    contents, megatron = list(actor.checkpoint.save_contents), actor.megatron
    if not megatron.use_mbridge:
        raise ConfigRefused(
            "actor_rollout_ref.actor.megatron.use_mbridge=False: verl 0.9.1's Megatron engine builds the model and "
            "writes the checkpoints' Hugging Face weights through the bridge (it asserts use_mbridge when the "
            "workers start): set use_mbridge=True"
        )
    hf_export = "hf_model" in contents or ("model" in contents and not megatron.use_dist_checkpointing)
    if not hf_export:
        report.warnings.append(
            f"actor_rollout_ref.actor.checkpoint.save_contents={contents} with use_dist_checkpointing=True saves no "
            "Hugging Face weights: add hf_model to export the trained model, MTP layers included "
            "(python -m verl_mtp.model_merger, docs/cluster.md)"
        )


def _check_reward_manager(config) -> None:
    """The reward manager is looked up only when the reward loop starts, after the cluster is up."""
    manager = config.reward.reward_manager
    if manager.get("source", "register") != "register":
        return
    import verl.experimental.reward_loop.reward_manager  # noqa: F401  (registers verl's managers)
    from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER

    if manager.name not in REWARD_MANAGER:
        raise ConfigRefused(
            f"reward.reward_manager.name={manager.name} is not a registered reward manager; choose one of "
            f"{sorted(REWARD_MANAGER)}"
        )


def _data_files(files) -> list[str]:
    return [files] if isinstance(files, str) else list(files or [])


def _check_data(config, report: CheckReport) -> None:
    """The parquet columns verl's dataset and rule-based reward managers read, for files on this machine."""
    import pyarrow.parquet as pq

    prompt_key = config.data.prompt_key
    for key in ("data.train_files", "data.val_files"):
        for path in _data_files(OmegaConf.select(config, key)):
            local = os.path.expanduser(str(path))
            if not os.path.isfile(local):
                report.not_checked.append(f"{key}: {path} is not a file on this machine")
                continue
            columns = set(pq.read_schema(local).names)
            missing = [c for c in (prompt_key, *REWARD_COLUMNS) if c not in columns]
            if missing:
                raise ConfigRefused(
                    f"{key}: {path} has no column(s) {missing} (has {sorted(columns)}); verl's dataset reads "
                    f"data.prompt_key={prompt_key} and the reward managers data_source and reward_model."
                    f"ground_truth: prepare it with {PREPARE_COMMAND} (docs/cluster.md)"
                )


def _summaries(config, built: dict) -> list[str]:
    """The batch schedule per step and the MTP regime, as the run will see them."""
    actor, mtp = config.actor_rollout_ref.actor, built["mtp"]
    n, batch, mini = config.actor_rollout_ref.rollout.n, config.data.train_batch_size, actor.ppo_mini_batch_size
    updates = max(1, batch // max(1, mini)) * actor.ppo_epochs
    regime = f"mtp_loss_type={mtp.mtp_loss_type}" if mtp.mtp_loss_type else "verl's own MTP handling"
    if mtp.is_rl:
        regime += f", OCC {'on' if mtp.occ.enable else 'off'}"
    return [
        f"batch:   {batch} prompts x {n} = {batch * n} sequences per step; {updates} optimizer update(s) per step "
        f"of {mini * n} sequences",
        f"mtp:     enable={mtp.enable}, {regime}, enable_rollout={mtp.enable_rollout}",
    ]


def check_before_start(config: DictConfig) -> None:
    """The trainer's own start: the same checks before Ray starts (verl's ``validate_config`` follows in verl's
    ``main``); a refusal ends the process with status 2."""
    try:
        report = check_config(config, run_verl_validation=False)
    except ConfigRefused as error:
        print(f"verl-mtp: REFUSED before start: {error}", file=sys.stderr)
        sys.exit(2)
    print(report.render(title="verl-mtp start-up checks: OK"))


def main(overrides: list[str]) -> int:
    """Compose, check, print the report; 0 when the run would start, 2 when it would not."""
    try:
        config = compose_trainer_config(overrides)
        report = check_config(config)
    except ConfigRefused as error:
        print(f"verl-mtp --check: REFUSED: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # composition errors: unknown keys, bad override syntax, missing values
        print(f"verl-mtp --check: REFUSED: {_cause(error)}", file=sys.stderr)
        return 2
    print(report.render())
    return 0
