"""A pytest plugin (``-p support.stand_in_probe``) failing a test module that leaves the process changed.

verl's CI runs every ``*_on_cpu.py`` in one pytest process, so whatever a test module installs (the CPU stand-ins
for ``torch.cuda``, Megatron's RNG tracker, parallel state and MTP loss state, ``NVTE_*`` variables, patched
classes) must be gone before the next module, which may be one of verl's own. The state is recorded when pytest
starts, before any test module is imported, and when a module's first test is set up; after its last test (its
module-scoped fixtures torn down) whatever is neither as the module found it nor as the process started is an
error of that test, naming what stayed changed. ``--stand-in-probe-only=FILE,...`` checks those test files only
(the MTP-RL tests, in a run among verl's own, whose leaks are verl's to judge).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.multi_token_prediction import (
    MTPLossAutoScaler,
    MTPLossLoggingHelper,
    MultiTokenPredictionBlock,
    MultiTokenPredictionLayer,
)
from megatron.core.transformer.torch_norm import WrappedTorchNorm

ATTENTION_ENV = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
# Namespaces whose entries must be the same objects again after a module (torch.cuda's functions, the classes
# the CPU platform and the MTP patches touch).
NAMESPACES = {
    "torch.cuda": torch.cuda,
    "torch.Tensor": torch.Tensor,
    "GPTModel": GPTModel,
    "MultiTokenPredictionBlock": MultiTokenPredictionBlock,
    "MultiTokenPredictionLayer": MultiTokenPredictionLayer,
    "WrappedTorchNorm": WrappedTorchNorm,
}


def _objects(namespace) -> dict[str, int]:
    return {name: id(value) for name, value in list(vars(namespace).items()) if not name.startswith("__")}


def snapshot() -> dict:
    """What a test module must leave as it found it."""
    return {
        **{f"{label}.{name}": obj for label, ns in NAMESPACES.items() for name, obj in _objects(ns).items()},
        "torch.distributed initialised": dist.is_initialized(),
        "megatron parallel_state initialised": parallel_state.model_parallel_is_initialized(),
        "megatron RNG tracker": id(mcore_random._CUDA_RNG_STATE_TRACKER),
        "megatron RNG tracker initialised": mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        "MTPLossLoggingHelper.tracker": sorted(MTPLossLoggingHelper.tracker),
        "MTPLossAutoScaler scale": float(MTPLossAutoScaler.main_loss_backward_scale),
        **{f"os.environ[{key}]": os.environ.get(key) for key in ATTENTION_ENV},
    }


def changes(before: dict, after: dict) -> list[str]:
    """The entries of ``before`` whose value is not the same in ``after`` (new entries are not changes)."""
    return [key for key, value in before.items() if key in after and after[key] != value]


def left_changed(session_start: dict, module_start: dict, after: dict) -> list[str]:
    """What a module left neither as it found it nor as the process started (a module that puts back what an
    earlier module left changed has left nothing)."""
    return [key for key in changes(module_start, after) if key in changes(session_start, after)]


_start: dict = {}
_module_start: dict = {}
_only: set[str] = set()
checked_modules: list[str] = []


def pytest_addoption(parser):
    parser.addoption(
        "--stand-in-probe-only",
        default="",
        help="comma-separated test files the probe checks (default: every module); others run unchecked",
    )


def pytest_configure(config):
    _start.update(snapshot())
    _only.update(filter(None, config.getoption("--stand-in-probe-only").split(",")))


def _checked(item) -> bool:
    return not _only or any(str(item.path).endswith(path) for path in _only)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _checked(item) and item.module not in _module_start:
        _module_start[item.module] = snapshot()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    if _checked(item) and (nextitem is None or nextitem.module is not item.module):
        checked_modules.append(item.module.__name__)
        left = left_changed(_start, _module_start.pop(item.module), snapshot())
        if left:
            raise AssertionError(f"{item.module.__name__} left the process changed: {', '.join(left)}")
    return result


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"stand-in probe: {len(checked_modules)} test modules checked")
