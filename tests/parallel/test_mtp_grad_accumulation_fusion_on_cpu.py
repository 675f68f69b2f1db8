"""Gradient-accumulation fusion (Megatron's GPU default) with ``mtp_loss_type=rl`` and ``train_lm_head``.

With fusion on, Megatron's output layer adds its weight gradient into ``main_grad`` and flags it
(``grad_added_to_main_grad``); Megatron's DDP hook then discards whatever autograd left in ``.grad``. The
heads' log-probs share that weight, so their gradient must reach ``main_grad`` too, whichever path scores them
(through the output layer, ``logprob_chunk_size=0``, or chunked).

Run here with Megatron's real fused backward and real ``DistributedDataParallel`` (fp32 grad buffers) and a
CPU stand-in for the CUDA weight-gradient kernel (``support.grad_accumulation_fusion``). Two micro-batches are
accumulated (the flag is already set when the second one starts). Asserted: every parameter's ``main_grad``
equals the unfused single-process ``.grad`` of the same model and batches (fp32, rtol 1e-5 / atol 1e-5),
untied and tied embeddings, PP = 1 and PP = 2 (2 gloo ranks, the stages run by hand as in
``test_mtp_pipeline_parallel_on_cpu``); and the heads' share of the lm-head gradient is large enough for a
lost contribution to show.
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from support.grad_accumulation_fusion import (
    cpu_gradient_accumulation_fusion,
    enable_gradient_accumulation_fusion,
    wrap_megatron_ddp,
)
from support.mtp_parallel import (
    K,
    MODEL_KW,
    MODEL_SEED,
    RANK_SEED,
    apply_rl,
    forward_backward,
    forward_stage,
    full_params,
    make_batch,
    scalar_loss,
    score,
)
from test_mtp_pipeline_parallel_on_cpu import POS_EMB, WORD_EMB, global_names
from verl_cpu.testing import build_tiny_gpt, init_cpu_megatron, run_cpu_ranks

CHUNKS = {"output_layer": 0, "chunked": 5}
TIES = {"untied": False, "tied": True}
MICRO_BATCH_SEEDS = (0, 1)
TOL = dict(rtol=1e-5, atol=1e-5)


def lm_head_name(tied: bool) -> str:
    return WORD_EMB if tied else "output_layer.weight"


def unfused_grads(tied: bool, chunk: int, train_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """The reference: plain autograd ``.grad`` of the single-process model over both micro-batches."""
    model = build_tiny_gpt(K, seed=MODEL_SEED, share_embeddings=tied, **MODEL_KW)
    hook = apply_rl(model, chunk, train_lm_head)
    for seed in MICRO_BATCH_SEEDS:
        forward_backward(model, hook, make_batch(seed=seed))
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def main_grads(model) -> dict[str, torch.Tensor]:
    """What Megatron's optimizer would read, after checking autograd left nothing DDP did not take."""
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}: DDP's hook leaves no .grad"
        out[name] = p.main_grad.detach().clone()
    return out


def assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("path", CHUNKS)
def test_fused_main_grads_equal_unfused_grads_pp1(cpu_megatron, tie, path):
    tied, chunk = TIES[tie], CHUNKS[path]
    want = unfused_grads(tied, chunk)
    with cpu_gradient_accumulation_fusion():
        model = build_tiny_gpt(K, seed=MODEL_SEED, share_embeddings=tied, **MODEL_KW)
        enable_gradient_accumulation_fusion(model)
        ddp = wrap_megatron_ddp(model)
        hook = apply_rl(ddp, chunk, True)
        for seed in MICRO_BATCH_SEEDS:
            forward_backward(ddp, hook, make_batch(seed=seed))
        ddp.finish_grad_sync()
    lm_head = dict(model.named_parameters())[lm_head_name(tied)]
    assert lm_head.grad_added_to_main_grad  # Megatron's fused path really ran
    assert_grads_equal(main_grads(model), want)


@pytest.mark.parametrize("tie", TIES)
def test_heads_share_of_the_lm_head_gradient_is_visible(cpu_megatron, tie):
    """Guards the tests above: without the heads' part the lm-head gradient would be far off."""
    tied = TIES[tie]
    name = lm_head_name(tied)
    with_heads = unfused_grads(tied, CHUNKS["chunked"])[name]
    main_only = unfused_grads(tied, CHUNKS["chunked"], train_lm_head=False)[name]
    assert (with_heads - main_only).norm() > 0.1 * with_heads.norm()


# ---------------------------------------------------------------------------------------------------- PP = 2
PP = 2
PP_CONFIGS = [(tie, path) for tie in TIES for path in CHUNKS]


def _run_stage(ddp, model, hook, batch):
    """One micro-batch through this pipeline stage, forward and backward, activations exchanged by hand."""
    b, s = batch["ids"].shape
    peer_next = parallel_state.get_pipeline_model_parallel_next_rank()
    peer_prev = parallel_state.get_pipeline_model_parallel_prev_rank()
    if parallel_state.is_pipeline_first_stage():
        hidden = forward_stage(ddp, batch)
        dist.send(hidden.detach().contiguous(), dst=peer_next)
        grad = torch.empty_like(hidden)
        dist.recv(grad, src=peer_next)
        hidden.backward(grad)
    else:
        received = torch.empty(s, b, MODEL_KW["hidden_size"])
        dist.recv(received, src=peer_prev)
        received.requires_grad_()
        model.set_input_tensor(received)
        logits = forward_stage(ddp, batch)
        scalar_loss(score(hook, logits, batch), batch).backward()
        dist.send(received.grad.contiguous(), dst=peer_prev)


def _pp_rank(info, params_paths):
    init_cpu_megatron(pp=PP, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    results = {"stage": parallel_state.get_pipeline_model_parallel_rank()}
    with cpu_gradient_accumulation_fusion():
        for tie, path in PP_CONFIGS:
            model = build_tiny_gpt(K, seed=RANK_SEED, share_embeddings=TIES[tie], **MODEL_KW)
            names = global_names(model)
            params = torch.load(params_paths[tie])
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if names[name] in params:  # not: the last stage's unused output_layer.weight when tied
                        p.copy_(params[names[name]])
            enable_gradient_accumulation_fusion(model)
            ddp = wrap_megatron_ddp(model)
            hook = apply_rl(ddp, CHUNKS[path], True)
            for seed in MICRO_BATCH_SEEDS:
                _run_stage(ddp, model, hook, make_batch(seed=seed))
            ddp.finish_grad_sync()
            results[(tie, path)] = {names[n]: g for n, g in main_grads(model).items()}
    return results


@pytest.fixture(scope="module")
def pp_runs(cpu_megatron, tmp_path_factory):
    paths = {}
    for tie, tied in TIES.items():
        paths[tie] = str(tmp_path_factory.mktemp(f"fusion_{tie}") / "params.pt")
        torch.save(full_params(build_tiny_gpt(K, seed=MODEL_SEED, share_embeddings=tied, **MODEL_KW)), paths[tie])
    ranks = sorted(run_cpu_ranks(_pp_rank, PP, paths), key=lambda r: r["stage"])
    assert [r["stage"] for r in ranks] == [0, 1]
    return ranks


@pytest.mark.multiprocess
@pytest.mark.parametrize("tie, path", PP_CONFIGS)
def test_fused_main_grads_equal_unfused_grads_pp2(pp_runs, tie, path):
    want = unfused_grads(TIES[tie], CHUNKS[path])
    per_stage = [stage[(tie, path)] for stage in pp_runs]
    for grads in per_stage:  # tied: the last stage allocates an output_layer.weight that the forward never uses
        for name in grads.keys() - want.keys():
            assert name == "output_layer.weight" and TIES[tie] and not grads[name].any(), name
    for name, g in want.items():
        owners = [i for i, grads in enumerate(per_stage) if name in grads]
        if name in (WORD_EMB, POS_EMB):  # a copy on each stage; finalize_model_grads sums the word embedding
            assert owners == [0, 1], name
            got = per_stage[0][name] + per_stage[1][name]
        else:
            assert len(owners) == 1, (name, owners)
            got = per_stage[owners[0]][name]
        torch.testing.assert_close(got, g, **TOL, msg=lambda m, n=name: f"{n}: {m}")
