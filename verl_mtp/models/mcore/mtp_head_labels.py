"""Targets of the MTP heads in the model's own packed layout (verl's ``model_forward`` counterpart).

Head ``k`` at position ``i`` is scored on ``x[i+k+1]``. Those targets are built on the unpacked (jagged) input
ids and then packed by verl's own ``preprocess_thd_engine`` / ``preprocess_bshd_engine`` with the arguments
verl's forward uses, so they land in exactly the slots of the tokens they belong to: alignment padding for
tensor parallelism, FP8 padding, length buckets, and the context-parallel split (zig-zag or contiguous).
Nothing is shifted inside a packed buffer, so no shift can cross a sequence or a context-parallel rank.
"""

from __future__ import annotations

import torch

from verl.models.mcore.util import preprocess_bshd_engine, preprocess_thd_engine
from verl_mtp.models.mcore.mtp_alignment import head_labels

__all__ = ["pack_head_labels"]


def pack_head_labels(
    input_ids: torch.Tensor,
    num_heads: int,
    data_format: str,
    *,
    use_fp8_padding: bool = False,
    local_cp_size: int | None = None,
    pad_to_length_bucket: int | None = None,
    cp_layout: str = "zigzag",
    forced_max_seqlen: int | None = None,
) -> list[torch.Tensor]:
    """``[b, s]`` packed targets of heads ``1..num_heads`` for the jagged ``input_ids`` of a micro-batch."""
    packed = []
    for k in range(1, num_heads + 1):
        targets = head_labels(input_ids, k)
        if data_format == "thd":
            buf = preprocess_thd_engine(
                targets,
                pre_process=True,
                use_fp8_padding=use_fp8_padding,
                local_cp_size=local_cp_size,
                pad_to_length_bucket=pad_to_length_bucket,
                cp_layout=cp_layout,
            )[0]
        elif data_format == "bshd":
            buf = preprocess_bshd_engine(
                targets, pre_process=True, use_fp8_padding=use_fp8_padding, forced_max_seqlen=forced_max_seqlen
            )[0]
        else:
            raise ValueError(f"unknown data_format {data_format!r}: expected 'thd' or 'bshd'")
        packed.append(buf.contiguous())
    return packed
