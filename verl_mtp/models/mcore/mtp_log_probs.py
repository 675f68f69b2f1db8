"""The MTP heads' log-probs of their targets and top-1 agreement, from what the RL postprocess kept.

:func:`score_mtp_heads` scores every head's targets (:class:`~verl_mtp.models.mcore.mtp_patch.MTPRLOutput`),
either in chunks without materialising a head's full-vocabulary logits (``logprob_chunk_size > 0``,
:func:`~verl_mtp.models.mcore.token_scores.chunked_token_log_probs`) or through Megatron's output layer with the
same scoring on its fp32 logits (``logprob_chunk_size = 0``), under the main head's temperature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from verl_mtp.models.mcore.mtp_alignment import mtp_ce_key, mtp_output_keys
from verl_mtp.models.mcore.token_scores import chunked_token_log_probs, scores_from_logits

if TYPE_CHECKING:
    from verl_mtp.models.mcore.mtp_patch import MTPRLOutput

__all__ = ["mtp_token_log_probs", "score_mtp_heads"]


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
    the backward keeps only ``exp(logits - max)`` in the hidden states' dtype, never fp32 logits.
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
            gradient_accumulation_fusion=mtp_output.output_layer.gradient_accumulation_fusion,
        )
        return log_probs.t(), (top1 == labels_sb).t()
    # fp32 from here on, as the main head: Megatron's Float16Module hands verl fp32 logits to divide and score.
    # Scored as one [s*b, v] matrix, its gradient laid out as the output layer's: an [s, b, v] gradient with the
    # size-1 batch dimension outermost (what a temperature division on [s, b, v] produced) is a layout
    # torch.matmul cannot fold, and the layer's backward ran as a batched product against s copies of the weight.
    logits = mtp_output.head_logits(hidden, trainable_weight).float()  # a bf16 output is freed here
    log_probs, top1 = scores_from_logits(
        logits.view(-1, logits.shape[-1]), labels_sb.view(-1), temperature.t().reshape(-1)
    )
    return log_probs.view(labels_sb.shape).t(), (top1.view(labels_sb.shape) == labels_sb).t()


def score_mtp_heads(
    mtp_output: MTPRLOutput, head_labels: list[torch.Tensor], temperature: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every head's log-prob of its own targets, and top-1 agreement, in the model's packed order.

    ``head_labels[k-1]`` holds head ``k``'s targets (``x[i+k+1]`` at slot ``i``, see
    :func:`verl_mtp.models.mcore.mtp_head_labels.pack_head_labels`); ``temperature`` is the main head's
    ``[b, s]``.
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
