"""``use_fused_kernels=True`` with MTP under TP = 2 (sequence parallel off / on) and CP = 2 (2 gloo CPU ranks).

Each rank builds the real tiny GPTModel (K = 2 MTP layers, the CPU platform's core attention) twice from the same
weights -- its TP shard of one reference model, or under CP the whole model -- and runs one actor micro-batch
through what the engine runs (``support.engine_micro_batch``: verl's model-engine forward with its TP / CP
packing, the engine's logits processor, verl's unpacking and CP all-gather, the engine's loss around verl's
``ppo_loss`` with the entropy in it, the backward), once unfused (verl's vocab-parallel log-probs and entropy of
the logits shard) and once fused (the main head's hidden states scored by the chunked function, vocab-parallel:
per chunk one all-gather of the shards' maxima, one all-reduce of the sums). Asserted per rank: log-probs,
entropy, every MTP head's outputs, the loss and every parameter's gradient (this rank's shard) are equal
(fp32, 1e-5).
"""

from functools import partial

import pytest
import torch
from support.actor_config import DAPO, mtp_actor_config
from support.engine_micro_batch import actor_batch, flat_outputs, micro_batch, param_grads, prepared_engine
from support.mtp_parallel import MODEL_KW, MODEL_SEED, RANK_SEED, full_params, load_tp_shards
from verl_cpu.testing import build_tiny_gpt, init_cpu_megatron, run_cpu_ranks

from verl.workers.utils.losses import ppo_loss
from verl_mtp.workers.config import MtpRLConfig, OCCConfig

pytestmark = pytest.mark.multiprocess

K = 2
REGIMES = {
    "detach": dict(mtp_loss_type="detach", enable_train=True, detach_encoder=True),
    "ce": dict(mtp_loss_type="ce", enable_train=True),
    "rl_occ": dict(mtp_loss_type="rl", enable_train=True, occ=OCCConfig(enable=True), train_lm_head=True),
}
TP_CONFIGS = [("rl_occ", "thd", False), ("rl_occ", "thd", True), ("detach", "bshd", False), ("ce", "thd", True)]
CP_CONFIGS = [("rl_occ", "thd", False), ("detach", "bshd", False)]


def config_id(cfg) -> str:
    return f"{cfg[0]}-{cfg[1]}" + ("-sp" if cfg[2] else "")


def _run(params, regime: str, fmt: str, sp: bool, fused: bool) -> dict:
    model = build_tiny_gpt(K, seed=RANK_SEED, packed_attention=True, sequence_parallel=sp, **MODEL_KW)
    load_tp_shards(model, params)
    engine = prepared_engine(model, MtpRLConfig(enable=True, logprob_chunk_size=5, **REGIMES[regime]), fmt, fused)
    loss_fn = partial(ppo_loss, config=mtp_actor_config([*DAPO, "actor_rollout_ref.actor.entropy_coeff=0.01"]))
    out, widths = micro_batch(engine, actor_batch(MODEL_KW["vocab_size"]), fmt, loss_fn, entropy=True)
    return {"outputs": flat_outputs(out), "loss": out["loss"], "grads": param_grads(model), "widths": widths}


def _rank(info, params, tp: int, cp: int, configs):
    init_cpu_megatron(tp=tp, cp=cp, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    return {cfg: {fused: _run(params, *cfg, fused) for fused in (False, True)} for cfg in configs}


@pytest.fixture(scope="module")
def runs(cpu_megatron):
    params = full_params(build_tiny_gpt(K, seed=MODEL_SEED, packed_attention=True, **MODEL_KW))
    return {
        "tp": run_cpu_ranks(_rank, 2, params, 2, 1, TP_CONFIGS, timeout_s=900),
        "cp": run_cpu_ranks(_rank, 2, params, 1, 2, CP_CONFIGS, timeout_s=900),
    }


def _assert_fused_equals_unfused(ranks, cfg):
    for rank in ranks:
        plain, fused = rank[cfg][False], rank[cfg][True]
        assert plain["widths"] and all(w > 0 for w in plain["widths"]) and fused["widths"] == [0]
        assert {"log_probs", "entropy"} <= set(plain["outputs"]) and fused["outputs"].keys() == plain["outputs"].keys()
        for key, want in plain["outputs"].items():
            torch.testing.assert_close(fused["outputs"][key], want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
        assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert any(n.startswith("output_layer.") and g is not None for n, g in plain["grads"].items())
        for name, want in plain["grads"].items():
            got = fused["grads"][name]
            assert (got is None) == (want is None), name
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("cfg", TP_CONFIGS, ids=config_id)
def test_tp2_fused_main_head_equals_the_unfused_path(runs, cfg):
    _assert_fused_equals_unfused(runs["tp"], cfg)


@pytest.mark.parametrize("cfg", CP_CONFIGS, ids=config_id)
def test_cp2_fused_main_head_equals_the_unfused_path(runs, cfg):
    _assert_fused_equals_unfused(runs["cp"], cfg)
