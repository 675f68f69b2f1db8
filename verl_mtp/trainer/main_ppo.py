"""``python -m verl_mtp.trainer.main_ppo``: verl's PPO entry point on the MTP-RL config.

Takes the same Hydra overrides as ``python -m verl.trainer.main_ppo``; the config composes verl's
``ppo_megatron_trainer`` from the installed verl package with the ``actor_rollout_ref.model.mtp`` keys of
this project. The training itself is verl's; verl-mtp's engine is installed by the verl plugin.
"""

import hydra

import verl_mtp.plugin  # noqa: F401  (the driver process gets the engine too, not only Ray workers)
from verl.trainer import main_ppo as verl_main_ppo
from verl_mtp.workers.config.mtp import check_distillation_settings, check_fused_main_head_settings


@hydra.main(config_path="config", config_name="mtp_ppo_megatron_trainer", version_base=None)
def main(config):
    model = config.actor_rollout_ref.model
    check_distillation_settings(model.mtp, config.get("distillation"))
    check_fused_main_head_settings(model.get("use_fused_kernels", False), model.mtp, config.get("distillation"))
    verl_main_ppo.main.__wrapped__(config)


if __name__ == "__main__":
    main()
