"""Patch of Megatron-Core ``GPTModel._postprocess`` that hands the MTP heads to the RL loss.

verl's own patch (``verl.models.mcore.mtp_patch``) turns the MTP heads into an auxiliary cross-entropy loss
injected with ``MTPLossAutoScaler``; that covers the ``detach`` and ``ce`` regimes and stays in charge of
them. For ``mtp_loss_type=rl`` this patch instead runs the MTP block, keeps each head's final hidden states
(with their autograd graph into the MTP layers and the trunk) in an :class:`MTPRLOutput`, and returns the
main logits exactly as verl does. The engine's logits processor then scores the sampled tokens with each head
through :func:`mtp_token_log_probs`, under the same temperature as the main head.

The head's hidden states are kept rather than logits so that no second full-vocabulary tensor is alive
before the logits processor needs it, and so that the temperature (known only to the processor) is applied
to the MTP logits exactly like the main ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from verl.models.mcore.mtp_patch import _get_patching_model
from verl.utils.megatron.tensor_parallel import vocab_parallel_log_probs_from_logits
from verl_mtp.models.mcore.mcore_compat import mtp_block_kwargs
from verl_mtp.models.mcore.mtp_alignment import mtp_ce_key, mtp_output_keys
from verl_mtp.models.mcore.mtp_log_probs import chunked_token_log_probs

__all__ = ["MTPRLOutput", "patch_postprocess_rl", "pop_mtp_rl_output", "mtp_token_log_probs", "score_mtp_heads"]

_OUTPUT_ATTR = "_verl_mtp_rl_output"


@dataclass
class MTPRLOutput:
    """What the patched postprocess leaves for the logits processor of the same micro-batch.

    ``hidden_states[k-1]`` is depth ``k``'s output, ``[s, b, h]`` in the model's (packed) sequence order.
    """

    hidden_states: tuple[torch.Tensor, ...]
    output_layer: torch.nn.Module
    output_weight: torch.Tensor | None
    runtime_gather_output: bool | None
    train_lm_head: bool
    logprob_chunk_size: int  # > 0: chunked log-probs, no full-vocabulary logits kept; 0: via the output layer
    # the heads re-run on detached trunk inputs (``detached_head_ce_coef > 0``), for their own CE loss
    detached_hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def num_heads(self) -> int:
        return len(self.hidden_states)

    def head_weight(self, trainable: bool) -> torch.Tensor:
        """The shared output-layer weight shard ``[V/tp, h]``, detached unless ``trainable``."""
        weight = self.output_weight if self.output_weight is not None else self.output_layer.weight
        return weight if trainable else weight.detach()

    def head_logits(self, hidden: torch.Tensor, trainable_weight: bool) -> torch.Tensor:
        """Logits ``[s, b, v/tp]`` of one head's hidden states through the shared output layer."""
        logits, _ = self.output_layer(
            hidden, weight=self.head_weight(trainable_weight), runtime_gather_output=self.runtime_gather_output
        )
        return logits


def mtp_token_log_probs(
    mtp_output: MTPRLOutput,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    trainable_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's log-probability of ``labels`` and whether its top-1 token equals them, both ``[b, s]``.

    ``hidden`` is the head's ``[s, b, h]`` output; ``labels`` and ``temperature`` are ``[b, s]`` in the same
    packed order as the main head's. Vocab-parallel (correct for TP > 1). Works in Megatron's ``[s, b]`` order
    so the full-vocabulary logits are never transposed into a contiguous copy; with ``logprob_chunk_size``
    they are not even kept for the backward pass.
    """
    labels_sb = labels.t().contiguous()
    weight = mtp_output.head_weight(trainable_weight)
    if mtp_output.logprob_chunk_size > 0:
        log_probs, top1 = chunked_token_log_probs(
            hidden,
            weight,
            labels_sb,
            temperature.t(),
            mtp_output.logprob_chunk_size,
            sequence_parallel=mtp_output.output_layer.sequence_parallel,
        )
        return log_probs.t(), (top1 == labels_sb).t()
    logits = mtp_output.head_logits(hidden, trainable_weight)
    logits = logits / temperature.t().unsqueeze(-1).to(logits.dtype)
    with torch.no_grad():  # before the cross-entropy, which rewrites its logits in place
        top1 = _vocab_parallel_argmax(logits)
    log_probs = vocab_parallel_log_probs_from_logits(logits, labels_sb)
    return log_probs.t(), (top1 == labels_sb).t()


def score_mtp_heads(
    mtp_output: MTPRLOutput, head_labels: list[torch.Tensor], temperature: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every head's log-prob of its own targets, and top-1 agreement, in the model's packed order.

    ``head_labels[k-1]`` holds head ``k``'s targets (``x[i+k+1]`` at slot ``i``, see
    :func:`verl_mtp.models.mcore.mtp_forward.pack_head_labels`); ``temperature`` is the main head's ``[b, s]``.
    """
    scored = {}
    for k in range(1, mtp_output.num_heads + 1):
        labels = head_labels[k - 1]
        log_probs, top1 = mtp_token_log_probs(
            mtp_output, mtp_output.hidden_states[k - 1], labels, temperature, mtp_output.train_lm_head
        )
        lp_key, _, top1_key = mtp_output_keys(k)
        scored[lp_key] = log_probs
        scored[top1_key] = top1.to(log_probs.dtype)
        if mtp_output.detached_hidden_states is not None:  # plain next-token CE, as Megatron's (T = 1)
            ce_log_probs, _ = mtp_token_log_probs(
                mtp_output, mtp_output.detached_hidden_states[k - 1], labels, torch.ones_like(temperature), False
            )
            scored[mtp_ce_key(k)] = ce_log_probs
    return scored


def _vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global argmax over a vocabulary split across tensor-parallel ranks."""
    from megatron.core import parallel_state as mpu

    tp = mpu.get_tensor_model_parallel_world_size()
    local_max, local_idx = logits.max(dim=-1)
    if tp == 1:
        return local_idx
    group = mpu.get_tensor_model_parallel_group()
    rank = mpu.get_tensor_model_parallel_rank()
    global_idx = local_idx + rank * logits.shape[-1]
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    idxs = [torch.empty_like(global_idx) for _ in range(tp)]
    torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
    torch.distributed.all_gather(idxs, global_idx.contiguous(), group=group)
    best = torch.stack(maxes).argmax(dim=0, keepdim=True)
    return torch.stack(idxs).gather(0, best).squeeze(0)


def pop_mtp_rl_output(model: torch.nn.Module) -> MTPRLOutput | None:
    """Take (and clear) what the last forward of ``model`` left; ``None`` when it ran no RL MTP heads."""
    gpt = _get_patching_model(model)
    if gpt is None:
        return None
    return gpt.__dict__.pop(_OUTPUT_ATTR, None)


def patch_postprocess_rl(
    model: torch.nn.Module,
    train_lm_head: bool = False,
    logprob_chunk_size: int = 0,
    detached_head_ce: bool = False,
) -> None:
    """Install the RL postprocess on ``model``'s GPTModel; the postprocess in place (verl's) stays as fallback.

    ``detached_head_ce`` re-runs the heads on detached trunk inputs so they can also get a cross-entropy loss
    that never reaches the trunk (see ``detached_head_ce_coef``). Raises when the model has no MTP layers:
    ``mtp_loss_type=rl`` would otherwise train nothing.
    """
    gpt = _get_patching_model(model)
    if gpt is None:
        raise TypeError(f"mtp_loss_type=rl needs a Megatron GPTModel, got {type(model).__name__}")
    if not gpt.config.mtp_num_layers:
        raise ValueError(
            "actor_rollout_ref.model.mtp.mtp_loss_type=rl but the model has no MTP layers "
            "(mtp_num_layers is 0/None): use a checkpoint with MTP heads (e.g. num_nextn_predict_layers > 0) "
            "or set mtp.enable=False."
        )
    if getattr(gpt, "_verl_mtp_fallback_postprocess", None) is None:
        gpt._verl_mtp_fallback_postprocess = gpt._postprocess
    output_layer = getattr(gpt, "output_layer", None)  # absent on pipeline stages other than the last
    if logprob_chunk_size > 0 and getattr(output_layer, "bias", None) is not None:
        raise NotImplementedError(
            "actor_rollout_ref.model.mtp.logprob_chunk_size > 0 needs an output layer without bias; set it to 0"
        )
    gpt._verl_mtp_train_lm_head = train_lm_head
    gpt._verl_mtp_logprob_chunk_size = logprob_chunk_size
    gpt._verl_mtp_detached_head_ce = detached_head_ce
    gpt._postprocess = _megatron_gptmodel_postprocess_rl.__get__(gpt, gpt.__class__)


class _DetachedEmbedding:
    """The model's embedding with its output cut from the graph: MTP inputs that train nothing upstream."""

    def __init__(self, embedding: torch.nn.Module):
        self.embedding = embedding

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.embedding(*args, **kwargs).detach()


def _megatron_gptmodel_postprocess_rl(
    self: GPTModel,
    hidden_states,
    input_ids,
    position_ids,
    labels,
    rotary_pos_emb,
    rotary_pos_cos,
    rotary_pos_sin,
    mtp_in_postprocess=None,
    loss_mask=None,
    decoder_input=None,
    attention_mask=None,
    inference_params=None,
    packed_seq_params=None,
    sequence_len_offset=None,
    runtime_gather_output=None,
    extra_block_kwargs=None,
    inference_context=None,
    **newer_kwargs,
):
    """Main logits as verl computes them; MTP head hidden states stashed for the RL loss.

    Without gradient (verl's ``compute_log_prob``) or without labels, the MTP heads are not needed: the
    fallback postprocess runs with ``labels=None`` and returns the main logits only.
    """
    if labels is None or not torch.is_grad_enabled():
        return self._verl_mtp_fallback_postprocess(
            hidden_states=hidden_states,
            input_ids=input_ids,
            position_ids=position_ids,
            labels=None,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            mtp_in_postprocess=False,
            loss_mask=loss_mask,
            decoder_input=decoder_input,
            attention_mask=attention_mask,
            inference_params=inference_params,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
            runtime_gather_output=runtime_gather_output,
            extra_block_kwargs=extra_block_kwargs,
            inference_context=inference_context,
            **newer_kwargs,
        )
    if newer_kwargs.get("output_processor") is not None:
        raise NotImplementedError("mtp_loss_type=rl does not support Megatron's output_processor hook")

    detached_chunks = None
    if mtp_in_postprocess:
        optional = mtp_block_kwargs(
            self.mtp,
            {"padding_mask": newer_kwargs.get("padding_mask"), "mhc_multistream": newer_kwargs.get("mhc_multistream")},
        )
        run_mtp = partial(
            self.mtp,
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            inference_params=inference_params,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
            **optional,
            **(extra_block_kwargs or {}),
        )
        trunk_hidden = hidden_states
        hidden_states = run_mtp(hidden_states=trunk_hidden, embedding=self.embedding)
        if self._verl_mtp_detached_head_ce:
            detached = run_mtp(hidden_states=trunk_hidden.detach(), embedding=_DetachedEmbedding(self.embedding))
            detached_chunks = tuple(torch.chunk(detached, 1 + self.config.mtp_num_layers, dim=0)[1:])
    elif self._verl_mtp_detached_head_ce:
        raise NotImplementedError("detached_head_ce_coef > 0 needs the MTP block in the postprocess stage")
    if not self.post_process:
        return hidden_states

    output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
    chunks = torch.chunk(hidden_states, 1 + self.config.mtp_num_layers, dim=0)
    self.__dict__[_OUTPUT_ATTR] = MTPRLOutput(
        hidden_states=tuple(chunks[1:]),
        output_layer=self.output_layer,
        output_weight=output_weight,
        runtime_gather_output=runtime_gather_output,
        train_lm_head=self._verl_mtp_train_lm_head,
        logprob_chunk_size=self._verl_mtp_logprob_chunk_size,
        detached_hidden_states=detached_chunks,
    )
    logits, _ = self.output_layer(chunks[0], weight=output_weight, runtime_gather_output=runtime_gather_output)
    return logits.transpose(0, 1).contiguous()
