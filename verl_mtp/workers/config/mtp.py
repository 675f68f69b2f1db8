"""Configuration of joint MTP-RL training: the regime (``mtp_loss_type``) and OCC.

The regime fields of ``MtpRLConfig`` (``actor_rollout_ref.model.mtp``) come on top of verl's MTP keys, which
keep their meaning. ``mtp_loss_type`` names a regime (see :data:`MTP_REGIME_REGISTRY`):

* ``detach``: Megatron's MTP cross-entropy on detached trunk inputs (verl ``enable_train=True,
  detach_encoder=True``); no gradient from MTP reaches the embedding, decoder or lm_head.
* ``ce``: Megatron's MTP cross-entropy with its gradient flowing into the trunk (``detach_encoder=False``).
* ``rl``: each MTP head gets the actor's registered policy loss on its own log-probs of the sampled tokens,
  with advantages scaled by the OCC lambda (``occ.enable``) or by the fixed ``mtp_loss_scaling_factor``.

``mtp_loss_type=None`` (the default) leaves verl's behaviour untouched.

This module is a leaf of the project (it imports nothing else of it), and its objects only validate: they
change neither themselves nor any global state. verl's own switches keep their meaning and are read by verl as
given: a regime requires ``enable_train=True`` and its own value of ``detach_encoder``, and a config that says
otherwise is refused with the setting to change, never rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from typing import Optional

import yaml
from verl.base_config import BaseConfig
from verl.workers.config import MtpConfig

__all__ = [
    "OCC_SCOPES",
    "OCC_ESTIMATORS",
    "MTP_REGIME_REGISTRY",
    "MtpRegime",
    "register_mtp_regime",
    "get_mtp_regime",
    "OCCConfig",
    "MtpRLConfig",
    "check_mtp_rl_settings",
    "check_megatron_mtp_settings",
    "check_distillation_settings",
    "check_fused_main_head_settings",
]

OCC_SCOPES = ("micro_batch", "data_parallel")
OCC_ESTIMATORS = ("proxy", "gradient")


@dataclass(frozen=True)
class MtpRegime:
    """What one ``mtp_loss_type`` means, as data the config, the engine and the loss dispatch on.

    A regime is a declaration rather than code because the config must validate names and options while
    staying a leaf: the registry lives here, and the engine and the loss read its fields instead of comparing
    names. ``detach_encoder`` is the value of verl's switch the regime requires (``enable_train=True`` is
    required by every regime); ``policy_loss`` says the heads are trained by the actor's policy loss (this
    project's postprocess, scoring, alignment and loss term, with OCC and the options marked "rl only").
    """

    name: str
    detach_encoder: bool
    policy_loss: bool


MTP_REGIME_REGISTRY: dict[str, MtpRegime] = {}


def register_mtp_regime(regime: MtpRegime) -> MtpRegime:
    """Add ``regime`` under its name (as verl's ``register_policy_loss`` does for policy losses)."""
    existing = MTP_REGIME_REGISTRY.get(regime.name)
    if existing is not None and existing != regime:
        raise ValueError(f"MTP regime {regime.name!r} is already registered as {existing}")
    MTP_REGIME_REGISTRY[regime.name] = regime
    return regime


def get_mtp_regime(name: str) -> MtpRegime:
    """The regime registered as ``name``; the error lists the valid names."""
    if name not in MTP_REGIME_REGISTRY:
        raise ValueError(
            f"actor_rollout_ref.model.mtp.mtp_loss_type={name!r} is unknown; choose one of "
            f"{tuple(MTP_REGIME_REGISTRY)} (or null to keep verl's own MTP behaviour)."
        )
    return MTP_REGIME_REGISTRY[name]


REGIMES_FILE = "mtp_regimes.yaml"


def _register_listed_regimes() -> None:
    """Register the regimes listed as data in ``mtp_regimes.yaml`` next to this module: the one list,
    which tools that must not import verl to read it (the local example's launcher) read too."""
    listed = yaml.safe_load(files(__package__).joinpath(REGIMES_FILE).read_text())
    for name, fields in listed.items():
        register_mtp_regime(MtpRegime(name, **fields))


_register_listed_regimes()


@dataclass
class OCCConfig(BaseConfig):
    """Optimal Coefficient Calibration: ``lambda = lambda_plus * sum(dRL*dMTP) / (sum(dMTP^2) + eps)``.

    Paper settings: ``lambda_plus``, ``eps``. Not in the paper (off or neutral by default, documented in
    docs/mtp_rl.md):

    scope: ``micro_batch`` sums over the micro-batch's response tokens; ``data_parallel`` all-reduces the
        OCC sums over the data-parallel group first (one collective of 5 floats per head and micro-batch).
    carry_last_lambda: when a micro-batch carries no signal (mean |dRL| <= ``uninformative_drl``, e.g. the
        first mini-batch of a step, where log pi == log pi_old and the paper's lambda is 0) use the last
        informative lambda of that head instead (``initial_lambda`` before there is one).
    max_abs_lambda: clamp |lambda| to this bound; ``None`` means no bound.
    estimator: ``proxy`` (the paper's OCC) or ``gradient``: the paper's "Full-model" calibration,
        ``lambda_plus_gradient * <g_RL, g_MTP_k> / (||g_MTP_k||^2 + eps)`` from full trunk gradients, once per
        mini-batch update, at the cost of K + 1 extra forward/backward passes.
    lambda_plus_gradient: the gradient estimator's own scale (the paper calibrates each estimator separately).
    diagnose_every: every N-th mini-batch update also computes the gradient estimator's statistics and logs
        them next to the proxy's (0 = never).
    """

    enable: bool = False
    lambda_plus: float = 1.0
    eps: float = 1e-8
    scope: str = "micro_batch"
    carry_last_lambda: bool = False
    initial_lambda: float = 0.0
    uninformative_drl: float = 1e-6
    max_abs_lambda: Optional[float] = None
    estimator: str = "proxy"
    lambda_plus_gradient: float = 1.0
    diagnose_every: int = 0

    @property
    def needs_gradients(self) -> bool:
        """Whether some update runs the gradient estimator (to calibrate or to diagnose)."""
        return self.estimator == "gradient" or self.diagnose_every > 0

    def __post_init__(self):
        self._check_estimator()
        if self.scope not in OCC_SCOPES:
            raise ValueError(
                f"actor_rollout_ref.model.mtp.occ.scope={self.scope!r} is unknown; choose one of {OCC_SCOPES}"
            )
        if self.eps <= 0:
            raise ValueError(f"actor_rollout_ref.model.mtp.occ.eps must be > 0, got {self.eps}")
        if self.max_abs_lambda is not None and self.max_abs_lambda <= 0:
            raise ValueError(
                f"actor_rollout_ref.model.mtp.occ.max_abs_lambda must be > 0 or null, got {self.max_abs_lambda}"
            )

    def _check_estimator(self) -> None:
        prefix = "actor_rollout_ref.model.mtp.occ"
        if self.estimator not in OCC_ESTIMATORS:
            raise ValueError(f"{prefix}.estimator={self.estimator!r} is unknown; choose one of {OCC_ESTIMATORS}")
        if self.estimator == "gradient" and not self.enable:
            raise ValueError(
                f"{prefix}.estimator=gradient needs {prefix}.enable=True (it calibrates OCC's lambda); set "
                f"{prefix}.enable=True, or use {prefix}.diagnose_every=N to only log the gradient statistics."
            )
        if isinstance(self.diagnose_every, bool) or not isinstance(self.diagnose_every, int) or self.diagnose_every < 0:
            raise ValueError(
                f"{prefix}.diagnose_every must be an integer >= 0 (0 = off, N = every N-th mini-batch update), "
                f"got {self.diagnose_every!r}"
            )
        if not self.lambda_plus_gradient > 0:
            raise ValueError(f"{prefix}.lambda_plus_gradient must be > 0, got {self.lambda_plus_gradient}")


def check_mtp_rl_settings(config) -> None:
    """Refuse contradictory regime settings of an MTP config (verl's ``MtpConfig`` keys plus the regime's).

    A function rather than a method so that the same checks run wherever the regime fields are declared.
    """
    regime = config.regime
    if regime is None:
        if config.occ.enable or config.occ.diagnose_every:
            raise ValueError(
                "actor_rollout_ref.model.mtp.occ.enable=True / occ.diagnose_every > 0 need mtp_loss_type=rl "
                "(OCC calibrates the MTP policy loss)."
            )
        return
    if not config.enable:
        raise ValueError(
            f"actor_rollout_ref.model.mtp.mtp_loss_type={regime.name} needs actor_rollout_ref.model.mtp.enable="
            "True and a model with MTP layers."
        )
    if config.logprob_chunk_size < 0:
        raise ValueError(
            f"actor_rollout_ref.model.mtp.logprob_chunk_size must be >= 0, got {config.logprob_chunk_size}"
        )
    _check_policy_loss_options(config, regime)
    _check_verl_switches(config, regime)


def _check_verl_switches(config, regime: MtpRegime) -> None:
    """verl reads ``enable_train`` / ``detach_encoder`` itself: they must already say what the regime trains."""
    if config.detach_encoder != regime.detach_encoder:
        trunk = "keeps the MTP loss off the trunk" if regime.detach_encoder else "trains the trunk through the heads"
        raise ValueError(
            f"actor_rollout_ref.model.mtp.detach_encoder={config.detach_encoder} contradicts mtp_loss_type="
            f"{regime.name} (which {trunk}); set detach_encoder={regime.detach_encoder}"
            + ("." if regime.detach_encoder else " or mtp_loss_type=detach.")
        )
    if not config.enable_train:
        raise ValueError(
            f"actor_rollout_ref.model.mtp.mtp_loss_type={regime.name} trains the MTP heads, but "
            "actor_rollout_ref.model.mtp.enable_train=False (verl would not run them in the training forward); "
            "set enable_train=True, or mtp_loss_type=null to leave the heads untrained."
        )


def _check_policy_loss_options(config, regime: MtpRegime) -> None:
    """Options marked "rl only" need a regime that trains the heads with the policy loss."""
    if config.detached_head_ce_coef < 0 or (config.detached_head_ce_coef > 0 and not regime.policy_loss):
        raise ValueError(
            "actor_rollout_ref.model.mtp.detached_head_ce_coef must be >= 0 and only applies to "
            f"mtp_loss_type=rl; got {config.detached_head_ce_coef} with mtp_loss_type={regime.name}"
        )
    if regime.policy_loss:
        return
    if config.occ.enable:
        raise ValueError(
            f"actor_rollout_ref.model.mtp.occ.enable=True with mtp_loss_type={regime.name}: OCC only calibrates "
            "the rl regime; set mtp_loss_type=rl or occ.enable=False."
        )
    if config.occ.diagnose_every:
        raise ValueError(
            f"actor_rollout_ref.model.mtp.occ.diagnose_every={config.occ.diagnose_every} with mtp_loss_type="
            f"{regime.name}: the diagnostics compare gradients of the rl regime's MTP policy loss; set "
            "mtp_loss_type=rl or occ.diagnose_every=0."
        )
    if config.train_lm_head:
        raise ValueError(
            f"actor_rollout_ref.model.mtp.train_lm_head=True only applies to mtp_loss_type=rl, got {regime.name}."
        )


@dataclass
class MtpRLConfig(MtpConfig):
    """verl's ``MtpConfig`` plus the joint-training regime; see the module docstring.

    train_lm_head: whether the MTP policy loss may update the shared output layer (``rl`` only). Default
        False, as verl's MTP losses never update it: the main head's distribution stays the policy's own.
    logprob_chunk_size: tokens per chunk when scoring the sampled tokens with each MTP head (``rl``):
        a head's fp32 full-vocabulary logits live only per chunk; the backward keeps ``exp(logits - max)`` in
        the hidden states' dtype. 0 runs the head through Megatron's output layer and keeps its logits (more
        memory). With verl's ``use_fused_kernels=True`` (any regime) the main head is scored in chunks of this
        size too, so it must be > 0 there.
    detached_head_ce_coef: ``rl`` only, not in the paper, off (0) by default. When > 0 the heads are run a second
        time on detached trunk inputs and get Megatron's cross-entropy on the sampled tokens with this coefficient
        (split over heads), so they keep learning as in ``detach`` (speculative-decoding drafts stay fresh)
        while lambda alone decides what the MTP term sends into the trunk. Costs one more forward and
        backward of the MTP layers (not of the trunk).
    """

    mtp_loss_type: Optional[str] = None
    train_lm_head: bool = False
    logprob_chunk_size: int = 1024
    detached_head_ce_coef: float = 0.0
    occ: OCCConfig = field(default_factory=OCCConfig)

    def __post_init__(self):
        if isinstance(self.occ, dict):  # built directly rather than through Hydra's nested _target_
            object.__setattr__(self, "occ", OCCConfig(**self.occ))
        check_mtp_rl_settings(self)

    @property
    def regime(self) -> MtpRegime | None:
        """The registered regime named by ``mtp_loss_type``; ``None`` keeps verl's own behaviour."""
        return None if self.mtp_loss_type is None else get_mtp_regime(self.mtp_loss_type)

    @property
    def is_rl(self) -> bool:
        """Whether the heads are trained by the policy loss (the engine's MTP-RL path)."""
        regime = self.regime
        return self.enable and regime is not None and regime.policy_loss



def check_megatron_mtp_settings(mtp_config, transformer_config) -> None:
    """Refuse Megatron-Core model settings that silently change what ``mtp_loss_type`` trains.

    ``mtp_detach_heads`` (Megatron-Core 0.19+; set through ``override_transformer_config`` or a bridge) cuts
    the MTP block's inputs off the trunk, which is the ``detach`` regime: with a regime that trains the trunk
    through the heads (``ce``, ``rl``) the trunk would get no MTP gradient and the run would silently train the
    heads only.
    """
    regime = mtp_config.regime
    if regime is not None and not regime.detach_encoder and getattr(transformer_config, "mtp_detach_heads", False):
        raise ValueError(
            f"Megatron-Core's mtp_detach_heads=True contradicts actor_rollout_ref.model.mtp.mtp_loss_type="
            f"{regime.name} (which trains the trunk through the MTP heads): set "
            "actor_rollout_ref.actor.megatron.override_transformer_config.mtp_detach_heads=False, or use "
            "mtp_loss_type=detach for head-only MTP training."
        )


def check_distillation_settings(mtp_config, distillation_config) -> None:
    """Refuse a policy-loss regime (``rl``) where verl's on-policy distillation has no task policy term.

    The rl MTP term is the actor's policy loss on the task advantages, so it exists exactly where verl's own
    task term does: with ``distillation.distillation_loss.use_task_rewards=True`` both are added (the
    distillation term only to the main head). With ``use_task_rewards=False`` verl drops its task term (and
    with top-k distillation, ``distillation_only``, computes no log-probs at all), so an rl MTP term would be
    the only task signal left: refused at start-up, with the alternatives. Accepts dataclasses or OmegaConf.
    """
    name = getattr(mtp_config, "mtp_loss_type", None)
    if name is None or distillation_config is None or not get_mtp_regime(name).policy_loss:
        return
    if not distillation_config.enabled or distillation_config.distillation_loss.use_task_rewards:
        return
    raise ValueError(
        f"actor_rollout_ref.model.mtp.mtp_loss_type={name} trains the MTP heads with the task policy term, which "
        "verl drops under distillation.distillation_loss.use_task_rewards=False: set use_task_rewards=True, or "
        "train the heads with mtp_loss_type=detach (or ce) during distillation. See docs/mtp_rl.md."
    )


def check_fused_main_head_settings(use_fused_kernels: bool, mtp_config, distillation_config=None) -> None:
    """Refuse what cannot run when verl's ``use_fused_kernels`` scores the main head in chunks (with a regime).

    The main head then never has full logits: it is scored in chunks of ``logprob_chunk_size`` tokens, and
    verl's top-k distillation, which reads the student's full logits, has nothing to read. Accepts
    dataclasses or OmegaConf; ``distillation_config`` may be absent (the engine does not see it).
    """
    if not use_fused_kernels or getattr(mtp_config, "mtp_loss_type", None) is None or not mtp_config.enable:
        return
    if mtp_config.logprob_chunk_size <= 0:
        raise ValueError(
            "actor_rollout_ref.model.use_fused_kernels=True with an MTP regime scores the main head in chunks of "
            "actor_rollout_ref.model.mtp.logprob_chunk_size tokens, which is "
            f"{mtp_config.logprob_chunk_size}: set it > 0 (e.g. 1024), or use_fused_kernels=False."
        )
    if distillation_config is None or not distillation_config.enabled:
        return
    from verl.trainer.distillation.losses import get_distillation_loss_settings

    loss_mode = distillation_config.distillation_loss.loss_mode
    if get_distillation_loss_settings(loss_mode).use_topk:
        raise ValueError(
            f"distillation.distillation_loss.loss_mode={loss_mode} (top-k distillation) reads the main head's full "
            "logits, which actor_rollout_ref.model.use_fused_kernels=True with an MTP regime never makes: set "
            "use_fused_kernels=False, or use a distillation loss without top-k."
        )
