"""CP = 2: ``mtp_loss_type=rl`` is refused at engine start-up with a clear error (single process).

The MTP heads' targets are shifted inside each sequence, which verl_mtp does not yet do across context-parallel
ranks' zig-zag chunks, so the engine must fail in ``initialize`` (before it builds anything) rather than train
on wrong targets. The engine is a bare ``MegatronMTPEngineWithLMHead`` instance (``__init__`` skipped) carrying
only ``model_config.mtp`` and ``engine_config``: reaching verl's ``initialize`` would fail differently.
"""

from types import SimpleNamespace

import pytest

import verl  # noqa: F401  (import verl before verl_mtp: verl's plugin loader imports verl_mtp's engine)
from verl_mtp.workers.config import MtpRLConfig
from verl_mtp.workers.engine.megatron.transformer_impl import MegatronMTPEngineWithLMHead


def bare_engine(mtp_loss_type="rl", context_parallel_size=2, **engine):
    obj = object.__new__(MegatronMTPEngineWithLMHead)
    obj.model_config = SimpleNamespace(mtp=MtpRLConfig(enable=True, mtp_loss_type=mtp_loss_type))
    obj.engine_config = SimpleNamespace(context_parallel_size=context_parallel_size, **engine)
    return obj


def test_rl_with_context_parallel_fails_at_start_up_with_a_clear_error():
    engine = bare_engine()
    with pytest.raises(NotImplementedError, match=r"mtp_loss_type=rl does not support context_parallel_size > 1"):
        engine._check_mtp_rl_layout()
    # initialize() runs the check first: it fails before verl's engine builds anything
    with pytest.raises(NotImplementedError, match=r"context_parallel_size > 1.*mtp_loss_type=detach.*docs/mtp_rl\.md"):
        MegatronMTPEngineWithLMHead.initialize(engine)


def test_the_unbound_check_on_a_plain_stand_in():
    stand_in = SimpleNamespace(
        mtp_rl=True,
        model_config=SimpleNamespace(mtp=MtpRLConfig(enable=True, mtp_loss_type="rl")),
        engine_config=SimpleNamespace(context_parallel_size=2),
    )
    with pytest.raises(NotImplementedError, match="context_parallel_size > 1"):
        MegatronMTPEngineWithLMHead._check_mtp_rl_layout(stand_in)


def test_dynamic_context_parallel_is_refused_too():
    with pytest.raises(NotImplementedError, match="dynamic_context_parallel"):
        bare_engine(context_parallel_size=1, dynamic_context_parallel=True)._check_mtp_rl_layout()


@pytest.mark.parametrize("mtp_loss_type, cp", [("rl", 1), ("detach", 2), ("ce", 2), (None, 2)])
def test_other_layouts_and_regimes_pass_the_check(mtp_loss_type, cp):
    bare_engine(mtp_loss_type, cp)._check_mtp_rl_layout()
