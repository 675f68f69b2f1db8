"""Everything that differs between the Megatron-Core versions the MTP regimes run on, in one place.

Tested: megatron-core 0.16.1, 0.18.0 (verl 0.9.x's pin) and 0.19.2. The rest of the MTP-RL code asks this module
instead of branching on versions itself:

- the transformer layer inside a ``MultiTokenPredictionLayer`` is ``transformer_layer`` up to 0.16 and
  ``mtp_model_layer`` from 0.17; parameter names differ the same way, and mbridge 0.15.1 (the newest, verl's
  vanilla bridge) maps only the old ones, so :func:`adapt_mbridge_mtp_names` translates for it;
- the MTP block's ``forward`` gained optional keywords (``padding_mask``, ...) over the versions: the RL
  postprocess (:mod:`verl_mtp.models.mcore.mtp_patch`) passes on those the block's signature accepts;
- from 0.17 verl 0.9.1 computes the MTP cross-entropy through Megatron's ``process_mtp_loss`` and hands it the
  trainable output layer, so that loss would train the shared lm_head; on older versions verl detaches it. The
  ``detach`` and ``ce`` regimes promise the lm_head never learns from MTP, so :func:`keep_mtp_ce_off_lm_head`
  gives ``process_mtp_loss`` a frozen view of the output layer on every version;
- 0.18.0's ``MultiTokenPredictionLayer.forward`` passes ``padding_mask`` to its own ``_checkpointed_forward``,
  which has no such parameter, so full activation recompute of an MTP layer raises ``TypeError`` in every
  regime (fixed in 0.19); :func:`let_mtp_layers_recompute` makes it work there.
"""

from __future__ import annotations

import inspect

import torch

import verl.models.mcore.mtp_patch as verl_mtp_patch

__all__ = ["mtp_inner_layer", "adapt_mbridge_mtp_names", "keep_mtp_ce_off_lm_head", "let_mtp_layers_recompute"]

_INNER_LAYER_NAMES = ("mtp_model_layer", "transformer_layer")  # 0.17+, then <= 0.16
_FROZEN_FOR_MTP_CE = "_frozen_for_mtp_ce"


def mtp_inner_layer(mtp_layer: torch.nn.Module) -> torch.nn.Module:
    """The transformer layer a ``MultiTokenPredictionLayer`` runs after its ``eh_proj``."""
    for name in _INNER_LAYER_NAMES:
        inner = getattr(mtp_layer, name, None)
        if inner is not None:
            return inner
    raise AttributeError(
        f"{type(mtp_layer).__name__} has none of {_INNER_LAYER_NAMES}: unsupported megatron-core version"
    )


def adapt_mbridge_mtp_names(bridge) -> None:
    """Let an mbridge bridge load and export MTP weights named after 0.17+'s ``mtp_model_layer``.

    Wraps this bridge instance's Megatron-to-HF name mapping (which every load and export goes through) so it
    sees the pre-0.17 name it knows; names without the new segment pass unchanged. Idempotent.
    """
    to_hf = getattr(bridge, "_weight_name_mapping_mcore_to_hf", None)
    if to_hf is None or getattr(to_hf, "mtp_names_adapted", False):
        return

    def mcore_to_hf(name: str) -> list[str]:
        return to_hf(name.replace(".mtp_model_layer.", ".transformer_layer."))

    mcore_to_hf.mtp_names_adapted = True
    bridge._weight_name_mapping_mcore_to_hf = mcore_to_hf


class _FrozenOutputLayer:
    """The output layer called with a detached weight: logits whose loss trains the hidden states only.

    Megatron's ``ColumnParallelLinear`` runs a weight that needs no gradient through its frozen-weight path,
    so no weight gradient (``.grad`` or the fused ``main_grad``) is produced.
    """

    def __init__(self, output_layer: torch.nn.Module):
        if getattr(output_layer, "bias", None) is not None:
            raise NotImplementedError("MTP cross-entropy with a frozen lm_head needs an output layer without bias")
        self.output_layer = output_layer

    def __call__(self, hidden_states, weight=None, runtime_gather_output=None):
        weight = self.output_layer.weight if weight is None else weight
        return self.output_layer(hidden_states, weight=weight.detach(), runtime_gather_output=runtime_gather_output)


def _process_mtp_loss_with_frozen_lm_head(original):
    def process_mtp_loss(**kwargs):
        output_layer = kwargs.get("output_layer")
        if getattr(output_layer, _FROZEN_FOR_MTP_CE, False):
            kwargs["output_layer"] = _FrozenOutputLayer(output_layer)
            if kwargs.get("output_weight") is not None:
                kwargs["output_weight"] = kwargs["output_weight"].detach()
        return original(**kwargs)

    process_mtp_loss.wrapped = original
    return process_mtp_loss


def keep_mtp_ce_off_lm_head(model: torch.nn.Module) -> None:
    """Make the MTP cross-entropy of ``model`` (verl's ``detach`` / ``ce`` path) leave its lm_head untouched.

    Needed from megatron-core 0.17, where verl 0.9.1 passes the trainable output layer to Megatron's
    ``process_mtp_loss``; a no-op on older versions, where verl detaches it itself. Marks this model's output
    layer (pipeline stages without one have nothing to do) and wraps verl's call once per process.
    """
    output_layer = getattr(verl_mtp_patch._get_patching_model(model), "output_layer", None)
    if output_layer is None:
        return
    setattr(output_layer, _FROZEN_FOR_MTP_CE, True)
    original = getattr(verl_mtp_patch, "_process_mtp_loss", None)
    if original is not None and not hasattr(original, "wrapped"):
        verl_mtp_patch._process_mtp_loss = _process_mtp_loss_with_frozen_lm_head(original)


def _recompute_without_padding_mask(checkpointed_forward):
    def recompute(*args, padding_mask=None, **kwargs):
        if padding_mask is not None:
            raise NotImplementedError(
                "megatron-core 0.18.0 cannot recompute an MTP layer with a padding mask (its "
                "MultiTokenPredictionLayer._checkpointed_forward takes none; verl passes one with dynamic context "
                "parallelism). Use megatron-core 0.19+, or turn full recompute off "
                "(actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity)."
            )
        return checkpointed_forward(*args, **kwargs)

    recompute.without_padding_mask = True
    return recompute


def let_mtp_layers_recompute(model: torch.nn.Module) -> None:
    """Let the MTP layers of ``model`` run under full activation recompute on megatron-core 0.18.0.

    There ``forward`` hands ``_checkpointed_forward`` a ``padding_mask`` it does not accept. Per layer, the call
    goes on without it when it is ``None`` (verl passes one only with dynamic context parallelism), which is
    exactly what the layer computes without recompute; a real mask is refused with the fix. Other versions
    are left as they are. Idempotent.
    """
    gpt = verl_mtp_patch._get_patching_model(model)
    for layer in getattr(getattr(gpt, "mtp", None), "layers", ()):
        cls = type(layer)
        if "padding_mask" not in inspect.signature(cls.forward).parameters:
            continue
        if "padding_mask" in inspect.signature(cls._checkpointed_forward).parameters:
            continue
        if getattr(layer._checkpointed_forward, "without_padding_mask", False):
            continue
        layer._checkpointed_forward = _recompute_without_padding_mask(layer._checkpointed_forward)
