"""Independent references for the MTP heads of a tiny GPTModel, shared by the model-level tests: the heads run by
hand, the engine's start-up patches per regime, and Megatron's own MTP cross-entropy in isolation."""

from types import SimpleNamespace

import torch
from verl_cpu.testing import causal_attention_mask, prepare_mtp_loss_tracker

from verl.utils.megatron_utils import patch_engine_mtp
from verl_mtp.models.mcore.mcore_compat import keep_mtp_ce_off_lm_head, mtp_inner_layer
from verl_mtp.models.mcore.mtp_patch import patch_postprocess_rl


def naive_head_log_probs(model, seq: torch.Tensor, temperature: float) -> dict[int, torch.Tensor]:
    """For each depth k, log p_k(x[i+k+1] | position i) for i + k + 1 < len, computed by hand."""
    s = seq.shape[0]
    mask = causal_attention_mask(1, s)
    ids, pos = seq.clone(), torch.arange(s)
    h = model.decoder(hidden_states=model.embedding(input_ids=ids[None], position_ids=pos[None]), attention_mask=mask)
    out = {}
    for k in range(1, model.config.mtp_num_layers + 1):
        ids = torch.cat([ids[1:], ids.new_zeros(1)])
        pos = torch.cat([pos[1:], pos.new_zeros(1)])
        layer = model.mtp.layers[k - 1]
        e = layer.enorm(model.embedding(input_ids=ids[None], position_ids=pos[None]))
        z, _ = layer.eh_proj(torch.cat([e, layer.hnorm(h)], dim=-1))
        z, _ = mtp_inner_layer(layer)(hidden_states=z, attention_mask=mask)
        h = layer.final_layernorm(z)
        logits, _ = model.output_layer(h)
        log_softmax = torch.log_softmax(logits[:, 0, :] / temperature, dim=-1)
        n = max(s - k - 1, 0)
        out[k] = log_softmax[torch.arange(n), seq[k + 1 : k + 1 + n]]
    return out


def apply_regime(model, mtp_config):
    """What the engine does at start-up: verl's own MTP patch with the regime's switches, then the regime's (the RL
    postprocess for ``rl``, the frozen lm_head for verl's MTP cross-entropy otherwise)."""
    patch_engine_mtp(model, SimpleNamespace(mtp=mtp_config))
    if mtp_config.is_rl:
        patch_postprocess_rl(model, mtp_config.train_lm_head, mtp_config.logprob_chunk_size)
    else:
        keep_mtp_ce_off_lm_head(model)


def main_labels(ids, lengths):
    """verl's label buffer: x[i+1] at slot i of each sequence (its last slot is never scored)."""
    labels = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        labels[b, : n - 1] = ids[b, 1:n]
    return labels


def mtp_only_loss_ce(model, seqs):
    """Megatron's MTP CE reaches the graph through MTPLossAutoScaler on the main hidden states: a zero-weighted
    main loss isolates exactly the MTP gradient."""
    ids = torch.stack(seqs)
    b, s = ids.shape
    prepare_mtp_loss_tracker(model.config.mtp_num_layers)
    logits = model(ids, torch.arange(s).expand(b, s).contiguous(), causal_attention_mask(b, s),
                   labels=main_labels(ids, [s] * b))
    return (logits * 0).sum()
