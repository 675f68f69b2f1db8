"""The gradient estimator's keys: defaults keep the proxy, the YAML carries them, bad values name key and fix."""

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import InstantiationException

from verl.utils.config import omega_conf_to_dataclass
from verl_mtp.workers.config import MtpRLConfig, OCCConfig
from verl_mtp.workers.config.mtp import OCC_ESTIMATORS

MTP = "actor_rollout_ref.model.mtp"


def _mtp(*overrides: str):
    with initialize_config_module(config_module="verl_mtp.trainer.config", version_base=None):
        cfg = compose(config_name="mtp_ppo_megatron_trainer", overrides=[f"{MTP}.{o}" for o in overrides])
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.model.mtp)


def test_proxy_is_the_default_and_no_diagnostics_run():
    composed = _mtp("enable=True", "enable_train=True", "mtp_loss_type=rl", "occ.enable=True").occ
    for occ in (OCCConfig(), OCCConfig(enable=True), composed):
        assert occ.estimator == "proxy" and occ.diagnose_every == 0 and occ.lambda_plus_gradient == 1.0
        assert not occ.needs_gradients


def test_gradient_keys_compose_from_the_yaml():
    occ = _mtp(
        "enable=True", "enable_train=True", "mtp_loss_type=rl", "occ.enable=True", "occ.estimator=gradient",
        "occ.lambda_plus_gradient=0.3", "occ.diagnose_every=5",
    ).occ
    assert (occ.estimator, occ.lambda_plus_gradient, occ.diagnose_every) == ("gradient", 0.3, 5)
    assert occ.needs_gradients
    diagnose_only = _mtp(
        "enable=True", "enable_train=True", "mtp_loss_type=rl", "occ.diagnose_every=3",
    ).occ  # fixed coefficient
    assert diagnose_only.needs_gradients and not diagnose_only.enable


BAD = {
    "unknown_estimator": (
        dict(enable=True, enable_train=True, mtp_loss_type="rl", occ={"enable": True, "estimator": "full"}),
        ["occ.estimator='full'", *OCC_ESTIMATORS],
    ),
    "gradient_without_occ": (
        dict(enable=True, enable_train=True, mtp_loss_type="rl", occ={"estimator": "gradient"}),
        ["occ.estimator=gradient", "occ.enable=True", "diagnose_every"],
    ),
    "negative_diagnose_every": (
        dict(enable=True, enable_train=True, mtp_loss_type="rl", occ={"enable": True, "diagnose_every": -1}),
        ["occ.diagnose_every", ">= 0"],
    ),
    "fractional_diagnose_every": (
        dict(enable=True, enable_train=True, mtp_loss_type="rl", occ={"enable": True, "diagnose_every": 1.5}),
        ["occ.diagnose_every", "integer"],
    ),
    "diagnose_with_detach": (
        dict(enable=True, enable_train=True, detach_encoder=True, mtp_loss_type="detach", occ={"diagnose_every": 2}),
        ["occ.diagnose_every=2", "mtp_loss_type=rl"],
    ),
    "diagnose_without_regime": (
        dict(enable=True, occ={"diagnose_every": 2}),
        ["occ.diagnose_every", "mtp_loss_type=rl"],
    ),
    "nonpositive_lambda_plus_gradient": (
        dict(
            enable=True,
            enable_train=True,
            mtp_loss_type="rl",
            occ={"enable": True, "estimator": "gradient", "lambda_plus_gradient": 0},
        ),
        ["occ.lambda_plus_gradient", "> 0"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_name_the_key_and_the_fix(case):
    kwargs, phrases = BAD[case]
    with pytest.raises(ValueError) as info:
        MtpRLConfig(**kwargs)
    assert f"{MTP}." in str(info.value)
    for phrase in phrases:
        assert phrase in str(info.value), (phrase, str(info.value))


def test_bad_estimator_through_hydra_names_the_key():
    with pytest.raises((ValueError, InstantiationException)) as info:
        _mtp("enable=True", "enable_train=True", "mtp_loss_type=rl", "occ.enable=True", "occ.estimator=exact")
    assert "occ.estimator='exact'" in str(info.value) and "'gradient'" in str(info.value)
