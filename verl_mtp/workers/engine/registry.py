"""The one place where verl-mtp writes into verl's ``EngineRegistry``: its engine takes verl's slots.

verl registers its engines with a decorator at import (``EngineRegistry.register``), keyed by model type,
backend and device (or ``(device, vendor)``). An extension that specialises one of them must take over every
slot the original holds, on every device, or a worker on another device key would silently build the
original. (The CPU platform writes nothing here: its lookup builds the CPU variant of whichever engine holds
the ``cuda`` slot, see ``verl_cpu.engine``.)
"""

from __future__ import annotations

from verl.workers.engine.base import EngineRegistry

__all__ = ["replace_engine"]


def replace_engine(old_cls: type, new_cls: type) -> None:
    """Point every registry slot that holds ``old_cls`` (any model type, backend, device) at ``new_cls``.

    Idempotent: slots already holding ``new_cls`` are left alone. Raises when ``old_cls`` holds no slot and
    ``new_cls`` none either, which means the engine to replace was never registered (a verl API change).
    """
    found = False
    for backends in EngineRegistry._engines.values():
        for devices in backends.values():
            for key, engine_cls in devices.items():
                if engine_cls is old_cls:
                    devices[key] = new_cls
                if devices[key] is new_cls:
                    found = True
    if not found:
        raise LookupError(
            f"{old_cls.__qualname__} is not registered in verl's EngineRegistry; cannot replace it with "
            f"{new_cls.__qualname__} (has verl's engine registration changed?)"
        )
