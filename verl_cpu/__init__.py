"""verl on CPU: run verl's real trainer (Megatron-Core backend) on a machine without accelerator.

Depends on verl, Megatron-Core and torch only. Activate with ``VERL_PLATFORM=cpu
VERL_USE_EXTERNAL_MODULES=verl_cpu.plugin`` (:mod:`.plugin`; :func:`.environment.cpu_process_env` sets both).
Pieces: :mod:`.platform` (``PlatformRegistry`` "cpu") and :mod:`.device_module`, :mod:`.cuda` (what
Megatron-Core's hard-coded CUDA calls mean on CPU: the one mechanism, shared by the trainer, tests and
benchmarks), :mod:`.engine` (``EngineRegistry`` "cpu"), :mod:`.optimizer`, :mod:`.attention`, :mod:`.bridges`
(local-spec mbridge bridges), :mod:`.rollout` (``hf_cpu`` rollout replica + server adapter), ``config/`` (the
Megatron-on-CPU settings as a Hydra config group), :mod:`.engine_smoke`, :mod:`.testing` (a tiny real
Megatron-Core GPT on CPU and a multi-process runner, for tests and benchmarks).
Importing this package imports verl first and nothing else: verl's loading of ``VERL_USE_EXTERNAL_MODULES``
imports :mod:`.plugin`, which imports the platform's modules, so it must run before any of their bodies starts
(a Ray actor unpickling :mod:`.rollout` would otherwise meet it half-initialised).
"""

import verl  # noqa: F401  (verl's plugin loading before any verl_cpu module body, see above)
