"""A test-only core attention that honours packed (THD) ``cu_seqlens`` on CPU.

Megatron's local ``DotProductAttention`` refuses packed sequences, and TransformerEngine needs a GPU. This
subclass turns the packed layout into a block-diagonal causal mask (sequence ``i`` occupies
``cu_seqlens_q_padded[i] : cu_seqlens_q_padded[i+1]``) and runs the local attention on it, so a packed
micro-batch behaves exactly like its sequences run one by one; everything else in the model (MTP rolls,
embeddings, output layer) sees the real ``PackedSeqParams``.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, 1, t, t]`` boolean mask, True = masked: causal inside each packed sequence, nothing across."""
    seq_id = torch.full((total,), -1, dtype=torch.long)
    for i in range(len(cu_seqlens) - 1):
        seq_id[int(cu_seqlens[i]) : int(cu_seqlens[i + 1])] = i
    same = seq_id.unsqueeze(0) == seq_id.unsqueeze(1)
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
    return ~(same & causal).view(1, 1, total, total)


class PackedCausalDotProductAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # THD [t, np, hn] -> [t, 1, np, hn]
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        mask = block_causal_mask(cu, query.shape[0])
        return super().forward(query, key, value, mask, attn_mask_type, attention_bias)


def packed_local_layer_spec():
    """Megatron's local GPT layer spec with the packed-aware core attention swapped in."""
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = PackedCausalDotProductAttention
    return spec
