"""Host synchronisations of one micro-batch of the MTP term: alignment, loss, OCC and metrics.

On a GPU every read of a device value by the host (``.item()``, ``.cpu()``, ``.tolist()``, a tensor used as a
Python bool / int / float / index) stalls the pipeline. Here the micro-batch is on CPU and those calls are
intercepted on ``torch.Tensor``; the count is exact. Two helpers from verl are counted as calls, not by their
insides: ``no_padding_2_padding`` (it reads each sample's lengths on the host) and the registered policy loss
(it reads back its own metrics). Budget per micro-batch of K heads:

* alignment of the unpacked outputs onto the main head's positions: no synchronisation at all;
* the MTP loss, OCC and every metric of every head: at most one read-back by this project's code, one call of
  verl's unpad helper (not 1 + 3K), and the K policy-loss calls the term is made of.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from support.actor_config import mtp_actor_config
from verl_cpu.testing import make_actor_batch, nested_like

import verl_mtp.workers.utils.losses as mtp_losses
from verl.workers.utils.losses import ppo_loss
from verl_mtp.models.mcore.mtp_alignment import align_mtp_outputs, mtp_ce_key, mtp_output_keys
from verl_mtp.trainer.ppo.mtp_occ import OCCState
from verl_mtp.workers.config import MtpRLConfig, OCCConfig

SYNCING = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    """Records each synchronising tensor call made outside the counted helpers, with its caller."""

    def __init__(self, monkeypatch):
        self.syncs: list[str] = []
        self.helper_calls: dict[str, int] = {}
        self._inside_helper = 0
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name, original):
        def method(tensor, *args, **kwargs):
            if not self._inside_helper:
                caller = traceback.extract_stack(limit=2)[0]
                self.syncs.append(f"{name} at {caller.filename}:{caller.lineno}")
            return original(tensor, *args, **kwargs)

        return method

    def helper(self, name, fn):
        """``fn`` counted as one call of a helper whose own synchronisations are its author's."""

        def wrapped(*args, **kwargs):
            self.helper_calls[name] = self.helper_calls.get(name, 0) + 1
            self._inside_helper += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside_helper -= 1

        return wrapped




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


@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_one_micro_batch_stays_within_the_sync_budget(monkeypatch, setting, num_heads):
    config = mtp_actor_config()
    mtp_config = MtpRLConfig(enable=True, mtp_loss_type="rl", **SETTINGS[setting])
    data = make_actor_batch([3, 5, 2, 4], [6, 4, 7, 5], seed=3)
    output = unaligned_outputs(data, num_heads, mtp_config.detached_head_ce_coef > 0)
    ppo_loss(config=config, model_output=output, data=data)  # verl's own term; fills global_batch_info
    occ_state = OCCState(mtp_config.occ)

    counter = SyncCounter(monkeypatch)
    monkeypatch.setattr(mtp_losses, "no_padding_2_padding", counter.helper("unpad", mtp_losses.no_padding_2_padding))
    get_fn = mtp_losses.get_policy_loss_fn
    monkeypatch.setattr(mtp_losses, "get_policy_loss_fn", lambda mode: counter.helper("policy_loss", get_fn(mode)))

    aligned = align_mtp_outputs(output)
    assert counter.syncs == [] and counter.helper_calls == {}, "the alignment must not synchronise"

    loss, metrics = mtp_losses.mtp_policy_loss(config, mtp_config, occ_state, aligned, data)
    assert len(counter.syncs) <= 1, counter.syncs
    assert counter.helper_calls == {"unpad": 1, "policy_loss": num_heads}
    # the budget was not met by skipping work: every head's metrics are there, as host numbers
    for k in range(1, num_heads + 1):
        assert isinstance(metrics[f"actor/mtp_{k}/lambda"], float)
        assert isinstance(metrics[f"actor/mtp_{k}/top1_agreement"], float)
    assert torch.isfinite(loss) and loss.requires_grad


def test_the_counter_sees_a_synchronisation(monkeypatch):
    counter = SyncCounter(monkeypatch)
    t = torch.ones(3)
    float(t.sum()), t.tolist(), bool(t.any())
    [None, None][t.long()[0]]
    assert [s.split(" ")[0] for s in counter.syncs] == ["__float__", "tolist", "__bool__", "__index__"]
    counter.helper("h", lambda: t.sum().item())()
    assert len(counter.syncs) == 4 and counter.helper_calls == {"h": 1}
