"""Code paths a GPU run takes by default, run on CPU on a real tiny GPTModel with MTP heads.

bf16 head scoring: the heads' logits come out of the output layer in bf16; the temperature division and the
log-softmax must then run in fp32, as for the main head (Megatron's ``Float16Module`` hands verl fp32 logits),
on both scoring paths; the main head scored in chunks under ``use_fused_kernels`` likewise, entropy included.
Reference: fp64 log-softmax of the same bf16 logits.

Full activation recompute (``recompute_granularity=full``, ``recompute_method=uniform``,
``recompute_num_layers=1``, what Megatron allows for MTP) through the decoder and the MTP block with the rl
postprocess: Megatron's real ``CheckpointFunction`` runs (its CUDA RNG state save/restore answered on CPU, the
model has no dropout); per-head log-probs and every parameter gradient equal the run without recompute
(fp32, rtol 1e-5 / atol 1e-6).
"""

import contextlib
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from megatron.core import tensor_parallel
from support.checkpoint_rng import cpu_checkpoint_rng
from support.mtp_batches import bshd_head_labels
from verl_cpu.testing import build_tiny_gpt, causal_attention_mask

from verl.utils.megatron_utils import patch_engine_mtp
from verl_mtp.models.mcore.mcore_compat import let_mtp_layers_recompute
from verl_mtp.models.mcore.mtp_log_probs import mtp_token_log_probs, score_mtp_heads
from verl_mtp.models.mcore.token_scores import chunked_token_scores
from verl_mtp.models.mcore.mtp_patch import MTPRLOutput, patch_postprocess_rl
from verl_mtp.workers.config import MtpRLConfig

pytestmark = pytest.mark.usefixtures("cpu_megatron")

VOCAB = 512
HIDDEN = 64


@pytest.mark.parametrize("chunk", [0, 7], ids=["output_layer", "chunked"])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_bf16_head_log_probs_are_computed_in_fp32(chunk, temperature):
    model = build_tiny_gpt(1, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=1)
    layer = model.output_layer.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    s, b = 24, 2
    hidden = (3 * torch.randn(s, b, HIDDEN, generator=g)).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g) / 2)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    temp = torch.full((b, s), temperature)
    out = MTPRLOutput(
        hidden_states=(hidden,), output_layer=layer, output_weight=None, runtime_gather_output=None,
        train_lm_head=False, logprob_chunk_size=chunk,
    )
    got, _ = mtp_token_log_probs(out, hidden, labels, temp, trainable_weight=False)

    logits = (hidden @ layer.weight.detach().t()).double() / temperature  # the layer's bf16 logits, then fp64
    want = torch.log_softmax(logits, dim=-1).gather(-1, labels.t()[..., None]).squeeze(-1).t()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_bf16_main_head_scores_and_gradients_in_chunks(temperature):
    """The fused main head's path under bf16 (``use_fused_kernels`` with MTP): log-probs and entropy against the
    fp64 softmax of the same bf16 logits (1e-4, as the heads), the gradients of a random functional of both
    within the GPU check's bf16 tolerance (5e-2 relative)."""
    g = torch.Generator().manual_seed(1)
    s, b = 24, 2
    hidden = (3 * torch.randn(s, b, HIDDEN, generator=g)).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) / 2).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, VOCAB, (s, b), generator=g)
    w_lp, w_h = torch.randn(s, b, generator=g), torch.randn(s, b, generator=g)
    temp = torch.full((s, b), temperature)
    got = chunked_token_scores(hidden, weight, labels, temp, 7, entropy=True)
    assert got.log_probs.dtype == got.entropy.dtype == torch.float32

    logits = (hidden @ weight.t()).double() / temperature  # the layer's bf16 logits, then fp64
    log_p = torch.log_softmax(logits, dim=-1)
    want_lp, want_h = log_p.gather(-1, labels[..., None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(got.log_probs.double(), want_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.entropy.double(), want_h, rtol=0, atol=1e-4)
    got_grads = torch.autograd.grad((got.log_probs * w_lp + got.entropy * w_h).sum(), [hidden, weight])
    want_grads = torch.autograd.grad((want_lp * w_lp + want_h * w_h).sum(), [hidden, weight])
    for got_g, want_g in zip(got_grads, want_grads, strict=True):
        rel = (got_g.double() - want_g.double()).norm() / want_g.double().norm()
        assert rel < 5e-2, rel


def rl_scores_and_grads(chunk: int, recompute: bool, k: int = 2):
    model = build_tiny_gpt(k, vocab_size=48, seed=3)
    cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", train_lm_head=True, logprob_chunk_size=chunk)
    with contextlib.redirect_stdout(None):  # verl's patch prints the model
        patch_engine_mtp(model, SimpleNamespace(mtp=cfg))
    hook = patch_postprocess_rl(model, cfg.train_lm_head, cfg.logprob_chunk_size)
    let_mtp_layers_recompute(model)  # as the engine does with every regime (megatron-core 0.18.0)
    if recompute:
        model.config.recompute_granularity, model.config.recompute_method = "full", "uniform"
        model.config.recompute_num_layers = 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 48, (2, 12), generator=g)
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    calls = []
    checkpoint = tensor_parallel.checkpoint

    def counted_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    with cpu_checkpoint_rng(), mock.patch.object(tensor_parallel, "checkpoint", counted_checkpoint):
        logits = model(ids, torch.arange(12).expand(2, 12).contiguous(), causal_attention_mask(2, 12), labels=labels)
        scored = score_mtp_heads(hook.pop_output(), bshd_head_labels(ids, [12, 12], k), torch.full((2, 12), 0.8))
        weights = {key: torch.randn(v.shape, generator=g) for key, v in scored.items()}
        loss = sum((w * scored[key]).sum() for key, w in weights.items()) + (logits.float() ** 2).mean()
        loss.backward()
    # Megatron checkpoints each decoder layer (uniform, 1 layer per chunk) and each MTP layer
    assert len(calls) == (model.config.num_layers + k if recompute else 0)
    return {key: v.detach() for key, v in scored.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [0, 5], ids=["output_layer", "chunked"])
def test_full_recompute_through_the_mtp_block_changes_nothing(chunk):
    plain_scores, plain_grads = rl_scores_and_grads(chunk, recompute=False)
    scores, grads = rl_scores_and_grads(chunk, recompute=True)
    for key, want in plain_scores.items():
        torch.testing.assert_close(scores[key], want, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, want in plain_grads.items():
        assert want.abs().sum() > 0 or name.startswith("embedding.position"), name
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_an_mtp_padding_mask_under_full_recompute_is_refused_where_megatron_cannot_recompute_it():
    """megatron-core 0.18.0's MTP layer passes ``padding_mask`` to a ``_checkpointed_forward`` that takes none.
    ``let_mtp_layers_recompute`` lets ``None`` through (the test above) and refuses a real mask with the fix."""
    import inspect

    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer as Layer

    if "padding_mask" not in inspect.signature(Layer.forward).parameters or (
        "padding_mask" in inspect.signature(Layer._checkpointed_forward).parameters
    ):
        pytest.skip("this megatron-core recomputes MTP layers with a padding mask itself (only 0.18.0 cannot)")
    model = build_tiny_gpt(1, vocab_size=48, seed=3)
    let_mtp_layers_recompute(model)
    let_mtp_layers_recompute(model)  # idempotent: one wrapper
    layer = model.mtp.layers[0]
    assert getattr(layer._checkpointed_forward, "without_padding_mask", False)
    with pytest.raises(NotImplementedError, match="recompute_granularity"):
        layer._checkpointed_forward(hidden_states=None, decoder_input=None, padding_mask=torch.ones(1, 4))
