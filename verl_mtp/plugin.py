"""verl plugin: loads verl-mtp's Megatron engine, which registers itself on import.

verl imports this module on ``import verl`` (entry point group ``verl.plugins``, or
``VERL_USE_EXTERNAL_MODULES=verl_mtp.plugin``), so the engine is in place in the driver and in every Ray worker.
verl logs a failing plugin only at debug level; the failure is logged as a warning here so that a broken
install cannot fall back to verl's engine unnoticed.
"""

import logging

logger = logging.getLogger(__name__)

try:
    import verl_mtp.workers.engine.megatron.transformer_impl  # noqa: F401  (registers the MTP engine)
except Exception:
    logger.warning("verl_mtp plugin: the MTP engine failed to load; verl's own engine stays in use", exc_info=True)
    raise
