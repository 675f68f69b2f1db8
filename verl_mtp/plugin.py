"""verl plugin: puts verl-mtp's Megatron engine in verl's ``EngineRegistry``.

verl imports this module on ``import verl`` (entry point group ``verl.plugins``, or
``VERL_USE_EXTERNAL_MODULES=verl_mtp.plugin``), so the engine is in place inside every Ray worker.

When a script imports a ``verl_mtp`` module before verl, verl runs this plugin while that module is still
half-imported; registering then would be a circular import, so it is deferred. It is never skipped: building
an ``MtpRLConfig`` with a regime (what every worker does before it builds its engine) calls :func:`register`.
Any other failure is reported as a warning (verl itself logs plugin errors only at debug level) and raised.
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
except ImportError as e:
    if "partially initialized module 'verl_mtp" not in str(e):
        logger.warning("verl_mtp plugin failed to register its Megatron engine", exc_info=True)
        raise
    logger.info("verl_mtp plugin: engine registration deferred to MtpRLConfig (import order): %s", e)
except Exception:
    logger.warning("verl_mtp plugin failed to register its Megatron engine", exc_info=True)
    raise
