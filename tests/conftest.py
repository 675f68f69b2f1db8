"""Shared pytest setup for this repository's tests.

* ``cpu_megatron`` (:mod:`support.pytest_fixtures`): Megatron on CPU for one test module, undone after it.
* Test-only helpers that need the product live in ``tests/support`` and import as ``support.<module>``
  (pytest's ``pythonpath`` setting in pyproject.toml; not ``tests.support``: verl 0.9.1 installs its own
  top-level ``tests`` package).
* The expected megatron-core warnings (``support.pytest_fixtures.EXPECTED_MCORE_WARNINGS``) are filtered for
  every test here; the upstream form gives each moved module the same filters as marks instead.
* Every test leaves Megatron's attention-backend variables (``NVTE_*``, exported into ``os.environ`` by each
  GPTModel build) as it found them, so one test's model build cannot break a later test's child processes.
  ``build_tiny_gpt`` puts them back itself; this covers the tests that build models through verl's engine.
"""

import os

import pytest
from support.pytest_fixtures import EXPECTED_MCORE_WARNINGS, cpu_megatron  # noqa: F401

from verl_cpu.environment import MEGATRON_ATTENTION_ENV


def pytest_configure(config):
    for line in EXPECTED_MCORE_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(autouse=True)
def _restore_megatron_attention_env():
    saved = {key: os.environ.get(key) for key in MEGATRON_ATTENTION_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
