"""Actor-update micro-batches shaped exactly as verl 0.9.1's engine hands them to ``ppo_loss``.

The batch starts in verl's left/right padded DataProto layout (left-padded prompts, right-padded responses)
and goes through verl's own ``left_right_2_no_padding``, so the loss under test sees the same nested
``input_ids``, padded ``response_mask``/``old_log_probs``/``advantages`` and non-tensor global-batch info
(``dp_size``, ``batch_num_tokens``, ``global_batch_size``) as in a real run.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding


def make_actor_batch(
    prompt_lens: list[int],
    response_lens: list[int],
    vocab_size: int = 32,
    seed: int = 0,
    response_holes: bool = True,
) -> TensorDict:
    """A micro-batch with random tokens, old log-probs and advantages; ``response_holes`` zeroes a few
    response-mask entries inside responses (tool outputs), which the losses must skip."""
    g = torch.Generator().manual_seed(seed)
    b, p_max, r_max = len(prompt_lens), max(prompt_lens), max(response_lens)
    prompts = torch.zeros(b, p_max, dtype=torch.long)
    responses = torch.zeros(b, r_max, dtype=torch.long)
    attention_mask = torch.zeros(b, p_max + r_max, dtype=torch.long)
    response_mask = torch.zeros(b, r_max, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        prompts[i, p_max - p :] = torch.randint(1, vocab_size, (p,), generator=g)
        responses[i, :r] = torch.randint(1, vocab_size, (r,), generator=g)
        attention_mask[i, p_max - p : p_max + r] = 1
        response_mask[i, :r] = 1
        if response_holes and r > 3:
            response_mask[i, r // 2] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    old_log_probs = -torch.rand(b, r_max, generator=g) * 3 * response_mask
    advantages = torch.randn(b, r_max, generator=g) * response_mask
    data = TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "position_ids": position_ids,
            "old_log_probs": old_log_probs,
            "advantages": advantages,
        },
        batch_size=[b],
    )
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(
        data,
        dp_size=1,
        batch_num_tokens=int(response_mask.sum()),
        global_batch_size=b,
    )
    return data


def nested_like(data: TensorDict, values: torch.Tensor) -> torch.Tensor:
    """A jagged tensor over the full (prompt + response) sequences of ``data``, like a model output."""
    return torch.nested.nested_tensor_from_jagged(values, offsets=data["input_ids"].offsets())
