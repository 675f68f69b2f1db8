"""The RL postprocess of a Megatron-Core ``GPTModel``: keeps the MTP heads' outputs for the RL loss.

verl's own patch (``verl.models.mcore.mtp_patch``) turns the MTP heads into an auxiliary cross-entropy loss
injected with ``MTPLossAutoScaler``; that covers the ``detach`` and ``ce`` regimes and stays in charge of
them. For ``mtp_loss_type=rl`` an :class:`MTPRLPostprocess` is installed over it, one per model chunk: it runs
the MTP block, keeps each head's final hidden states (with their autograd graph into the MTP layers and the
trunk) as its last output, an :class:`MTPRLOutput`, and returns the main logits exactly as verl does. The
engine's logits processor takes that output and scores the sampled tokens with each head
(:func:`verl_mtp.models.mcore.mtp_log_probs.score_mtp_heads`) under the main head's temperature.

The heads' hidden states are kept rather than logits so that no second full-vocabulary tensor is alive
before the logits processor needs it, and so that the temperature (known only to the processor) is applied
to the MTP logits exactly like the main ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from inspect import signature

import torch

from verl.models.mcore.mtp_patch import _get_patching_model
from verl_mtp.models.mcore.mtp_grad_fusion import keep_mtp_stage_embedding_grad

__all__ = ["MTPRLOutput", "MTPRLPostprocess", "check_cp_roll_offsets", "patch_postprocess_rl"]


@dataclass
class MTPRLOutput:
    """What the RL postprocess leaves for the logits processor of the same micro-batch.

    ``hidden_states[k-1]`` is depth ``k``'s output, ``[s, b, h]`` in the model's (packed) sequence order;
    ``positions`` and ``packed_seq_params`` are the packed layout verl gave the model (each slot's position in
    its sequence; the padded offsets, ``None`` for BSHD), from which the heads' targets are gathered.
    """

    hidden_states: tuple[torch.Tensor, ...]
    output_layer: torch.nn.Module
    output_weight: torch.Tensor | None
    runtime_gather_output: bool | None
    train_lm_head: bool
    logprob_chunk_size: int  # > 0: chunked log-probs, no full-vocabulary logits kept; 0: via the output layer
    positions: torch.Tensor | None = None
    packed_seq_params: object | None = None
    # the heads re-run on detached trunk inputs (``detached_head_ce_coef > 0``), for their own CE loss
    detached_hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def num_heads(self) -> int:
        return len(self.hidden_states)

    def head_weight(self, trainable: bool) -> torch.Tensor:
        """The shared output-layer weight shard ``[V/tp, h]``, detached unless ``trainable``."""
        weight = self.output_weight if self.output_weight is not None else self.output_layer.weight
        return weight if trainable else weight.detach()

    def head_logits(self, hidden: torch.Tensor, trainable_weight: bool) -> torch.Tensor:
        """Logits ``[s, b, v/tp]`` of one head's hidden states through the shared output layer."""
        logits, _ = self.output_layer(
            hidden, weight=self.head_weight(trainable_weight), runtime_gather_output=self.runtime_gather_output
        )
        return logits


class _DetachedEmbedding:
    """The model's embedding with its output cut from the graph: MTP inputs that train nothing upstream."""

    def __init__(self, embedding: torch.nn.Module):
        self.embedding = embedding

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.embedding(*args, **kwargs).detach()


def check_cp_roll_offsets(packed_seq_params, context_parallel_size: int) -> None:
    """Refuse packed offsets that Megatron's MTP roll would misread under context parallelism.

    Megatron-Core's ``roll_tensor`` splits each packed sequence at ``cu_seqlens_q / cp`` into the two zig-zag
    chunks a CP rank holds, which is right only for the *padded* offsets (Megatron-LM issues #4495 / #6205:
    unpadded ones silently shift the MTP inputs across chunks and sequences). verl's ``preprocess_thd_engine``
    passes the padded offsets as both, so the check costs nothing on that path.
    """
    if context_parallel_size == 1 or packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return
    offsets, padded = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_q_padded
    if padded is None or offsets is padded or torch.equal(offsets, padded):
        return
    raise ValueError(
        "mtp_loss_type=rl with context parallelism: PackedSeqParams.cu_seqlens_q differs from cu_seqlens_q_padded; "
        "Megatron's MTP roll would split the sequences at the wrong offsets. Pack with verl's "
        "preprocess_thd_engine (padded offsets in both) or set context_parallel_size=1."
    )


_NOT_SET = object()


def install_postprocess(gpt, postprocess) -> object:
    """Make ``postprocess`` the chunk's ``_postprocess``; what it replaced, for :func:`restore_postprocess` (the
    chunk's own attribute, or a marker when the class's method was in use)."""
    replaced = gpt.__dict__.get("_postprocess", _NOT_SET)
    gpt._postprocess = postprocess
    return replaced


def restore_postprocess(gpt, postprocess, replaced, name: str) -> None:
    """Undo :func:`install_postprocess`; refused when ``postprocess`` (a ``name``) is not the one installed."""
    if gpt is None or gpt.__dict__.get("_postprocess") is not postprocess:
        raise RuntimeError(f"this {name} is not the one installed on its model chunk")
    if replaced is _NOT_SET:
        del gpt._postprocess
    else:
        gpt._postprocess = replaced


class MTPRLPostprocess:
    """The RL postprocess of one model chunk: its settings, the postprocess it replaced, its last output.

    ``patch`` installs it as the chunk's ``GPTModel._postprocess`` and ``unpatch`` puts back exactly what was
    there. Megatron calls ``_postprocess`` with keywords only; they are passed on as they come.
    ``detached_head_ce`` re-runs the heads on detached trunk inputs so they can also get a cross-entropy loss
    that never reaches the trunk (see ``detached_head_ce_coef``).
    """

    def __init__(self, train_lm_head: bool = False, logprob_chunk_size: int = 0, detached_head_ce: bool = False):
        self.train_lm_head = train_lm_head
        self.logprob_chunk_size = logprob_chunk_size
        self.detached_head_ce = detached_head_ce
        self.model = None  # the GPTModel it is installed on
        self._fallback = None  # the postprocess it replaced, run when the heads are not needed
        self._replaced = _NOT_SET  # the chunk's own ``_postprocess`` attribute before patching, if any
        self._output: MTPRLOutput | None = None

    def patch(self, model: torch.nn.Module) -> MTPRLPostprocess:
        """Install on ``model``'s GPTModel; raises when the model cannot serve ``mtp_loss_type=rl``."""
        gpt = _get_patching_model(model)
        if gpt is None:
            raise TypeError(f"mtp_loss_type=rl needs a Megatron GPTModel, got {type(model).__name__}")
        if not gpt.config.mtp_num_layers:
            raise ValueError(
                "actor_rollout_ref.model.mtp.mtp_loss_type=rl but the model has no MTP layers "
                "(mtp_num_layers is 0/None): use a checkpoint with MTP heads (e.g. num_nextn_predict_layers > 0) "
                "or set mtp.enable=False."
            )
        if isinstance(gpt._postprocess, MTPRLPostprocess):
            raise RuntimeError("the RL postprocess is already installed on this model chunk; unpatch it first")
        output_layer = getattr(gpt, "output_layer", None)  # absent on pipeline stages other than the last
        if self.logprob_chunk_size > 0 and getattr(output_layer, "bias", None) is not None:
            raise NotImplementedError(
                "actor_rollout_ref.model.mtp.logprob_chunk_size > 0 needs an output layer without bias; set it to 0"
            )
        self._fallback = gpt._postprocess
        self.model = gpt
        keep_mtp_stage_embedding_grad(gpt)
        self._replaced = install_postprocess(gpt, self)
        return self

    def unpatch(self) -> None:
        """Restore the chunk's postprocess as it was before :meth:`patch`; drop any pending output."""
        restore_postprocess(self.model, self, self._replaced, "RL postprocess")
        self.model, self._fallback, self._replaced, self._output = None, None, _NOT_SET, None

    def pop_output(self) -> MTPRLOutput | None:
        """Take (and clear) what the last forward left; ``None`` when it ran no MTP heads for the RL loss."""
        output, self._output = self._output, None
        return output

    def __call__(self, **kwargs):
        """Main logits as verl computes them; the MTP heads' hidden states kept as the last output.

        Without gradient (verl's ``compute_log_prob``) or without labels the heads are not needed: the
        replaced postprocess runs with ``labels=None`` and returns the main logits only.
        """
        if kwargs.get("labels") is None or not torch.is_grad_enabled():
            return self._fallback(**{**kwargs, "labels": None, "mtp_in_postprocess": False})
        if kwargs.get("output_processor") is not None:
            raise NotImplementedError("mtp_loss_type=rl does not support Megatron's output_processor hook")
        hidden_states, detached = self._run_mtp_block(kwargs)
        if not self.model.post_process:
            return hidden_states
        return self._main_logits_keeping_heads(hidden_states, detached, kwargs)

    def _run_mtp_block(self, kwargs: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The MTP block on the trunk's hidden states (and on detached inputs for the head CE), as Megatron's
        own postprocess calls it: every keyword the block accepts, plus ``extra_block_kwargs`` spread out."""
        gpt = self.model
        trunk_hidden = kwargs["hidden_states"]
        if not kwargs.get("mtp_in_postprocess"):
            if self.detached_head_ce:
                raise NotImplementedError("detached_head_ce_coef > 0 needs the MTP block in the postprocess stage")
            return trunk_hidden, None
        check_cp_roll_offsets(kwargs.get("packed_seq_params"), gpt.config.context_parallel_size)
        accepted = signature(gpt.mtp.forward).parameters
        block_kwargs = {
            k: v for k, v in kwargs.items() if k in accepted and k not in ("hidden_states", "extra_block_kwargs")
        }
        block_kwargs.update(kwargs.get("extra_block_kwargs") or {})
        hidden_states = gpt.mtp(hidden_states=trunk_hidden, embedding=gpt.embedding, **block_kwargs)
        if not self.detached_head_ce:
            return hidden_states, None
        detached = gpt.mtp(
            hidden_states=trunk_hidden.detach(), embedding=_DetachedEmbedding(gpt.embedding), **block_kwargs
        )
        return hidden_states, tuple(torch.chunk(detached, 1 + gpt.config.mtp_num_layers, dim=0)[1:])

    def _main_logits_keeping_heads(self, hidden_states, detached, kwargs: dict) -> torch.Tensor:
        gpt = self.model
        runtime_gather_output = kwargs.get("runtime_gather_output")
        output_weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        chunks = torch.chunk(hidden_states, 1 + gpt.config.mtp_num_layers, dim=0)
        self._output = MTPRLOutput(
            hidden_states=tuple(chunks[1:]),
            output_layer=gpt.output_layer,
            output_weight=output_weight,
            runtime_gather_output=runtime_gather_output,
            train_lm_head=self.train_lm_head,
            logprob_chunk_size=self.logprob_chunk_size,
            detached_hidden_states=detached,
            positions=kwargs.get("position_ids"),
            packed_seq_params=kwargs.get("packed_seq_params"),
        )
        logits, _ = gpt.output_layer(chunks[0], weight=output_weight, runtime_gather_output=runtime_gather_output)
        return logits.transpose(0, 1).contiguous()


def patch_postprocess_rl(
    model: torch.nn.Module, train_lm_head: bool = False, logprob_chunk_size: int = 0, detached_head_ce: bool = False
) -> MTPRLPostprocess:
    """Install a new :class:`MTPRLPostprocess` on ``model``'s GPTModel and return it (``unpatch`` removes it)."""
    return MTPRLPostprocess(train_lm_head, logprob_chunk_size, detached_head_ce).patch(model)
