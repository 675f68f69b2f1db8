"""verl's ``use_fused_kernels=True`` with MTP on: the main head scored in chunks equals verl's unfused path.

A real tiny GPTModel (K = 1 or 2 real MTP layers; the CPU platform's core attention, so THD packing runs) goes
through what the engine runs for one actor micro-batch (``support.engine_micro_batch``): once with
``use_fused_kernels=False`` (verl's logits, its temperature division, entropy and vocab-parallel log-probs) and
once with ``use_fused_kernels=True`` (the main head's output-layer call captured, its hidden states scored by the
chunked function in chunks of 5 tokens), from the same weights, in every regime (detach, ce, rl, rl + OCC),
THD and BSHD, per-sequence temperatures 0.7-1.3, with the entropy in the loss (``entropy_coeff`` 0.01).

Asserted: verl's forward handed the processor logits of the full vocabulary unfused and an empty stand-in fused;
log-probs, entropy and every MTP head's outputs, the loss and every parameter's gradient are equal (fp32,
1e-5). Forward only (verl's compute_log_prob): log-probs, entropy and verl's sum of squared probabilities equal.
What cannot run fused is refused with the setting named. The fused scoring, forward and backward, reads
nothing back to the host (verl's processor does).
"""

from functools import cache, partial
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from support.actor_config import DAPO, mtp_actor_config
from support.engine_micro_batch import actor_batch, flat_outputs, micro_batch, param_grads, prepared_engine
from support.mtp_parallel import MODEL_KW
from support.mtp_reference import apply_regime, main_labels
from torch.utils._python_dispatch import TorchDispatchMode
from verl_cpu.testing import build_tiny_gpt, causal_attention_mask, prepare_mtp_loss_tracker

from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead
from verl.workers.utils.losses import ppo_loss
from verl_mtp.models.mcore.main_head_scoring import MainHeadCapture
from verl_mtp.workers.config import MtpRLConfig, OCCConfig
from verl_mtp.workers.config.mtp import check_fused_main_head_settings
from verl_mtp.workers.engine.megatron import mtp_engine_hooks
from verl_mtp.workers.engine.megatron.mtp_engine_state import MtpEngineState

pytestmark = pytest.mark.usefixtures("cpu_megatron")

VOCAB = MODEL_KW["vocab_size"]
CHUNK = 5
REGIMES = {
    "detach": dict(mtp_loss_type="detach", enable_train=True, detach_encoder=True),
    "ce": dict(mtp_loss_type="ce", enable_train=True),
    "rl": dict(mtp_loss_type="rl", enable_train=True),
    "rl_occ": dict(mtp_loss_type="rl", enable_train=True, occ=OCCConfig(enable=True), train_lm_head=True),
}
CONFIGS = [(regime, fmt, k) for regime in REGIMES for fmt in ("thd", "bshd") for k in (1, 2)]


def mtp_config(regime: str) -> MtpRLConfig:
    return MtpRLConfig(enable=True, logprob_chunk_size=CHUNK, **REGIMES[regime])


def engine_for(regime: str, fmt: str, k: int, fused: bool, tied: bool = False):
    model = build_tiny_gpt(k, seed=7, packed_attention=True, share_embeddings=tied, **MODEL_KW)
    return prepared_engine(model, mtp_config(regime), fmt, use_fused_kernels=fused)


@cache
def loss_with_entropy():
    """verl's ppo_loss (DAPO's clip-higher) with the entropy in the loss, so it back-propagates."""
    return partial(ppo_loss, config=mtp_actor_config([*DAPO, "actor_rollout_ref.actor.entropy_coeff=0.01"]))


def train_step(regime, fmt, k, fused, tied=False):
    engine = engine_for(regime, fmt, k, fused, tied)
    out, widths = micro_batch(engine, actor_batch(VOCAB), fmt, loss_with_entropy(), entropy=True)
    return engine, out, widths


@pytest.mark.parametrize(
    "regime, fmt, k, tied",
    [(*cfg, False) for cfg in CONFIGS] + [("detach", "thd", 1, True), ("rl_occ", "bshd", 2, True)],
    ids=[f"{r}-{f}-K{k}" for r, f, k in CONFIGS] + ["tied-detach-thd-K1", "tied-rl_occ-bshd-K2"],
)
def test_fused_main_head_equals_the_unfused_path(regime, fmt, k, tied):
    """``tied``: the output layer shares the embedding's weight (the main head's live weight is the embedding's)."""
    plain_engine, plain, plain_widths = train_step(regime, fmt, k, fused=False, tied=tied)
    fused_engine, fused, fused_widths = train_step(regime, fmt, k, fused=True, tied=tied)
    assert plain_widths == [VOCAB] and fused_widths == [0]  # fused: no main-head logits reached verl
    assert fused_engine.mtp_state.fused_main_head and not fused_engine.engine_config.use_fused_kernels

    want, got = flat_outputs(plain), flat_outputs(fused)
    assert {"log_probs", "entropy"} <= set(want) and got.keys() == want.keys()
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-5)

    want_grads, got_grads = param_grads(plain_engine.module[0]), param_grads(fused_engine.module[0])
    for prefix in ("embedding.", "decoder.", "mtp.") + (() if tied else ("output_layer.",)):
        assert any(n.startswith(prefix) and g is not None and g.abs().sum() > 0 for n, g in want_grads.items())
    for name, w in want_grads.items():
        g = got_grads[name]
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("fmt", ["thd", "bshd"])
def test_forward_only_scores_equal_verls_with_sum_pi_squared(fmt):
    """verl's compute_log_prob: no gradient, entropy and the optimal-token baseline's sum of squared probs."""
    outs = {}
    for fused in (False, True):
        engine = engine_for("detach", fmt, 2, fused)
        with torch.no_grad():
            out, _ = micro_batch(engine, actor_batch(VOCAB), fmt, entropy=True, sum_pi_squared=True)
        outs[fused] = flat_outputs(out)
    assert {"log_probs", "entropy", "sum_pi_squared"} <= set(outs[False]) and outs[True].keys() == outs[False].keys()
    for key, want in outs[False].items():
        torch.testing.assert_close(outs[True][key], want, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_what_needs_the_main_heads_logits_is_refused_with_the_setting():
    engine = engine_for("rl", "thd", 1, fused=True)
    with pytest.raises(NotImplementedError, match="calculate_sum_pi_squared"):
        micro_batch(engine, actor_batch(VOCAB), "thd", entropy=False, sum_pi_squared=True)
    engine = engine_for("detach", "thd", 1, fused=True)
    with pytest.raises(NotImplementedError, match="top-k distillation.*use_fused_kernels=False"):
        engine._lm_head_logits_processor(
            None, None, None, calculate_sum_pi_squared=False, calculate_entropy=False, distillation_use_topk=True,
            distillation_only=True, logits_processor_func=None, batch=None, data_format="thd",
        )
    with pytest.raises(RuntimeError, match="no main-head output-layer call was captured"):
        engine._lm_head_logits_processor(
            None, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), calculate_sum_pi_squared=False,
            calculate_entropy=False, distillation_use_topk=False, distillation_only=False, logits_processor_func=None,
            batch=None, data_format="thd",
        )


def test_start_up_refuses_a_zero_chunk_and_top_k_distillation_and_leaves_verl_alone_without_a_regime():
    model = build_tiny_gpt(1, seed=7, **MODEL_KW)
    with pytest.raises(ValueError, match="logprob_chunk_size"):
        config = MtpRLConfig(
            enable=True, enable_train=True, detach_encoder=True, mtp_loss_type="detach", logprob_chunk_size=0
        )
        prepared_engine(model, config, "thd", True)
    topk = OmegaConf.create({"enabled": True, "distillation_loss": {"loss_mode": "forward_kl_topk"}})
    with pytest.raises(ValueError, match="top-k distillation"):
        check_fused_main_head_settings(True, mtp_config("rl"), topk)
    check_fused_main_head_settings(False, mtp_config("rl"), topk)  # verl's own fused switch off: nothing to check
    # no regime: verl's own MTP behaviour, which turns its fused kernels off
    engine = prepared_engine(build_tiny_gpt(1, seed=7, **MODEL_KW), MtpRLConfig(enable=True), "thd", True)
    assert not engine.mtp_state.fused_main_head and not engine.mtp_state.main_head_capture
    assert engine.engine_config.use_fused_kernels is False


def test_the_capture_restores_the_model_and_refuses_an_output_layer_with_a_bias():
    model = build_tiny_gpt(1, seed=7, **MODEL_KW)
    before = model.__dict__.get("_postprocess"), model.output_layer.__dict__.get("forward")
    capture = MainHeadCapture(CHUNK).patch(model)
    assert model._postprocess is capture
    capture.unpatch()
    assert (model.__dict__.get("_postprocess"), model.output_layer.__dict__.get("forward")) == before
    model.output_layer.bias = torch.nn.Parameter(torch.zeros(VOCAB))
    with pytest.raises(NotImplementedError, match="use_fused_kernels=False"):
        MainHeadCapture(CHUNK).patch(model)


class HostReads(TorchDispatchMode):
    """Operators that make the host wait for the device: a scalar read (``item``, ``bool`` of a tensor ...) or
    an output whose shape depends on values (``nonzero``, boolean-mask indexing)."""

    DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ()
        )
        if name == "_local_scalar_dense" or name in self.DATA_DEPENDENT or bool_index:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_fused_scoring_reads_nothing_back_to_the_host():
    """The processor and the backward (through the model, Megatron's MTP cross-entropy included) of the fused
    main head: no host read (verl's unfused processor makes some: its temperature check, Megatron's
    cross-entropy masks), so the path adds nothing to a step's syncs."""
    model = build_tiny_gpt(2, seed=7, **MODEL_KW)
    apply_regime(model, mtp_config("detach"))
    capture = MainHeadCapture(CHUNK).patch(model)
    ids = torch.randint(1, VOCAB, (2, 9))
    prepare_mtp_loss_tracker(2)
    logits = model(ids, torch.arange(9).expand(2, 9).contiguous(), causal_attention_mask(2, 9),
                   labels=main_labels(ids, [9, 9]))
    labels, temperature = main_labels(ids, [9, 9]), torch.full((2, 9), 0.8)
    flags = dict(calculate_sum_pi_squared=False, calculate_entropy=True, distillation_use_topk=False,
                 distillation_only=False, logits_processor_func=None)
    engine = SimpleNamespace(mtp_state=MtpEngineState(main_head_capture={model: capture}))
    with HostReads() as fused:
        out = mtp_engine_hooks.fused_main_head_scores(engine, labels, temperature, **flags)
        (out["log_probs"].sum() + out["entropy"].sum()).backward()
    assert logits.shape == (2, 9, 0) and model.output_layer.weight.grad.abs().sum() > 0
    assert fused.ops == []

    verl_logits = torch.randn(2, 9, VOCAB, requires_grad=True)
    verl_engine = SimpleNamespace(engine_config=SimpleNamespace(entropy_from_logits_with_chunking=False))
    with HostReads() as verl:
        out = MegatronEngineWithLMHead._lm_head_logits_processor(
            verl_engine, verl_logits.clone(), labels, torch.full((2, 9), 0.8), batch=None, data_format="bshd", **flags
        )
        (out["log_probs"].sum() + out["entropy"].sum()).backward()
    assert "_local_scalar_dense" in verl.ops  # the counter sees what it counts
