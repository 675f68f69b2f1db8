"""CPU support for verl 0.9.1 + Megatron-Core 0.16.1: run verl's real PPO trainer without a GPU.

Activate with ``VERL_PLATFORM=cpu VERL_USE_EXTERNAL_MODULES=verl_mtp.utils.cpu.plugin`` (see :mod:`.plugin`).
Pieces: :mod:`.platform` (``PlatformRegistry`` "cpu"), :mod:`.device_module`, :mod:`.cuda_shim` (documented
``torch.cuda`` shim for Megatron-Core), :mod:`.device_redirect` (literal ``device="cuda"``), :mod:`.engine`
(``EngineRegistry`` "cpu"), :mod:`.optimizer`, :mod:`.attention`, :mod:`.mbridge_cpu` (local-spec bridges),
:mod:`.rollout` (``hf_cpu`` rollout replica + server adapter), :mod:`.engine_smoke`; verl's PPO trainer on
CPU is launched by :mod:`verl_mtp.utils.local_run.launch`.
Importing this package does nothing by itself.
"""
