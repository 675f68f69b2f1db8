"""verl on CPU: run verl's real trainer (Megatron-Core backend) on a machine without accelerator.

Depends on verl, Megatron-Core and torch only. Activate with ``VERL_PLATFORM=cpu
VERL_USE_EXTERNAL_MODULES=verl_cpu.plugin`` (:mod:`.plugin`; :func:`.environment.cpu_process_env` sets both).
Pieces: :mod:`.patches` (every change to torch.cuda, Megatron-Core, verl and mbridge, each with apply / undo,
what it replaces and why), :mod:`.platform` (the ``cpu`` platform) and :mod:`.device_module`, :mod:`.cuda`
(what Megatron-Core's hard-coded CUDA calls mean on CPU: the one mechanism, shared by the trainer, tests and
benchmarks), :mod:`.engine` (the CPU variant of the Megatron engine), :mod:`.optimizer`, :mod:`.attention`,
:mod:`.bridges` (local-spec mbridge bridges), :mod:`.rollout` (``hf_cpu`` rollout replica + server adapter),
``config/`` (the Megatron-on-CPU settings as a Hydra config group), :mod:`.engine_smoke`, :mod:`.testing` (a
tiny real Megatron-Core GPT on CPU and a multi-process runner, for tests and benchmarks).
Importing this package or its modules changes nothing (:mod:`.plugin` applies the patches, under VERL_PLATFORM=cpu).
"""
