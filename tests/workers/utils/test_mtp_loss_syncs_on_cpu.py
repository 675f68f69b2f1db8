"""Host synchronisations of one micro-batch of the MTP term: alignment, loss, OCC and metrics.

Counted at the dispatcher by :class:`verl_cpu.testing.host_syncs.HostSyncCounter` (every ``item`` / ``bool`` /
``tolist``, data-dependent shape, host<->device copy), verl's helpers and its registered policy losses counted
by what they do inside. Budget per micro-batch of K heads, every policy loss verl registers:

* alignment of the unpacked outputs onto the main head's positions: no synchronisation at all;
* the MTP loss, OCC and every metric of every head, the policy losses' own metrics included: one read-back.

The whole micro-batch step through verl's worker is counted in ``tests/benchmarks/test_worker_syncs_on_cpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from support.actor_config import mtp_actor_config
from verl_cpu.testing import make_actor_batch, nested_like

from verl_cpu.testing.host_syncs import HostSyncCounter
from verl.workers.utils.losses import ppo_loss
from verl_mtp.models.mcore.mtp_alignment import align_mtp_outputs, mtp_ce_key, mtp_output_keys
from verl_mtp.trainer.ppo.mtp_occ import OCCState
from verl_mtp.workers.config import MtpRLConfig, OCCConfig
from verl_mtp.workers.utils.losses import mtp_policy_loss


def unaligned_outputs(data, num_heads: int, with_ce: bool) -> dict:
    """What verl's engine unpacks for K heads before the alignment: jagged per-token outputs."""
    g = torch.Generator().manual_seed(0)
    n = data["input_ids"].values().shape[0]

    def leaf():
        return (-torch.rand(n, generator=g) * 3).requires_grad_()

    out = {"log_probs": nested_like(data, leaf())}
    for k in range(1, num_heads + 1):
        lp_key, _, top1_key = mtp_output_keys(k)
        out[lp_key] = nested_like(data, leaf())
        out[top1_key] = nested_like(data, (torch.rand(n, generator=g) > 0.5).float())
        if with_ce:
            out[mtp_ce_key(k)] = nested_like(data, leaf())
    return out


SETTINGS = {
    "fixed": dict(),
    "occ_carry": dict(occ=OCCConfig(enable=True, carry_last_lambda=True, initial_lambda=0.05)),
    "occ_head_ce": dict(occ=OCCConfig(enable=True), detached_head_ce_coef=0.2),
}


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo", "cispo", "geo_mean"])
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_one_micro_batch_stays_within_the_sync_budget(setting, num_heads, loss_mode):
    config = mtp_actor_config([f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}"])
    mtp_config = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", **SETTINGS[setting])
    data = make_actor_batch([3, 5, 2, 4], [6, 4, 7, 5], seed=3)
    output = unaligned_outputs(data, num_heads, mtp_config.detached_head_ce_coef > 0)
    ppo_loss(config=config, model_output=output, data=data)  # verl's own term; fills global_batch_info
    occ_state = OCCState(mtp_config.occ)

    with HostSyncCounter() as alignment:
        aligned = align_mtp_outputs(output)
    assert alignment.syncs == [], "the alignment must not synchronise"

    with HostSyncCounter() as term:
        loss, metrics = mtp_policy_loss(config, mtp_config, occ_state, aligned, data)
    assert term.total <= 1, term.by_site()
    # the budget was not met by skipping work: every head's metrics are there, as host numbers
    for k in range(1, num_heads + 1):
        assert isinstance(metrics[f"actor/mtp_{k}/coef_applied"], float)
        assert isinstance(metrics[f"actor/mtp_{k}/top1_agreement"], float)
        assert metrics[f"actor/mtp_{k}/ppo_kl"].values and isinstance(metrics[f"actor/mtp_{k}/ppo_kl"].values[0], float)
    assert torch.isfinite(loss) and loss.requires_grad
