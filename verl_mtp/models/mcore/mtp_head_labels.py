"""Targets of the MTP heads in the model's own packed layout, read off the layout verl already built.

Head ``k`` at position ``p`` of a sequence is scored on ``x[p+k+1]``. verl's forward packs the micro-batch once
(``preprocess_thd_engine`` / ``preprocess_bshd_engine``: alignment padding for TP, FP8 padding, length buckets,
the context-parallel split, zig-zag or contiguous) and hands the model the position of every slot inside its
sequence. Each slot's sequence follows from the padded offsets (THD) or is its row (BSHD), so every head's target
is one gather from the unpacked input ids: no second packing, no shift inside a packed buffer (which could cross
a sequence or a context-parallel rank), and no value read back to the host. Slots whose target lies past their
sequence (padding, a sequence's last ``k+1`` tokens) get 0; after the alignment they are never scored.
"""

from __future__ import annotations

import torch

__all__ = ["thd_sequence_ids", "bshd_sequence_ids", "head_targets"]


def thd_sequence_ids(
    cu_seqlens_padded: torch.Tensor, local_len: int, cp_size: int = 1, cp_rank: int = 0, cp_layout: str = "zigzag"
) -> torch.Tensor:
    """``[local_len]``: the sequence each slot of this rank's packed THD buffer belongs to.

    ``cu_seqlens_padded`` are the global padded offsets verl packed with. Under zig-zag CP every sequence
    keeps ``padded_len / cp`` consecutive local slots (its two chunks); under the contiguous layout this rank
    holds one interval of the global buffer.
    """
    slots = torch.arange(local_len, device=cu_seqlens_padded.device)
    if cp_layout == "contiguous":
        slots, bounds = slots + cp_rank * local_len, cu_seqlens_padded
    elif cp_layout == "zigzag":
        bounds = torch.div(cu_seqlens_padded, cp_size, rounding_mode="floor")
    else:
        raise ValueError(f"unknown context-parallel layout {cp_layout!r}: expected 'zigzag' or 'contiguous'")
    last = cu_seqlens_padded.numel() - 2
    return torch.searchsorted(bounds[1:].contiguous(), slots, right=True).clamp_max(last)


def bshd_sequence_ids(batch_size: int, local_len: int, device) -> torch.Tensor:
    """``[b, local_len]``: in BSHD every row is one sequence."""
    return torch.arange(batch_size, device=device)[:, None].expand(batch_size, local_len)


def head_targets(
    input_ids: torch.Tensor, sequence_ids: torch.Tensor, positions: torch.Tensor, num_heads: int
) -> list[torch.Tensor]:
    """Head ``k``'s target ``x[p+k+1]`` at every slot, for ``k = 1..num_heads``, each shaped like ``positions``.

    input_ids: the micro-batch's jagged (unpacked) token ids; ``sequence_ids`` / ``positions``: each slot's
    sequence and position in it, in the packed layout (same shape).
    """
    values, offsets = input_ids.values(), input_ids.offsets()
    starts, lengths = offsets[:-1][sequence_ids], offsets.diff()[sequence_ids]
    targets = []
    for k in range(1, num_heads + 1):
        source = positions + (k + 1)
        inside = source < lengths
        index = torch.where(inside, starts + source, torch.zeros_like(source))
        targets.append(torch.where(inside, values[index], torch.zeros_like(index)).to(values.dtype))
    return targets
