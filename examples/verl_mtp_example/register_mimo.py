"""Importing this module makes ``AutoConfig`` know ``model_type: "mimo"`` in this process.

verl imports ``actor_rollout_ref.model.external_lib`` in every process that builds the model (Ray workers
included), so ``external_lib=verl_mtp_example.register_mimo`` is how a run reads the tiny model's config
without ``trust_remote_code``.
"""

from __future__ import annotations


def register_mimo_config() -> None:
    """Register :class:`.mimo_config.MiMoConfig` for ``mimo``. Idempotent.

    Skipped when transformers already knows ``mimo`` (natively or registered before), so a future native
    config class wins over ours.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "mimo" in CONFIG_MAPPING:
        return
    from verl_mtp_example.mimo_config import MiMoConfig

    AutoConfig.register("mimo", MiMoConfig)


register_mimo_config()
