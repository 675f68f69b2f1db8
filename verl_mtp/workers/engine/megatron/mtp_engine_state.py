"""What the MTP hooks (:mod:`verl_mtp.workers.engine.megatron.mtp_engine_hooks`) keep per engine, in one object.

verl's engine creates it once in ``__init__`` (``engine.mtp_state``); every hook reads and writes it there, so
the MTP regimes add one attribute to verl's engine and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from verl_mtp.models.mcore.main_head_scoring import MainHeadCapture
from verl_mtp.models.mcore.mtp_patch import MTPRLPostprocess
from verl_mtp.trainer.ppo.mtp_occ import OCCState

__all__ = ["MtpEngineState"]


@dataclass
class MtpEngineState:
    """The hooks' per-engine state; the ``rl`` regime's pieces stay empty until ``install_mtp_rl``."""

    rl_postprocess: dict[torch.nn.Module, MTPRLPostprocess] = field(default_factory=dict)  # per model chunk
    occ_state: OCCState | None = None  # OCC's carried lambdas (``rl`` only), saved with the checkpoint
    updates: int = 0  # mini-batch updates so far (the gradient estimator's cadence)
    loss_mode: int | str | None = None  # None: the full loss; "rl": the RL loss alone; k: head k's MTP loss alone
    coefficients: torch.Tensor | None = None  # the gradient estimator's lambdas for the update in progress
    diagnosed: bool = False  # the gradient estimator measures the update in progress
    fused_main_head: bool = False  # use_fused_kernels with a regime: the main head is scored in chunks
    main_head_capture: dict[torch.nn.Module, MainHeadCapture] = field(default_factory=dict)  # per model chunk
