"""``python -m verl_mtp.trainer.main_ppo``: verl's PPO entry point on the MTP-RL config.

Takes the same Hydra overrides as ``python -m verl.trainer.main_ppo``; the config composes verl's
``ppo_megatron_trainer`` from the installed verl package with the ``actor_rollout_ref.model.mtp`` keys of
this project. The training itself is verl's; verl-mtp's engine is installed by the verl plugin.

Before verl's own start, the checks of :mod:`verl_mtp.trainer.config_check` run on the driver (a refused setting
ends it with status 2 before Ray starts). ``--check`` among the arguments runs only those checks, plus verl's
``validate_config``, and prints the layout: no Ray, no GPU (the recipes' ``DRY_RUN=1``).
"""

import sys

import hydra

import verl_mtp.plugin  # noqa: F401  (the driver process gets the engine too, not only Ray workers)
from verl.trainer import main_ppo as verl_main_ppo
from verl_mtp.trainer import config_check


@hydra.main(config_path="config", config_name="mtp_ppo_megatron_trainer", version_base=None)
def main(config):
    config_check.check_before_start(config)
    verl_main_ppo.main.__wrapped__(config)


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(config_check.main([arg for arg in sys.argv[1:] if arg != "--check"]))
    main()
