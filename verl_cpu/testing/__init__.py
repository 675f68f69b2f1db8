"""Test and benchmark support for verl on CPU (installed code: ``from verl_cpu.testing import ...``).

A tiny real Megatron-Core ``GPTModel`` with MTP heads built and run with the platform's own CPU mechanism
(:mod:`.tiny_gpt`), a runner for multi-process (gloo) ranks (:mod:`.ranks`) and actor-update micro-batches
shaped as verl's engine hands them to ``ppo_loss`` (:mod:`.actor_batch`)::

    init_cpu_megatron(tp=1, pp=1, cp=1)          # gloo, world size 1, model-parallel groups, CPU mechanism
    init_cpu_megatron(tp, pp, cp, rank=r, world_size=n, init_method=url)   # inside a spawned rank
    destroy_cpu_megatron()                       # undo it (test isolation)
    build_tiny_gpt(mtp_num_layers, ...)          # real GPTModel + K real MTP layers, fp32, CPU
    causal_attention_mask(batch, seq)            # bool [batch, 1, seq, seq], True = masked out
    forward_bshd(model, input_ids, labels=None, loss_mask=None)
    prepare_mtp_loss_tracker(k)                  # before calling model(...) yourself with labels in training
    run_cpu_ranks(fn, world_size, *args)         # fn(RankInfo, *args) on n pooled spawned processes, results back
    make_actor_batch(prompt_lens, response_lens) # verl's no-padding actor micro-batch; nested_like(data, v)
    HostSyncCounter()                            # counts host synchronisations as a GPU pays them (with ...:)
"""

from verl_cpu.testing.actor_batch import make_actor_batch, nested_like
from verl_cpu.testing.host_syncs import HostSyncCounter
from verl_cpu.testing.ranks import RankInfo, run_cpu_ranks
from verl_cpu.testing.tiny_gpt import (
    MTP_LOSS_TRACKER_KEY,
    build_tiny_gpt,
    causal_attention_mask,
    destroy_cpu_megatron,
    forward_bshd,
    init_cpu_megatron,
    prepare_mtp_loss_tracker,
)

__all__ = [
    "HostSyncCounter",
    "MTP_LOSS_TRACKER_KEY",
    "RankInfo",
    "build_tiny_gpt",
    "causal_attention_mask",
    "destroy_cpu_megatron",
    "forward_bshd",
    "init_cpu_megatron",
    "make_actor_batch",
    "nested_like",
    "prepare_mtp_loss_tracker",
    "run_cpu_ranks",
]
