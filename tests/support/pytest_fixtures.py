"""The MTP-RL tests' pytest fixture and expected-warning filters, imported by name where they are used.

* ``cpu_megatron``: sets up gloo + Megatron's parallel state + the CPU stand-ins for ``torch.cuda`` and
  Megatron's RNG tracker (``verl_cpu.testing.init_cpu_megatron``) for one test module and undoes all of it after
  the module's last test (``destroy_cpu_megatron``). Module scope, not session: verl's CI runs every
  ``*_on_cpu.py`` in one pytest process, and verl's tests in the next module must find ``torch.cuda`` and
  Megatron as they were.
* ``EXPECTED_MCORE_WARNINGS``: megatron-core 0.16.1 warnings that are expected on a CPU box without
  TransformerEngine/Apex or come from megatron's own defaults (each tiny model build emits dozens); only these
  exact messages, other megatron warnings still show. ``MCORE_WARNING_FILTERS`` are the same as
  ``pytest.mark.filterwarnings`` marks for a module's ``pytestmark``.
"""

import pytest

EXPECTED_MCORE_WARNINGS = (
    "ignore:Transformer Engine and Apex are not installed:UserWarning",
    "ignore:Apex is not installed:UserWarning",
    "ignore:full scope is deprecated:UserWarning",  # TransformerConfig.cuda_graph_scope default "full"
    "ignore:MLP requires ffn_hidden_size:DeprecationWarning",  # megatron's own layer specs
    "ignore:Warning. tp_group is None:DeprecationWarning",  # "." stands for ":" (the field separator)
    "ignore:The 'megatron.core.transformer.custom_layers.transformer_engine':DeprecationWarning",
)
MCORE_WARNING_FILTERS = [pytest.mark.filterwarnings(line) for line in EXPECTED_MCORE_WARNINGS]


@pytest.fixture(scope="module")
def cpu_megatron():
    """torch.distributed (gloo, world 1), Megatron's parallel state and the CPU stand-ins, for one module."""
    from verl_cpu.testing import destroy_cpu_megatron, init_cpu_megatron

    init_cpu_megatron()
    yield
    destroy_cpu_megatron()
