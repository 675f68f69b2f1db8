"""More settings a GPU run has on by default, on CPU, on a real tiny GPTModel with two MTP heads (``rl``).

* **bf16 with Megatron's real mixed-precision stack**: ``Float16Module`` (bf16 parameters and activations,
  fp32 logits out), Megatron's ``DistributedDataParallel`` with fp32 ``main_grad`` buffers and gradient-
  accumulation fusion (CPU stand-in for the CUDA kernel, ``support.grad_accumulation_fusion``).
  Per-head and main log-probs stay within 0.05 nats of the fp32 model's, every ``main_grad`` within 5 %
  (relative L2) of the fp32 ``.grad``: bf16 keeps 8 bits of mantissa (relative rounding 2**-9 per operation,
  compounded over the layers); a head's lost contribution would move the gradients it reaches by far more
  (guarded below).
  The ``detach`` / ``ce`` gradient routing holds in bf16 too.
* **Selective activation recompute** (``recompute_granularity="selective"``): Megatron's default
  (``core_attn``), ``core_attn`` + ``mlp`` and ``layernorm`` (output-discarding checkpoint) through the
  decoder and the MTP layers: log-probs and gradients equal the run without recompute (fp32, 1e-6). Linear
  layers without bias, as in MiMo / GLM (megatron-core 0.16.1's checkpointed MLP returns a bias parameter from
  inside its autograd function and then recurses without end in the backward).
* **MoE** (4 experts, top-2, ungrouped, local spec; the MTP layers are MoE too, as in GLM-4.5): per-head
  log-probs and every gradient equal a by-hand computation of the heads (expert parallel 1 here; 2 in
  ``tests/parallel/test_mtp_moe_expert_parallel_on_cpu.py``).
* **verl's own MTP settings with the regimes'**: ``enable_train`` / ``detach_encoder`` given against ``rl`` and
  Megatron's ``mtp_loss_scaling_factor``: the rl gradients are the policy term's alone, as documented.

TransformerEngine names that megatron-core 0.16.1 reads even without TE are answered as TE answers with FP8
off (``support.transformer_engine_off``).
"""

import pytest
import torch
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_layer import MoELayer
from support.checkpoint_rng import cpu_checkpoint_rng
from support.grad_accumulation_fusion import (
    cpu_gradient_accumulation_fusion,
    enable_gradient_accumulation_fusion,
    wrap_megatron_ddp,
)
from support.mtp_reference import apply_regime, mtp_only_loss_ce, naive_head_log_probs
from support.mtp_parallel import K, MODEL_KW, MODEL_SEED, apply_rl, forward_backward, make_batch, reference_run
from support.transformer_engine_off import transformer_engine_off
from verl_cpu.testing import build_tiny_gpt

from verl_mtp.models.mcore.mcore_compat import mtp_inner_layer
from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys
from verl_mtp.workers.config import MtpRLConfig

pytestmark = pytest.mark.usefixtures("cpu_megatron")

CHUNKS = {"output_layer": 0, "chunked": 5}
NO_BIAS = dict(add_bias_linear=False)


def fp32_reference(chunk: int, train_lm_head: bool = True, **build_kw) -> dict:
    model = build_tiny_gpt(K, seed=MODEL_SEED, **MODEL_KW, **build_kw)
    return reference_run(model, apply_rl(model, chunk, train_lm_head), make_batch())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# ------------------------------------------------------------------------------------------------------ bf16
def bf16_ddp_model(**build_kw):
    """The fp32 model put in bf16 the way Megatron's training set-up does it: ``Float16Module`` then DDP."""
    model = build_tiny_gpt(K, seed=MODEL_SEED, **MODEL_KW, **build_kw)
    model.config.bf16 = True
    enable_gradient_accumulation_fusion(model)
    return model, wrap_megatron_ddp(Float16Module(model.config, model))


@pytest.mark.parametrize("train_lm_head", [False, True], ids=["lm_head_frozen", "lm_head_trained"])
@pytest.mark.parametrize("path", CHUNKS)
def test_bf16_ddp_log_probs_and_main_grads_match_fp32(path, train_lm_head):
    ref = fp32_reference(CHUNKS[path], train_lm_head)
    with cpu_gradient_accumulation_fusion():
        model, ddp = bf16_ddp_model()
        hook = apply_rl(ddp, CHUNKS[path], train_lm_head)
        _, scored = forward_backward(ddp, hook, make_batch())
        ddp.finish_grad_sync()
    for key, want in ref["scores"].items():
        assert scored[key].dtype == torch.float32, key
        torch.testing.assert_close(scored[key].detach(), want, rtol=0, atol=0.05, msg=lambda m, k=key: f"{k}: {m}")
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.main_grad.dtype == torch.float32 and p.grad is None, name
        assert relative_error(p.main_grad, ref["grads"][name]) < 0.05, name


def test_bf16_tolerance_would_catch_a_lost_head_gradient():
    """Guards the 5 % above: dropping either head's term moves the gradients it reaches by far more."""
    full = fp32_reference(CHUNKS["chunked"])["grads"]
    for k in range(1, K + 1):
        model = build_tiny_gpt(K, seed=MODEL_SEED, **MODEL_KW)
        batch = make_batch()
        batch["weights"][mtp_output_keys(k)[0]].zero_()
        model.zero_grad(set_to_none=True)
        forward_backward(model, apply_rl(model, CHUNKS["chunked"], True), batch)
        grads = dict(model.named_parameters())
        for name in ("output_layer.weight", f"mtp.layers.{k - 1}.eh_proj.weight"):
            assert relative_error(grads[name].grad, full[name]) > 0.2, (k, name)


@pytest.mark.parametrize("regime", ["detach", "ce"])
def test_bf16_ddp_detach_and_ce_gradient_routing(regime):
    """Megatron's MTP cross-entropy alone (zero-weighted main loss): ``detach`` reaches the MTP layers only,
    ``ce`` the trunk too; neither reaches the output layer."""
    with cpu_gradient_accumulation_fusion():
        model, ddp = bf16_ddp_model()
        config = MtpRLConfig(enable=True, enable_train=True, detach_encoder=regime == "detach", mtp_loss_type=regime)
        apply_regime(ddp, config)
        mtp_only_loss_ce(ddp, [torch.randint(1, MODEL_KW["vocab_size"], (10,)) for _ in range(2)]).backward()
        ddp.finish_grad_sync()
    for name, p in model.named_parameters():
        reached = bool(p.main_grad.count_nonzero())
        if name.startswith("mtp."):
            assert reached, name
        elif name == "output_layer.weight" or regime == "detach":
            assert not reached, name
    trunk = [p for n, p in model.named_parameters() if n.startswith(("decoder.", "embedding.word"))]
    assert all(p.main_grad.count_nonzero() for p in trunk) == (regime == "ce")


# ----------------------------------------------------------------------------------- selective recompute
RECOMPUTE_MODULES = {"default": None, "core_attn+mlp": ["core_attn", "mlp"], "layernorm": ["layernorm"]}


@pytest.mark.parametrize("modules", RECOMPUTE_MODULES)
@pytest.mark.parametrize("path", CHUNKS)
def test_selective_recompute_through_the_mtp_block_changes_nothing(path, modules):
    chunk = CHUNKS[path]
    plain = fp32_reference(chunk, config_overrides=NO_BIAS)
    overrides = {**NO_BIAS, "recompute_granularity": "selective"}
    if RECOMPUTE_MODULES[modules] is not None:
        overrides["recompute_modules"] = RECOMPUTE_MODULES[modules]
    model = build_tiny_gpt(K, seed=MODEL_SEED, config_overrides=overrides, **MODEL_KW)
    mtp_layer = mtp_inner_layer(model.mtp.layers[0])
    assert mtp_layer.self_attention.checkpoint_core_attention == (modules != "layernorm")
    assert mtp_layer.recompute_mlp == (modules == "core_attn+mlp")
    assert mtp_layer.recompute_input_layernorm == (modules == "layernorm")
    with cpu_checkpoint_rng(), transformer_engine_off():
        got = reference_run(model, apply_rl(model, chunk, True), make_batch())
    for key, want in plain["scores"].items():
        torch.testing.assert_close(got["scores"][key], want, rtol=1e-6, atol=1e-6)
    for name, want in plain["grads"].items():
        assert want.abs().sum() > 0 or name.startswith("embedding.position"), name
        torch.testing.assert_close(got["grads"][name], want, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------------ MoE
MOE = dict(moe_experts=4, config_overrides=NO_BIAS)


def naive_moe_run(batch: dict) -> dict:
    """Heads run by hand on each sequence alone (``naive_head_log_probs``, temperature 1), then the same linear
    functional of their log-probs back-propagated: scores ``[b, s]`` and every parameter's gradient."""
    model = build_tiny_gpt(K, seed=MODEL_SEED, **MODEL_KW, **MOE)
    scores = {mtp_output_keys(k)[0]: torch.zeros(batch["ids"].shape) for k in range(1, K + 1)}
    loss = 0
    for b, seq in enumerate(batch["ids"]):
        for k, log_probs in naive_head_log_probs(model, seq, 1.0).items():
            key, n = mtp_output_keys(k)[0], log_probs.shape[0]
            scores[key][b, :n] = log_probs.detach()
            loss = loss + (batch["weights"][key][b, :n] * log_probs).sum()
    loss.backward()
    return {"scores": scores, "grads": {name: p.grad for name, p in model.named_parameters()}}


@pytest.mark.parametrize("path", CHUNKS)
def test_moe_head_log_probs_and_grads_equal_naive(path):
    """Patched forward with the engine's scoring (heads only: the main head's weight is 0) vs by hand."""
    batch = make_batch(lengths=(12, 12))
    batch["temperature"].fill_(1.0)
    batch["weights"]["log_probs"].zero_()
    s = batch["ids"].shape[1]
    for k in range(1, K + 1):  # the last k + 1 positions of head k have no target
        batch["weights"][mtp_output_keys(k)[0]][:, s - k - 1 :] = 0
    with transformer_engine_off():
        model = build_tiny_gpt(K, seed=MODEL_SEED, **MODEL_KW, **MOE)
        got = reference_run(model, apply_rl(model, CHUNKS[path], True), batch)
        want = naive_moe_run(batch)
    for k in range(1, K + 1):
        key = mtp_output_keys(k)[0]
        torch.testing.assert_close(got["scores"][key][:, : s - k - 1], want["scores"][key][:, : s - k - 1],
                                   rtol=1e-5, atol=1e-5)
    assert isinstance(mtp_inner_layer(model.mtp.layers[0]).mlp, MoELayer)
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    inner = next(n for n in want["grads"] if n.startswith("mtp.layers.1.") and n.endswith(".mlp.router.weight"))
    assert want["grads"][inner].abs().sum() > 0


# ------------------------------------------------------------------------------- verl's MTP settings with rl
@pytest.mark.parametrize("path", CHUNKS)
def test_verl_mtp_settings_reach_megatron_as_the_rl_regime_documents(path):
    """verl's ``enable_train`` / ``detach_encoder`` against the regime are refused, never rewritten, and
    Megatron's own ``mtp_loss_scaling_factor`` (what verl writes into the TransformerConfig) changes nothing:
    ``rl`` runs the heads on the undetached trunk, Megatron's MTP cross-entropy is never added (its tracker
    stays 0) and the gradients are those of the policy term alone, whatever Megatron's factor."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
    from verl_cpu.testing import MTP_LOSS_TRACKER_KEY

    cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", mtp_loss_scaling_factor=0.3,
                      train_lm_head=True, logprob_chunk_size=CHUNKS[path])
    want = fp32_reference(CHUNKS[path])
    for factor in (0.3, 5.0):
        model = build_tiny_gpt(K, seed=MODEL_SEED, config_overrides=dict(mtp_loss_scaling_factor=factor), **MODEL_KW)
        MTPLossLoggingHelper.tracker[MTP_LOSS_TRACKER_KEY].zero_()
        got = reference_run(model, apply_rl(model, cfg.logprob_chunk_size, cfg.train_lm_head), make_batch())
        assert not MTPLossLoggingHelper.tracker[MTP_LOSS_TRACKER_KEY].any()
        for name, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(ValueError, match="detach_encoder=True contradicts mtp_loss_type=rl"):
        MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", detach_encoder=True)
    with pytest.raises(ValueError, match="set enable_train=True"):
        MtpRLConfig(enable=True, enable_train=False, mtp_loss_type="rl")
