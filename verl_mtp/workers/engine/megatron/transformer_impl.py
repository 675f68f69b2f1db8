"""verl's Megatron LM engine with the MTP regimes of ``actor_rollout_ref.model.mtp.mtp_loss_type``.

Importing this module registers the engine in verl's ``EngineRegistry`` in place of verl's
``MegatronEngineWithLMHead`` (as verl's own engines register on import). It hands verl the regime's values of
verl's ``enable_train`` / ``detach_encoder`` (verl reads them when it patches the model and in every
``forward_step``), and for a regime trained by the policy loss (``rl``) it:

1. installs one RL postprocess per model chunk (:mod:`verl_mtp.models.mcore.mtp_patch`) after verl's own
   MTP patch, keeping the chunk -> postprocess map;
2. in the logits processor, scores each head's targets (``x[i+k+1]``, packed by verl's own packing like the
   main labels) under the main head's temperature, so verl unpacks the per-head log-probs exactly like the
   main ones (TP padding, context-parallel gather);
3. shifts the unpacked per-head outputs right by ``k`` onto the main head's positions, with a valid mask;
4. adds the OCC-scaled MTP policy term to verl's actor loss;
5. with ``occ.estimator=gradient`` (every update) or ``occ.diagnose_every=N`` (every N-th), runs the gradient
   estimator (:mod:`verl_mtp.trainer.ppo.mtp_occ_gradient`) before the update: the mini-batch's forward/backward
   once with the RL loss alone and once per head with that head's unit-coefficient MTP loss, through Megatron's
   pipeline schedule like the update itself, then the update with the estimator's lambdas (``gradient``) or
   the proxy's (diagnostics only).

On every megatron-core version it keeps verl's own MTP cross-entropy (``detach``, ``ce``, any MTP model not
in ``rl``) off the lm_head, as verl does on 0.16, and lets verl's mbridge load MTP weights under 0.17+'s
names (:mod:`verl_mtp.models.mcore.mcore_compat`). Otherwise, without a regime (``mtp_loss_type=null``), it
is verl's engine unchanged.
"""

from __future__ import annotations

import json
import os

import torch

from verl.utils import tensordict_utils as tu
from verl.utils.megatron_utils import unwrap_model
from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead
from verl_mtp.models.mcore.mcore_compat import (
    adapt_mbridge_mtp_names,
    keep_mtp_ce_off_lm_head,
    let_mtp_layers_recompute,
)
from verl_mtp.models.mcore.mtp_alignment import align_mtp_outputs
from verl_mtp.models.mcore.mtp_head_labels import pack_head_labels
from verl_mtp.models.mcore.mtp_log_probs import score_mtp_heads
from verl_mtp.models.mcore.mtp_patch import MTPRLPostprocess
from verl_mtp.trainer.ppo.mtp_occ import OCCState
from verl_mtp.trainer.ppo.mtp_occ_gradient import (
    GradientSnapshot,
    gradient_occ,
    gradient_occ_metrics,
    head_products,
    proxy_lambda_metrics,
    shared_trunk_parameters,
)
from verl_mtp.workers.config.mtp import MtpRLConfig, check_megatron_mtp_settings
from verl_mtp.workers.engine.registry import replace_engine
from verl_mtp.workers.utils.losses import mtp_head_only_loss, with_mtp_policy_loss

__all__ = ["MegatronMTPEngineWithLMHead"]


class MegatronMTPEngineWithLMHead(MegatronEngineWithLMHead):
    def __init__(self, model_config, *args, **kwargs):
        if isinstance(model_config.mtp, MtpRLConfig):  # before verl reads enable_train / detach_encoder
            model_config.mtp = model_config.mtp.with_regime_switches()
        super().__init__(model_config, *args, **kwargs)
        self.rl_postprocess: dict[torch.nn.Module, MTPRLPostprocess] = {}
        self.mtp_updates = 0  # mini-batch updates so far (the gradient estimator's cadence)
        self._mtp_loss_mode = None  # None: the full loss; "rl": the RL loss alone; k: head k's MTP loss alone
        self._mtp_coefficients = None  # the gradient estimator's lambdas for the update in progress

    @property
    def mtp_rl(self) -> bool:
        mtp = self.model_config.mtp
        return isinstance(mtp, MtpRLConfig) and mtp.is_rl

    def initialize(self):
        self._check_mtp_rl_layout()
        super().initialize()
        if isinstance(self.model_config.mtp, MtpRLConfig):
            for chunk in self.module:
                check_megatron_mtp_settings(self.model_config.mtp, unwrap_model(chunk).config)
        if self.model_config.mtp.enable:
            for chunk in self.module:
                let_mtp_layers_recompute(chunk)
        if self.mtp_rl:
            mtp = self.model_config.mtp
            self._check_gradient_estimator_layout()
            self.occ_state = OCCState(mtp.occ)
            for chunk in self.module:
                self.rl_postprocess[chunk] = MTPRLPostprocess(
                    train_lm_head=mtp.train_lm_head,
                    logprob_chunk_size=mtp.logprob_chunk_size,
                    detached_head_ce=mtp.detached_head_ce_coef > 0,
                ).patch(chunk)
        elif self.model_config.mtp.enable:  # verl's MTP cross-entropy (detach / ce) must not train the lm_head
            for chunk in self.module:
                keep_mtp_ce_off_lm_head(chunk)

    def _build_tf_config(self):
        super()._build_tf_config()
        if getattr(self, "bridge", None) is not None:  # before verl loads the weights through it
            adapt_mbridge_mtp_names(self.bridge)

    def _check_mtp_rl_layout(self):
        """Refuse, before anything is built, the layouts whose MTP inputs would be rolled wrongly.

        Static context parallelism works: Megatron's MTP block rolls its inputs across the CP ranks' zig-zag
        chunks with the padded packed offsets verl passes, and the head targets are packed by verl itself.
        Dynamic CP regroups ranks per micro-batch, but the MTP block rolls over the static CP group.
        """
        if not self.mtp_rl:
            return
        if bool(getattr(self.engine_config, "dynamic_context_parallel", False)):
            raise NotImplementedError(
                "actor_rollout_ref.model.mtp.mtp_loss_type=rl does not support "
                "actor_rollout_ref.actor.megatron.dynamic_context_parallel=True: Megatron's MTP block rolls its "
                "inputs over the static context-parallel group, not the per-micro-batch dynamic groups, so the "
                "heads would see wrong tokens. Use dynamic_context_parallel=False with context_parallel_size > 1 "
                "(supported), or mtp_loss_type=detach. See docs/mtp_rl.md."
            )

    def _check_gradient_estimator_layout(self):
        """The estimator reads whole DP-averaged gradients; the distributed optimizer keeps only a shard of them."""
        occ = self.model_config.mtp.occ
        if occ.needs_gradients and self.engine_config.use_distributed_optimizer and self.get_data_parallel_size() > 1:
            raise ValueError(
                "actor_rollout_ref.model.mtp.occ.estimator=gradient / occ.diagnose_every > 0 read whole "
                "data-parallel-averaged gradients, which Megatron's distributed optimizer shards over the "
                f"{self.get_data_parallel_size()} data-parallel ranks: set "
                "actor_rollout_ref.actor.megatron.use_distributed_optimizer=False, or use occ.estimator=proxy "
                "with occ.diagnose_every=0."
            )

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        """verl's, preceded on the gradient estimator's updates by its passes (see the module docstring)."""
        if forward_only or loss_function is None or not self.mtp_rl:
            return super().forward_backward_batch(data, loss_function, forward_only=forward_only)
        occ = self.model_config.mtp.occ
        self.mtp_updates += 1
        diagnose = occ.diagnose_every > 0 and self.mtp_updates % occ.diagnose_every == 0
        if occ.estimator != "gradient" and not diagnose:
            return super().forward_backward_batch(data, loss_function)
        stats = self._gradient_occ(data, loss_function)
        lam, nonfinite = stats.lambdas(occ.lambda_plus_gradient, occ.eps, occ.max_abs_lambda)
        self._mtp_coefficients = lam if occ.estimator == "gradient" else None
        try:
            output = super().forward_backward_batch(data, loss_function)
        finally:
            self._mtp_coefficients = None
        if "metrics" in output:
            metrics = output["metrics"]
            metrics.update(proxy_lambda_metrics(metrics, self.tf_config.mtp_num_layers, occ.lambda_plus, occ.eps))
            metrics.update(gradient_occ_metrics(stats, lam, nonfinite))  # one per update, as verl merges them
        return output

    def _gradient_occ(self, data, loss_function):
        """The gradient estimator's statistics for this mini-batch; leaves the gradients zeroed."""
        mtp = self.model_config.mtp
        params = shared_trunk_parameters([unwrap_model(chunk) for chunk in self.module], mtp.train_lm_head)
        per_head = []
        try:
            self._mtp_loss_mode = "rl"
            self.optimizer_zero_grad()
            super().forward_backward_batch(data, loss_function)
            rl = GradientSnapshot.take(params)
            for k in range(1, self.tf_config.mtp_num_layers + 1):
                self._mtp_loss_mode = k
                self.optimizer_zero_grad()
                super().forward_backward_batch(data, loss_function)
                per_head.append(head_products(rl, params))
        finally:
            self._mtp_loss_mode = None
            self.optimizer_zero_grad()
        return gradient_occ(per_head)

    def _pop_mtp_output(self):
        """The postprocess that ran the heads in this micro-batch's forward and its output, else ``(None, None)``.

        Only the chunk that holds the output layer (``post_process``) leaves an output, and its logits
        processor runs before the next forward.
        """
        for postprocess in self.rl_postprocess.values():
            output = postprocess.pop_output()
            if output is not None:
                return postprocess, output
        return None, None

    def _lm_head_logits_processor(self, logits, label, temperature, *, batch, data_format, **kwargs):
        ret = super()._lm_head_logits_processor(
            logits, label, temperature, batch=batch, data_format=data_format, **kwargs
        )
        postprocess, mtp_output = self._pop_mtp_output()
        if mtp_output is None:
            return ret
        packing = self._packing(batch, postprocess.model)
        head_labels = pack_head_labels(batch["input_ids"], mtp_output.num_heads, data_format, **packing)
        ret.update(score_mtp_heads(mtp_output, [t.view_as(label) for t in head_labels], temperature))
        return ret

    def _packing(self, batch, gpt) -> dict:
        """The packing arguments verl's forward_step gives its own labels for this micro-batch."""
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
        """This rank's OCC state, then verl's checkpoint (MTP weights are part of the Megatron model state).

        The OCC state goes first: verl's checkpoint manager uploads ``local_path`` to ``hdfs_path``
        (``trainer.default_hdfs_dir``) at the end of its own save, and the state must be in that copy.
        """
        if self.mtp_rl:
            os.makedirs(local_path, exist_ok=True)
            with open(self._occ_state_path(local_path), "w") as f:
                json.dump(self.occ_state.state_dict(), f)
        super().save_checkpoint(local_path, *args, **kwargs)

    def load_checkpoint(self, local_path: str, *args, **kwargs) -> None:
        occ_path = self._occ_state_path(local_path) if self.mtp_rl else None
        if occ_path and os.path.exists(occ_path):  # read first: verl may delete the local copy after loading
            with open(occ_path) as f:
                self.occ_state.load_state_dict(json.load(f))
        super().load_checkpoint(local_path, *args, **kwargs)

    def postprocess_micro_batch_func(self, output, data, forward_only: bool, loss_function, local_cp_size=None):
        if self.mtp_rl and loss_function is not None and not forward_only:
            loss_function = self._mtp_loss(loss_function)
        return super().postprocess_micro_batch_func(
            output, data, forward_only=forward_only, loss_function=loss_function, local_cp_size=local_cp_size
        )

    def _mtp_loss(self, loss_function):
        """verl's actor loss as the current pass needs it (see ``_mtp_loss_mode``)."""
        mode, mtp = self._mtp_loss_mode, self.model_config.mtp
        if mode == "rl":
            return loss_function
        if mode is not None:
            return mtp_head_only_loss(loss_function, mtp, mode)
        return with_mtp_policy_loss(loss_function, mtp, self.occ_state, self._mtp_coefficients)


replace_engine(MegatronEngineWithLMHead, MegatronMTPEngineWithLMHead)
