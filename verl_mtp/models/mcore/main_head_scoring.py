"""The main head scored without its full logits: verl's ``use_fused_kernels`` with MTP on.

verl 0.9.1's Megatron engine turns its fused kernels off whenever MTP is enabled, because its fused forward
(``verl.models.mcore.model_forward_fused``) never runs the MTP block. Here verl's non-fused forward runs
unchanged -- the MTP block, Megatron's MTP cross-entropy (``detach``, ``ce``) or the rl postprocess -- and only
the main head's output-layer call is taken over: :class:`MainHeadCapture`, installed as a model chunk's outermost
postprocess, keeps the hidden states that call receives (with their graph, ``MTPLossAutoScaler`` included) and
hands verl an empty ``[b, s, 0]`` stand-in for the logits. The engine's logits processor then scores them with
:func:`score_main_head`: the chunked function the MTP heads use
(:func:`verl_mtp.models.mcore.token_scores.chunked_token_scores`), so no ``[tokens, vocab]`` fp32 logits, their
log-softmax or their gradient ever exist; what the backward keeps is ``exp(logits - max)`` in the model's dtype.

Which output-layer call is the main head's: the one made with the live output weight (the layer's own, or the
shared embedding's). The MTP cross-entropy of ``detach`` / ``ce`` runs the layer on a detached weight (verl on
megatron-core <= 0.16; :func:`~verl_mtp.models.mcore.mcore_compat.keep_mtp_ce_off_lm_head` from 0.17), and the
rl postprocess scores its heads after the postprocess, in the logits processor. A second live call in one
postprocess, or none where the processor expects one, is an error, never a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as mpu

from verl.models.mcore.mtp_patch import _get_patching_model
from verl_mtp.models.mcore.token_scores import chunked_token_scores
from verl_mtp.models.mcore.mtp_patch import _NOT_SET, install_postprocess, restore_postprocess

__all__ = ["MainHeadCapture", "MainHeadHidden", "score_main_head"]


@dataclass
class MainHeadHidden:
    """The main head's output-layer input of one forward, for the logits processor of the same micro-batch."""

    hidden_states: torch.Tensor  # [s, b, h] in the model's (packed) order; [s/tp, b, h] under sequence parallel
    weight: torch.Tensor  # the live output weight, this rank's vocabulary shard [V/tp, h]
    sequence_parallel: bool
    gradient_accumulation_fusion: bool
    chunk_size: int


class MainHeadCapture:
    """One model chunk's capture of the main head's output-layer call (see the module docstring).

    ``patch`` installs it over whatever postprocess the chunk has (verl's MTP patch, the rl postprocess) and
    over its output layer's ``forward``; ``unpatch`` restores both. Megatron calls ``_postprocess`` with
    keywords only; they are passed on as they come.
    """

    def __init__(self, chunk_size: int):
        if chunk_size <= 0:
            raise ValueError(f"the main head's chunk size must be > 0, got {chunk_size}")
        self.chunk_size = chunk_size
        self.model = None
        self._inner = None  # the postprocess it wraps
        self._replaced = _NOT_SET  # the chunk's own ``_postprocess`` attribute before patching, if any
        self._live_weight = None
        self._capturing = False
        self._output: MainHeadHidden | None = None

    def patch(self, model: torch.nn.Module) -> MainHeadCapture:
        """Install on ``model``'s GPTModel, which must hold the output layer (the last pipeline stage)."""
        gpt = _get_patching_model(model)
        layer = getattr(gpt, "output_layer", None)
        if layer is None:
            raise ValueError("the main head is scored where the output layer is: this model chunk has none")
        if getattr(layer, "bias", None) is not None:
            raise NotImplementedError(
                "actor_rollout_ref.model.use_fused_kernels=True with MTP scores the main head from the output "
                "layer's weight alone, and this output layer has a bias: set use_fused_kernels=False"
            )
        if isinstance(gpt._postprocess, MainHeadCapture):
            raise RuntimeError("the main-head capture is already installed on this model chunk; unpatch it first")
        self._inner = gpt._postprocess
        # the Parameter itself: a detached view of it (the MTP cross-entropy's weight) is a different object
        tied = gpt.share_embeddings_and_output_weights
        self._live_weight = gpt.shared_embedding_or_output_weight() if tied else layer.weight
        self.model = gpt
        self._replaced = install_postprocess(gpt, self)
        layer.forward = self._output_layer_forward
        return self

    def unpatch(self) -> None:
        """Restore the chunk's postprocess and output layer as they were before :meth:`patch`."""
        gpt = self.model
        restore_postprocess(gpt, self, self._replaced, "main-head capture")
        del gpt.output_layer.forward
        self.model, self._inner, self._replaced, self._live_weight, self._output = None, None, _NOT_SET, None, None

    def pop_output(self) -> MainHeadHidden | None:
        """Take (and clear) what the last forward captured; ``None`` when it made no main-head call."""
        output, self._output = self._output, None
        return output

    def __call__(self, **kwargs):
        """The wrapped postprocess, with the main head's output-layer call captured."""
        self._output, self._capturing = None, True
        try:
            return self._inner(**kwargs)
        finally:
            self._capturing = False

    def _output_layer_forward(self, input_, weight=None, runtime_gather_output=None, **kwargs):
        layer = self.model.output_layer
        used = layer.weight if weight is None else weight
        if not self._capturing or used is not self._live_weight:
            return type(layer).forward(layer, input_, weight=weight, runtime_gather_output=runtime_gather_output,
                                       **kwargs)
        if self._output is not None:
            raise RuntimeError(
                "the main-head capture saw two output-layer calls with the live weight in one postprocess: an MTP "
                "loss there trains the lm_head, which no regime allows (set use_fused_kernels=False)"
            )
        self._output = MainHeadHidden(
            input_, used, bool(layer.sequence_parallel), bool(layer.gradient_accumulation_fusion), self.chunk_size
        )
        return _logits_stand_in(input_, layer.sequence_parallel), None


def _logits_stand_in(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """``[s, b, 0]``: the shape of the logits verl's forward passes on to its logits processor, holding nothing."""
    s = hidden.shape[0] * (mpu.get_tensor_model_parallel_world_size() if sequence_parallel else 1)
    return hidden.new_empty((s, hidden.shape[1], 0))


def score_main_head(
    main: MainHeadHidden, labels: torch.Tensor, temperature: torch.Tensor, *, entropy: bool, sum_pi_squared: bool
) -> dict[str, torch.Tensor]:
    """What verl's logits processor returns for the main head (``log_probs``, and ``entropy`` /
    ``sum_pi_squared`` when asked), ``[b, s]`` fp32, from the captured hidden states.

    ``labels`` and ``temperature`` are the processor's ``[b, s]`` (packed like the hidden states; temperature
    already made positive). Works in Megatron's ``[s, b]`` order, as the MTP heads do.
    """
    scores = chunked_token_scores(
        main.hidden_states,
        main.weight,
        labels.t().contiguous(),
        temperature.t(),
        main.chunk_size,
        entropy=entropy,
        sum_pi_squared=sum_pi_squared,
        sequence_parallel=main.sequence_parallel,
        gradient_accumulation_fusion=main.gradient_accumulation_fusion,
    )
    out = {"log_probs": scores.log_probs.t()}
    if entropy:
        out["entropy"] = scores.entropy.t()
    if sum_pi_squared:
        out["sum_pi_squared"] = scores.sum_pi_squared.t()
    return out
