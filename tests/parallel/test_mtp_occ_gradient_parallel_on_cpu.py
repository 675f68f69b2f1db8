"""The gradient estimator's c, v^2 under TP = 2 and PP = 2 (2 gloo CPU ranks each) equal TP = PP = 1's.

The losses are fixed random linear functionals of the log-probs (``support.mtp_parallel``): ``L_RL`` of the
main head's, ``L_k`` of head k's, so ``g_RL`` reaches the trunk and the output layer and ``g_MTP_k`` the trunk,
the MTP layers and (with ``train_lm_head``) the output layer. The reference, in the pytest process, is
``torch.autograd.grad`` of each loss on the TP = PP = 1 model w.r.t. the parameters picked by name (embedding,
decoder, output layer only with ``train_lm_head``) and the inner products summed by hand.

Each rank copies in its shard / stage of the same weights, back-propagates each loss in turn, emulates what
Megatron's ``finalize_model_grads`` does before the estimator reads the gradients (sequence-parallel-tagged
gradients summed over TP; the word-embedding copies summed over the embedding group), and runs the estimator
(``shared_trunk_parameters``, ``head_products``, ``gradient_occ`` over the model-parallel group). Asserted: every
rank's c_k, v_k^2 and ||g_RL||^2 equal the reference (1e-5 relative) — which fails if a TP-replicated parameter
is counted on both TP ranks, a shard is missed, or the MTP stage's word-embedding copy is counted twice.

Under PP the learned absolute position embedding (present only because RoPE needs CUDA here) has a copy on the
MTP stage whose gradient Megatron does not sum with the first stage's: the optimizer updates two parameters
there, so the estimator counts two; the comparison leaves that one parameter out on both sides.
"""

import re

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from support.mtp_parallel import (
    K,
    MODEL_KW,
    MODEL_SEED,
    RANK_SEED,
    apply_rl,
    forward_stage,
    full_params,
    load_tp_shards,
    make_batch,
    score,
)
from verl_cpu.testing import build_tiny_gpt, init_cpu_megatron, run_cpu_ranks

from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys
from verl_mtp.trainer.ppo.mtp_occ_gradient import GradientSnapshot, gradient_occ, head_products, shared_trunk_parameters

pytestmark = pytest.mark.multiprocess

POS_EMB = "embedding.position_embeddings.weight"
TP_CONFIGS = [{"sp": sp, "chunk": 5, "train_lm_head": lm} for sp in (False, True) for lm in (False, True)]
PP_CONFIGS = [{"sp": False, "chunk": 0, "train_lm_head": False}, {"sp": False, "chunk": 5, "train_lm_head": True}]
LOSSES = ["rl"] + list(range(1, K + 1))


def config_id(cfg) -> str:
    return f"sp{int(cfg['sp'])}-chunk{cfg['chunk']}-lm_head{int(cfg['train_lm_head'])}"


def loss_of(scored: dict, batch: dict, which) -> torch.Tensor:
    key = "log_probs" if which == "rl" else mtp_output_keys(which)[0]
    return (batch["weights"][key] * scored[key]).sum()


def reference(params: dict, cfg: dict, exclude=()) -> dict:
    """c, v^2, ||g_RL||^2 by autograd.grad on the TP = PP = 1 model, parameters picked by name."""
    model = build_tiny_gpt(K, seed=RANK_SEED, **MODEL_KW)
    load_tp_shards(model, params)
    hook = apply_rl(model, cfg["chunk"], cfg["train_lm_head"])
    prefixes = ("embedding.", "decoder.") + (("output_layer.",) if cfg["train_lm_head"] else ())
    picked = [p for n, p in model.named_parameters() if n.startswith(prefixes) and n not in exclude]
    batch = make_batch()
    grads = {}
    for which in LOSSES:
        scored = score(hook, forward_stage(model, batch), batch)
        got = torch.autograd.grad(loss_of(scored, batch, which), picked, allow_unused=True)
        grads[which] = [torch.zeros_like(p) if g is None else g.double() for g, p in zip(got, picked)]
    rl = grads["rl"]
    return {
        "c": [sum(float((a * b).sum()) for a, b in zip(rl, grads[k])) for k in range(1, K + 1)],
        "v2": [sum(float((b * b).sum()) for b in grads[k]) for k in range(1, K + 1)],
        "rl_sq": sum(float((a * a).sum()) for a in rl),
    }


def _finalize_like_megatron(model) -> None:
    """What ``finalize_model_grads`` does before the estimator reads: SP-tagged grads summed over TP, the word
    embedding's copies summed over the embedding group."""
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        emb = model.embedding.word_embeddings.weight if hasattr(model, "embedding") else None
        if emb is not None:
            if emb.grad is None:
                emb.grad = torch.zeros_like(emb)
            dist.all_reduce(emb.grad, group=parallel_state.get_embedding_group())


def _estimate(model, cfg, backward_one, exclude=()) -> dict:
    """The estimator on this rank: one backward per loss, a snapshot of g_RL, the products per head."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for p in shared_trunk_parameters([model], cfg["train_lm_head"]) if names[id(p)] not in exclude]
    per_head, rl = [], None
    for which in LOSSES:
        model.zero_grad(set_to_none=True)
        backward_one(which)
        _finalize_like_megatron(model)
        if which == "rl":
            rl = GradientSnapshot.take(params)
        else:
            per_head.append(head_products(rl, params))
    stats = gradient_occ(per_head)
    return {"c": stats.c.tolist(), "v2": stats.v2.tolist(), "rl_sq": float(stats.rl_sq)}


def _tp_rank(info, params_path, configs):
    init_cpu_megatron(tp=2, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    params, batch, results = torch.load(params_path), make_batch(), {}
    for cfg in configs:
        model = build_tiny_gpt(K, seed=MODEL_SEED, sequence_parallel=cfg["sp"], **MODEL_KW)
        load_tp_shards(model, params)
        hook = apply_rl(model, cfg["chunk"], cfg["train_lm_head"])

        def backward_one(which, model=model, hook=hook):
            loss_of(score(hook, forward_stage(model, batch), batch), batch, which).backward()

        results[config_id(cfg)] = _estimate(model, cfg, backward_one)
    return results


def _pp_backward(model, hook, batch, which) -> None:
    """Both stages by hand, as megatron's schedule runs them (see test_mtp_pipeline_parallel_on_cpu)."""
    b, s = batch["ids"].shape
    if parallel_state.is_pipeline_first_stage():
        hidden = forward_stage(model, batch)
        dist.send(hidden.detach().contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(hidden)
        dist.recv(grad, src=parallel_state.get_pipeline_model_parallel_next_rank())
        hidden.backward(grad)
    else:
        received = torch.empty(s, b, MODEL_KW["hidden_size"])
        dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        received.requires_grad_()
        model.set_input_tensor(received)
        loss_of(score(hook, forward_stage(model, batch), batch), batch, which).backward()
        dist.send(received.grad.contiguous(), dst=parallel_state.get_pipeline_model_parallel_prev_rank())


def _pp_rank(info, params_path, configs):
    init_cpu_megatron(pp=2, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    params, batch, results = torch.load(params_path), make_batch(), {}
    for cfg in configs:
        model = build_tiny_gpt(K, seed=MODEL_SEED, **MODEL_KW)
        offsets = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
        with torch.no_grad():
            for name, p in model.named_parameters():
                glob = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{offsets[int(m.group(1))]}.",
                              name)
                p.copy_(params[glob])
        hook = apply_rl(model, cfg["chunk"], cfg["train_lm_head"])

        def backward_one(which, model=model, hook=hook):
            _pp_backward(model, hook, batch, which)

        results[config_id(cfg)] = _estimate(model, cfg, backward_one, exclude={POS_EMB})
    return results


@pytest.fixture(scope="module")
def params_path(cpu_megatron, tmp_path_factory):
    path = tmp_path_factory.mktemp("occ_gradient") / "reference_params.pt"
    torch.save(full_params(build_tiny_gpt(K, seed=MODEL_SEED + 1, **MODEL_KW)), path)
    return str(path)


def _check(ranks, params_path, configs, exclude=()):
    params = torch.load(params_path)
    for cfg in configs:
        want = reference(params, cfg, exclude)
        assert all(c != 0 for c in want["c"]) and all(v > 0 for v in want["v2"])
        for r in ranks:
            got = r[config_id(cfg)]
            for key in ("c", "v2"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), (config_id(cfg), key)
            assert got["rl_sq"] == pytest.approx(want["rl_sq"], rel=1e-5), config_id(cfg)


def test_tp2_statistics_equal_tp1(params_path):
    _check(run_cpu_ranks(_tp_rank, 2, params_path, TP_CONFIGS), params_path, TP_CONFIGS)


def test_pp2_statistics_equal_pp1(params_path):
    _check(run_cpu_ranks(_pp_rank, 2, params_path, PP_CONFIGS), params_path, PP_CONFIGS, exclude={POS_EMB})
