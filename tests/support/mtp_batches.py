"""MTP head targets for test batches, gathered by ``mtp_head_labels.head_targets`` (BSHD rows, no CP)."""

from __future__ import annotations

import torch

from verl_mtp.models.mcore.mtp_head_labels import bshd_sequence_ids, head_targets


def bshd_head_labels(ids: torch.Tensor, lengths, num_heads: int) -> list[torch.Tensor]:
    """``[b, s]`` targets ``x[i+k+1]`` of each head for a right-padded ``ids`` batch with true ``lengths``."""
    b, s = ids.shape
    nested = torch.nested.as_nested_tensor([ids[i, :n] for i, n in enumerate(lengths)], layout=torch.jagged)
    positions = torch.arange(s).expand(b, s)
    return head_targets(nested, bshd_sequence_ids(b, s, ids.device), positions, num_heads)
