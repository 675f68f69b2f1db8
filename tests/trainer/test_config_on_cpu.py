"""The MTP-RL Hydra config composes on top of the installed verl and validates its regime settings.

* The MTP-RL trainer config is verl's ``ppo_megatron_trainer`` (composed from the installed package,
  ``pkg://verl.trainer.config``, where verl does not carry them itself) with the ``actor_rollout_ref.model.mtp`` keys.
* ``omega_conf_to_dataclass`` (what verl's workers call) turns the block into ``MtpRLConfig``; each
  ``mtp_loss_type`` names a registered regime that requires verl's own ``enable_train`` / ``detach_encoder``
  switches to say what it trains; the config object only validates (a contradiction is refused, never rewritten).
* Contradictory settings fail with a ``ValueError`` whose message names the offending key. Through Hydra's
  ``instantiate`` (the path verl takes) that ``ValueError`` arrives wrapped in Hydra's
  ``InstantiationException`` and its text is kept in the message.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import MtpConfig
from verl_mtp.workers.config import MTP_REGIME_REGISTRY, OCC_SCOPES, MtpRLConfig, OCCConfig, get_mtp_regime

CONFIG_MODULE = "verl_mtp.trainer.config"
CONFIG_NAME = "mtp_ppo_megatron_trainer"
MTP = "actor_rollout_ref.model.mtp"


def _compose(*overrides: str):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


def _mtp(*overrides: str):
    """``actor_rollout_ref.model.mtp`` as verl's workers build it, after the given (unprefixed) overrides."""
    cfg = _compose(*(f"{MTP}.{o}" for o in overrides))
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.model.mtp)


@pytest.fixture(scope="module")
def default_cfg():
    return _compose()


# ----------------------------------------------------------------------------------------- composition


def test_composes_verl_trainer_from_installed_package(default_cfg):
    cfg = default_cfg
    # verl's own Megatron trainer keys are all there, with verl's defaults.
    assert cfg.model_engine == "megatron"
    assert cfg.actor_rollout_ref.actor.strategy == "megatron"
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "vanilla"
    assert cfg.actor_rollout_ref.actor.megatron.context_parallel_size == 1
    assert {"data", "algorithm", "trainer", "reward", "critic"} <= set(cfg.keys())
    # verl's MtpConfig keys keep their meaning and defaults.
    mtp = cfg.actor_rollout_ref.model.mtp
    for key in ("enable", "enable_train", "enable_rollout", "detach_encoder"):
        assert mtp[key] is False, key
    assert mtp.mtp_loss_scaling_factor == pytest.approx(0.1)
    assert mtp.method == "mtp" and mtp.num_speculative_tokens == 1


def test_adds_mtp_rl_keys_with_paper_defaults(default_cfg):
    mtp = default_cfg.actor_rollout_ref.model.mtp
    assert mtp._target_ == "verl_mtp.workers.config.MtpRLConfig"
    assert mtp.mtp_loss_type is None
    assert mtp.train_lm_head is False
    assert mtp.logprob_chunk_size == 1024
    occ = mtp.occ
    assert occ._target_ == "verl_mtp.workers.config.OCCConfig"
    assert occ.enable is False
    assert occ.lambda_plus == pytest.approx(1.0)  # the paper's, not mtp_loss_scaling_factor / K
    assert occ.eps == pytest.approx(1e-8)
    assert occ.scope == "micro_batch"
    assert occ.carry_last_lambda is False and occ.initial_lambda == 0.0
    assert occ.max_abs_lambda is None
    # Every OCCConfig field is in the YAML, so every field can be overridden from the command line.
    assert set(OCCConfig.__dataclass_fields__) - {"_target_"} <= set(occ.keys())
    assert set(MtpRLConfig.__dataclass_fields__) - {"_target_"} <= set(mtp.keys())


def test_rollout_sees_the_same_mtp_block():
    cfg = _compose(
        f"{MTP}.enable=True", f"{MTP}.enable_train=True", f"{MTP}.mtp_loss_type=rl", f"{MTP}.occ.enable=True",
    )
    resolved = OmegaConf.to_container(cfg.actor_rollout_ref, resolve=True)
    assert resolved["rollout"]["mtp"] == resolved["model"]["mtp"]


def test_default_block_is_verl_behaviour():
    mtp = _mtp()
    assert type(mtp) is MtpRLConfig and isinstance(mtp, MtpConfig)
    assert mtp.mtp_loss_type is None and not mtp.is_rl
    assert mtp.enable is False and mtp.enable_train is False and mtp.detach_encoder is False
    assert isinstance(mtp.occ, OCCConfig) and mtp.occ.enable is False


def test_null_type_keeps_verl_switches_as_given():
    mtp = _mtp("enable=True", "enable_train=True", "detach_encoder=True")
    assert mtp.mtp_loss_type is None
    assert (mtp.enable_train, mtp.detach_encoder) == (True, True)


# mtp_loss_type -> (enable_train, detach_encoder, is_rl)
REGIMES = {"detach": (True, True, False), "ce": (True, False, False), "rl": (True, False, True)}


def test_regime_table_covers_every_type():
    assert set(REGIMES) == set(MTP_REGIME_REGISTRY)


@pytest.mark.parametrize("kind", sorted(REGIMES))
def test_type_is_accepted_with_its_verl_switches_and_left_as_given(kind):
    enable_train, detach_encoder, is_rl = REGIMES[kind]
    mtp = _mtp(
        "enable=True", f"enable_train={enable_train}", f"detach_encoder={detach_encoder}", f"mtp_loss_type={kind}",
    )
    assert type(mtp) is MtpRLConfig
    assert (mtp.mtp_loss_type, mtp.enable_train, mtp.detach_encoder, mtp.is_rl) == (
        kind,
        enable_train,
        detach_encoder,
        is_rl,
    )
    assert mtp.occ.enable is False


@pytest.mark.parametrize("kind", sorted(REGIMES))
def test_type_refuses_verl_switches_that_contradict_it(kind):
    _, detach_encoder, _ = REGIMES[kind]
    wrong = {
        f"detach_encoder={not detach_encoder} contradicts mtp_loss_type={kind}": f"detach_encoder={not detach_encoder}",
        "enable_train=False (verl would not run them": "enable_train=False",
    }
    for message, switch in wrong.items():
        given = {"enable_train=True", f"detach_encoder={detach_encoder}"}
        given = {s for s in given if s.split("=")[0] != switch.split("=")[0]} | {switch}
        with pytest.raises((ValueError, InstantiationException)) as info:
            _mtp("enable=True", *sorted(given), f"mtp_loss_type={kind}")
        assert message in str(_value_error_in_chain(info.value))


def test_unknown_regime_error_lists_the_registered_names():
    with pytest.raises(ValueError) as info:
        get_mtp_regime("policy")
    for name in MTP_REGIME_REGISTRY:
        assert repr(name) in str(info.value)
    assert "actor_rollout_ref.model.mtp.mtp_loss_type" in str(info.value)


def test_rl_with_occ_builds_occ_config():
    mtp = _mtp(
        "enable=True",
        "enable_train=True",
        "mtp_loss_type=rl",
        "occ.enable=True",
        "occ.lambda_plus=0.5",
        "occ.scope=data_parallel",
        "occ.carry_last_lambda=True",
        "occ.initial_lambda=0.05",
        "occ.max_abs_lambda=2.0",
        "train_lm_head=True",
    )
    assert mtp.is_rl and mtp.train_lm_head is True
    occ = mtp.occ
    assert isinstance(occ, OCCConfig)
    assert (occ.enable, occ.lambda_plus, occ.scope) == (True, 0.5, "data_parallel")
    assert (occ.carry_last_lambda, occ.initial_lambda, occ.max_abs_lambda) == (True, 0.05, 2.0)


@pytest.mark.parametrize("scope", OCC_SCOPES)
def test_every_documented_scope_is_accepted(scope):
    assert _mtp(
        "enable=True", "enable_train=True", "mtp_loss_type=rl", "occ.enable=True", f"occ.scope={scope}",
    ).occ.scope == scope


# ----------------------------------------------------------------------------------------- errors

# (overrides under actor_rollout_ref.model.mtp, the setting the message must name, as MtpRLConfig kwargs)
BAD = {
    "unknown_type": (
        ["enable=True", "mtp_loss_type=policy"],
        "mtp_loss_type",
        dict(enable=True, mtp_loss_type="policy"),
    ),
    "rl_without_enable": (
        ["mtp_loss_type=rl"],
        "mtp.enable",
        dict(mtp_loss_type="rl", enable_train=True),
    ),
    "ce_without_enable": (
        ["mtp_loss_type=ce"],
        "mtp.enable",
        dict(mtp_loss_type="ce", enable_train=True),
    ),
    "occ_with_detach": (
        ["enable=True", "mtp_loss_type=detach", "occ.enable=True"],
        "occ.enable",
        dict(enable=True, mtp_loss_type="detach", occ={"enable": True}),
    ),
    "occ_with_ce": (
        ["enable=True", "mtp_loss_type=ce", "occ.enable=True"],
        "occ.enable",
        dict(enable=True, mtp_loss_type="ce", occ={"enable": True}),
    ),
    "occ_without_type": (
        ["enable=True", "occ.enable=True"],
        "occ.enable",
        dict(enable=True, occ={"enable": True}),
    ),
    "detach_encoder_with_ce": (
        ["enable=True", "mtp_loss_type=ce", "detach_encoder=True"],
        "detach_encoder",
        dict(enable=True, mtp_loss_type="ce", detach_encoder=True),
    ),
    "detach_encoder_with_rl": (
        ["enable=True", "mtp_loss_type=rl", "detach_encoder=True"],
        "detach_encoder",
        dict(enable=True, mtp_loss_type="rl", detach_encoder=True),
    ),
    "detach_without_detach_encoder": (
        ["enable=True", "enable_train=True", "mtp_loss_type=detach"],
        "detach_encoder=True",
        dict(enable=True, enable_train=True, mtp_loss_type="detach"),
    ),
    "rl_without_enable_train": (
        ["enable=True", "mtp_loss_type=rl"],
        "enable_train=True",
        dict(enable=True, mtp_loss_type="rl"),
    ),
    "bad_occ_scope": (
        ["enable=True", "mtp_loss_type=rl", "occ.enable=True", "occ.scope=global"],
        "occ.scope",
        dict(enable=True, mtp_loss_type="rl", occ={"enable": True, "scope": "global"}),
    ),
    "bad_occ_eps": (
        ["enable=True", "mtp_loss_type=rl", "occ.enable=True", "occ.eps=0"],
        "occ.eps",
        dict(enable=True, mtp_loss_type="rl", occ={"enable": True, "eps": 0.0}),
    ),
    "bad_occ_max_abs_lambda": (
        ["enable=True", "mtp_loss_type=rl", "occ.enable=True", "occ.max_abs_lambda=-1"],
        "occ.max_abs_lambda",
        dict(enable=True, mtp_loss_type="rl", occ={"enable": True, "max_abs_lambda": -1.0}),
    ),
    "negative_logprob_chunk_size": (
        ["enable=True", "mtp_loss_type=rl", "logprob_chunk_size=-1"],
        "logprob_chunk_size",
        dict(enable=True, mtp_loss_type="rl", logprob_chunk_size=-1),
    ),
    "detached_head_ce_with_detach": (
        ["enable=True", "mtp_loss_type=detach", "detached_head_ce_coef=0.1"],
        "detached_head_ce_coef",
        dict(enable=True, mtp_loss_type="detach", detached_head_ce_coef=0.1),
    ),
    "negative_detached_head_ce": (
        ["enable=True", "mtp_loss_type=rl", "detached_head_ce_coef=-0.1"],
        "detached_head_ce_coef",
        dict(enable=True, mtp_loss_type="rl", detached_head_ce_coef=-0.1),
    ),
    "train_lm_head_with_ce": (
        ["enable=True", "mtp_loss_type=ce", "train_lm_head=True"],
        "train_lm_head",
        dict(enable=True, mtp_loss_type="ce", train_lm_head=True),
    ),
}


def _value_error_in_chain(exc: BaseException) -> ValueError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ValueError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.mark.parametrize("case", sorted(BAD))
def test_dataclass_raises_value_error_naming_the_setting(case):
    _, setting, kwargs = BAD[case]
    with pytest.raises(ValueError) as info:
        MtpRLConfig(**kwargs)
    assert setting in str(info.value)
    assert "actor_rollout_ref.model.mtp" in str(info.value)  # the full key, copy-pasteable as an override


@pytest.mark.parametrize("case", sorted(BAD))
def test_config_path_raises_value_error_naming_the_setting(case):
    overrides, setting, _ = BAD[case]
    with pytest.raises((ValueError, InstantiationException)) as info:
        _mtp(*overrides)
    cause = _value_error_in_chain(info.value)
    assert cause is not None, f"no ValueError behind {info.value!r}"
    assert setting in str(cause)
    assert setting in str(info.value)  # what the user sees on the console names it too
