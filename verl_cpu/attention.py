"""``CPUCoreAttention``: a core-attention module for Megatron-Core's local layer spec that understands the
masks verl passes, on CPU (``torch.nn.functional.scaled_dot_product_attention``).

Why: Megatron-Core 0.16.1's local ``DotProductAttention`` expects a ``[b, 1, sq, sk]`` mask with True = masked
out, rejects packed sequences ("Packed sequence is not supported by DotProductAttention") and builds its default
causal mask on CUDA. verl 0.9.1's Megatron forward (``verl.models.mcore.model_forward``) instead passes either

* BSHD (``use_remove_padding=False``): a ``[b, s]`` bool padding mask, True = real token
  (``verl.models.mcore.util.preprocess_bshd_engine``), meant for TE / flash attention; or
* THD (``use_remove_padding=True``, verl's default): no mask and ``PackedSeqParams`` with ``cu_seqlens``.

It is also the attention of :func:`verl_cpu.testing.build_tiny_gpt` with ``packed_attention=True``.
This module accepts all three forms: 2-D keep masks, 4-D Megatron masks and packed ``cu_seqlens`` (block-
diagonal causal attention, using the padded offsets when present). Padded query rows attend to themselves
only, so they never produce NaNs. Tensor/context parallel size 1 only (the CPU setting).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class CPUCoreAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None, **kwargs):
        super().__init__(config=config)
        if config.tensor_model_parallel_size != 1 or config.context_parallel_size != 1:
            raise NotImplementedError("CPUCoreAttention: tensor/context parallel size must be 1")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        # Interface fields some Megatron code reads off core_attention.
        self.current_max_attn_logits = None

    @staticmethod
    def _causal(sq: int, sk: int, device) -> torch.Tensor:
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)

    def _allowed_mask_bshd(self, attention_mask, b: int, sq: int, sk: int, device) -> torch.Tensor:
        """bool [b or 1, 1, sq, sk], True = may attend."""
        causal = self.attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        allowed = self._causal(sq, sk, device)[None, None] if causal else torch.ones(
            1, 1, sq, sk, dtype=torch.bool, device=device)
        if attention_mask is not None:
            if attention_mask.dim() == 2:  # verl: [b, s] True = real token
                keep = attention_mask.to(torch.bool)
                allowed = allowed & keep[:, None, None, -sk:]
            elif attention_mask.dim() == 4:  # megatron: [b|1, 1, sq, sk] True = masked out
                allowed = allowed & ~attention_mask.to(torch.bool)
            else:
                raise ValueError(f"CPUCoreAttention: unsupported attention_mask shape {tuple(attention_mask.shape)}")
        eye = torch.eye(sq, sk, dtype=torch.bool, device=device)[None, None]
        return allowed | eye  # rows that are fully masked (padding) attend to themselves: no NaN

    @staticmethod
    def _allowed_mask_thd(packed_seq_params, t: int, device) -> torch.Tensor:
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        cu = cu.to(device=device, dtype=torch.long)
        pos = torch.arange(t, device=device)
        seg = torch.bucketize(pos, cu[1:], right=True)  # sequence index of each packed position
        same = seg[:, None] == seg[None, :]
        causal = pos[None, :] <= pos[:, None]
        return (same & causal)[None, None]

    def _expand_kv(self, x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
        groups = x.shape[dim]
        return x if groups == heads else x.repeat_interleave(heads // groups, dim=dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_bias is not None:
            raise NotImplementedError("CPUCoreAttention: attention_bias")
        if attn_mask_type is not None:
            self.attn_mask_type = attn_mask_type
        dropout = self.dropout_p if self.training else 0.0
        hn = query.shape[-1]
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(hn)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # [t, np, hn] (Attention squeezed the dummy batch dim)
            t, heads = query.shape[0], query.shape[1]
            q = query.permute(1, 0, 2)[None]
            k = self._expand_kv(key, heads, 1).permute(1, 0, 2)[None]
            v = self._expand_kv(value, heads, 1).permute(1, 0, 2)[None]
            mask = self._allowed_mask_thd(packed_seq_params, t, query.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
            return out[0].permute(1, 0, 2).reshape(t, heads * v.shape[-1])
        # sbhd: [s, b, np, hn]
        sq, b, heads = query.shape[0], query.shape[1], query.shape[2]
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)
        k = self._expand_kv(key, heads, 2).permute(1, 2, 0, 3)
        v = self._expand_kv(value, heads, 2).permute(1, 2, 0, 3)
        mask = self._allowed_mask_bshd(attention_mask, b, sq, sk, query.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * v.shape[-1])
