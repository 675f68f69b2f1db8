"""verl's Megatron LM engine with the MTP heads wired into the RL loss (``mtp_loss_type=rl``).

For every other setting this engine is verl's ``MegatronEngineWithLMHead`` unchanged. With ``rl`` it:

1. installs the RL postprocess (:mod:`verl_mtp.models.mcore.mtp_patch`) after verl's own MTP patch;
2. in the logits processor, scores each head's targets (``x[i+k+1]``, packed by verl's own packing like the
   main labels) under the main head's temperature, so verl unpacks the per-head log-probs exactly like the
   main ones (TP padding, context-parallel gather);
3. shifts the unpacked per-head outputs right by ``k`` onto the main head's positions, with a valid mask;
4. adds the OCC-scaled MTP policy term to verl's actor loss.
"""

from __future__ import annotations

import json
import os

import torch

from verl.utils import tensordict_utils as tu
from verl.utils.megatron_utils import unwrap_model
from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead
from verl_mtp.models.mcore.mcore_compat import adapt_mbridge_mtp_names, keep_mtp_ce_off_lm_head
from verl_mtp.models.mcore.mtp_alignment import align_mtp_outputs
from verl_mtp.models.mcore.mtp_forward import pack_head_labels
from verl_mtp.models.mcore.mtp_patch import patch_postprocess_rl, pop_mtp_rl_output, score_mtp_heads
from verl_mtp.trainer.ppo.mtp_occ import OCCState
from verl_mtp.workers.config.mtp import MtpRLConfig
from verl_mtp.workers.utils.losses import with_mtp_policy_loss

__all__ = ["MegatronMTPEngineWithLMHead"]


class MegatronMTPEngineWithLMHead(MegatronEngineWithLMHead):
    @property
    def mtp_rl(self) -> bool:
        mtp = self.model_config.mtp
        return isinstance(mtp, MtpRLConfig) and mtp.is_rl

    def initialize(self):
        self._check_mtp_rl_layout()
        super().initialize()
        if self.mtp_rl:
            self.occ_state = OCCState(self.model_config.mtp.occ)
            for module in self.module:
                patch_postprocess_rl(
                    module,
                    train_lm_head=self.model_config.mtp.train_lm_head,
                    logprob_chunk_size=self.model_config.mtp.logprob_chunk_size,
                    detached_head_ce=self.model_config.mtp.detached_head_ce_coef > 0,
                )
        elif self.model_config.mtp.enable:  # verl's MTP cross-entropy (detach / ce) must not train the lm_head
            for module in self.module:
                keep_mtp_ce_off_lm_head(module)

    def _build_tf_config(self):
        super()._build_tf_config()
        if getattr(self, "bridge", None) is not None:  # before verl loads the weights through it
            adapt_mbridge_mtp_names(self.bridge)

    def _check_mtp_rl_layout(self):
        if not self.mtp_rl:
            return
        cfg = self.engine_config
        unsupported = {
            "context_parallel_size > 1": cfg.context_parallel_size > 1,
            "dynamic_context_parallel": bool(getattr(cfg, "dynamic_context_parallel", False)),
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise NotImplementedError(
                f"actor_rollout_ref.model.mtp.mtp_loss_type=rl does not support {', '.join(bad)} yet "
                "(actor.megatron.*): the per-head targets and alignment are context-parallel aware, but Megatron's "
                "MTP block under context parallelism is not verified; switch it off or use mtp_loss_type=detach. "
                "See docs/mtp_rl.md."
            )

    def forward_step(self, batch_iter, model, logits_processor_func, postprocess_micro_batch_func):
        # The logits processor needs the model that just ran, to collect its MTP heads' hidden states.
        self._mtp_model = model
        return super().forward_step(batch_iter, model, logits_processor_func, postprocess_micro_batch_func)

    def _lm_head_logits_processor(self, logits, label, temperature, *, batch, data_format, **kwargs):
        ret = super()._lm_head_logits_processor(
            logits, label, temperature, batch=batch, data_format=data_format, **kwargs
        )
        mtp_output = pop_mtp_rl_output(self._mtp_model) if self.mtp_rl else None
        if mtp_output is None:
            return ret
        head_labels = pack_head_labels(batch["input_ids"], mtp_output.num_heads, data_format, **self._packing(batch))
        ret.update(score_mtp_heads(mtp_output, [t.view_as(label) for t in head_labels], temperature))
        return ret

    def _packing(self, batch) -> dict:
        """The packing arguments verl's forward_step gives its own labels for this micro-batch."""
        gpt = unwrap_model(self._mtp_model)
        cfg = self.engine_config
        return {
            "use_fp8_padding": gpt.config.fp8 in ["e4m3", "hybrid"],
            "local_cp_size": tu.get_non_tensor_data(data=batch, key="local_cp_size", default=None),
            "pad_to_length_bucket": cfg.pad_to_length_bucket if cfg.pad_to_length and cfg.use_remove_padding else None,
            "cp_layout": self._get_context_parallel_layout(gpt),
            "forced_max_seqlen": tu.get_non_tensor_data(data=batch, key="forced_max_seqlen", default=None),
        }

    def prepare_model_outputs(self, output: dict, data):
        output = super().prepare_model_outputs(output, data)
        return align_mtp_outputs(output) if self.mtp_rl else output

    def _occ_state_path(self, local_path: str) -> str:
        return os.path.join(local_path, f"mtp_occ_state_rank{torch.distributed.get_rank()}.json")

    def save_checkpoint(self, local_path: str, *args, **kwargs) -> None:
        """verl's checkpoint (MTP weights are part of the Megatron model state) plus this rank's OCC state."""
        super().save_checkpoint(local_path, *args, **kwargs)
        if self.mtp_rl:
            os.makedirs(local_path, exist_ok=True)
            with open(self._occ_state_path(local_path), "w") as f:
                json.dump(self.occ_state.state_dict(), f)

    def load_checkpoint(self, local_path: str, *args, **kwargs) -> None:
        occ_path = self._occ_state_path(local_path) if self.mtp_rl else None
        if occ_path and os.path.exists(occ_path):  # read first: verl may delete the local copy after loading
            with open(occ_path) as f:
                self.occ_state.load_state_dict(json.load(f))
        super().load_checkpoint(local_path, *args, **kwargs)

    def postprocess_micro_batch_func(self, output, data, forward_only: bool, loss_function, local_cp_size=None):
        if self.mtp_rl and loss_function is not None and not forward_only:
            loss_function = with_mtp_policy_loss(loss_function, self.model_config.mtp, self.occ_state)
        return super().postprocess_micro_batch_func(
            output, data, forward_only=forward_only, loss_function=loss_function, local_cp_size=local_cp_size
        )
