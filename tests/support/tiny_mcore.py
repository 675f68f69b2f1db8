"""A tiny, real Megatron-Core ``GPTModel`` with Multi-Token-Prediction heads, on CPU, for tests.

Why this exists: verl_mtp works on megatron's own ``GPTModel`` / ``MultiTokenPredictionBlock`` (their
``_postprocess``, ``roll_tensor``, ``MTPLossAutoScaler`` ...). Mocks would not catch a change in those, so
unit tests build the real modules, only very small, and run them on CPU (no GPU on dev machines / CI).

Import it as ``from support.tiny_mcore import ...`` (``tests/conftest.py`` puts ``tests/`` on ``sys.path``).
Not as ``tests.support.tiny_mcore``: verl 0.9.1 installs a top-level *regular* package named ``tests``
into site-packages, and a regular package always wins over this repo's ``tests/`` namespace directory.

Public API::

    init_cpu_megatron(tp=1, pp=1, cp=1)          # gloo, world size 1, model-parallel groups, CPU shims
    init_cpu_megatron(tp, pp, cp, rank=r, world_size=n, init_method=url)   # inside a spawned rank
    destroy_cpu_megatron()                       # undo everything init set up (for test isolation)
    build_tiny_gpt(mtp_num_layers, ...)          # real GPTModel + K real MTP layers, fp32, CPU
    causal_attention_mask(batch, seq)            # bool [batch, 1, seq, seq], True = masked out
    forward_bshd(model, input_ids, labels=None, loss_mask=None)
    run_cpu_ranks(fn, world_size, *args)         # fn(RankInfo, *args) in n spawned processes, results back

Multi-process (``run_cpu_ranks``): each rank is a fresh ``spawn``-ed interpreter; ``fn`` must be a module-level
function (it is imported by name in the child) and calls ``init_cpu_megatron(..., rank=info.rank,
world_size=info.world_size, init_method=info.init_method)`` itself, then ``build_tiny_gpt`` builds this rank's
shard / pipeline stage (sizes come from megatron's parallel state). Whatever ``fn`` returns is ``torch.save``-d
and handed back to the parent in rank order; an exception in any rank is raised in the parent with every
failing rank's traceback (the other ranks, stuck in a collective, are killed after a grace period).

Tested with: megatron-core 0.16.1, 0.18.0 and 0.19.2, torch 2.13.0 (CPU build), verl 0.9.1, Python 3.11.

CPU shims (they live only here, are installed by ``init_cpu_megatron`` / ``forward_bshd`` and touch no
code path outside megatron's process-global test state; ``torch.cuda`` itself is *not* patched, so code
under test that wrongly assumes CUDA still fails loudly):

1. RNG tracker. Megatron forks a "model-parallel" RNG stream around dropout
   (``tensor_parallel.get_cuda_rng_tracker().fork()``); its ``CudaRNGStatesTracker.add`` /``fork`` call
   ``torch.cuda.get_rng_state`` and fail without CUDA. We install ``CPURNGStatesTracker`` (same
   interface, CPU generator states) as megatron's tracker and seed it the way
   ``model_parallel_cuda_manual_seed`` does. Megatron's ``model_parallel_cuda_manual_seed`` keeps working
   afterwards too (it reuses an initialised tracker; ``torch.cuda.manual_seed`` is lazy on CPU builds).
2. Global memory buffer. The local ``DotProductAttention`` takes its ``baddbmm`` scratch tensor from
   ``parallel_state.get_global_memory_buffer()``, which allocates on ``torch.cuda.current_device()``
   ("AssertionError: Torch not compiled with CUDA enabled"). We swap in ``_CPUGlobalMemoryBuffer``.
3. MTP loss logging tracker. In training mode with labels, ``GPTModel._postprocess`` calls
   ``MTPLossLoggingHelper.save_loss_to_tracker``, which lazily creates its buffer on
   ``torch.cuda.current_device()``. ``forward_bshd`` / ``build_tiny_gpt`` pre-create it on CPU (size K).
   If you call ``model(...)`` yourself in training mode with labels, call ``prepare_mtp_loss_tracker`` first.
4. ``labels=None`` with MTP. megatron-core 0.16.1 ``GPTModel._postprocess`` does ``labels.clone()``
   whenever ``config.mtp_num_layers`` is set, so a label-free forward of an MTP model raises
   "AttributeError: 'NoneType' object has no attribute 'clone'". ``forward_bshd(labels=None)`` therefore
   runs the *main head only* (MTP skipped, exactly what verl's patched ``_postprocess`` does without
   labels) by hiding MTP for that one call (``model.mtp_process`` / ``config.mtp_num_layers``, restored).
   Newer versions do not crash (0.17-0.18 skip MTP, 0.19 derives labels from the input ids); the shim gives
   the same main-head-only forward on every version.
5. Attention mask. Without an explicit mask the local softmax builds its causal mask with
   ``device="cuda"`` (``transformer.utils.get_default_causal_mask``); ``forward_bshd`` always passes one.


Multi-process shims (installed only when the world size is > 1, i.e. inside ``run_cpu_ranks`` ranks):

6. Collective buffers. Megatron's tensor-parallel collectives and linear layers allocate their output
   buffers with ``device=torch.cuda.current_device()`` (``tensor_parallel.mappings`` / ``layers``). Inside
   just those two modules the name ``torch`` is rebound to a proxy whose ``cuda.current_device()`` is the
   CPU; everything else (and ``torch.cuda`` everywhere else) is the real torch. ``destroy_cpu_megatron``
   restores them.
7. Pipeline-parallel embedding tie. With PP > 1 the MTP (last) stage keeps its own copy of the word
   embedding, zeroes it and all-reduces it with the first stage's at construction
   (``LanguageModule.setup_embeddings_and_output_layer``), after ``weight.data = weight.data.cuda()``.
   ``build_tiny_gpt`` makes ``Tensor.cuda`` the identity for the duration of the ``GPTModel`` constructor
   only, so megatron's own all-reduce runs (on gloo).
8. Sequence parallel. Megatron's CPU fallback norm (``WrappedTorchNorm``, used by the local spec without
   Apex) asserts ``not config.sequence_parallel``, only because it does not tag its parameters. With
   ``build_tiny_gpt(sequence_parallel=True)`` the norms are the same ``torch.nn.LayerNorm`` built from a
   non-SP copy of the config, and their parameters get ``sequence_parallel=True`` like megatron's fused /
   TE norms (their grads are partial per TP rank and must be all-reduced over the TP group, as
   ``finalize_model_grads`` does).

Not supported on CPU here: RoPE (``RotaryEmbedding.forward`` moves ``inv_freq`` to
``torch.cuda.current_device()``, so the model uses learned absolute positions), context parallel (the local
attention has no CP; ``cp`` must stay 1 in practice), TransformerEngine specs, fp16/bf16, virtual pipeline
stages.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import importlib
import multiprocessing
import operator
import os
import shutil
import socket
import tempfile
import time
import traceback
import types
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import layers as mcore_tp_layers
from megatron.core.tensor_parallel import mappings as mcore_tp_mappings
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import GlobalMemoryBuffer
from verl_mtp.utils.cpu.cuda_shim import CPURNGStatesTracker  # the CPU platform's tracker, shared

__all__ = [
    "init_cpu_megatron",
    "destroy_cpu_megatron",
    "seed_cpu_rng_tracker",
    "build_tiny_gpt",
    "causal_attention_mask",
    "forward_bshd",
    "prepare_mtp_loss_tracker",
    "MTP_LOSS_TRACKER_KEY",
    "RankInfo",
    "run_cpu_ranks",
]

TESTED_MCORE_VERSIONS = ("0.16.1", "0.18.0", "0.19.2")

# Whether init_cpu_megatron created the default process group (then destroy_cpu_megatron may tear it down).
_OWNS_PROCESS_GROUP = False


# --------------------------------------------------------------------------------------------------------
# Shim 1: CPU RNG tracker
# --------------------------------------------------------------------------------------------------------
def seed_cpu_rng_tracker(seed: int = 0) -> None:
    """(Re)install the CPU tracker as megatron's RNG tracker and seed its streams.

    Mirrors ``model_parallel_cuda_manual_seed`` (same stream names and seed offsets, this process's
    tensor / expert parallel ranks, 0 before the parallel state exists) without touching CUDA. There is no
    public hook to choose the tracker class, hence the module globals.
    """
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    if not isinstance(tracker, CPURNGStatesTracker):
        tracker = CPURNGStatesTracker()
        mcore_random._CUDA_RNG_STATE_TRACKER = tracker
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_rank = ep_rank = etp_rank = 0
    if parallel_state.model_parallel_is_initialized():
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tracker.reset()
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


# --------------------------------------------------------------------------------------------------------
# Shim 2: CPU global memory buffer
# --------------------------------------------------------------------------------------------------------
class _CPUGlobalMemoryBuffer(GlobalMemoryBuffer):
    """``GlobalMemoryBuffer`` that allocates on CPU (megatron's uses ``torch.cuda.current_device()``)."""

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required_len = functools.reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < required_len:
            buf = self.buffer[(name, dtype)] = torch.empty(required_len, dtype=dtype, device="cpu")
        return buf[:required_len].view(*tensor_shape)


# --------------------------------------------------------------------------------------------------------
# Shim 3: CPU MTP loss logging tracker
# --------------------------------------------------------------------------------------------------------
def prepare_mtp_loss_tracker(num_mtp_layers: int) -> None:
    """Make ``MTPLossLoggingHelper.tracker[MTP_LOSS_TRACKER_KEY]`` a CPU tensor with one slot per MTP layer.

    Megatron creates it lazily on ``torch.cuda.current_device()`` (0.19: three such buffers, all made here).
    An existing CPU buffer of the right size is kept (it accumulates, as in megatron); a missing, non-CPU or
    wrongly sized one is replaced (the tracker is process-global, so models with different K in one process
    would otherwise clash).
    """
    for key in _MTP_TRACKER_KEYS:
        values = MTPLossLoggingHelper.tracker.get(key)
        if values is None or values.device.type != "cpu" or values.numel() != num_mtp_layers:
            MTPLossLoggingHelper.tracker[key] = torch.zeros(num_mtp_layers)


# megatron-core 0.19 tracks loss, correct and total counts (``save_metrics_to_tracker``); earlier, the loss only.
if hasattr(MTPLossLoggingHelper, "save_metrics_to_tracker"):
    MTP_LOSS_TRACKER_KEY = "loss_values"
    _MTP_TRACKER_KEYS = ("loss_values", "correct_values", "total_values")
else:
    MTP_LOSS_TRACKER_KEY = "values"
    _MTP_TRACKER_KEYS = ("values",)


# --------------------------------------------------------------------------------------------------------
# Process group + model parallel state
# --------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------
# Shim 6: CPU buffers in megatron's tensor-parallel collectives (world size > 1 only)
# --------------------------------------------------------------------------------------------------------
class _CPUCuda:
    """``torch.cuda`` as megatron's TP collectives see it: ``current_device()`` is the CPU, the rest is real."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithCPUCurrentDevice(types.ModuleType):
    """Stand-in for the name ``torch`` inside one megatron module; only ``torch.cuda`` differs (``_CPUCuda``)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CPUCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_DEVICE_MODULES = (mcore_tp_mappings, mcore_tp_layers)


def _install_cpu_collective_buffers() -> None:
    for module in _CPU_DEVICE_MODULES:
        if not isinstance(module.torch, _TorchWithCPUCurrentDevice):
            module.torch = _TorchWithCPUCurrentDevice()


def _remove_cpu_collective_buffers() -> None:
    for module in _CPU_DEVICE_MODULES:
        module.torch = torch


# --------------------------------------------------------------------------------------------------------
# Shims 7 and 8: construction-time only (PP embedding tie, sequence-parallel norms)
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tensor_cuda_is_identity() -> Iterator[None]:
    """Shim 7: ``Tensor.cuda`` returns the tensor itself, for the duration of a model constructor."""
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


@contextlib.contextmanager
def _sequence_parallel_torch_norms() -> Iterator[None]:
    """Shim 8: ``WrappedTorchNorm`` accepts ``sequence_parallel`` and tags its parameters like fused norms do."""
    saved = WrappedTorchNorm.__dict__["__new__"]
    original_new = saved.__func__ if isinstance(saved, staticmethod) else saved

    def __new__(cls, config, hidden_size, *args, **kwargs):
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_new(cls, plain, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = __new__
    try:
        yield
    finally:
        WrappedTorchNorm.__new__ = saved


# --------------------------------------------------------------------------------------------------------
# Process group + model parallel state
# --------------------------------------------------------------------------------------------------------
def init_cpu_megatron(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    *,
    rank: int = 0,
    world_size: Optional[int] = None,
    init_method: Optional[str] = None,
    timeout_s: float = 120.0,
) -> None:
    """Idempotently set up torch.distributed (gloo) and megatron's parallel state on CPU.

    Single process (the default, ``world_size`` 1): rank 0 of 1, and ``tp``/``pp``/``cp`` exist for signature
    parity with GPU helpers, so they must all be 1. The rendezvous address is passed as
    ``init_method=tcp://127.0.0.1:<free port>`` instead of through ``MASTER_ADDR``/``MASTER_PORT`` so the
    environment of other tests is left alone. Safe to call from every test: a second call only re-checks the
    CPU shims.

    Inside a spawned rank (see ``run_cpu_ranks``): pass ``rank``, ``world_size`` and the shared
    ``init_method``; the data-parallel size is ``world_size / (tp*pp*cp)``. Collectives time out after
    ``timeout_s`` (gloo) so a rank whose peer died fails instead of hanging. The multi-process shims (6) are
    installed as well.
    """
    global _OWNS_PROCESS_GROUP
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size == 1 and tp * pp * cp != 1:
        raise ValueError(f"CPU test world size is 1, so tp*pp*cp must be 1 (got tp={tp}, pp={pp}, cp={cp})")
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not a multiple of tp*pp*cp (tp={tp}, pp={pp}, cp={cp})")

    if not dist.is_initialized():
        if init_method is None:
            if world_size != 1:
                raise ValueError("world_size > 1 needs init_method, the rendezvous address shared by all ranks")
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(
            backend="gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        _OWNS_PROCESS_GROUP = True
    elif dist.get_world_size() != world_size:
        raise RuntimeError(
            f"torch.distributed already initialised with world size {dist.get_world_size()}, not {world_size}"
        )

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
        )
    else:
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
        )
        if world_size > 1 and have != (tp, pp, cp):
            raise RuntimeError(f"megatron parallel state already has (tp, pp, cp)={have}, not {(tp, pp, cp)}")

    # initialize_model_parallel (re)creates megatron's CUDA buffer; replace it with the CPU one.
    if not isinstance(parallel_state._GLOBAL_MEMORY_BUFFER, _CPUGlobalMemoryBuffer):
        parallel_state._GLOBAL_MEMORY_BUFFER = _CPUGlobalMemoryBuffer()
    if not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        seed_cpu_rng_tracker(0)
    if world_size > 1:
        _install_cpu_collective_buffers()


def destroy_cpu_megatron() -> None:
    """Undo ``init_cpu_megatron`` and reset megatron's process-global MTP state, for test isolation.

    The default process group is destroyed only if ``init_cpu_megatron`` created it.
    """
    global _OWNS_PROCESS_GROUP
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state._GLOBAL_MEMORY_BUFFER = None
    mcore_random._CUDA_RNG_STATE_TRACKER = None
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    MTPLossLoggingHelper.tracker.clear()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    _remove_cpu_collective_buffers()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------
def build_tiny_gpt(
    mtp_num_layers: int,
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    seq_len: int = 64,
    share_embeddings: bool = False,
    seed: int = 0,
    packed_attention: bool = False,
    sequence_parallel: bool = False,
) -> GPTModel:
    """Build a real fp32 ``GPTModel`` on CPU with ``mtp_num_layers`` real MTP layers (0 = no MTP).

    Local (non-TransformerEngine) layer spec; the MTP block spec is derived from it by megatron's own
    ``get_gpt_mtp_block_spec``. Dropout is 0 and positions are learned absolute (RoPE needs CUDA, see the
    module docstring); ``seq_len`` is the maximum sequence length. Weights are a pure function of
    ``seed`` (``use_cpu_initialization`` draws from torch's CPU generator, which is forked so the
    caller's global RNG state is unchanged). The model is returned in training mode.
    ``packed_attention`` swaps in a core attention that honours packed ``cu_seqlens``
    (``support.packed_attention``), so THD micro-batches run on CPU; weights are the same as without it.

    Under model parallelism (inside a ``run_cpu_ranks`` rank, after ``init_cpu_megatron(tp, pp, ...)``) the
    config takes megatron's current TP / PP / CP sizes and this rank builds its own shard and pipeline stage
    (``pre_process`` / ``post_process`` from megatron's parallel state; the MTP block only where
    ``get_gpt_mtp_block_spec`` places it, the last stage). ``sequence_parallel`` needs TP > 1 (shim 8).
    Weights are *not* the shards of the same-seed TP = 1 model in general: copy them in for comparisons.
    """
    if mtp_num_layers < 0:
        raise ValueError(f"mtp_num_layers must be >= 0, got {mtp_num_layers}")
    if parallel_state.model_parallel_is_initialized():  # keep the sizes set up (e.g. by a rank), re-check shims
        init_cpu_megatron(
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
            cp=parallel_state.get_context_parallel_world_size(),
        )
    else:
        init_cpu_megatron()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel=True needs tensor parallel size > 1")
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        mtp_num_layers=mtp_num_layers or None,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=torch.float32 if pp > 1 else None,
    )
    if packed_attention:
        from support.packed_attention import packed_local_layer_spec

        layer_spec = packed_local_layer_spec()
    else:
        layer_spec = get_gpt_layer_local_spec()
    mtp_block_spec = (
        get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False) if mtp_num_layers else None
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        if pp > 1:
            stack.enter_context(_tensor_cuda_is_identity())
        if sequence_parallel:
            stack.enter_context(_sequence_parallel_torch_norms())
        torch.manual_seed(seed)
        seed_cpu_rng_tracker(seed)
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=seq_len,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=share_embeddings,
            position_embedding_type="learned_absolute",
            mtp_block_spec=mtp_block_spec,
        )
    if mtp_num_layers:
        prepare_mtp_loss_tracker(mtp_num_layers)
    return model


def causal_attention_mask(batch: int, seq: int, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Boolean causal mask ``[batch, 1, seq, seq]`` for the local ``DotProductAttention``; True = masked out.

    It broadcasts over heads against the ``[b, heads, s, s]`` scores and is applied with
    ``masked_fill_(mask, -10000)`` (megatron's ``attention_mask_func``).
    """
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)
    return mask.view(1, 1, seq, seq).expand(batch, 1, seq, seq)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def _main_head_only(gpt: GPTModel) -> Iterator[None]:
    """Hide the MTP block for one forward (shim 4): ``_postprocess`` then skips MTP and ``labels.clone()``."""
    saved = (gpt.mtp_process, gpt.config.mtp_num_layers)
    gpt.mtp_process, gpt.config.mtp_num_layers = False, None
    try:
        yield
    finally:
        gpt.mtp_process, gpt.config.mtp_num_layers = saved


def forward_bshd(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    loss_mask: Optional[torch.Tensor] = None,
):
    """Run ``GPTModel.forward`` on an unpacked ``[b, s]`` batch, building position ids and causal mask.

    Returns what megatron returns:

    * ``labels is None``: logits ``[b, s, vocab]`` of the main head (MTP heads are skipped, shim 4);
    * ``labels`` given: the main head's per-token CE loss ``[b, s]`` (unmasked). If the model has MTP, the
      MTP heads run and their CE losses (weighted by ``loss_mask``, scaled by
      ``config.mtp_loss_scaling_factor / K``) are attached to the graph through ``MTPLossAutoScaler``,
      so a backward from this loss also trains the MTP layers. ``loss_mask`` only affects the MTP part.
    """
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq).contiguous()
    attention_mask = causal_attention_mask(batch, seq, device=input_ids.device)
    gpt = _unwrap(model)
    mtp_layers = gpt.config.mtp_num_layers if getattr(gpt, "mtp_process", False) else None

    if mtp_layers and labels is None:
        with _main_head_only(gpt):
            return model(input_ids, position_ids, attention_mask)
    if mtp_layers and gpt.training:
        prepare_mtp_loss_tracker(mtp_layers)
    return model(input_ids, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)


# --------------------------------------------------------------------------------------------------------
# Multi-process runs: spawn N CPU ranks on one gloo world, bring their results back
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RankInfo:
    """What a rank function gets first: its rank, the world size and the rendezvous address to pass on to
    ``init_cpu_megatron(..., rank=info.rank, world_size=info.world_size, init_method=info.init_method)``."""

    rank: int
    world_size: int
    init_method: str


def _rank_entry(fn_ref: str, info: RankInfo, out_dir: str, args: tuple) -> None:
    """Body of one spawned rank: import ``fn`` by name, run it, save its result or its traceback."""
    result_path = os.path.join(out_dir, f"rank{info.rank}.pt")
    error_path = os.path.join(out_dir, f"rank{info.rank}.err")
    try:
        module_name, qualname = fn_ref.split(":")
        fn = importlib.import_module(module_name)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        result = fn(info, *args)
        torch.save(result, result_path + ".tmp")
        os.replace(result_path + ".tmp", result_path)
    except BaseException:
        with open(error_path, "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)
    finally:
        with contextlib.suppress(Exception):
            destroy_cpu_megatron()


def run_cpu_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0, grace_s: float = 15.0
) -> list:
    """Run ``fn(RankInfo, *args)`` in ``world_size`` freshly spawned processes; return their results by rank.

    ``fn`` must be a module-level function of an importable module (the child imports it by name, with the
    parent's ``sys.path``); ``args`` and the results must be picklable (results go through ``torch.save``).
    The ranks rendezvous at ``tcp://127.0.0.1:<free port>``; ``fn`` initialises torch.distributed itself via
    ``init_cpu_megatron``. When a rank fails, the others get ``grace_s`` to fail or finish and are then killed
    (they are typically blocked in a collective); the parent then raises ``RuntimeError`` carrying every
    failing rank's traceback. Runs longer than ``timeout_s`` are killed and reported the same way.
    """
    fn_ref = f"{fn.__module__}:{fn.__qualname__}"
    ctx = multiprocessing.get_context("spawn")
    out_dir = tempfile.mkdtemp(prefix="cpu_ranks_")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [
        ctx.Process(
            target=_rank_entry,
            args=(fn_ref, RankInfo(rank, world_size, init_method), out_dir, args),
            name=f"cpu-rank-{rank}",
        )
        for rank in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        first_failure = None
        timed_out = False
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
                first_failure = now
            if now > deadline or (first_failure is not None and now > first_failure + grace_s):
                timed_out = now > deadline
                break
            time.sleep(0.05)
        killed = []
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                killed.append(rank)
            p.join(timeout=10)

        results, problems = [], []
        for rank, p in enumerate(procs):
            error_path = os.path.join(out_dir, f"rank{rank}.err")
            result_path = os.path.join(out_dir, f"rank{rank}.pt")
            if os.path.exists(error_path):
                with open(error_path) as f:
                    problems.append(f"--- rank {rank} raised (exit code {p.exitcode}):\n{f.read()}")
            elif rank in killed:
                why = f"timed out after {timeout_s:.0f}s" if timed_out else "killed after another rank failed"
                problems.append(f"--- rank {rank} {why}")
            elif p.exitcode != 0 or not os.path.exists(result_path):
                problems.append(f"--- rank {rank} exited with code {p.exitcode} and left no result")
            else:
                results.append(torch.load(result_path, weights_only=False))
        if problems:
            raise RuntimeError(
                f"{fn_ref} failed on {world_size} CPU ranks (ranks' own output is in the captured stderr):\n"
                + "\n".join(problems)
            )
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        shutil.rmtree(out_dir, ignore_errors=True)
