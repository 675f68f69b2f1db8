"""Exact causal attention over a sequence split across context-parallel (CP) ranks, on CPU.

Why: Megatron-Core's context-parallel attention is TransformerEngine's (GPU only) and its local
``DotProductAttention`` refuses CP > 1, so on CPU nothing could run a model, and with it the real
``MultiTokenPredictionBlock`` (whose CP-aware roll exchanges boundary tokens between ranks), under CP.

How: every rank all-gathers the keys and values of the whole CP group and attends with its own queries under a
mask built from *global* token coordinates. The layout is the zig-zag one that verl's ``preprocess_thd_engine`` /
``preprocess_bshd_engine`` and Megatron's ``get_batch_on_this_cp_rank`` produce: each sequence, padded to a
multiple of ``2 * cp``, is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r`` and
``2 * cp - 1 - r``, in that order (packed THD: per sequence, at ``cu_seqlens_q_padded / cp``; BSHD: per row).
The all-gather is differentiable: its backward sums every rank's gradient for the gathered keys / values and
hands each rank the part it owns, so parameter gradients are partial per rank and sum over the CP group (as
Megatron's gradient reduction over the data-and-context-parallel group does). Exact, not fast: scores are
``local tokens x all tokens``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "all_gather_sequence",
    "context_parallel_attention",
    "zigzag_positions",
    "zigzag_thd_coordinates",
]


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along dim 0 in rank order; backward: sum the gathered gradient over ranks, keep own part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # gloo has no reduce-scatter: an all-reduce of the whole gradient, then this rank's slice.
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return total.chunk(size, dim=0)[rank], None


def all_gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every CP rank's ``x`` along dim 0 (rank order), differentiably."""
    return _AllGatherSequence.apply(x, group)


def zigzag_positions(local_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions of the ``local_len`` rows a CP rank holds of one zig-zag split sequence."""
    if local_len % 2:
        raise ValueError(
            f"context parallel: a sequence's local length {local_len} is odd; sequences must be padded to a "
            f"multiple of 2 * context_parallel_size ({2 * cp_size}), as verl's preprocess_thd_engine does"
        )
    chunk = local_len // 2
    first = torch.arange(chunk) + cp_rank * chunk
    second = torch.arange(chunk) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


def zigzag_thd_coordinates(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int):
    """(sequence index, global position) of every packed row a CP rank holds, from the global padded offsets."""
    bounds = [int(x) for x in cu_seqlens_padded.tolist()]
    seq_ids, positions = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if (end - start) % (2 * cp_size):
            raise ValueError(
                f"context parallel: packed sequence {i} has padded length {end - start}, not a multiple of "
                f"2 * context_parallel_size ({2 * cp_size}); pack with verl's preprocess_thd_engine"
            )
        local_len = (end - start) // cp_size
        seq_ids.append(torch.full((local_len,), i, dtype=torch.long))
        positions.append(zigzag_positions(local_len, cp_size, cp_rank))
    return torch.cat(seq_ids), torch.cat(positions)


def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Plain (no autograd) all-gather along dim 0, for masks and coordinates."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _thd_allowed(packed_seq_params, local_rows: int, group, device) -> torch.Tensor:
    """``[1, 1, t_local, t_all]`` True = may attend: same packed sequence, key position <= query position."""
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    seq_q, pos_q = zigzag_thd_coordinates(cu.cpu(), size, rank)
    if seq_q.numel() != local_rows:
        raise ValueError(
            f"context parallel: {local_rows} local packed rows but cu_seqlens_q_padded[-1] / cp = {seq_q.numel()}"
        )
    coords = [zigzag_thd_coordinates(cu.cpu(), size, r) for r in range(size)]
    seq_k = torch.cat([c[0] for c in coords])
    pos_k = torch.cat([c[1] for c in coords])
    allowed = (seq_q[:, None] == seq_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
    return allowed[None, None].to(device)


def _bshd_allowed(attention_mask, local_len: int, group, causal: bool, device) -> torch.Tensor:
    """``[b|1, 1, s_local, s_all]`` True = may attend, from global positions and verl's ``[b, s]`` keep mask."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    pos_q = zigzag_positions(local_len, size, rank)
    pos_k = torch.cat([zigzag_positions(local_len, size, r) for r in range(size)])
    allowed = pos_k[None, :] <= pos_q[:, None] if causal else torch.ones(local_len, size * local_len, dtype=torch.bool)
    allowed = allowed[None, None].to(device)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(
                "context parallel on CPU: pass verl's [batch, seq] padding mask (True = real token) or none; a "
                f"{attention_mask.dim()}-D mask carries no global positions (got shape {tuple(attention_mask.shape)})"
            )
        keep_k = _gather_rows(attention_mask.to(torch.bool).t(), group).t()  # [b, s_all]
        allowed = allowed & keep_k[:, None, None, :]
    self_key = (pos_k[None, :] == pos_q[:, None])[None, None].to(device)
    return allowed | self_key  # padded query rows attend to themselves: no NaN


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    packed_seq_params,
    group,
    *,
    causal: bool,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """Core attention of Megatron's local spec under CP: THD ``[t, np, hn]`` -> ``[t, np*hn]`` or
    SBHD ``[s, b, np, hn]`` -> ``[s, b, np*hn]``; ``key`` / ``value`` may have fewer (GQA) heads."""
    heads = query.shape[-2]
    key = key.repeat_interleave(heads // key.shape[-2], dim=-2) if key.shape[-2] != heads else key
    value = value.repeat_interleave(heads // value.shape[-2], dim=-2) if value.shape[-2] != heads else value
    key_all, value_all = all_gather_sequence(key, group), all_gather_sequence(value, group)
    if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
        if not causal:
            raise NotImplementedError("context parallel on CPU: packed (THD) attention is causal only")
        mask = _thd_allowed(packed_seq_params, query.shape[0], group, query.device)
        q, k, v = (x.permute(1, 0, 2)[None] for x in (query, key_all, value_all))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out[0].permute(1, 0, 2).reshape(query.shape[0], -1)
    mask = _bshd_allowed(attention_mask, query.shape[0], group, causal, query.device)
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key_all, value_all))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
