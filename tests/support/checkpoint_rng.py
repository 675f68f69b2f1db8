"""Megatron's activation recompute on CPU: the RNG state it saves and restores."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from megatron.core.tensor_parallel import random as mcore_random


@contextlib.contextmanager
def cpu_checkpoint_rng():
    """Megatron's activation checkpoint saves and restores the CUDA RNG state; on CPU there is none to keep, so
    the CPU generator's state stands in (restoring it is not needed: the recomputed layers draw no numbers)."""
    with mock.patch.object(mcore_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()), \
            mock.patch.object(mcore_random, "_set_cuda_rng_state", lambda *a, **k: None):
        yield
