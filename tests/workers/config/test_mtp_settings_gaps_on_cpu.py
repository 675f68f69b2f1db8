"""Settings of Megatron-Core and of verl's distillation that would silently change what a regime trains.

* Megatron-Core 0.19's ``mtp_detach_heads=True`` cuts the MTP block off the trunk: refused with ``ce`` / ``rl``
  (checked on a real tiny GPTModel's TransformerConfig; 0.16.1 has no such field, so it is set on the
  instance as 0.19 would have it), accepted with ``detach`` and when absent or False.
* verl's distillation with ``use_task_rewards=False`` (top-k or estimator, with or without
  ``use_policy_gradient``) has no task policy term: ``rl`` is refused when the actor loss is wrapped and at the
  entry point; with ``use_task_rewards=True`` both accept it (the MTP term rides on verl's task term, as
  without distillation).
"""

from functools import partial

import pytest
from hydra import compose, initialize_config_module
from verl_cpu.testing import build_tiny_gpt

from verl.trainer.distillation.losses import distillation_ppo_loss
from verl.utils.config import omega_conf_to_dataclass
from verl_mtp.trainer.ppo.mtp_occ import OCCState
from verl_mtp.workers.config import MtpRLConfig
from verl_mtp.workers.config.mtp import check_distillation_settings, check_megatron_mtp_settings
from verl_mtp.workers.utils.losses import with_mtp_policy_loss

MTP = "actor_rollout_ref.model.mtp"
REGIMES = ("detach", "ce", "rl")


def mtp(kind):
    return MtpRLConfig(enable=True, enable_train=True, detach_encoder=kind == "detach", mtp_loss_type=kind)


@pytest.mark.parametrize("kind", REGIMES)
@pytest.mark.parametrize("detach_heads", [None, False, True], ids=["absent", "false", "true"])
@pytest.mark.usefixtures("cpu_megatron")
def test_megatron_mtp_detach_heads_contradicting_the_regime_is_refused(kind, detach_heads):
    config = build_tiny_gpt(1).config
    if detach_heads is not None:
        config.mtp_detach_heads = detach_heads
    if detach_heads and kind in ("ce", "rl"):
        with pytest.raises(ValueError, match="mtp_detach_heads=True contradicts .*mtp_loss_type=" + kind):
            check_megatron_mtp_settings(mtp(kind), config)
    else:
        check_megatron_mtp_settings(mtp(kind), config)


def compose_config(overrides):
    with initialize_config_module(config_module="verl_mtp.trainer.config", version_base=None):
        return compose(
            config_name="mtp_ppo_megatron_trainer",
            overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", *overrides],
        )


def distillation_overrides(loss_mode, use_task_rewards, use_policy_gradient):
    teacher = "distillation.teacher_models.teacher_model"
    return [
        "distillation.enabled=True",
        "distillation.n_gpus_per_node=1",
        "distillation.nnodes=1",
        f"{teacher}.model_path=/nonexistent/teacher",
        f"{teacher}.num_replicas=1",
        f"{teacher}.inference.name=vllm",
        f"{teacher}.inference.tensor_model_parallel_size=1",
        f"distillation.distillation_loss.loss_mode={loss_mode}",
        f"distillation.distillation_loss.use_task_rewards={use_task_rewards}",
        f"distillation.distillation_loss.use_policy_gradient={use_policy_gradient}",
    ]


MODES = {  # verl's distillation modes: (loss_mode, use_task_rewards, use_policy_gradient)
    "topk_only": ("forward_kl_topk", False, False),  # verl's distillation_only: no log_probs at all
    "estimator_only": ("k3", False, False),
    "estimator_pg_no_task": ("k1", False, True),
    "topk_with_task": ("forward_kl_topk", True, False),
    "estimator_with_task": ("k3", True, False),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", REGIMES)
def test_rl_needs_verl_task_policy_term_under_distillation(mode, kind):
    regime = [f"{MTP}.enable_train=True", f"{MTP}.detach_encoder={kind == 'detach'}", f"{MTP}.mtp_loss_type={kind}"]
    cfg = compose_config([*regime, *distillation_overrides(*MODES[mode])])
    distillation = omega_conf_to_dataclass(cfg.distillation)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    base = partial(distillation_ppo_loss, config=actor, distillation_config=distillation)
    checks = {
        "engine": lambda: with_mtp_policy_loss(base, mtp(kind), OCCState(mtp(kind).occ)),
        "entry point": lambda: check_distillation_settings(cfg.actor_rollout_ref.model.mtp, cfg.distillation),
    }
    for where, check in checks.items():
        if kind == "rl" and not MODES[mode][1]:
            with pytest.raises(ValueError, match="use_task_rewards=False"):
                check()
        else:
            check()


def test_without_distillation_rl_is_accepted():
    cfg = compose_config([f"{MTP}.enable_train=True", f"{MTP}.mtp_loss_type=rl"])
    check_distillation_settings(cfg.actor_rollout_ref.model.mtp, cfg.get("distillation"))
