"""The MTP block checked against the rest of a run's settings: the actor's strategy and batch schedule, the
Megatron layout, the model, the rollout.

:class:`~verl_mtp.workers.config.mtp.MtpRLConfig` validates its own fields when it is built; what depends on
other blocks is checked here, from config objects and plain numbers only, so that a pre-flight check of the trainer
config (this package's ``main_ppo --check``) finds on a CPU, before any GPU is allocated, what the engine would refuse
after the cluster has started, and so that the CPU example's launcher shares the one-update rule. Refusals
raise ``ValueError`` naming the key and the fix; settings that are legal but make a regime meaningless or costly
come back as warning text.
"""

from __future__ import annotations

from typing import Callable, Optional

__all__ = [
    "SPECULATIVE_ROLLOUTS",
    "check_mtp_actor_strategy",
    "check_mtp_megatron_layout",
    "occ_single_update_warning",
    "check_speculative_decoding",
    "speculative_decoding_warnings",
]

MTP = "actor_rollout_ref.model.mtp"
MEGATRON = "actor_rollout_ref.actor.megatron"
MINI_BATCH = "actor_rollout_ref.actor.ppo_mini_batch_size"
# rollout engines whose verl 0.9.1 servers pass the MTP block on as speculative-decoding settings
SPECULATIVE_ROLLOUTS = ("vllm", "sglang")


def check_mtp_actor_strategy(mtp, strategy: str) -> None:
    """The regimes are implemented by the Megatron engine's MTP hooks; any other actor would ignore them."""
    if mtp.mtp_loss_type is not None and strategy != "megatron":
        raise ValueError(
            f"{MTP}.mtp_loss_type={mtp.mtp_loss_type} needs actor_rollout_ref.actor.strategy=megatron (the engine "
            f"with the MTP hooks), got strategy={strategy}: set the Megatron actor, or {MTP}.mtp_loss_type=null."
        )


def check_mtp_megatron_layout(mtp, megatron, data_parallel_size: int) -> None:
    """What the engine refuses when it starts, from the config: dynamic context parallelism under ``rl`` (the
    MTP block rolls its inputs over the static CP group), and the gradient estimator (``occ.estimator=gradient``
    or ``occ.diagnose_every > 0``) with Megatron's distributed optimizer over more than one data-parallel rank
    (the estimator reads whole DP-averaged gradients; the distributed optimizer keeps a shard per rank)."""
    if not mtp.is_rl:
        return
    if megatron.dynamic_context_parallel:
        raise ValueError(
            f"{MTP}.mtp_loss_type=rl does not support {MEGATRON}.dynamic_context_parallel=True: Megatron's MTP "
            "block rolls its inputs over the static context-parallel group, so the heads would see wrong tokens. "
            "Use dynamic_context_parallel=False with context_parallel_size > 1 (supported), or mtp_loss_type=detach."
        )
    if mtp.occ.needs_gradients and megatron.use_distributed_optimizer and data_parallel_size > 1:
        setting = "estimator=gradient" if mtp.occ.estimator == "gradient" else f"diagnose_every={mtp.occ.diagnose_every}"
        raise ValueError(
            f"{MTP}.occ.{setting}: the gradient estimator reads whole "
            "data-parallel-averaged gradients, which Megatron's distributed optimizer shards over the "
            f"{data_parallel_size} data-parallel ranks of this layout: set {MEGATRON}.use_distributed_optimizer="
            "False (more optimizer memory per GPU), or use occ.estimator=proxy with occ.diagnose_every=0."
        )


def occ_single_update_warning(
    occ_enabled: bool,
    train_batch_size: int,
    ppo_mini_batch_size: int,
    ppo_epochs: int = 1,
    mini_batch_setting: Callable[[int], str] = lambda size: f"{MINI_BATCH}={size}",
) -> Optional[str]:
    """OCC's lambda needs an optimizer update earlier in the same step: ``log pi - log pi_old`` is 0 before it.

    ``mini_batch_setting`` spells the fix for the caller's interface (a Hydra key here, a launcher switch in
    the CPU example).
    """
    updates = max(1, train_batch_size // max(1, ppo_mini_batch_size)) * ppo_epochs
    if not occ_enabled or updates > 1:
        return None
    return (
        f"OCC with one optimizer update per step (batch {train_batch_size}, mini-batch {ppo_mini_batch_size}, "
        f"{ppo_epochs} epoch): lambda is 0 by construction, since log pi - log pi_old is 0 until the step's first "
        "update (docs/mtp_rl.md, section 4); use a smaller mini-batch, e.g. "
        f"{mini_batch_setting(max(1, train_batch_size // 4))}"
    )


def check_speculative_decoding(mtp, rollout_name: str) -> None:
    """Speculative-decoding settings that verl would ignore silently or hand to the engine broken."""
    if not mtp.enable_rollout:
        return
    if not mtp.enable:
        raise ValueError(
            f"{MTP}.enable_rollout=True drafts with the model's MTP layers, which are loaded only with "
            f"{MTP}.enable=True: set enable=True, or enable_rollout=False."
        )
    if rollout_name not in SPECULATIVE_ROLLOUTS:
        raise ValueError(
            f"{MTP}.enable_rollout=True: the {rollout_name!r} rollout does not draft with MTP layers (verl passes "
            f"them to {' and '.join(SPECULATIVE_ROLLOUTS)} only); set actor_rollout_ref.rollout.name to one of "
            f"{SPECULATIVE_ROLLOUTS}, or {MTP}.enable_rollout=False."
        )
    steps = mtp.num_speculative_tokens if rollout_name == "vllm" else mtp.speculative_num_steps
    key = "num_speculative_tokens" if rollout_name == "vllm" else "speculative_num_steps"
    if steps < 1:
        raise ValueError(f"{MTP}.{key} must be >= 1 with enable_rollout=True, got {steps}")


def speculative_decoding_warnings(mtp, rollout_name: str, num_mtp_layers: Optional[int]) -> list[str]:
    """What drafting with the MTP heads costs or risks in an RL run (no refusal: each can be the right choice)."""
    if not (mtp.enable and mtp.enable_rollout):
        return []
    warnings = [
        "speculative decoding with the MTP heads: it pays off only while drafts are accepted; at RL batch sizes "
        "(hundreds of sequences per rollout replica) decoding is compute-bound and a rejected draft costs a "
        "verification pass, so compare timing_s/gen and rollout/spec_accept_rate with enable_rollout=False. "
        "verl also keeps the rollout's weights at sleep level 1 (in host memory between rollouts) when drafting."
    ]
    steps = mtp.num_speculative_tokens if rollout_name == "vllm" else mtp.speculative_num_steps
    if num_mtp_layers and steps > num_mtp_layers:
        warnings.append(
            f"{MTP}.{'num_speculative_tokens' if rollout_name == 'vllm' else 'speculative_num_steps'}={steps} "
            f"> the model's {num_mtp_layers} MTP layer(s): the engine runs the same layer again for the extra "
            "drafts, whose acceptance is usually much lower."
        )
    if mtp.is_rl and mtp.detached_head_ce_coef == 0:
        warnings.append(
            f"{MTP}.mtp_loss_type=rl trains the heads only through the lambda-scaled policy term: while lambda is "
            f"about 0 the drafts go stale and acceptance can fall; {MTP}.detached_head_ce_coef > 0 keeps them "
            "trained (docs/mtp_rl.md, section 4)."
        )
    return warnings
