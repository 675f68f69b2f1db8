"""The MTP policy term inside verl's real ``ppo_loss`` path, on micro-batches shaped like the engine's."""

from functools import partial

import pytest
import torch
from support.actor_config import mtp_actor_config
from verl_cpu.testing import make_actor_batch, nested_like

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
from verl.utils.metric import Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding
from verl_mtp.trainer.ppo.mtp_occ import OCCState
from verl_mtp.workers.config import MtpRLConfig, OCCConfig
from verl_mtp.models.mcore.mtp_alignment import mtp_ce_key, mtp_output_keys
from verl_mtp.workers.utils.losses import with_mtp_policy_loss

DAPO = [
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.28",
    "actor_rollout_ref.actor.clip_ratio_c=10.0",
    "actor_rollout_ref.actor.loss_agg_mode=token-mean",
]
GSPO = [
    "actor_rollout_ref.actor.policy_loss.loss_mode=gspo",
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
    "actor_rollout_ref.actor.clip_ratio_low=3e-4",
    "actor_rollout_ref.actor.clip_ratio_high=4e-4",
]




def model_outputs(data, num_heads, seed=0, spread=0.2):
    """Leaf log-probs near the old ones (so ratios straddle the clip range), per head aligned + valid mask."""
    g = torch.Generator().manual_seed(seed)
    n = data["input_ids"].values().shape[0]
    main = (-torch.rand(n, generator=g) * 3).requires_grad_()
    out = {"log_probs": nested_like(data, main)}
    leaves = {"main": main}
    for k in range(1, num_heads + 1):
        lp_key, valid_key, top1_key = mtp_output_keys(k)
        head = (-torch.rand(n, generator=g) * 3).requires_grad_()
        leaves[k] = head
        out[lp_key] = nested_like(data, head)
        pos = torch.cat([torch.arange(int(m)) for m in data["input_ids"].offsets().diff()])
        out[valid_key] = nested_like(data, pos >= k)
        out[top1_key] = nested_like(data, (torch.rand(n, generator=g) > 0.5).float())
    # put the response log-probs near old_log_probs so the PPO ratio is ~1 +- spread
    old = data.select("old_log_probs").to_padded_tensor()["old_log_probs"]
    with torch.no_grad():
        for leaf in leaves.values():
            resp = no_padding_2_padding(nested_like(data, leaf), data)
            leaf_padded = old + spread * torch.randn(old.shape, generator=g)
            _write_response(leaf, data, leaf_padded, resp.shape)
    return out, leaves


def _write_response(leaf, data, padded, shape):
    """Inverse of verl's no_padding_2_padding for test inputs: response value r sits at offset-len(resp)-1+r."""
    offsets = data["input_ids"].offsets()
    resp_lens = data["responses"].shape[1] - (data["attention_mask"][:, -data["responses"].shape[1] :] == 0).sum(1)
    for i in range(shape[0]):
        end = int(offsets[i + 1])
        r = int(resp_lens[i])
        leaf[end - r - 1 : end - 1] = padded[i, :r]


def padded(data, key):
    return data.select(key).to_padded_tensor()[key]


def test_coefficient_zero_equals_verl_ppo_loss_and_gradients():
    config = mtp_actor_config(DAPO)
    data = make_actor_batch([3, 5, 2], [6, 4, 7])
    out, leaves = model_outputs(data, num_heads=2)
    base = partial(ppo_loss, config=config)
    mtp_cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", mtp_loss_scaling_factor=0.0)
    loss_fn = with_mtp_policy_loss(base, mtp_cfg, OCCState(mtp_cfg.occ))

    want, _ = base(model_output=out, data=data)
    (want_grad,) = torch.autograd.grad(want, leaves["main"])
    got, metrics = loss_fn(model_output=out, data=data)
    got_main, got_h1, got_h2 = torch.autograd.grad(got, [leaves["main"], leaves[1], leaves[2]], allow_unused=True)

    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_main, want_grad)
    for g in (got_h1, got_h2):
        assert g is None or torch.count_nonzero(g) == 0
    assert metrics["actor/mtp_1/lambda"] == 0.0


def independent_mtp_term(config, data, out, leaves, k, coef):
    lp = no_padding_2_padding(out["log_probs"], data)
    mtp = no_padding_2_padding(out[mtp_output_keys(k)[0]], data)
    valid = no_padding_2_padding(out[mtp_output_keys(k)[1]], data).bool()
    mask = padded(data, "response_mask").bool() & valid
    old = padded(data, "old_log_probs")
    mtp = torch.where(mask, mtp, old)
    fn = get_policy_loss_fn(config.policy_loss.loss_mode)
    loss, _ = fn(
        old_log_prob=old,
        log_prob=mtp,
        advantages=padded(data, "advantages") * coef,
        response_mask=mask,
        loss_agg_mode=config.loss_agg_mode,
        config=config,
    )
    return loss, lp, mtp, old, mask


@pytest.mark.parametrize("overrides", [DAPO, GSPO], ids=["dapo", "gspo"])
@pytest.mark.parametrize("occ", [False, True], ids=["fixed", "occ"])
def test_mtp_term_is_registered_policy_loss_with_scaled_advantages(overrides, occ):
    config = mtp_actor_config(overrides)
    data = make_actor_batch([4, 2, 6, 3], [7, 9, 3, 5], seed=1)
    out, leaves = model_outputs(data, num_heads=2, seed=1)
    base = partial(ppo_loss, config=config)
    mtp_cfg = MtpRLConfig(
        enable=True, enable_train=True, mtp_loss_type="rl", mtp_loss_scaling_factor=0.3, occ=OCCConfig(enable=occ),
    )
    loss_fn = with_mtp_policy_loss(base, mtp_cfg, OCCState(mtp_cfg.occ))

    base_loss, _ = base(model_output=out, data=data)
    total, metrics = loss_fn(model_output=out, data=data)
    expected = base_loss.detach().clone()
    for k in (1, 2):
        if occ:
            _, lp, mtp, old, mask = independent_mtp_term(config, data, out, leaves, k, 0.0)
            d_rl, d_mtp = (lp - old)[mask].double(), (mtp - old)[mask].double()
            coef = float((d_rl * d_mtp).sum() / ((d_mtp**2).sum() + 1e-8))
        else:
            coef = 0.3 / 2
        term, *_ = independent_mtp_term(config, data, out, leaves, k, coef)
        assert metrics[f"actor/mtp_{k}/lambda"] == pytest.approx(coef, rel=1e-5)
        expected = expected + term.detach()
    torch.testing.assert_close(total.detach(), expected, rtol=1e-5, atol=1e-7)
    assert total.detach() != base_loss.detach()


def test_entropy_and_kl_terms_do_not_drop_the_mtp_term():
    config = mtp_actor_config([*DAPO, "actor_rollout_ref.actor.entropy_coeff=0.01", "actor_rollout_ref.actor.use_kl_loss=True"])
    data = make_actor_batch([3, 4], [5, 6], seed=2)
    data["ref_log_prob"] = data["old_log_probs"].clone()
    out, leaves = model_outputs(data, num_heads=1, seed=2)
    out["entropy"] = nested_like(data, torch.rand(data["input_ids"].values().shape[0]))
    base = partial(ppo_loss, config=config)
    mtp_cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", mtp_loss_scaling_factor=0.5)
    total, metrics = with_mtp_policy_loss(base, mtp_cfg, OCCState(mtp_cfg.occ))(model_output=out, data=data)
    base_loss, base_metrics = base(model_output=out, data=data)
    assert "actor/entropy_loss" in base_metrics and "kl_loss" in base_metrics
    term, *_ = independent_mtp_term(config, data, out, leaves, 1, 0.5)
    torch.testing.assert_close(total.detach() - base_loss.detach(), term.detach(), rtol=1e-5, atol=1e-7)
    assert float(term) != 0.0


def test_gradient_reaches_heads_only_on_valid_response_tokens():
    config = mtp_actor_config(DAPO)
    data = make_actor_batch([3, 5], [6, 4], seed=3)
    out, leaves = model_outputs(data, num_heads=2, seed=3)
    mtp_cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", mtp_loss_scaling_factor=1.0)
    total, _ = with_mtp_policy_loss(partial(ppo_loss, config=config), mtp_cfg, OCCState(mtp_cfg.occ))(
        model_output=out, data=data
    )
    grads = torch.autograd.grad(total, [leaves[1], leaves[2]])
    # a token's log-prob is produced one slot before it; only response slots with response_mask=1 may get gradient
    allowed = torch.zeros_like(leaves[1], dtype=torch.bool)
    offsets = data["input_ids"].offsets()
    resp_mask = padded(data, "response_mask").bool()
    for i in range(len(offsets) - 1):
        r = int(resp_mask.shape[1] - (data["attention_mask"][i, -resp_mask.shape[1] :] == 0).sum())
        end = int(offsets[i + 1])
        slots = torch.arange(end - r - 1, end - 1)
        allowed[slots[resp_mask[i, :r]]] = True
    for g in grads:
        assert torch.count_nonzero(g[~allowed]) == 0
        assert torch.count_nonzero(g[allowed]) > 0


def test_nonfinite_head_log_probs_never_reach_the_gradient():
    config = mtp_actor_config(DAPO)
    data = make_actor_batch([3, 5], [6, 4], seed=4)
    out, leaves = model_outputs(data, num_heads=1, seed=4)
    with torch.no_grad():
        leaves[1][leaves[1].shape[0] - 2] = float("nan")  # last response token
        leaves[1][leaves[1].shape[0] - 5] = float("-inf")  # first response token
    mtp_cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", occ=OCCConfig(enable=True))
    total, metrics = with_mtp_policy_loss(partial(ppo_loss, config=config), mtp_cfg, OCCState(mtp_cfg.occ))(
        model_output=out, data=data
    )
    (grad,) = torch.autograd.grad(total, [leaves[1]])
    assert torch.isfinite(total) and torch.isfinite(grad).all()
    assert metrics["actor/mtp_1/nonfinite_tokens"] == 2.0


def test_metrics_are_reported_per_head():
    config = mtp_actor_config(DAPO)
    data = make_actor_batch([3, 5], [6, 4], seed=5)
    out, _ = model_outputs(data, num_heads=2, seed=5)
    mtp_cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", occ=OCCConfig(enable=True))
    _, metrics = with_mtp_policy_loss(partial(ppo_loss, config=config), mtp_cfg, OCCState(mtp_cfg.occ))(
        model_output=out, data=data
    )
    for k in (1, 2):
        for name in ("lambda", "occ_cross_sum", "occ_dmtp_sq_sum", "dmtp_mean", "top1_agreement", "pg_loss",
                     "pg_clipfrac"):
            assert f"actor/mtp_{k}/{name}" in metrics, name
    assert isinstance(metrics["actor/mtp_pg_loss"], Metric)


def test_wrapping_rejects_a_loss_without_actor_config():
    mtp_cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl")
    with pytest.raises(TypeError, match="ActorConfig"):
        with_mtp_policy_loss(lambda **kw: None, mtp_cfg, OCCState(mtp_cfg.occ))


def test_detached_head_ce_term_is_added_with_the_main_normalisation():
    config = mtp_actor_config(DAPO)
    data = make_actor_batch([3, 5, 4], [6, 4, 5], seed=6)
    out, leaves = model_outputs(data, num_heads=2, seed=6)
    n = data["input_ids"].values().shape[0]
    for k in (1, 2):
        out[mtp_ce_key(k)] = nested_like(data, -torch.rand(n, generator=torch.Generator().manual_seed(k)))
    base = partial(ppo_loss, config=config)
    plain = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl")
    with_ce = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", detached_head_ce_coef=0.2)
    total_plain, _ = with_mtp_policy_loss(base, plain, OCCState(plain.occ))(model_output=out, data=data)
    total_ce, metrics = with_mtp_policy_loss(base, with_ce, OCCState(with_ce.occ))(model_output=out, data=data)
    expected = 0
    tokens = data["batch_num_tokens"]
    for k in (1, 2):
        ce = no_padding_2_padding(out[mtp_ce_key(k)], data)
        valid = no_padding_2_padding(out[mtp_output_keys(k)[1]], data).bool()
        mask = padded(data, "response_mask").bool() & valid
        expected = expected + 0.2 / 2 * float(-(ce * mask).sum() / tokens)
        assert f"actor/mtp_{k}/head_ce_loss" in metrics
    assert float(total_ce - total_plain) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss_mode", sorted(POLICY_LOSS_REGISTRY))
def test_every_registered_policy_loss_gives_the_heads_the_same_term(loss_mode):
    """The heads' policy losses run with their metric reads deferred to the micro-batch's one read-back: the term,
    its gradient and the losses' own metrics are what the loss gives when called directly."""
    settings = {"dro": ["actor_rollout_ref.actor.policy_loss.dro_beta=0.5"]}.get(loss_mode, [])
    config = mtp_actor_config([f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}", *settings])
    data = make_actor_batch([4, 2, 6, 3], [7, 9, 3, 5], seed=2)
    out, leaves = model_outputs(data, num_heads=1, seed=2)
    base = partial(ppo_loss, config=config)
    mtp_cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", mtp_loss_scaling_factor=0.3)
    base_loss, _ = base(model_output=out, data=data)
    want, lp, mtp, old, mask = independent_mtp_term(config, data, out, leaves, 1, 0.3)
    (want_grad,) = torch.autograd.grad(want, leaves[1])
    _, want_metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=old, log_prob=mtp.detach(), advantages=padded(data, "advantages") * 0.3, response_mask=mask,
        loss_agg_mode=config.loss_agg_mode, config=config,
    )
    total, metrics = with_mtp_policy_loss(base, mtp_cfg, OCCState(mtp_cfg.occ))(model_output=out, data=data)
    (got_grad,) = torch.autograd.grad(total - base_loss, leaves[1])
    torch.testing.assert_close(total.detach() - base_loss.detach(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    for name, value in want_metrics.items():
        got = metrics[f"actor/mtp_1/{name.split('/')[-1]}"]
        assert isinstance(got, Metric) and got.values == [pytest.approx(value, rel=1e-5, abs=1e-7)], name
