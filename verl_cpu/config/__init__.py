"""Hydra configs of verl on CPU (searchpath ``pkg://verl_cpu.config``); see ``cpu_engine/megatron.yaml``."""
