"""verl's real Megatron actor (EngineRegistry -> TrainingWorker -> ppo_loss) trains on CPU.

Runs :mod:`verl_cpu.engine_smoke` in a subprocess (it sets VERL_PLATFORM=cpu and initialises a gloo process
group, which must not leak into other tests) on a tiny Qwen2 built here from a config, with verl-mtp's trainer
config: the engine verl builds must be the CPU variant of the MTP engine that verl-mtp's plugin registered for
cuda (after the CPU platform had loaded).
"""

import math
import re

import pytest
from support.engine_smoke import run_engine_smoke


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from verl_mtp_example.tiny_model import make_tokenizer

    out = str(tmp_path_factory.mktemp("tiny_qwen2"))
    tok = make_tokenizer(out)
    vocab = ((len(tok) + 7) // 8) * 8
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out




def test_engine_smoke_trains_on_cpu(tiny_model_dir):
    """No MTP (the engine is verl's with no regime); packed sequences. The padded (bshd) path runs below, with
    the MTP heads on top of it."""
    proc, out = run_engine_smoke(tiny_model_dir, "actor_rollout_ref.model.use_remove_padding=True")
    assert proc.returncode == 0, out[-4000:]
    assert "engine=CPUMegatronMTPEngineWithLMHead" in out, out[-2000:]
    norms = [float(x) for x in re.findall(r"grad_norm: \[([0-9.eE+-]+)\]", out)]
    losses = [float(x) for x in re.findall(r"actor/pg_loss: \[np.float64\(([0-9.eE+-]+)\)\]", out)]
    assert len(norms) == 2 and all(n > 0 for n in norms), out[-2000:]
    assert len(losses) == 2


@pytest.fixture(scope="module")
def tiny_mimo_dir(tmp_path_factory):
    from verl_mtp_example.tiny_model import make_tiny_mimo

    return make_tiny_mimo(str(tmp_path_factory.mktemp("tiny_mimo")), num_mtp_layers=2)


@pytest.mark.parametrize(
    "remove_padding, occ", [(True, True), (False, False)], ids=["thd-rl_occ", "bshd-rl_fixed"]
)
def test_rl_mtp_term_through_verls_real_engine_and_ppo_loss(tiny_mimo_dir, remove_padding, occ):
    """mtp_loss_type=rl on a 2-head MiMo: verl's engine packs, runs, unpacks; our term lands in the actor loss."""
    proc, out = run_engine_smoke(
        tiny_mimo_dir,
        f"actor_rollout_ref.model.use_remove_padding={remove_padding}",
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.mtp_loss_type=rl",
        f"actor_rollout_ref.model.mtp.occ.enable={occ}",
        "actor_rollout_ref.model.external_lib=verl_mtp_example",
        "actor_rollout_ref.model.trust_remote_code=True",
    )
    assert proc.returncode == 0, out[-4000:]
    for k in (1, 2):
        for name in ("lambda", "top1_agreement", "occ_cross_sum", "pg_clipfrac"):
            values = re.findall(rf"actor/mtp_{k}/{name}: \[([^\]]*)\]", out)
            assert len(values) == 2, (k, name, out[-3000:])
            nums = [float(x) for x in re.findall(r"[-0-9.eE+]+(?=\)|,|$)", values[0].replace("np.float64(", ""))]
            assert nums and all(math.isfinite(x) for x in nums), (k, name, values)
    lambdas = [float(x) for x in re.findall(r"actor/mtp_1/lambda: \[([-0-9.eE+]+)", out)]
    if not occ:
        assert lambdas == [pytest.approx(0.1 / 2)] * 2  # fixed mtp_loss_scaling_factor / K
    norms = [float(x) for x in re.findall(r"grad_norm: \[([0-9.eE+-]+)\]", out)]
    assert len(norms) == 2 and all(n > 0 for n in norms)


@pytest.mark.parametrize(
    "remove_padding, regime", [(True, "rl"), (False, "detach")], ids=["thd-rl_occ", "bshd-detach"]
)
def test_use_fused_kernels_with_mtp_through_verls_real_worker(tiny_mimo_dir, remove_padding, regime):
    """verl's own ``use_fused_kernels=True`` on a 2-head MiMo: the engine scores the main head in chunks (its
    start-up line says so) instead of turning the fused kernels off, and the actor trains, entropy included."""
    proc, out = run_engine_smoke(
        tiny_mimo_dir,
        f"actor_rollout_ref.model.use_remove_padding={remove_padding}",
        "actor_rollout_ref.model.use_fused_kernels=True",
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_train=True",
        f"actor_rollout_ref.model.mtp.detach_encoder={regime == 'detach'}",
        f"actor_rollout_ref.model.mtp.mtp_loss_type={regime}",
        f"actor_rollout_ref.model.mtp.occ.enable={regime == 'rl'}",
        "actor_rollout_ref.model.mtp.logprob_chunk_size=8",
        "actor_rollout_ref.actor.entropy_coeff=0.01",
        "actor_rollout_ref.model.external_lib=verl_mtp_example",
        "actor_rollout_ref.model.trust_remote_code=True",
    )
    assert proc.returncode == 0, out[-4000:]
    assert f"use_fused_kernels=True with mtp_loss_type={regime}" in out and "chunks of 8 tokens" in out, out[-3000:]
    assert "Fused kernels require remove-padding" not in out  # verl's own switch-off did not run
    norms = [float(x) for x in re.findall(r"grad_norm: \[([0-9.eE+-]+)\]", out)]
    entropies = [float(x) for x in re.findall(r"actor/entropy_loss: \[np.float64\(([-0-9.eE+]+)\)", out)]
    assert len(norms) == 2 and all(n > 0 for n in norms), out[-2000:]
    assert len(entropies) == 2 and all(math.isfinite(e) and e > 0 for e in entropies), out[-2000:]
