"""Start-up layout check of ``mtp_loss_type=rl`` (single process): static context parallelism is accepted,
dynamic context parallelism is refused with a clear error.

Static CP is proven equal to CP = 1 on 2 ranks (test_mtp_context_parallel_rl_on_cpu.py). Dynamic CP regroups
ranks per micro-batch while Megatron's MTP block rolls over the static CP group, so the engine must fail in
``initialize`` (before it builds anything) rather than train on wrong inputs. The engine is a bare
``MegatronMTPEngineWithLMHead`` instance (``__init__`` skipped) carrying only ``model_config.mtp`` and
``engine_config``: reaching verl's ``initialize`` would fail differently.
"""

from types import SimpleNamespace

import pytest

import verl  # noqa: F401  (import verl before verl_mtp: verl's plugin loader imports verl_mtp's engine)
from verl_mtp.workers.config import MtpRLConfig
from verl_mtp.workers.engine.megatron.mtp_engine_hooks import check_mtp_rl_layout
from verl_mtp.workers.engine.megatron.transformer_impl import MegatronMTPEngineWithLMHead


def bare_engine(mtp_loss_type="rl", context_parallel_size=2, **engine):
    obj = object.__new__(MegatronMTPEngineWithLMHead)
    obj.model_config = SimpleNamespace(mtp=MtpRLConfig(
        enable=True, enable_train=True, detach_encoder=mtp_loss_type == "detach", mtp_loss_type=mtp_loss_type
    ))
    obj.engine_config = SimpleNamespace(context_parallel_size=context_parallel_size, **engine)
    return obj


def test_rl_with_dynamic_context_parallel_fails_at_start_up_with_a_clear_error():
    engine = bare_engine(context_parallel_size=2, dynamic_context_parallel=True)
    with pytest.raises(ValueError, match=r"mtp_loss_type=rl does not support .*dynamic_context_parallel=True"):
        check_mtp_rl_layout(engine)
    # initialize() runs the check first: it fails before verl's engine builds anything
    advice = r"dynamic_context_parallel=False with context_parallel_size > 1.*mtp_loss_type=detach"
    with pytest.raises(ValueError, match=advice):
        MegatronMTPEngineWithLMHead.initialize(engine)


def test_the_unbound_check_on_a_plain_stand_in():
    stand_in = SimpleNamespace(
        mtp_rl=True,
        model_config=SimpleNamespace(mtp=MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl")),
        engine_config=SimpleNamespace(context_parallel_size=1, dynamic_context_parallel=True),
    )
    with pytest.raises(ValueError, match="dynamic_context_parallel"):
        check_mtp_rl_layout(stand_in)


@pytest.mark.parametrize(
    "mtp_loss_type, cp, dynamic",
    [("rl", 1, False), ("rl", 2, False), ("rl", 4, False), ("detach", 2, True), ("ce", 2, True), (None, 2, True)],
)
def test_other_layouts_and_regimes_pass_the_check(mtp_loss_type, cp, dynamic):
    check_mtp_rl_layout(bare_engine(mtp_loss_type, cp, dynamic_context_parallel=dynamic))
