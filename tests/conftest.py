"""Shared pytest setup for verl_mtp tests.

* Puts ``tests/`` on ``sys.path`` so helpers import as ``support.tiny_mcore`` however pytest is invoked
  (``tests.support`` cannot work: verl 0.9.1 installs its own top-level ``tests`` package).
* ``cpu_megatron``: session fixture that sets up gloo + megatron parallel state on CPU once
  (``support.tiny_mcore.init_cpu_megatron``) and tears it down at the end.
* Silences megatron-core 0.16.1 warnings that are expected on a CPU box without TransformerEngine/Apex
  or come from megatron's own defaults (each tiny model build emits dozens), so reports stay readable.
  Only these exact messages are filtered; other megatron warnings still show.
"""

import os
import sys

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


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
    from support.tiny_mcore import destroy_cpu_megatron, init_cpu_megatron

    init_cpu_megatron()
    yield
    destroy_cpu_megatron()
