"""MTP head targets for test batches, packed by the product's own ``pack_head_labels`` (verl's BSHD packing)."""

from __future__ import annotations

import torch

from verl_mtp.models.mcore.mtp_head_labels import pack_head_labels


def bshd_head_labels(ids: torch.Tensor, lengths, num_heads: int) -> list[torch.Tensor]:
    """``[b, s]`` targets ``x[i+k+1]`` of each head for a right-padded ``ids`` batch with true ``lengths``."""
    b, s = ids.shape
    nested = torch.nested.as_nested_tensor([ids[i, :n] for i, n in enumerate(lengths)], layout=torch.jagged)
    out = []
    for packed in pack_head_labels(nested, num_heads, "bshd"):
        buf = torch.zeros(b, s, dtype=torch.long)
        width = min(s, packed.shape[1])
        buf[:, :width] = packed[:, :width]
        out.append(buf)
    return out
