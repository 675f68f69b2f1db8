"""The Megatron engine with the MTP hooks, holding only what one micro-batch's forward and loss read (no
``__init__``).

Tests drive verl's own model-engine forward (``gptmodel_forward_model_engine``) with the engine's logits
processor, then the engine's ``postprocess_micro_batch_func``, on a tiny GPTModel built in the test process.
"""

from __future__ import annotations

from types import SimpleNamespace

from megatron.core import parallel_state

from verl_mtp.models.mcore.mtp_patch import MTPRLPostprocess
from verl_mtp.trainer.ppo.mtp_occ import OCCState
from verl_mtp.workers.config import MtpRLConfig
from verl_mtp.workers.engine.megatron import mtp_engine_hooks
from verl_mtp.workers.engine.megatron.transformer_impl import MegatronMTPEngineWithLMHead


def bare_engine(hook: MTPRLPostprocess, mtp_cfg: MtpRLConfig, fmt: str = "thd") -> MegatronMTPEngineWithLMHead:
    engine = object.__new__(MegatronMTPEngineWithLMHead)
    engine.model_config = SimpleNamespace(mtp=mtp_cfg)
    engine.engine_config = SimpleNamespace(
        use_remove_padding=fmt == "thd",
        pad_to_length=False,
        pad_to_length_bucket=None,
        dynamic_context_parallel=False,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
    )
    engine.tf_config = SimpleNamespace(
        mtp_num_layers=hook.model.config.mtp_num_layers, calculate_per_token_loss=False
    )
    mtp_engine_hooks.init_mtp_state(engine)
    engine.mtp_state.occ_state = OCCState(mtp_cfg.occ)
    engine.mtp_state.rl_postprocess = {hook.model: hook}
    return engine
