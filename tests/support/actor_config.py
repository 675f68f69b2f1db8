"""verl's actor config as the MTP-RL trainer config composes it, for the tests that call verl's ``ppo_loss``."""

from __future__ import annotations

from collections.abc import Iterable

from hydra import compose, initialize_config_module

from verl.utils.config import omega_conf_to_dataclass

# DAPO's clip-higher range with token-mean aggregation, the recipes' default policy loss
DAPO = (
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.28",
    "actor_rollout_ref.actor.loss_agg_mode=token-mean",
)


def mtp_actor_config(overrides: Iterable[str] = ()):
    """The actor config, one sample per micro-batch, with Hydra ``overrides`` on top."""
    with initialize_config_module(config_module="verl_mtp.trainer.config", version_base=None):
        cfg = compose(
            config_name="mtp_ppo_megatron_trainer",
            overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", *overrides],
        )
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
