"""The CPU platform's optimizer under data parallelism: DP = 2 (2 gloo CPU ranks) equals DP = 1.

Megatron's real ``DistributedDataParallel`` built for a distributed optimizer (verl's default) reduce-scatters the
gradients: each rank ends the backward pass with the reduced gradient of its own shard of the bucket only. The
CPU optimizer (:class:`verl_cpu.optimizer.CPUMixedPrecisionOptimizer`) gathers the shards back and makes the
same, whole update on every rank. A tiny real GPTModel with an MTP head trains one step on a batch of 4
sequences, on one rank, and split 2 + 2 over two ranks: the gradients the optimizer reads, the gradient norm and
the updated parameters must agree (to float summation order), and the two ranks' parameters must be identical.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from verl_cpu.optimizer import CPUMixedPrecisionOptimizer
from verl_cpu.testing import build_tiny_gpt, forward_bshd, init_cpu_megatron, run_cpu_ranks

pytestmark = pytest.mark.multiprocess

SEQUENCES, SEQ_LEN, VOCAB = 4, 16, 64
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _global_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (SEQUENCES, SEQ_LEN + 1), generator=torch.Generator().manual_seed(7))


def _one_step(info):
    """Train one step on this rank's share of the global batch; what the optimizer read and what it wrote."""
    from megatron.core import parallel_state as mpu

    init_cpu_megatron(rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    model = build_tiny_gpt(1, vocab_size=VOCAB, seq_len=SEQ_LEN, seed=0)
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
    )
    # Adam's eps well above float summation noise: its first step is ~lr * g / (|g| + eps), which for eps near 0
    # turns the last bits of a near-zero gradient (summed in another order over two ranks) into a whole step
    optimizer = CPUMixedPrecisionOptimizer([ddp], OptimizerConfig(optimizer="adam", lr=1e-2, adam_eps=1e-4,
                                                                  weight_decay=0.01, clip_grad=1.0, bf16=False))
    dp, rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    tokens = _global_batch().chunk(dp)[rank]
    loss = forward_bshd(ddp, tokens[:, :-1], labels=tokens[:, 1:]).mean()
    loss.backward()
    ddp.finish_grad_sync()  # reduce-scatter (DP 2) or nothing to reduce (DP 1)
    names = {id(p): name for name, p in model.named_parameters()}
    scattered = {name: p.main_grad.clone() for name, p in model.named_parameters()}
    ok, grad_norm, _ = optimizer.step()  # gathers, then clips the gradients it read by the global norm
    assert ok
    return {"grad_norm": grad_norm, "scattered": scattered,
            "main_grads": {names[id(p)]: main.grad.clone() for p, main in optimizer._pairs()},
            "params": {name: p.detach().clone() for name, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def one_rank():
    return run_cpu_ranks(_one_step, 1, timeout_s=900)[0]


@pytest.fixture(scope="module")
def two_ranks():
    return run_cpu_ranks(_one_step, 2, timeout_s=900)


def test_both_ranks_read_the_whole_reduced_gradient(one_rank, two_ranks):
    for rank in two_ranks:
        assert rank["main_grads"].keys() == one_rank["main_grads"].keys()
        for name, want in one_rank["main_grads"].items():
            torch.testing.assert_close(rank["main_grads"][name], want, **TOL, msg=lambda m, n=name: f"{n}: {m}")
        assert rank["grad_norm"] == pytest.approx(one_rank["grad_norm"], rel=1e-5)


def test_dp2_step_equals_the_dp1_step_and_is_identical_on_both_ranks(one_rank, two_ranks):
    first, second = (rank["params"] for rank in two_ranks)
    assert any(name.startswith("mtp.") for name in first)  # the MTP layer is trained too
    for name, want in one_rank["params"].items():
        assert torch.equal(first[name], second[name]), f"{name}: the ranks' updates differ"
        torch.testing.assert_close(first[name], want, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_without_the_gather_each_rank_would_read_a_partly_unreduced_gradient(one_rank, two_ranks):
    """Guards the tests above: after DDP's reduce-scatter alone, each rank's buffer holds the reduced gradient
    only in its own shard (the situation the gather fixes), so some parameters' gradients differ there from
    the one-rank gradient (both before clipping) and others, in the rank's own shard, already equal it."""
    for rank in two_ranks:
        stale = [name for name, want in one_rank["scattered"].items()
                 if not torch.allclose(rank["scattered"][name], want, **TOL)]
        assert stale and len(stale) < len(one_rank["scattered"])
