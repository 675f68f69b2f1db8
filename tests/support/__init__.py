"""Test-only helpers that need the product (import as ``support.<module>``: pytest's ``pythonpath`` setting;
not ``tests.support``, verl 0.9.1 installs its own top-level ``tests`` package). Helpers that need only verl,
Megatron-Core and torch are installed code in :mod:`verl_cpu.testing`."""
