"""verl's Megatron LM engine with the MTP regimes of ``actor_rollout_ref.model.mtp.mtp_loss_type``.

Importing this module registers the engine in verl's ``EngineRegistry`` in place of verl's
``MegatronEngineWithLMHead`` (as verl's own engines register on import). Each method adds one call of
:mod:`verl_mtp.workers.engine.megatron.mtp_engine_hooks` to verl's, where the behaviour is described; the
upstream form of this project makes the same calls in verl's class itself, so this class holds nothing else.
Without a regime (``mtp_loss_type=null``) it is verl's engine unchanged.
"""

from __future__ import annotations

from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead
from verl_mtp.workers.engine.megatron import mtp_engine_hooks
from verl_mtp.workers.engine.registry import replace_engine

__all__ = ["MegatronMTPEngineWithLMHead"]


class MegatronMTPEngineWithLMHead(MegatronEngineWithLMHead):
    def __init__(self, model_config, *args, **kwargs):
        super().__init__(model_config, *args, **kwargs)
        mtp_engine_hooks.init_mtp_state(self)

    def initialize(self):
        mtp_engine_hooks.check_mtp_rl_layout(self)
        super().initialize()
        mtp_engine_hooks.install_mtp_rl(self)
        mtp_engine_hooks.install_fused_main_head(self)

    def _maybe_enable_fused_kernels(self):
        if mtp_engine_hooks.enable_fused_main_head(self):
            return
        return super()._maybe_enable_fused_kernels()

    def _build_tf_config(self):
        super()._build_tf_config()
        mtp_engine_hooks.adapt_bridge(self)

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        run = super().forward_backward_batch
        return mtp_engine_hooks.forward_backward_batch(self, run, data, loss_function, forward_only)

    def save_checkpoint(self, local_path: str, *args, **kwargs) -> None:
        mtp_engine_hooks.save_occ_state(self, local_path)
        super().save_checkpoint(local_path, *args, **kwargs)

    def load_checkpoint(self, local_path: str, *args, **kwargs) -> None:
        mtp_engine_hooks.load_occ_state(self, local_path)
        super().load_checkpoint(local_path, *args, **kwargs)

    def _lm_head_logits_processor(
        self,
        logits,
        label,
        temperature,
        *,
        calculate_sum_pi_squared: bool,
        calculate_entropy: bool,
        distillation_use_topk: bool,
        distillation_only: bool,
        logits_processor_func,
        batch,
        data_format: str,
    ):
        if mtp_engine_hooks.scores_main_head_fused(self):
            return mtp_engine_hooks.fused_lm_head_logits_processor(
                self,
                label,
                temperature,
                batch,
                data_format,
                calculate_sum_pi_squared=calculate_sum_pi_squared,
                calculate_entropy=calculate_entropy,
                distillation_use_topk=distillation_use_topk,
                distillation_only=distillation_only,
                logits_processor_func=logits_processor_func,
            )
        ret = super()._lm_head_logits_processor(
            logits,
            label,
            temperature,
            calculate_sum_pi_squared=calculate_sum_pi_squared,
            calculate_entropy=calculate_entropy,
            distillation_use_topk=distillation_use_topk,
            distillation_only=distillation_only,
            logits_processor_func=logits_processor_func,
            batch=batch,
            data_format=data_format,
        )
        mtp_engine_hooks.add_mtp_head_scores(self, ret, label, temperature, batch, data_format)
        return ret

    def prepare_model_outputs(self, output: dict, data):
        output = super().prepare_model_outputs(output, data)
        output = mtp_engine_hooks.align_outputs(self, output)
        return output

    def postprocess_micro_batch_func(self, output, data, forward_only: bool, loss_function, local_cp_size=None):
        loss_function = mtp_engine_hooks.mtp_loss_function(self, loss_function, forward_only)
        return super().postprocess_micro_batch_func(
            output, data, forward_only=forward_only, loss_function=loss_function, local_cp_size=local_cp_size
        )


replace_engine(MegatronEngineWithLMHead, MegatronMTPEngineWithLMHead)
