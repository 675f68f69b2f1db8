"""Line MTP-head outputs up with the main head's token positions.

Megatron's MTP depth ``k`` (1-based) reads position ``i`` and predicts token ``x[i+k+1]``, while the main
head at position ``i`` predicts ``x[i+1]``. Two shifts per head connect them, and both must stay inside one
sequence of a packed batch:

* ``head_labels``: the token head ``k`` is scored on at position ``i``, ``x[i+k+1]``; built on the unpacked
  (nested) input ids so verl's own packing then pads and splits it (TP alignment, context-parallel
  zig-zag) exactly like the main labels.
* ``shift_right``: after the per-head log-probs are unpacked, entry ``j`` takes the value head ``k``
  produced at ``j-k``; it now scores the same token as the main head's entry ``j``. The first ``k``
  positions of every sequence have no MTP prediction and are marked invalid, never silently zero-scored.

Everything here works on packed values + per-sequence ``starts``/``lengths`` so the same code serves jagged
nested tensors (starts = offsets) and padded THD buffers (starts = padded offsets, lengths = true lengths).

Between the logits processor and the loss the per-head outputs travel as extra channels of the main head's
``log_probs`` (:func:`stack_mtp_channels` / :func:`split_mtp_channels`): verl unpacks every output key with host
reads of the packing offsets (and, under context parallelism, one all-gather per key), so one tensor carrying
all heads costs what the main log-probs already cost, whatever the number of heads.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "mtp_output_keys",
    "mtp_ce_key",
    "positions_in_sequence",
    "shift_packed",
    "shift_right",
    "head_labels",
    "align_mtp_outputs",
    "mtp_channel_keys",
    "stack_mtp_channels",
    "split_mtp_channels",
    "drop_mtp_outputs",
]


_HEAD_KEY = re.compile(r"mtp_\d+_")


def mtp_output_keys(k: int) -> tuple[str, str, str]:
    """Model-output keys of head ``k``: log-probs, valid mask, top-1 agreement with the sampled token."""
    return f"mtp_{k}_log_probs", f"mtp_{k}_valid", f"mtp_{k}_top1"


def mtp_ce_key(k: int) -> str:
    """Model-output key of head ``k``'s log-probs on detached trunk inputs (its own CE loss)."""
    return f"mtp_{k}_ce_log_probs"


def positions_in_sequence(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per packed slot: its index inside its sequence and that sequence's true length.

    ``starts`` are ascending (packed order) and sequences do not overlap. Slots outside every sequence (THD
    padding) get index -1 and length 0, so any shift marks them invalid. Works on device without reading a
    length back to the host: each slot finds its sequence by a sorted search over the starts.
    """
    slots = torch.arange(total, device=starts.device)
    if starts.numel() == 0:
        return torch.full_like(slots, -1), torch.zeros_like(slots)
    starts = starts.to(torch.long)
    seq_id = (torch.searchsorted(starts, slots, right=True) - 1).clamp_min(0)
    within = slots - starts[seq_id]
    seq_len = lengths.to(torch.long)[seq_id]
    inside = (within >= 0) & (within < seq_len)
    return torch.where(inside, within, -1), torch.where(inside, seq_len, 0)


def shift_packed(
    values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, shift: int, fill: float | int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift packed ``values`` (sequence along dim 0) by ``shift`` slots inside each sequence.

    ``shift > 0`` moves values right (``out[j] = values[j - shift]``), ``shift < 0`` moves them left. Returns
    ``(shifted, valid)``; slots whose source falls outside their own sequence hold ``fill`` and
    ``valid=False``. Differentiable in ``values`` (a gather).
    """
    total = values.shape[0]
    pos, seq_len = positions_in_sequence(starts, lengths, total)
    src_pos = pos - shift
    valid = (pos >= 0) & (src_pos >= 0) & (src_pos < seq_len)
    src = torch.arange(total, device=values.device) - shift
    src = torch.where(valid, src, torch.zeros_like(src))
    shifted = values[src]
    mask = valid.view(-1, *([1] * (values.dim() - 1)))
    shifted = torch.where(mask, shifted, torch.full_like(shifted, fill))
    return shifted, valid


def _jagged_parts(nested: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offsets = nested.offsets()
    return nested.values(), offsets[:-1], offsets.diff()


def _as_jagged(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.nested.nested_tensor_from_jagged(values, offsets=like.offsets())


def shift_right(nested: torch.Tensor, k: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-shift each sequence of a jagged nested tensor by ``k``; returns ``(shifted, valid)`` as jagged."""
    values, starts, lengths = _jagged_parts(nested)
    shifted, valid = shift_packed(values, starts, lengths, k, fill)
    return _as_jagged(shifted, nested), _as_jagged(valid, nested)


def head_labels(input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Targets of MTP depth ``k`` (1-based): ``x[i+k+1]`` at position ``i`` of each jagged sequence.

    The last ``k+1`` positions of each sequence have no target and hold 0; after ``shift_right`` by ``k``
    they land on the sequence's final slot, which lies past the response and is never scored.
    """
    values, starts, lengths = _jagged_parts(input_ids)
    shifted, _ = shift_packed(values, starts, lengths, -(k + 1), 0)
    return _as_jagged(shifted, input_ids)


def align_mtp_outputs(output: dict) -> dict:
    """Move every head's unpacked (jagged) outputs onto the main head's positions and add its valid mask.

    Before: ``mtp_k_log_probs[i]`` is head ``k`` at position ``i``. After: entry ``j`` scores the token the main
    head's ``log_probs[j]`` scores, and ``mtp_k_valid[j]`` says whether head ``k`` predicted it at all.
    """
    k = 1
    while mtp_output_keys(k)[0] in output:
        lp_key, valid_key, top1_key = mtp_output_keys(k)
        output[lp_key], output[valid_key] = shift_right(output[lp_key], k)
        output[top1_key], _ = shift_right(output[top1_key], k)
        if mtp_ce_key(k) in output:
            output[mtp_ce_key(k)], _ = shift_right(output[mtp_ce_key(k)], k)
        k += 1
    return output


def mtp_channel_keys(num_heads: int, with_ce: bool) -> list[str]:
    """The per-head output keys in their channel order after the main log-probs (channel 0)."""
    keys = []
    for k in range(1, num_heads + 1):
        lp_key, _, top1_key = mtp_output_keys(k)
        keys += [lp_key, top1_key, *([mtp_ce_key(k)] if with_ce else [])]
    return keys


def stack_mtp_channels(log_probs: torch.Tensor, scored: dict, keys: list[str]) -> torch.Tensor:
    """``log_probs`` with the heads' outputs ``scored[key]`` (same shape) stacked behind it on a last dimension."""
    columns = [log_probs] + [scored[key].to(log_probs.dtype) for key in keys]
    return torch.stack(columns, dim=-1)


def split_mtp_channels(output: dict, keys: list[str]) -> dict:
    """Undo :func:`stack_mtp_channels` on verl's unpacked (jagged) ``output["log_probs"]``, in place.

    Channel-free log-probs (a forward without the heads, e.g. verl's ``compute_log_prob``) pass unchanged.
    """
    stacked = output["log_probs"]
    if stacked.dim() == 2:
        return output
    if stacked.shape[-1] != 1 + len(keys):
        raise RuntimeError(f"the log-probs carry {stacked.shape[-1] - 1} MTP channels, expected {len(keys)} ({keys})")
    for key, column in zip(["log_probs", *keys], stacked.values().unbind(-1), strict=True):
        output[key] = torch.nested.nested_tensor_from_jagged(column, offsets=stacked.offsets())
    return output


def drop_mtp_outputs(output: dict) -> None:
    """Remove every head's outputs (the keys of :func:`mtp_output_keys` / :func:`mtp_ce_key`) from ``output``."""
    for key in [key for key in output if _HEAD_KEY.match(key)]:
        del output[key]
