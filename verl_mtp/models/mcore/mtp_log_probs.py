"""Scoring of the sampled tokens by each MTP head: log-probs and top-1 agreement.

:func:`score_mtp_heads` scores every head's targets from what the RL postprocess kept
(:class:`~verl_mtp.models.mcore.mtp_patch.MTPRLOutput`), either through Megatron's output layer or, with
``logprob_chunk_size > 0``, without materialising a head's full-vocabulary logits:

``log p(y | h) = (h . w_y) / T - logsumexp_v((h . w_v) / T)``, computed over chunks of tokens: each chunk's
fp32 logits ``[chunk, V/tp]`` live only inside the forward's chunk loop. What the backward needs of them,
``exp(logits - max)``, is kept in the hidden states' dtype (``T * V/tp`` values, half the bytes of the fp32
softmax Megatron's cross-entropy keeps under bf16), so the backward never recomputes the head's matrix product
and makes one pass over it per chunk: ``d log p_y / d logits = onehot(y) - softmax``.

With ``logprob_chunk_size = 0`` the head runs through Megatron's output layer and the same scoring runs once on
its fp32 logits, in place: the maximum and top-1 id in one pass, the shift, the exponential and the sum, the
buffer kept as the backward's ``exp(logits - max)`` and turned into the gradient in place (one pass).

Tensor parallelism follows Megatron's vocab-parallel output layer: each rank holds a vocabulary shard; per chunk
one all-gather brings every rank's maximum and arg-maximum, one all-reduce sums the sum-exp and the target logit.
The input gradient is all-reduced by ``copy_to_tensor_model_parallel_region`` (sequence parallel: gathered /
reduce-scattered like the output layer does it).

The output-layer weight gradient follows Megatron's gradient-accumulation-fusion protocol when the layer uses
it (:func:`verl_mtp.models.mcore.mtp_grad_fusion.hand_over_weight_grad`), so Megatron's DDP keeps it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from megatron.core import parallel_state as mpu
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from verl_mtp.models.mcore.mtp_alignment import mtp_ce_key, mtp_output_keys
from verl_mtp.models.mcore.mtp_grad_fusion import hand_over_weight_grad

if TYPE_CHECKING:
    from verl_mtp.models.mcore.mtp_patch import MTPRLOutput

__all__ = ["chunked_token_log_probs", "mtp_token_log_probs", "score_mtp_heads"]


def _global_max_and_argmax(local_max, local_arg, vocab_start, group):
    """Maximum over the whole vocabulary and its lowest vocabulary id, from every rank's shard (one collective)."""
    if group is None or torch.distributed.get_world_size(group) == 1:
        return local_max, local_arg + vocab_start
    pair = torch.stack([local_max.double(), (local_arg + vocab_start).double()])  # ids < 2**53: exact in fp64
    gathered = [torch.empty_like(pair) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, pair, group=group)
    maxes, ids = torch.stack(gathered).unbind(1)  # [tp, rows] each
    global_max = maxes.max(dim=0).values
    top1 = torch.where(maxes == global_max, ids, torch.full_like(ids, float("inf"))).min(dim=0).values
    return global_max.to(local_max.dtype), top1.long()


def _sum_over_shards(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return t


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """The head weight's gradient of one chunk, added to the fp32 accumulator."""
    grad_weight.add_(grad_logits.t() @ hidden)


def _score_block(logits, safe_labels, in_shard, exp_out, group, vocab_start):
    """Log-prob of the label, top-1 id and ``1 / sum exp`` of a block of tempered logits ``[rows, V/tp]``.

    Rewrites ``logits`` in place and leaves ``exp(logits - max)`` in ``exp_out`` (which may be ``logits``):
    one pass for the maximum and its id, one for the shift, one for the exponential, one for the sum.
    """
    local_max, local_arg = logits.max(dim=-1)
    global_max, top1 = _global_max_and_argmax(local_max, local_arg, vocab_start, group)
    target = logits.gather(1, safe_labels[:, None]).squeeze(1) * in_shard
    exp_block = exp_out if exp_out.dtype == logits.dtype else logits
    torch.exp(logits.sub_(global_max[:, None]), out=exp_block)
    sum_exp, target = _sum_over_shards(torch.stack([exp_block.sum(-1, dtype=torch.float32), target]), group)
    if exp_block is not exp_out:
        exp_out.copy_(exp_block)
    return target - global_max - torch.log(sum_exp), top1, sum_exp.reciprocal()


def _logits_grad_in_place(exp_shifted, safe_labels, in_shard, inv_temperature, inv_sum_exp, grad_log_probs):
    """Turn the kept ``exp(logits - max)`` into the logits' gradient, in place (one pass):
    ``d log p_y / d logits = (onehot(y) - exp_shifted / sum_exp) / T``, times the upstream gradient."""
    onehot_coef = grad_log_probs.float() * inv_temperature
    exp_shifted.mul_((-onehot_coef * inv_sum_exp).to(exp_shifted.dtype)[:, None])
    return exp_shifted.scatter_add_(1, safe_labels[:, None], (onehot_coef * in_shard).to(exp_shifted.dtype)[:, None])


def _shard_labels(labels, vocab_start, v_local):
    """This rank's label ids (0 where the label lives on another vocabulary shard) and which rows it holds."""
    local_labels = labels - vocab_start
    in_shard = (local_labels >= 0) & (local_labels < v_local)
    return torch.where(in_shard, local_labels, torch.zeros_like(local_labels)), in_shard


def _keep_for_backward(ctx, top1, *tensors) -> None:
    """Save what the backward needs, once: the scoring functions overwrite it with the gradient."""
    ctx.save_for_backward(*tensors)
    ctx.consumed = False
    ctx.mark_non_differentiable(top1)


def _refuse_second_backward(ctx) -> None:
    """Both scoring functions turn their saved exponentials into the logits' gradient in place."""
    if ctx.consumed:
        raise RuntimeError(
            "MTP head log-probs back-propagate once per forward (their saved exponentials become the gradient "
            "in place): run the forward again instead of backward(retain_graph=True) twice."
        )
    ctx.consumed = True


class _ChunkedTokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temperature, chunk, group, vocab_start, fuse_wgrad):
        n, v_local = hidden.shape[0], weight.shape[0]
        log_probs, inv_sum_exp = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(2))
        top1 = torch.empty(n, dtype=torch.long, device=hidden.device)
        exp_shifted = torch.empty(n, v_local, dtype=hidden.dtype, device=hidden.device)  # kept for backward
        safe_labels, in_shard = _shard_labels(labels, vocab_start, v_local)
        # fp32 (at least) in the same pass as the temperature, the product staying in the weights' dtype. An
        # fp32 model scores each chunk where its exponentials are kept; a bf16 one reuses one fp32 chunk buffer
        # (a fresh buffer per chunk would cost its page faults on CPU).
        logits_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logits_buf = product_buf = None
        if logits_dtype != hidden.dtype:
            logits_buf = hidden.new_empty(min(chunk, n), v_local, dtype=logits_dtype)
            product_buf = hidden.new_empty(logits_buf.shape)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            product = exp_shifted[s:e] if logits_buf is None else product_buf[: e - s]
            logits = exp_shifted[s:e] if logits_buf is None else logits_buf[: e - s]
            torch.mul(torch.mm(hidden[s:e], weight.t(), out=product), inv_temperature[s:e, None], out=logits)
            log_probs[s:e], top1[s:e], inv_sum_exp[s:e] = _score_block(
                logits, safe_labels[s:e], in_shard[s:e], exp_shifted[s:e], group, vocab_start
            )
        _keep_for_backward(ctx, top1, hidden, weight, exp_shifted, safe_labels, in_shard, inv_temperature, inv_sum_exp)
        ctx.chunk, ctx.fuse_wgrad = chunk, fuse_wgrad
        return log_probs, top1

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_top1):
        _refuse_second_backward(ctx)
        hidden, weight, *kept = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_logits = _logits_grad_in_place(*kept, grad_log_probs)  # no buffer, so no page faults on CPU
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, hidden.shape[0])
            if need_h:
                grad_hidden[s:e] = (grad_logits[s:e].to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                _accumulate_weight_grad(grad_weight, grad_logits[s:e], hidden[s:e])
        if need_w:
            grad_weight = hand_over_weight_grad(weight, grad_weight, ctx.fuse_wgrad)
        return grad_hidden, grad_weight, None, None, None, None, None, None


class _TokenLogProbFromLogits(torch.autograd.Function):
    """The chunked path's scoring on logits the output layer already made, rewritten in place (as Megatron's
    vocab-parallel cross-entropy rewrites its input): the buffer ends up holding ``exp(logits - max)`` for the
    backward, which turns it into the logits' gradient in place."""

    @staticmethod
    def forward(ctx, logits, labels, inv_temperature, group, vocab_start):
        safe_labels, in_shard = _shard_labels(labels, vocab_start, logits.shape[1])
        logits.mul_(inv_temperature[:, None])
        log_probs, top1, inv_sum_exp = _score_block(logits, safe_labels, in_shard, logits, group, vocab_start)
        _keep_for_backward(ctx, top1, logits, safe_labels, in_shard, inv_temperature, inv_sum_exp)
        return log_probs, top1

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_top1):
        _refuse_second_backward(ctx)
        return _logits_grad_in_place(*ctx.saved_tensors, grad_log_probs), None, None, None, None


def chunked_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    chunk_size: int,
    sequence_parallel: bool = False,
    gradient_accumulation_fusion: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(labels)`` and the top-1 token id of ``softmax(hidden @ weight.T / temperature)``.

    hidden: ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallel), weight: this rank's vocabulary shard
    ``[V/tp, h]``, labels / temperature: ``[s, b]``. Returns fp32 log-probs and long top-1 ids, ``[s, b]``.
    ``gradient_accumulation_fusion``: the output layer's setting (its weight gradient then goes to ``main_grad``).
    """
    tp = mpu.get_tensor_model_parallel_world_size()
    group = mpu.get_tensor_model_parallel_group() if tp > 1 else None
    # Each rank's input gradient is only its vocabulary shard's part: the ranks' parts must be summed exactly
    # once, as Megatron's ColumnParallelLinear does: reduce-scatter (sequence parallel: the backward of the
    # all-gather) or all-reduce. Both would sum twice, a gradient tp times too large.
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    elif tp > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    vocab_start = mpu.get_tensor_model_parallel_rank() * weight.shape[0]
    s, b, h = hidden.shape
    log_probs, top1 = _ChunkedTokenLogProb.apply(
        hidden.reshape(s * b, h),
        weight,
        labels.reshape(-1),
        temperature.reshape(-1).float().reciprocal(),
        chunk_size,
        group,
        vocab_start,
        gradient_accumulation_fusion,
    )
    return log_probs.view(s, b), top1.view(s, b)


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
    tp = mpu.get_tensor_model_parallel_world_size()
    log_probs, top1 = _TokenLogProbFromLogits.apply(
        logits.view(-1, logits.shape[-1]),
        labels_sb.view(-1),
        temperature.t().reshape(-1).float().reciprocal(),
        mpu.get_tensor_model_parallel_group() if tp > 1 else None,
        mpu.get_tensor_model_parallel_rank() * logits.shape[-1],
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
