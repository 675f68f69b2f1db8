"""Responses cut out of unpadded model outputs, without reading anything back to the host.

verl's ``no_padding_2_padding`` (``verl.workers.utils.padding``, 0.9.1) slices each sample's response out of the
packed model output with Python indices, which on a GPU costs one host read per sample and a few per call.
:func:`responses_padded` computes the same ``[b, max_response_len, *]`` tensor with one gather whose indices are
built on the device. It needs the checks verl's helper makes (the packed length matches, every prompt is
non-empty) to have passed on the same micro-batch, which verl's ``ppo_loss`` does before the MTP term runs.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from verl.utils import tensordict_utils as tu

__all__ = ["responses_padded"]


def _response_layout(data: TensorDict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each sample's end offset in the packed output, its response length and the padded response width, as
    verl's helper derives them (nested prompts/responses, or padded ones with an attention mask)."""
    prompt_ids, response_ids = data["prompts"], data["responses"]
    if prompt_ids.is_nested:
        prompt_lens, response_lens = prompt_ids.offsets().diff(), response_ids.offsets().diff()
        width = tu.get_non_tensor_data(data=data, key="max_response_len", default=-1)
        if width < 0:  # verl's helper reads it back the same way when the batch does not carry it
            width = int(response_lens.max())
    else:
        attention_mask = data["attention_mask"]
        prompt_lens = attention_mask[:, : prompt_ids.shape[1]].sum(dim=1)
        response_lens = attention_mask[:, prompt_ids.shape[1] :].sum(dim=1)
        width = response_ids.shape[1]
    return (prompt_lens + response_lens).cumsum(dim=0), response_lens, width


def responses_padded(values: torch.Tensor, data: TensorDict) -> torch.Tensor:
    """``values`` (``[total_nnz, *]`` or a jagged tensor of the micro-batch) as padded responses.

    Entry ``[i, t]`` is the output at sample ``i``'s packed slot ``end_i - response_len_i - 1 + t`` (the slot
    that scores response token ``t``), zero past the response, exactly as verl's ``no_padding_2_padding``.
    """
    values = values.values() if values.is_nested else values
    ends, response_lens, width = _response_layout(data)
    t = torch.arange(width, device=values.device)
    inside = t[None, :] < response_lens[:, None]
    index = torch.where(inside, (ends - response_lens - 1)[:, None] + t[None, :], torch.zeros_like(t)[None, :])
    padded = values[index]
    inside = inside.view(*inside.shape, *([1] * (values.dim() - 1)))
    return torch.where(inside, padded, torch.zeros_like(padded))
