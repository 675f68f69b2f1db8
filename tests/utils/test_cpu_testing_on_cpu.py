"""verl_cpu.testing: the tiny CPU Megatron-Core GPT + MTP model used by other tests builds, runs and trains as
expected, with the CPU platform's own mechanism (the one the trainer's CPU plugin installs)."""

import pytest
import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper, MultiTokenPredictionLayer

from verl_cpu.testing import (
    MTP_LOSS_TRACKER_KEY,
    build_tiny_gpt,
    causal_attention_mask,
    forward_bshd,
    init_cpu_megatron,
)

VOCAB, BATCH, SEQ = 64, 2, 16

pytestmark = pytest.mark.usefixtures("cpu_megatron")


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _grad_norms(module):
    return {n: (0.0 if p.grad is None else p.grad.abs().sum().item()) for n, p in module.named_parameters()}


@pytest.mark.parametrize("k", [1, 2])
def test_builds_real_gpt_with_k_mtp_layers(k):
    model = build_tiny_gpt(mtp_num_layers=k)
    assert isinstance(model, GPTModel)
    assert model.config.mtp_num_layers == k
    assert len(model.mtp.layers) == k
    assert all(isinstance(layer, MultiTokenPredictionLayer) for layer in model.mtp.layers)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_no_mtp_model_has_no_mtp_block():
    model = build_tiny_gpt(mtp_num_layers=0)
    assert model.config.mtp_num_layers is None and not hasattr(model, "mtp")
    assert forward_bshd(model, _tokens()).shape == (BATCH, SEQ, VOCAB)


@pytest.mark.parametrize("k", [1, 2])
def test_forward_without_labels_returns_main_head_logits(k):
    model = build_tiny_gpt(mtp_num_layers=k)
    logits = forward_bshd(model, _tokens())
    assert logits.shape == (BATCH, SEQ, VOCAB)
    assert torch.isfinite(logits).all()
    # The temporary MTP hiding (labels=None shim) is undone.
    assert model.mtp_process and model.config.mtp_num_layers == k

    # Main-head logits are those of the same weights without MTP: MTP does not touch the main head.
    base = build_tiny_gpt(mtp_num_layers=0)
    base.load_state_dict({n: t for n, t in model.state_dict().items() if not n.startswith("mtp.")}, strict=False)
    torch.testing.assert_close(forward_bshd(base, _tokens()), logits)


def test_causal_mask_makes_logits_causal():
    mask = causal_attention_mask(BATCH, SEQ)
    assert mask.shape == (BATCH, 1, SEQ, SEQ) and mask.dtype == torch.bool
    assert mask[0, 0, 0, 1] and not mask[0, 0, 1, 0]

    model = build_tiny_gpt(mtp_num_layers=1).eval()
    a, b = _tokens(), _tokens()
    b[:, SEQ // 2 :] = (b[:, SEQ // 2 :] + 1) % VOCAB  # change only the second half
    with torch.no_grad():
        la, lb = forward_bshd(model, a), forward_bshd(model, b)
    torch.testing.assert_close(la[:, : SEQ // 2], lb[:, : SEQ // 2])
    assert not torch.allclose(la[:, SEQ // 2 :], lb[:, SEQ // 2 :])


def test_backward_from_logits_reaches_decoder_but_not_mtp():
    model = build_tiny_gpt(mtp_num_layers=1)
    forward_bshd(model, _tokens()).sum().backward()
    grads = _grad_norms(model)
    assert all(v > 0 for n, v in grads.items() if n.startswith("decoder.")), grads
    assert grads["embedding.word_embeddings.weight"] > 0 and grads["output_layer.weight"] > 0
    assert all(v == 0 for n, v in grads.items() if n.startswith("mtp.")), "labels=None must skip MTP"


@pytest.mark.parametrize("k", [1, 2])
def test_labels_exercise_mtp_loss_and_train_every_mtp_layer(k):
    """With labels, megatron's _postprocess adds the MTP CE via MTPLossAutoScaler.

    The main loss does not depend on MTP parameters at all (their hidden states are chunked off before
    the main head), so any gradient on ``mtp.*`` proves the injected MTP loss is backpropagated.
    """
    model = build_tiny_gpt(mtp_num_layers=k)
    MTPLossLoggingHelper.tracker.clear()
    tokens = _tokens()
    labels = torch.roll(tokens, shifts=-1, dims=1)
    loss = forward_bshd(model, tokens, labels=labels, loss_mask=torch.ones_like(tokens, dtype=torch.float32))
    assert loss.shape == (BATCH, SEQ) and torch.isfinite(loss).all()
    loss.mean().backward()

    grads = _grad_norms(model)
    assert all(v > 0 for n, v in grads.items() if n.startswith("decoder.")), grads
    for i in range(k):
        layer = {n: v for n, v in grads.items() if n.startswith(f"mtp.layers.{i}.")}
        assert layer and all(v > 0 for v in layer.values()), layer
    # Megatron logged one positive MTP loss per layer in its own tracker, created on the CPU.
    values = MTPLossLoggingHelper.tracker[MTP_LOSS_TRACKER_KEY]
    assert values.device.type == "cpu" and values.shape == (k,) and (values > 0).all()


def test_same_seed_same_weights_different_seed_different_weights():
    state = lambda m: m.state_dict()  # noqa: E731
    a, b, c = (state(build_tiny_gpt(mtp_num_layers=2, seed=s)) for s in (7, 7, 8))
    assert a.keys() == b.keys()
    for name in a:
        if torch.is_tensor(a[name]):
            assert torch.equal(a[name], b[name]), name
    assert any(torch.is_tensor(a[n]) and not torch.equal(a[n], c[n]) for n in a)


def test_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_gpt(mtp_num_layers=1, seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_shared_embeddings_with_mtp():
    model = build_tiny_gpt(mtp_num_layers=1, share_embeddings=True)
    assert model.output_layer.weight is None  # the output head reuses the word embedding
    tokens = _tokens()
    forward_bshd(model, tokens, labels=tokens).sum().backward()
    assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0


def test_init_is_idempotent_and_rng_tracker_works_without_cuda():
    init_cpu_megatron()
    init_cpu_megatron()
    with pytest.raises(ValueError, match="tp\\*pp\\*cp must be 1"):
        init_cpu_megatron(tp=2)
    # Megatron's own seeding entry point runs on the CPU tracker, and fork() gives a reproducible stream.
    model_parallel_cuda_manual_seed(11)
    with get_cuda_rng_tracker().fork():
        first = torch.rand(2)
    model_parallel_cuda_manual_seed(11)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(2), first)


def test_megatron_cuda_calls_run_on_the_platform_mechanism():
    """What Megatron allocates on ``torch.cuda.current_device()`` lands on the CPU through the platform's shim."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mcore_random

    from verl_cpu.cuda import CPURNGStatesTracker

    init_cpu_megatron()
    assert torch.cuda.current_device() == "cpu" and not torch.cuda.is_available()
    assert isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker)
    buf = parallel_state.get_global_memory_buffer().get_tensor((2, 3), torch.float32, "verl_cpu_test")
    assert buf.device.type == "cpu" and buf.shape == (2, 3)
