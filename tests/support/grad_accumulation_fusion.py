"""Megatron-Core's gradient-accumulation fusion on CPU: its real fused backward and its real DDP hook.

On a GPU Megatron's linear layers (``gradient_accumulation_fusion=True``, its default) add their weight
gradient into ``weight.main_grad`` with the CUDA kernel ``fused_weight_gradient_mlp_cuda`` and tell Megatron's
``DistributedDataParallel`` so through ``weight.grad_added_to_main_grad``; the DDP hook then discards
``weight.grad``. Nothing of that runs on CPU: the kernel does not exist, and the layer's placeholder gradient
and DDP's grad buffers are allocated on ``torch.cuda.current_device()``.

:func:`cpu_gradient_accumulation_fusion` installs, for its duration, a Python stand-in for the kernel's two
entry points (``main_grad += grad_output^T @ input``, accumulated in fp32 like the kernel) and gives just
those two Megatron modules a ``torch.cuda.current_device()`` that answers the CPU; Megatron's own fused
backward (``LinearWithGradAccumulationAndAsyncCommunication``) and DDP hook run unchanged.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import param_and_grad_buffer as mcore_grad_buffer
from megatron.core.tensor_parallel import layers as mcore_tp_layers

__all__ = ["cpu_gradient_accumulation_fusion", "enable_gradient_accumulation_fusion", "wrap_megatron_ddp"]


def _wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The kernel's contract: ``main_grad += grad_output^T @ total_input``, products summed in fp32."""
    go = grad_output.reshape(-1, grad_output.shape[-1]).float()
    x = total_input.reshape(-1, total_input.shape[-1]).float()
    main_grad.add_(go.t() @ x)


_STAND_IN_KERNEL = types.SimpleNamespace(
    wgrad_gemm_accum_fp32=_wgrad_gemm_accum, wgrad_gemm_accum_fp16=_wgrad_gemm_accum
)


class _CPUCurrentDeviceCuda:
    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCPU(types.ModuleType):
    """The name ``torch`` inside one Megatron module: only ``cuda.current_device()`` differs (the CPU)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CPUCurrentDeviceCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def cpu_gradient_accumulation_fusion() -> Iterator[None]:
    """Let Megatron's fused weight-gradient path and DDP grad buffers run on CPU (see the module docstring)."""
    saved = (
        mcore_tp_layers.__dict__.get("fused_weight_gradient_mlp_cuda"),
        mcore_tp_layers._grad_accum_fusion_available,
        mcore_tp_layers.torch,
        mcore_grad_buffer.torch,
    )
    mcore_tp_layers.fused_weight_gradient_mlp_cuda = _STAND_IN_KERNEL
    mcore_tp_layers._grad_accum_fusion_available = True
    mcore_tp_layers.torch = _TorchOnCPU()
    mcore_grad_buffer.torch = _TorchOnCPU()
    try:
        yield
    finally:
        kernel, available, mcore_tp_layers.torch, mcore_grad_buffer.torch = saved
        mcore_tp_layers._grad_accum_fusion_available = available
        if kernel is None:
            del mcore_tp_layers.fused_weight_gradient_mlp_cuda
        else:
            mcore_tp_layers.fused_weight_gradient_mlp_cuda = kernel


def enable_gradient_accumulation_fusion(model: torch.nn.Module) -> None:
    """Turn fusion on as ``TransformerConfig(gradient_accumulation_fusion=True)`` would have at construction:
    the config flag and every Megatron linear layer's copy of it."""
    model.config.gradient_accumulation_fusion = True
    for module in model.modules():
        if hasattr(module, "gradient_accumulation_fusion"):
            module.gradient_accumulation_fusion = True


def wrap_megatron_ddp(model: torch.nn.Module, grad_reduce_in_fp32: bool = True) -> DistributedDataParallel:
    """Megatron's real ``DistributedDataParallel`` around ``model``: fp32 ``main_grad`` buffers, its hooks."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=grad_reduce_in_fp32)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
