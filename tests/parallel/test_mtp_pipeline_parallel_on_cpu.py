"""PP = 2 (2 gloo CPU ranks): MTP heads live on the last stage and score exactly like PP = 1.

Megatron-Core 0.16.1 (no custom pipeline layout) builds the MTP block only where ``get_gpt_mtp_block_spec``
finds ``is_pipeline_last_stage()``; that stage also keeps its own copy of the word embedding (the MTP layers
embed the rolled input ids), zeroed and all-reduced with the first stage's at construction, and the two copies'
gradients are summed over megatron's embedding group by ``finalize_model_grads``.

The PP = 1 model is built from a seed in the pytest process; each rank builds its stage and copies in the
matching PP = 1 parameters (decoder layers by their global ``layer_number``). The two stages are then run by
hand, as megatron's schedule would: stage 0's hidden states go to stage 1 with ``torch.distributed.send``,
stage 1 takes them through ``set_input_tensor``, runs the decoder's second half, the RL postprocess (MTP
block + main head) and ``score_mtp_heads``, back-propagates one fixed linear functional of all log-probs and
sends the input-tensor gradient back; stage 0 back-propagates it. Asserted:

* placement: the last stage's GPTModel has the MTP block (K layers), the output layer and an embedding; the
  first has no MTP block and no output layer; the last stage's word-embedding copy equals the first's after
  construction and is tagged ``shared_embedding``;
* per-head log-probs / top-1 on the last stage (and the main head's) equal PP = 1 (``logprob_chunk_size`` 0
  and 5);
* every parameter's gradient equals PP = 1's; the word embedding after summing over megatron's embedding group.
  Learned absolute position embeddings (only used here because RoPE needs CUDA) also have a copy on the MTP
  stage whose gradient megatron does *not* sum with the first stage's (its position-embedding group is the
  first stage alone); the test asserts that the two stages' gradients add up to PP = 1's.
"""

import re

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
    forward_stage,
    make_batch,
    reference_runs,
    rl_setting,
    save_reference_params,
)
from verl_cpu.testing import build_tiny_gpt, init_cpu_megatron, run_cpu_ranks

from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys

pytestmark = pytest.mark.multiprocess

PP = 2
WORD_EMB = "embedding.word_embeddings.weight"
POS_EMB = "embedding.position_embeddings.weight"
CONFIGS = [{"chunk": 0, "train_lm_head": False}, {"chunk": 5, "train_lm_head": True}]


def config_id(cfg) -> str:
    return f"{'chunked' if cfg['chunk'] else 'output_layer'}-lm_head{int(cfg['train_lm_head'])}"


def global_names(model) -> dict[str, str]:
    """Local parameter name -> the PP = 1 model's name (decoder layers renumbered by ``layer_number``)."""
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}

    def rename(name):
        return re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{offsets[int(m.group(1))]}.", name)

    return {name: rename(name) for name, _ in model.named_parameters()}


def _placement(model) -> dict:
    emb = getattr(model, "embedding", None)
    pos_group = parallel_state.get_position_embedding_group(check_initialized=False)  # None: not a member
    return {
        "pre_process": model.pre_process,
        "post_process": model.post_process,
        "mtp_process": model.mtp_process,
        "mtp_layers": len(model.mtp.layers) if hasattr(model, "mtp") else 0,
        "has_output_layer": hasattr(model, "output_layer"),
        "decoder_layer_numbers": [layer.layer_number for layer in model.decoder.layers],
        "word_embedding": None if emb is None else emb.word_embeddings.weight.detach().clone(),
        "shared_embedding": emb is not None and bool(getattr(emb.word_embeddings.weight, "shared_embedding", False)),
        "embedding_group": dist.get_process_group_ranks(parallel_state.get_embedding_group()),
        "position_embedding_group": None if pos_group is None else dist.get_process_group_ranks(pos_group),
    }


def _pp_rank(info, params_path, configs):
    init_cpu_megatron(pp=PP, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    params = torch.load(params_path)
    batch = make_batch()
    b, s = batch["ids"].shape
    results = {"stage": stage, "placement": _placement(build_tiny_gpt(K, seed=RANK_SEED, **MODEL_KW))}
    for cfg in configs:
        model = build_tiny_gpt(K, seed=RANK_SEED, **MODEL_KW)
        names = global_names(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[names[name]])
        hook = apply_rl(model, *rl_setting(cfg))
        scores = None
        if first:
            hidden = forward_stage(model, batch)  # [s, b, h]: not the last stage, the postprocess returns them
            assert hidden.shape == (s, b, MODEL_KW["hidden_size"])
            dist.send(hidden.detach().contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            grad = torch.empty_like(hidden)
            dist.recv(grad, src=parallel_state.get_pipeline_model_parallel_next_rank())
            hidden.backward(grad)
        if last:
            received = torch.empty(s, b, MODEL_KW["hidden_size"])
            dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            received.requires_grad_()
            model.set_input_tensor(received)
            _, scored = forward_backward(model, hook, batch)
            dist.send(received.grad.contiguous(), dst=parallel_state.get_pipeline_model_parallel_prev_rank())
            scores = detached(scored)
        grads = {names[n]: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
        # finalize_model_grads: the word embedding's copies are summed over the embedding group
        word_grad = grads[WORD_EMB].clone()
        dist.all_reduce(word_grad, group=parallel_state.get_embedding_group())
        results[config_id(cfg)] = {"scores": scores, "grads": grads, "word_embedding_grad_reduced": word_grad}
    return results


@pytest.fixture(scope="module")
def runs(cpu_megatron, tmp_path_factory):
    path = save_reference_params(tmp_path_factory, "pp")
    refs = reference_runs(CONFIGS)
    ranks = sorted(run_cpu_ranks(_pp_rank, PP, path, CONFIGS), key=lambda r: r["stage"])
    assert [r["stage"] for r in ranks] == [0, 1]
    return refs, ranks


def test_mtp_block_is_built_on_the_last_stage_only(runs):
    _, (first, last) = runs
    f, l = first["placement"], last["placement"]
    assert (f["pre_process"], f["post_process"], f["mtp_process"]) == (True, False, False)
    assert (l["pre_process"], l["post_process"], l["mtp_process"]) == (False, True, True)
    assert f["mtp_layers"] == 0 and l["mtp_layers"] == K
    assert not f["has_output_layer"] and l["has_output_layer"]
    assert f["decoder_layer_numbers"] == [1] and l["decoder_layer_numbers"] == [2]
    # the MTP stage's own word-embedding copy: synchronised with the first stage's at construction
    assert l["word_embedding"] is not None and l["shared_embedding"]
    torch.testing.assert_close(l["word_embedding"], f["word_embedding"], rtol=0, atol=0)
    assert f["embedding_group"] == l["embedding_group"] == [0, 1]
    # megatron's default position-embedding group is the first stage alone: the MTP stage is not in it
    assert f["position_embedding_group"] == [0] and l["position_embedding_group"] is None


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_last_stage_head_log_probs_equal_pp1(runs, cfg):
    refs, (first, last) = runs
    ref, got = refs[rl_setting(cfg)]["scores"], last[config_id(cfg)]["scores"]
    assert first[config_id(cfg)]["scores"] is None
    assert got.keys() == ref.keys()
    for k in range(1, K + 1):
        lp_key, _, top1_key = mtp_output_keys(k)
        torch.testing.assert_close(got[lp_key], ref[lp_key], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[top1_key], ref[top1_key]), f"head {k} top-1 differs"
    torch.testing.assert_close(got["log_probs"], ref["log_probs"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_pp2_gradients_equal_pp1(runs, cfg):
    refs, stages = runs
    ref = refs[rl_setting(cfg)]["grads"]
    per_stage = [st[config_id(cfg)]["grads"] for st in stages]
    owners = {name: [i for i, g in enumerate(per_stage) if name in g] for name in ref}
    assert all(owners.values()), [n for n, o in owners.items() if not o]
    assert all(set(g) <= set(ref) for g in per_stage)

    def check(got, want, name):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    for name, want in ref.items():
        if name in (WORD_EMB, POS_EMB):
            assert owners[name] == [0, 1], name
            check(per_stage[0][name] + per_stage[1][name], want, name)
        else:
            assert len(owners[name]) == 1, (name, owners[name])
            check(per_stage[owners[name][0]][name], want, name)
    assert any(n.startswith("mtp.") for n in per_stage[1]) and not any(n.startswith("mtp.") for n in per_stage[0])
    # what megatron's finalize_model_grads leaves on each stage for the word embedding
    for st in stages:
        check(st[config_id(cfg)]["word_embedding_grad_reduced"], ref[WORD_EMB], WORD_EMB)
    # the MTP stage's embedding copy does get gradient (the MTP layers embed the rolled ids)
    assert torch.count_nonzero(per_stage[1][WORD_EMB]) > 0
