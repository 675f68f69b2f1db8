"""What TransformerEngine answers with FP8 off, for the few Megatron-Core paths that call it without TE.

A GPU image has TransformerEngine, so these paths run there; here (no TE) megatron-core 0.16.1 leaves the
names undefined and fails with ``NameError``:

* selective recompute of ``layernorm`` (``CheckpointWithoutOutput``, in ``megatron.core.tensor_parallel.random``)
  sets ``fp8 = fp8 is not None``, so its default ``fp8=False`` still asks TE's ``FP8GlobalStateManager``
  whether FP8 is on and enters ``activation_recompute_forward`` / ``fp8_autocast``;
* the MoE router's gating GEMM (``RouterGatingLinearFunction`` in ``megatron.core.transformer.moe.moe_utils``)
  tests ``te_general_gemm is not None`` and falls back to ``torch`` only when TE is importable but lacks it.

:func:`transformer_engine_off` gives those modules, for its duration, what TE gives them with FP8 disabled:
FP8 is off, its recipe is ``None``, the two context managers do nothing, and there is no TE GEMM (Megatron's
own ``torch.matmul`` fallback runs). Nothing numerical is replaced; where TE is installed nothing is touched.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator
from unittest import mock

from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.moe import moe_utils

__all__ = ["transformer_engine_off"]


def _no_op_context(*args, **kwargs):
    return contextlib.nullcontext()


_FP8_OFF = types.SimpleNamespace(is_fp8_enabled=lambda: False, get_fp8_recipe=lambda: None)


@contextlib.contextmanager
def transformer_engine_off() -> Iterator[None]:
    """Define the TE names those Megatron modules read, as TE answers with FP8 off (see the module docstring)."""
    names = [
        (mcore_random, "FP8GlobalStateManager", _FP8_OFF),
        (mcore_random, "activation_recompute_forward", _no_op_context),
        (mcore_random, "fp8_autocast", _no_op_context),
        (moe_utils, "te_general_gemm", None),
    ]
    with contextlib.ExitStack() as stack:
        for module, name, value in names:
            if hasattr(module, name):  # TransformerEngine is installed: it answers itself
                continue
            stack.enter_context(mock.patch.object(module, name, value, create=True))
        yield
