"""DP = 2 (2 gloo CPU ranks): the OCC lambda and the MTP policy loss under data parallelism.

One actor micro-batch of 4 sequences (``verl_cpu.testing.make_actor_batch``: verl's own no-padding layout) with
model outputs near ``old_log_probs`` goes through verl's ``ppo_loss`` wrapped by ``with_mtp_policy_loss``
(OCC on, 2 heads) in the pytest process; each rank takes its half (verl's ``chunk_tensordict``, global batch
info ``dp_size=2`` and the global token / sequence counts, as verl's engine sets them) and passes megatron's
data-parallel group as ``dp_group``, as the engine does. Asserted:

* ``occ.scope=data_parallel``: both ranks' lambda equals the single-process lambda over the whole batch; the
  DP-averaged loss equals the single-process loss and each rank's gradient, averaged over DP like DDP does,
  equals the single-process gradient on its tokens (token-mean DAPO and seq-mean-token-mean GSPO aggregation);
* ``occ.scope=micro_batch``: each rank's lambda equals the single-process lambda of its own half; the two
  halves' lambdas differ from each other and from the whole batch's (the scope matters on this batch).
"""

from functools import partial

import pytest
import torch
from support.actor_config import mtp_actor_config
from verl_cpu.testing import init_cpu_megatron, make_actor_batch, nested_like, run_cpu_ranks

import verl  # noqa: F401  (import verl before verl_mtp: verl's plugin loader imports verl_mtp's engine)
from verl.utils import tensordict_utils as tu
from verl.workers.utils.losses import ppo_loss
from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys
from verl_mtp.trainer.ppo.mtp_occ import OCCState
from verl_mtp.workers.config import MtpRLConfig, OCCConfig
from verl_mtp.workers.utils.losses import with_mtp_policy_loss

pytestmark = pytest.mark.multiprocess

DP = 2
HEADS = 2
PROMPTS, RESPONSES = [3, 5, 2, 4], [6, 4, 7, 5]
LOSS_MODES = {
    "dapo": ["actor_rollout_ref.actor.clip_ratio_low=0.2", "actor_rollout_ref.actor.clip_ratio_high=0.28",
             "actor_rollout_ref.actor.loss_agg_mode=token-mean"],
    "gspo": ["actor_rollout_ref.actor.policy_loss.loss_mode=gspo",
             "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
             "actor_rollout_ref.actor.clip_ratio_low=3e-4", "actor_rollout_ref.actor.clip_ratio_high=4e-4"],
}
CASES = [(mode, scope) for mode in LOSS_MODES for scope in ("data_parallel", "micro_batch")]




def full_batch():
    """dp_size=1 and the batch's own token / sequence counts (make_actor_batch sets them)."""
    return make_actor_batch(PROMPTS, RESPONSES, seed=11)


def leaves(data, seed=3, spread=0.3):
    """Per-token leaves (main head and each MTP head) over the packed batch; response tokens near old."""
    g = torch.Generator().manual_seed(seed)
    n = data["input_ids"].values().shape[0]
    offsets = data["input_ids"].offsets()
    old = data.select("old_log_probs").to_padded_tensor()["old_log_probs"]
    resp_lens = data["attention_mask"][:, -old.shape[1]:].sum(-1)
    out = {}
    for key in ["log_probs"] + [mtp_output_keys(k)[0] for k in range(1, HEADS + 1)]:
        leaf = -torch.rand(n, generator=g) * 3
        noisy = old + spread * torch.randn(old.shape, generator=g)
        for i in range(len(offsets) - 1):  # response value r of row i sits at slot end - r_len - 1 + r
            end, r = int(offsets[i + 1]), int(resp_lens[i])
            leaf[end - r - 1 : end - 1] = noisy[i, :r]
        out[key] = leaf.requires_grad_()
    return out


def model_output(data, leaf_values, a, b):
    """The engine's model output for ``data``, whose tokens are slots ``[a, b)`` of the full-batch leaves."""
    pos = torch.cat([torch.arange(int(m)) for m in data["input_ids"].offsets().diff()])
    out = {key: nested_like(data, v[a:b]) for key, v in leaf_values.items()}
    for k in range(1, HEADS + 1):
        _, valid_key, top1_key = mtp_output_keys(k)
        out[valid_key] = nested_like(data, pos >= k)
        out[top1_key] = nested_like(data, (pos % 3 == 0).float())
    return out


def half(data, rank):
    part = tu.chunk_tensordict(data, DP)[rank]
    tu.assign_non_tensor(part, dp_size=DP, batch_num_tokens=data["batch_num_tokens"],
                         global_batch_size=data["global_batch_size"])
    return part


def run_loss(mode, scope, data, outputs, dp_group=None):
    mtp_cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", occ=OCCConfig(enable=True, scope=scope))
    loss_fn = with_mtp_policy_loss(partial(ppo_loss, config=mtp_actor_config(LOSS_MODES[mode])), mtp_cfg, OCCState(mtp_cfg.occ))
    return loss_fn(model_output=outputs, data=data, dp_group=dp_group)


def summarize(loss, metrics, leaf_values, lo_slot, hi_slot):
    grads = torch.autograd.grad(loss, list(leaf_values.values()))
    return {
        "loss": float(loss.detach()),
        "grads": {key: g[lo_slot:hi_slot].clone() for key, g in zip(leaf_values, grads)},
        **{f"{k}/lambda": float(metrics[f"actor/mtp_{k}/lambda"]) for k in range(1, HEADS + 1)},
    }


def _dp_rank(info, cases):
    init_cpu_megatron(tp=1, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    from megatron.core import parallel_state

    assert parallel_state.get_data_parallel_world_size() == DP
    group = parallel_state.get_data_parallel_group()
    rank = parallel_state.get_data_parallel_rank()
    data = full_batch()
    part = half(data, rank)
    lo, hi = rank * len(PROMPTS) // DP, (rank + 1) * len(PROMPTS) // DP
    offsets = data["input_ids"].offsets()
    results = {"dp_rank": rank}
    for mode, scope in cases:
        a, b = int(offsets[lo]), int(offsets[hi])
        leaf_values = leaves(data)
        loss, metrics = run_loss(mode, scope, part, model_output(part, leaf_values, a, b), dp_group=group)
        results[(mode, scope)] = summarize(loss, metrics, leaf_values, a, b)
    return results


@pytest.fixture(scope="module")
def runs():
    data = full_batch()
    offsets = data["input_ids"].offsets()
    whole, halves = {}, {}
    for mode, scope in CASES:
        leaf_values = leaves(data)
        loss, metrics = run_loss(mode, scope, data, model_output(data, leaf_values, 0, int(offsets[-1])))
        whole[(mode, scope)] = summarize(loss, metrics, leaf_values, 0, int(offsets[-1]))
        for r in range(DP):  # single process on one half alone: micro-batch-scope reference
            lo, hi = r * len(PROMPTS) // DP, (r + 1) * len(PROMPTS) // DP
            a, b = int(offsets[lo]), int(offsets[hi])
            part, leaf_values = half(data, r), leaves(data)
            loss, metrics = run_loss(mode, scope, part, model_output(part, leaf_values, a, b))
            halves[(mode, scope, r)] = summarize(loss, metrics, leaf_values, a, b)
    ranks = run_cpu_ranks(_dp_rank, DP, CASES)
    assert sorted(r["dp_rank"] for r in ranks) == list(range(DP))
    return whole, halves, sorted(ranks, key=lambda r: r["dp_rank"]), offsets


@pytest.mark.parametrize("mode", list(LOSS_MODES))
def test_data_parallel_scope_lambda_loss_and_grads_equal_single_process(runs, mode):
    whole, _, ranks, offsets = runs
    want = whole[(mode, "data_parallel")]
    for r in ranks:
        got = r[(mode, "data_parallel")]
        for k in range(1, HEADS + 1):
            assert got[f"{k}/lambda"] == pytest.approx(want[f"{k}/lambda"], rel=1e-9, abs=1e-12), k
            assert want[f"{k}/lambda"] != 0.0
    # DDP averages over data-parallel ranks: the averaged loss / gradients are the single-process ones
    mean_loss = sum(r[(mode, "data_parallel")]["loss"] for r in ranks) / DP
    assert mean_loss == pytest.approx(want["loss"], rel=1e-5)
    for key in want["grads"]:
        got = torch.cat([r[(mode, "data_parallel")]["grads"][key] for r in ranks]) / DP
        torch.testing.assert_close(got, want["grads"][key], rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("mode", list(LOSS_MODES))
def test_micro_batch_scope_lambda_is_each_halfs_own(runs, mode):
    whole, halves, ranks, _ = runs
    for rank, r in enumerate(ranks):
        got, want = r[(mode, "micro_batch")], halves[(mode, "micro_batch", rank)]
        for k in range(1, HEADS + 1):
            assert got[f"{k}/lambda"] == pytest.approx(want[f"{k}/lambda"], rel=1e-9, abs=1e-12), k
    for k in range(1, HEADS + 1):
        lambdas = [r[(mode, "micro_batch")][f"{k}/lambda"] for r in ranks]
        assert lambdas[0] != pytest.approx(lambdas[1], rel=1e-3)
        assert whole[(mode, "micro_batch")][f"{k}/lambda"] not in lambdas
