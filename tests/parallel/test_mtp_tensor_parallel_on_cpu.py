"""TP = 2 (2 gloo CPU ranks) gives the TP = 1 result for the same weights: MTP log-probs, top-1, gradients.

The TP = 1 model is built from a seed in the pytest process; each of the 2 ranks builds the TP = 2 model
(its own shard; a different seed, so nothing matches unless the copy is right) and copies in its shard of
every TP = 1 parameter by megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes. Both ranks then
run the patched (``mtp_loss_type=rl``) forward on the same batch, score each MTP head with the engine's
``score_mtp_heads`` (vocab-parallel log-softmax or the chunked path, whose max / sum-exp / target logit / argmax
are all-reduced over the TP group) plus the main head with verl's vocab-parallel log-prob, and back-propagate
one fixed linear functional of all log-probs. Asserted, for both ranks and every configuration
(``logprob_chunk_size`` 0 / 5, ``train_lm_head`` off / on, sequence parallel off / on):

* per-head log-probs of the sampled tokens (per-token temperature) equal TP = 1 (1e-5), top-1 agreement is
  identical, main logits are the TP = 1 logits' vocabulary shard;
* every parameter's gradient equals this rank's shard of the TP = 1 gradient (replicated parameters: the
  whole gradient; under sequence parallel, parameters megatron tags ``sequence_parallel`` are summed over the
  TP group first, as ``finalize_model_grads`` does).
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from support.mtp_parallel import (
    K,
    MODEL_KW,
    RANK_SEED,
    apply_rl,
    detached,
    forward_backward,
    grads,
    load_tp_shards,
    make_batch,
    reference_runs,
    rl_setting,
    save_reference_params,
    tp_layout,
    tp_shard,
)
from verl_cpu.testing import build_tiny_gpt, init_cpu_megatron, run_cpu_ranks

from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys

pytestmark = pytest.mark.multiprocess

TP = 2
CONFIGS = [
    {"sp": sp, "chunk": chunk, "train_lm_head": lm}
    for sp in (False, True)
    for chunk in (0, 5)
    for lm in (False, True)
]


def config_id(cfg) -> str:
    return f"sp{int(cfg['sp'])}-{'chunked' if cfg['chunk'] else 'output_layer'}-lm_head{int(cfg['train_lm_head'])}"


def _tp_rank(info, params_path, configs):
    """One TP rank: for each configuration, its shard of the TP = 1 weights, forward, backward."""
    init_cpu_megatron(tp=TP, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    params = torch.load(params_path)
    batch = make_batch()
    results = {}
    for cfg in configs:
        model = build_tiny_gpt(K, seed=RANK_SEED, sequence_parallel=cfg["sp"], **MODEL_KW)
        load_tp_shards(model, params)
        hook = apply_rl(model, *rl_setting(cfg))
        logits, scored = forward_backward(model, hook, batch)
        sp_tagged = []
        for name, p in model.named_parameters():
            if getattr(p, "sequence_parallel", False) and p.grad is not None:
                dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
                sp_tagged.append(name)
        results[config_id(cfg)] = {
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "scores": detached(scored),
            "logits": logits.detach().clone(),
            "grads": grads(model),
            "layout": tp_layout(model),
            "sp_tagged": sp_tagged,
        }
    return results


@pytest.fixture(scope="module")
def runs(cpu_megatron, tmp_path_factory):
    """TP = 1 references (pytest process) and the 2 ranks' TP = 2 results, one spawn for all configurations."""
    path = save_reference_params(tmp_path_factory, "tp")
    refs = reference_runs(CONFIGS)
    ranks = run_cpu_ranks(_tp_rank, TP, path, CONFIGS)
    return refs, ranks


def _pairs(runs, cfg):
    refs, ranks = runs
    ref = refs[rl_setting(cfg)]
    return ref, [r[config_id(cfg)] for r in ranks]


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_tp2_head_log_probs_and_top1_equal_tp1(runs, cfg):
    ref, ranks = _pairs(runs, cfg)
    assert sorted(r["tp_rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["scores"].keys() == ref["scores"].keys()
        for k in range(1, K + 1):
            lp_key, _, top1_key = mtp_output_keys(k)
            torch.testing.assert_close(r["scores"][lp_key], ref["scores"][lp_key], rtol=1e-5, atol=1e-5)
            assert torch.equal(r["scores"][top1_key], ref["scores"][top1_key]), f"head {k} top-1 differs"
        torch.testing.assert_close(r["scores"]["log_probs"], ref["scores"]["log_probs"], rtol=1e-5, atol=1e-5)
        shard = ref["logits"].chunk(TP, dim=-1)[r["tp_rank"]]
        torch.testing.assert_close(r["logits"], shard, rtol=1e-5, atol=1e-5)
    # the agreement is not trivially all-0 or all-1 on this batch
    top1 = ref["scores"][mtp_output_keys(1)[2]]
    assert 0 < top1.sum() < top1.numel()


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_tp2_gradients_are_shards_of_tp1_gradients(runs, cfg):
    ref, ranks = _pairs(runs, cfg)
    for r in ranks:
        assert r["grads"].keys() == ref["grads"].keys()
        split_params = [n for n, (split, _) in r["layout"].items() if split]
        assert any(n.startswith("mtp.") for n in split_params) and "output_layer.weight" in split_params
        if cfg["sp"]:
            assert any(".enorm." in n for n in r["sp_tagged"]), r["sp_tagged"]
        for name, want in ref["grads"].items():
            got = r["grads"][name]
            assert want is not None and got is not None, name
            split, dim = r["layout"][name]
            want = tp_shard(want, split, dim, r["tp_rank"], TP)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
