"""Shared pytest setup for the MTP-RL tests.

* ``cpu_megatron``: session fixture that sets up gloo + megatron parallel state on CPU once
  (``verl_cpu.testing.init_cpu_megatron``) and tears it down at the end.
* Test-only helpers that need the product live in ``tests/support`` and import as ``support.<module>``
  (pytest's ``pythonpath`` setting in pyproject.toml; not ``tests.support``: verl 0.9.1 installs its own
  top-level ``tests`` package).
* Silences megatron-core 0.16.1 warnings that are expected on a CPU box without TransformerEngine/Apex
  or come from megatron's own defaults (each tiny model build emits dozens), so reports stay readable.
  Only these exact messages are filtered; other megatron warnings still show.
* Every test leaves Megatron's attention-backend variables (``NVTE_*``, exported into ``os.environ`` by each
  GPTModel build) as it found them, so one test's model build cannot break a later test's child processes.
"""

import os

import pytest

from verl_cpu.environment import MEGATRON_ATTENTION_ENV

_EXPECTED_MCORE_WARNINGS = (
    "ignore:Transformer Engine and Apex are not installed:UserWarning",
    "ignore:Apex is not installed:UserWarning",
    "ignore:full scope is deprecated:UserWarning",  # TransformerConfig.cuda_graph_scope default "full"
    "ignore:MLP requires ffn_hidden_size:DeprecationWarning",  # megatron's own layer specs
    "ignore:Warning. tp_group is None:DeprecationWarning",  # "." stands for ":" (the field separator)
    "ignore:The 'megatron.core.transformer.custom_layers.transformer_engine':DeprecationWarning",
)


def pytest_configure(config):
    for line in _EXPECTED_MCORE_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def cpu_megatron():
    """Initialise torch.distributed (gloo, world 1) + megatron parallel state on CPU for the session."""
    from verl_cpu.testing import destroy_cpu_megatron, init_cpu_megatron

    init_cpu_megatron()
    yield
    destroy_cpu_megatron()


@pytest.fixture(autouse=True)
def _restore_megatron_attention_env():
    saved = {key: os.environ.get(key) for key in MEGATRON_ATTENTION_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
