"""The output-layer weight's gradient under Megatron-Core's gradient-accumulation fusion.

With ``gradient_accumulation_fusion=True`` (Megatron's GPU default) a linear layer adds its weight gradient
straight into ``weight.main_grad`` and sets ``weight.grad_added_to_main_grad``; Megatron's DDP backward hook
then discards ``weight.grad`` unless the weight carries ``zero_out_wgrad`` (then it adds ``.grad`` too). The
MTP heads share the output layer's weight (and, tied, the embedding's), so their gradient must follow the
same protocol or it is silently lost.
"""

from __future__ import annotations

import torch

__all__ = ["hand_over_weight_grad", "keep_mtp_stage_embedding_grad"]


def hand_over_weight_grad(weight: torch.Tensor, grad_weight: torch.Tensor, fused: bool) -> torch.Tensor | None:
    """What a backward returns to autograd for ``weight`` whose gradient is ``grad_weight`` (any float dtype).

    ``fused``: the output layer's ``gradient_accumulation_fusion``. The main head always runs through that
    layer, so under fusion the weight is always flagged and a plain ``.grad`` would be discarded: the gradient
    goes into ``main_grad`` and autograd gets a zero placeholder, zero rather than uninitialised because DDP
    adds ``.grad`` when ``zero_out_wgrad`` is set.
    """
    if not (fused and hasattr(weight, "main_grad")):
        return grad_weight.to(weight.dtype)
    weight.main_grad.add_(grad_weight)
    if not hasattr(weight, "grad_added_to_main_grad"):  # no DDP hook reads .grad: nothing to hand over
        return None
    weight.grad_added_to_main_grad = True
    return torch.zeros_like(weight)


def keep_mtp_stage_embedding_grad(gpt: torch.nn.Module) -> None:
    """Make DDP keep the MTP embedding-lookup gradient on a pipeline stage that also ties the output layer.

    With tied embeddings the MTP stage's word embedding is used both by the MTP layers' lookup (gradient in
    ``.grad``) and by the fused output layer (gradient in ``main_grad``, flagged). Megatron-Core marks that
    weight ``zero_out_wgrad`` only when the pipeline has one stage; on the last of several stages DDP would
    discard the lookup gradient. Marking it here is what Megatron does in the one-stage case.
    """
    if not (getattr(gpt, "mtp_process", False) and gpt.post_process and gpt.share_embeddings_and_output_weights):
        return
    gpt.shared_embedding_or_output_weight().zero_out_wgrad = True
