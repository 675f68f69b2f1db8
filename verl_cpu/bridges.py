"""mbridge bridges that build Megatron-Core's *local* (non-TransformerEngine) layer spec, for CPU.

Blocker this removes: mbridge 0.15.1 ``LLMBridge._get_transformer_layer_spec`` and
``MimoBridge._get_gptmodel_args`` hard-code ``use_transformer_engine=True``;
TransformerEngine needs CUDA. The local spec keeps the layer norms as separate modules, so the HF name
mapping gains two entries (``input_layernorm.weight``, ``pre_mlp_layernorm.weight``) in place of TE's fused
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``.

Second blocker: mbridge 0.15.1 ``mbridge.core.util.get_model`` moves every chunk with
``model_module.cuda(torch.cuda.current_device())`` ("RuntimeError: Invalid device, must be cuda device"), so
:meth:`CPUBridge.get_model` builds the chunks itself: provider -> Float16Module (bf16/fp16) -> Megatron DDP,
on CPU, no pipeline/virtual-pipeline stages (tensor and data parallelism only).

:data:`verl_cpu.patches.MBRIDGE_BRIDGES` puts them in mbridge's registry (``mbridge.core.bridge._MODEL_REGISTRY``,
where ``register_model`` writes) in place of the entries for qwen2, llama, qwen3 and mimo, when the CPU platform
is active (:mod:`verl_cpu.plugin`). The GPU check puts the same local-spec bridges there with ``on_cpu=False``
(:data:`verl_cpu.patches.MBRIDGE_BRIDGES_ON_GPU`) on a GPU machine without TransformerEngine: mbridge's own
model building (on CUDA) is kept, only the layer spec and the core attention change.
"""

from __future__ import annotations

from typing import Optional


def _local_spec(config, vp_stage=None):
    """Megatron's local decoder block spec with :class:`CPUCoreAttention` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from verl_cpu.attention import CPUCoreAttention

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization,
                                       vp_stage=vp_stage)
    for layer_spec in block.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = CPUCoreAttention
    return block


def _build_cpu_chunk(bridge, wrap_with_ddp: bool, half: bool, ddp_config, post_model_creation_callbacks,
                     extra_provider_args, kwargs: dict):
    """The one model chunk, on CPU: provider -> Float16Module (bf16/fp16) -> Megatron DDP (see module doc)."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    if mpu.get_pipeline_model_parallel_world_size() != 1 or bridge.mpu.vpp_size not in (None, 1):
        raise NotImplementedError("CPU bridge: pipeline / virtual pipeline parallelism is not supported")
    unsupported = {k: v for k, v in kwargs.items() if v and k in ("use_torch_fsdp2", "use_custom_fsdp",
                                                                 "init_model_with_meta_device")}
    if unsupported:
        raise NotImplementedError(f"CPU bridge: {unsupported} not supported")
    provider = bridge._model_provider(list(post_model_creation_callbacks), **(extra_provider_args or {}))
    model = provider(pre_process=True, post_process=True)
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    if half:
        model = Float16Module(model.config, model)
    if wrap_with_ddp:
        ddp_kwargs = {"grad_reduce_in_fp32": True, "use_distributed_optimizer": True, **(ddp_config or {})}
        cfg = DistributedDataParallelConfig(**ddp_kwargs)
        if not cfg.overlap_grad_reduce:
            cfg.bucket_size = None
        inner = model.module if isinstance(model, Float16Module) else model
        model = DistributedDataParallel(config=inner.config, ddp_config=cfg, module=model)
    return model


def make_cpu_bridge(base: type, on_cpu: bool = True) -> type:
    """Subclass of mbridge bridge ``base`` that builds the local spec (and a local MTP block spec); ``on_cpu``:
    it also builds the model on CPU (:func:`_build_cpu_chunk`) instead of mbridge's ``get_model`` (CUDA)."""

    class CPUBridge(base):
        _ATTENTION_MAPPING = {  # MimoBridge routes MTP inner-layer names straight to the attention mapping
            **base._ATTENTION_MAPPING,
            "input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"],
        }
        _MLP_MAPPING = {
            "pre_mlp_layernorm.weight": ["model.layers.{layer_number}.post_attention_layernorm.weight"],
            **base._MLP_MAPPING,
        }
        _OTHER_MAPPING = {
            "input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"],
            **getattr(base, "_OTHER_MAPPING", {}),
        }

        def _get_transformer_layer_spec(self, vp_stage: Optional[int] = None):
            self.has_vp_stage = True
            return _local_spec(self.config, vp_stage)

        def _get_gptmodel_args(self) -> dict:
            from mbridge.core import LLMBridge

            if getattr(self.config, "mtp_num_layers", None):
                # mbridge 0.15.1 MimoBridge._get_gptmodel_args builds a TE MTP spec: skip it
                ret = LLMBridge._get_gptmodel_args(self)
                ret["mtp_block_spec"] = None
            else:
                ret = super()._get_gptmodel_args()
            if "mtp_block_spec" in ret:
                from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

                # MTP inner layer: the local decoder layer spec (MiMo's MTP layer is a plain decoder layer).
                layer_spec = _local_spec(self.config).layer_specs[-1]
                ret["mtp_block_spec"] = get_gpt_mtp_block_spec(self.config, layer_spec, use_transformer_engine=False)
            return ret

        def get_model(self, weight_path=None, wrap_with_ddp=True, fp16=False, bf16=True, ddp_config=None,
                      post_model_creation_callbacks=(), extra_provider_args=None, **kwargs):
            if not on_cpu:
                return super().get_model(
                    weight_path=weight_path, wrap_with_ddp=wrap_with_ddp, fp16=fp16, bf16=bf16, ddp_config=ddp_config,
                    post_model_creation_callbacks=post_model_creation_callbacks,
                    extra_provider_args=extra_provider_args, **kwargs,
                )
            chunks = [_build_cpu_chunk(self, wrap_with_ddp, fp16 or bf16, ddp_config, post_model_creation_callbacks,
                                       extra_provider_args, kwargs)]
            if weight_path:
                self.load_weights(chunks, self._get_actual_hf_path(weight_path))
            return chunks

    CPUBridge.__name__ = CPUBridge.__qualname__ = f"CPU{base.__name__}"
    return CPUBridge
