"""verl plugin: puts verl-mtp's Megatron engine in verl's ``EngineRegistry``.

verl imports this module on ``import verl`` (entry point group ``verl.plugins``, or
``VERL_USE_EXTERNAL_MODULES=verl_mtp.plugin``), so the engine is in place inside every Ray worker. verl logs
plugin import errors only at debug level; this module reports its own failure as a warning before raising,
so a broken install is never silent.
"""

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Swap verl's Megatron LM engine for the MTP-RL one on every device it is registered for. Idempotent."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

    from verl_mtp.workers.engine.megatron.transformer_impl import MegatronMTPEngineWithLMHead

    registry = EngineRegistry._engines["language_model"]["megatron"]
    for key, engine_cls in registry.items():
        if engine_cls is MegatronEngineWithLMHead:
            registry[key] = MegatronMTPEngineWithLMHead


try:
    register()
except Exception:
    logger.warning("verl_mtp plugin failed to register its Megatron engine", exc_info=True)
    raise
