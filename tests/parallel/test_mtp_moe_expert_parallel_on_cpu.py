"""MoE with MTP heads (``rl``), expert parallel 2 on 2 gloo CPU ranks, against expert parallel 1.

The model has 4 experts, top-2 routing, ungrouped experts (local spec) in every decoder and MTP layer, linear
layers without bias. The EP = 1 model is built from a seed in the pytest process and run once per micro-batch;
each rank builds the EP = 2 model (a different seed) and copies in the EP = 1 weights, its two experts by their
global index. Rank r runs micro-batch r, so tokens of both micro-batches meet in every expert. Megatron's real
token dispatchers run over gloo, ``allgather`` and ``alltoall`` (the one MoE GPU runs use). Emulated: only
the all-to-all dispatcher's device-to-host side stream, its event and its host copy of the split sizes
(``support.moe_dispatch_on_cpu``: one CPU stand-in stream, events complete at once, NumPy splits as on GPU) and the TransformerEngine names megatron-core 0.16.1 reads
without TE (``support.transformer_engine_off``); the collectives, permutations and split sizes are Megatron's.

Asserted per rank: per-head and main log-probs and top-1 equal the EP = 1 run of its micro-batch (1e-5);
each replicated parameter's gradient equals the EP = 1 gradient of its micro-batch; each expert's gradient
equals the sum over both micro-batches of the EP = 1 gradient of that expert (no data-parallel reduction is
run, so nothing else is summed).
"""

import re

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from support.mtp_parallel import K, MODEL_KW, MODEL_SEED, RANK_SEED, apply_rl, full_params, make_batch, reference_run
from support.moe_dispatch_on_cpu import cpu_token_dispatcher_streams
from support.transformer_engine_off import transformer_engine_off
from verl_cpu.testing import build_tiny_gpt, init_cpu_megatron, run_cpu_ranks

pytestmark = pytest.mark.multiprocess

EP = 2
EXPERTS = 4
DISPATCHERS = ["allgather", "alltoall"]
CHUNK = 5
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def moe_kw(dispatcher: str) -> dict:
    overrides = dict(add_bias_linear=False, moe_token_dispatcher_type=dispatcher)
    return dict(MODEL_KW, moe_experts=EXPERTS, config_overrides=overrides)


def global_name(name: str, ep_rank: int) -> str:
    """This rank's local expert j is global expert ``ep_rank * experts_per_rank + j``."""
    per_rank = EXPERTS // EP
    return _LOCAL_EXPERT.sub(lambda m: f".local_experts.{ep_rank * per_rank + int(m.group(1))}.", name)


def _ep_rank(info, params_path, dispatchers):
    dist.init_process_group("gloo", init_method=info.init_method, rank=info.rank, world_size=info.world_size)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=EP)
    init_cpu_megatron(rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    params = torch.load(params_path)
    results = {"ep_rank": ep_rank}
    for dispatcher in dispatchers:
        with transformer_engine_off(), cpu_token_dispatcher_streams():
            model = build_tiny_gpt(K, seed=RANK_SEED, **moe_kw(dispatcher))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(params[global_name(name, ep_rank)])
            run = reference_run(model, apply_rl(model, CHUNK, True), make_batch(seed=info.rank))
        run["grads"] = {global_name(n, ep_rank): g for n, g in run["grads"].items()}
        results[dispatcher] = run
    return results


@pytest.fixture(scope="module")
def runs(cpu_megatron, tmp_path_factory):
    """EP = 1 runs of micro-batches 0 and 1 (pytest process) and the 2 ranks' EP = 2 runs."""
    path = tmp_path_factory.mktemp("moe") / "params.pt"
    with transformer_engine_off():
        torch.save(full_params(build_tiny_gpt(K, seed=MODEL_SEED, **moe_kw("allgather"))), path)
        refs = []
        for seed in range(EP):
            model = build_tiny_gpt(K, seed=MODEL_SEED, **moe_kw("allgather"))
            refs.append(reference_run(model, apply_rl(model, CHUNK, True), make_batch(seed=seed)))
    ranks = sorted(run_cpu_ranks(_ep_rank, EP, str(path), DISPATCHERS), key=lambda r: r["ep_rank"])
    assert [r["ep_rank"] for r in ranks] == list(range(EP))
    return refs, ranks


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_ep2_log_probs_equal_ep1(runs, dispatcher):
    refs, ranks = runs
    for rank, ref in zip(ranks, refs):
        got = rank[dispatcher]["scores"]
        assert got.keys() == ref["scores"].keys()
        for key, want in ref["scores"].items():
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_ep2_gradients_equal_ep1(runs, dispatcher):
    refs, ranks = runs
    experts_seen = set()
    for rank, ref in zip(ranks, refs):
        for name, got in rank[dispatcher]["grads"].items():
            if _LOCAL_EXPERT.search(name):
                want = sum(r["grads"][name] for r in refs)
                experts_seen.add(name)
            else:
                want = ref["grads"][name]
            assert want.abs().sum() > 0 or name.startswith("embedding.position"), name
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    expert_names = {n for n in refs[0]["grads"] if _LOCAL_EXPERT.search(n)}
    assert experts_seen == expert_names and any(n.startswith("mtp.") for n in expert_names)
