"""One actor micro-batch through the engine with the MTP hooks on a real tiny GPTModel, without verl's worker.

:func:`prepared_engine` does to the model what the engine's ``initialize`` does (its ``_maybe_enable_fused_kernels``,
verl's MTP patch, the regime's patches, the fused main-head capture), on an engine made without ``__init__`` (as
verl's own unit tests make one) that holds only what one micro-batch reads. :func:`micro_batch` then runs what
the engine runs for it: verl's model-engine forward (THD packing or BSHD), the engine's logits processor, verl's
unpacking, ``postprocess_micro_batch_func`` around verl's ``ppo_loss`` and the backward.
"""

from __future__ import annotations

import contextlib
import io
from functools import partial
from types import SimpleNamespace

import torch
from megatron.core import parallel_state
from verl_cpu.testing import make_actor_batch, prepare_mtp_loss_tracker

from verl.models.mcore.model_forward import gptmodel_forward_model_engine
from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F
from verl.utils.megatron_utils import patch_engine_mtp
from verl_mtp.workers.engine.megatron import mtp_engine_hooks as hooks
from verl_mtp.workers.engine.megatron.transformer_impl import MegatronMTPEngineWithLMHead

PROMPTS, RESPONSES = [3, 6, 2, 5], [4, 5, 7, 2]  # lengths 7, 11, 9, 7
TEMPERATURES = [0.7, 1.0, 1.3, 0.9]


def actor_batch(vocab_size: int):
    """verl's no-padding actor micro-batch of 4 sequences with per-sequence temperatures."""
    data = make_actor_batch(PROMPTS, RESPONSES, vocab_size=vocab_size, seed=5)
    data["temperature"] = torch.tensor(TEMPERATURES)
    tu.assign_non_tensor(data, num_micro_batch=1)
    return data


def prepared_engine(model, mtp_config, fmt: str, use_fused_kernels: bool) -> MegatronMTPEngineWithLMHead:
    """The engine after ``initialize`` on ``model`` (``actor_rollout_ref.model.use_fused_kernels`` as
    given), holding only what a micro-batch reads."""
    engine = object.__new__(MegatronMTPEngineWithLMHead)
    engine.model_config = SimpleNamespace(mtp=mtp_config)
    hooks.init_mtp_state(engine)
    engine.engine_config = SimpleNamespace(
        use_fused_kernels=use_fused_kernels,
        use_remove_padding=fmt == "thd",
        pad_to_length=False,
        pad_to_length_bucket=None,
        dynamic_context_parallel=False,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        use_distributed_optimizer=False,
        entropy_from_logits_with_chunking=False,  # verl's default
    )
    engine.module, engine.is_value_model = [model], False
    engine.tf_config = SimpleNamespace(mtp_num_layers=model.config.mtp_num_layers, calculate_per_token_loss=False)
    engine._maybe_enable_fused_kernels()
    with contextlib.redirect_stdout(io.StringIO()):  # verl's patch prints the whole model
        patch_engine_mtp(engine.module, engine.model_config)
    hooks.install_mtp_rl(engine)
    hooks.install_fused_main_head(engine)
    return engine


def micro_batch(engine, data, fmt: str, loss_fn=None, *, entropy: bool, sum_pi_squared: bool = False):
    """Forward (and, with ``loss_fn``, loss and backward) of one micro-batch: ``(output, logits_widths)``.

    ``output`` is what ``postprocess_micro_batch_func`` returns (``loss``, ``metrics``, ``model_output``);
    ``logits_widths`` the last dimension of every logits tensor verl's forward handed the logits processor.
    """
    model = engine.module[0]
    prepare_mtp_loss_tracker(model.config.mtp_num_layers)
    widths = []

    def processor(logits, **kwargs):
        widths.append(logits.shape[-1])
        return engine._lm_head_logits_processor(logits, **kwargs)

    input_ids, loss_mask = data["input_ids"], data["loss_mask"].to(bool)
    args = {
        "label": input_ids.clone(),
        "temperature": verl_F.expand_as_nested(data["temperature"].float(), input_ids),
        "loss_mask": loss_mask,
        "response_attention_mask": data["attention_mask"][:, -loss_mask.shape[-1] :],
    }
    processor_kwargs = dict(
        calculate_sum_pi_squared=sum_pi_squared, calculate_entropy=entropy, distillation_use_topk=False,
        distillation_only=False, logits_processor_func=None, batch=data, data_format=fmt,
    )
    output = gptmodel_forward_model_engine(
        model, input_ids, {}, logits_processor=partial(processor, **processor_kwargs), logits_processor_args=args,
        pad_token_id=0, data_format=fmt, mtp_enable_train=True,
    )
    loss, out = engine.postprocess_micro_batch_func(
        output, data, forward_only=loss_fn is None, loss_function=loss_fn
    )
    if loss_fn is not None:
        loss.backward()
    return out, widths


def flat_outputs(out: dict) -> dict[str, torch.Tensor]:
    """Each model output of ``postprocess_micro_batch_func`` as one flat tensor (sequences concatenated)."""
    outputs = out["model_output"].items()
    return {key: torch.cat([t.detach().reshape(-1) for t in value.unbind()]) for key, value in outputs}


def param_grads(model) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}
