"""A tiny, real Megatron-Core ``GPTModel`` with Multi-Token-Prediction heads, on CPU, for tests and benchmarks.

Mocks would not catch a change in Megatron's own ``GPTModel`` / ``MultiTokenPredictionBlock`` (their
``_postprocess``, ``roll_tensor``, ``MTPLossAutoScaler`` ...), so tests build the real modules, only very small,
and run them on CPU. The CPU mechanism is the platform's own (:mod:`verl_cpu.cuda`, what the trainer's CPU
plugin installs): ``init_cpu_megatron`` applies :data:`verl_cpu.patches.CUDA_ON_CPU` (the ``torch.cuda``
calls and the RNG tracker) until ``destroy_cpu_megatron`` undoes them, so Megatron's global memory buffer,
tensor-parallel collective buffers and MTP loss tracker land on the CPU, and the model constructor runs inside
:func:`~verl_cpu.cuda.cpu_placements` (the pipeline-parallel embedding tie calls
``weight.data.cuda()``). What is left here is test-specific:

* ``forward_bshd(labels=None)`` on an MTP model runs the main head only: megatron-core 0.16.1
  ``GPTModel._postprocess`` calls ``labels.clone()`` whenever ``config.mtp_num_layers`` is set, so MTP is
  hidden for that one call (what verl's patched ``_postprocess`` does without labels); newer versions do not
  crash (0.17-0.18 skip MTP, 0.19 derives labels from the input ids), and the same hiding gives the same
  main-head-only forward on every version;
* an explicit causal mask (the local softmax builds its default one on ``device="cuda"``);
* ``prepare_mtp_loss_tracker``: Megatron's MTP loss tracker is process-global and sized by the first model, so
  a model with another head count in the same process needs it resized;
* ``sequence_parallel=True``: Megatron's CPU fallback norm (``WrappedTorchNorm``, the local spec without Apex)
  rejects sequence parallelism only because it does not tag its parameters; the builder tags them like the
  fused norms do (their grads are partial per TP rank, all-reduced by ``finalize_model_grads``), under
  :data:`verl_cpu.patches.SEQUENCE_PARALLEL_TORCH_NORM` for the build.

Not supported here: RoPE (``RotaryEmbedding.forward`` needs a CUDA ``inv_freq``; positions are learned
absolute), context parallel with the default local attention (it has no CP: use ``packed_attention=True``),
TransformerEngine specs, fp16/bf16, virtual pipeline stages.
Tested with megatron-core 0.16.1, 0.18.0 and 0.19.2, torch 2.13.0 (CPU build), verl 0.9.1, Python 3.11.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import socket
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper
from megatron.core.transformer.transformer_config import TransformerConfig

from verl_cpu.attention import CPUCoreAttention
from verl_cpu.cuda import cpu_placements
from verl_cpu.environment import MEGATRON_ATTENTION_ENV
from verl_cpu.patches import CUDA_ON_CPU, SEQUENCE_PARALLEL_TORCH_NORM, applied

# Whether init_cpu_megatron created the default process group (then destroy_cpu_megatron may tear it down).
_OWNS_PROCESS_GROUP = False
# The patches init_cpu_megatron applied itself (not those a CPU plugin applied before): destroy_cpu_megatron
# undoes exactly these.
_APPLIED_BY_INIT: list = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_mtp_loss_tracker(num_mtp_layers: int, device=None) -> None:
    """Make Megatron's MTP loss tracker buffers (``MTP_LOSS_TRACKER_KEY`` and, on 0.19, the token counts) hold
    one slot per MTP layer, on ``device`` (the model's; CPU by default).

    An existing buffer of the right size and device is kept (it accumulates, as in megatron); any other is
    replaced (the tracker is process-global, so models with different K in one process would clash).
    """
    device = torch.device(device or "cpu")
    for key in _MTP_TRACKER_KEYS:
        values = MTPLossLoggingHelper.tracker.get(key)
        if values is None or values.numel() != num_mtp_layers or values.device.type != device.type:
            MTPLossLoggingHelper.tracker[key] = torch.zeros(num_mtp_layers, device=device)


# megatron-core 0.19 tracks the loss and the correct / total token counts (``save_metrics_to_tracker``);
# earlier versions the loss only.
if hasattr(MTPLossLoggingHelper, "save_metrics_to_tracker"):
    MTP_LOSS_TRACKER_KEY = "loss_values"
    _MTP_TRACKER_KEYS = ("loss_values", "correct_values", "total_values")
else:
    MTP_LOSS_TRACKER_KEY = "values"
    _MTP_TRACKER_KEYS = ("values",)


def _init_process_group(rank: int, world_size: int, init_method: Optional[str], timeout_s: float) -> None:
    global _OWNS_PROCESS_GROUP
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise RuntimeError(
                f"torch.distributed already initialised with world size {dist.get_world_size()}, not {world_size}"
            )
        return
    if init_method is None:
        if world_size != 1:
            raise ValueError("world_size > 1 needs init_method, the rendezvous address shared by all ranks")
        init_method = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group(backend="gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _OWNS_PROCESS_GROUP = True


def _init_model_parallel(tp: int, pp: int, cp: int, world_size: int) -> None:
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
        )
        return
    have = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
    )
    if world_size > 1 and have != (tp, pp, cp):
        raise RuntimeError(f"megatron parallel state already has (tp, pp, cp)={have}, not {(tp, pp, cp)}")


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
    """Idempotently set up torch.distributed (gloo), megatron's parallel state and the CPU platform mechanism.

    Single process (the default, ``world_size`` 1): rank 0 of 1, and ``tp``/``pp``/``cp`` must all be 1. The
    rendezvous address is passed as ``init_method=tcp://127.0.0.1:<free port>`` instead of through
    ``MASTER_ADDR``/``MASTER_PORT`` so the environment of other tests is left alone.

    Inside a spawned rank (see :func:`verl_cpu.testing.run_cpu_ranks`): pass ``rank``, ``world_size`` and the
    shared ``init_method``; the data-parallel size is ``world_size / (tp*pp*cp)``. Collectives time out after
    ``timeout_s`` (gloo) so a rank whose peer died fails instead of hanging. The RNG tracker's streams are
    seeded with 0 the way Megatron's ``model_parallel_cuda_manual_seed`` seeds them, unless already seeded.
    """
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size == 1 and tp * pp * cp != 1:
        raise ValueError(f"CPU test world size is 1, so tp*pp*cp must be 1 (got tp={tp}, pp={pp}, cp={cp})")
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not a multiple of tp*pp*cp (tp={tp}, pp={pp}, cp={cp})")
    _init_process_group(rank, world_size, init_method, timeout_s)
    _init_model_parallel(tp, pp, cp, world_size)
    for patch in CUDA_ON_CPU:
        if not patch.applied:
            patch.apply()
            _APPLIED_BY_INIT.append(patch)
    if not tensor_parallel.get_cuda_rng_tracker().is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(0)


def destroy_cpu_megatron() -> None:
    """Undo ``init_cpu_megatron`` and reset megatron's process-global MTP state, for test isolation.

    Tests share one process with other tests (verl's CI runs every ``*_on_cpu.py`` in one pytest), so everything
    init changed goes back: the ``torch.cuda`` functions and Megatron's RNG tracker are the originals again
    (the patches a CPU plugin applied before init stay), the parallel state is gone, and the default process
    group is destroyed if ``init_cpu_megatron`` created it.
    """
    global _OWNS_PROCESS_GROUP
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    while _APPLIED_BY_INIT:
        _APPLIED_BY_INIT.pop().undo()
    MTPLossLoggingHelper.tracker.clear()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False


def tag_sequence_parallel_norms(original_new):
    """``WrappedTorchNorm.__new__`` accepting ``sequence_parallel`` and tagging its parameters like the fused
    norms do (:data:`verl_cpu.patches.SEQUENCE_PARALLEL_TORCH_NORM`)."""
    plain_new = original_new.__func__ if isinstance(original_new, staticmethod) else original_new

    def __new__(cls, config, hidden_size, *args, **kwargs):
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = plain_new(cls, plain, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

    return __new__


def _current_parallel_sizes() -> tuple[int, int, int]:
    """(tp, pp, cp) of megatron's parallel state, set up first (world size 1) when there is none yet."""
    if parallel_state.model_parallel_is_initialized():  # keep the sizes set up (e.g. by a rank)
        init_cpu_megatron(
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
            cp=parallel_state.get_context_parallel_world_size(),
        )
    else:
        init_cpu_megatron()
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
    )


def _layer_spec(packed_attention: bool, moe_experts: int = 0):
    """Megatron's local layer spec (its MoE variant with ``moe_experts``, ungrouped experts); with
    ``packed_attention`` its core attention is the platform's :class:`~verl_cpu.attention.CPUCoreAttention`,
    which honours packed (THD) ``cu_seqlens``, verl's ``[b, s]`` padding masks and context parallelism over the
    zig-zag split."""
    spec = get_gpt_layer_local_spec(num_experts=moe_experts or None, moe_grouped_gemm=False)
    if packed_attention:
        spec.submodules.self_attention.submodules.core_attention = CPUCoreAttention
    return spec


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
    moe_experts: int = 0,
    config_overrides: Optional[dict] = None,
) -> GPTModel:
    """Build a real fp32 ``GPTModel`` on CPU with ``mtp_num_layers`` real MTP layers (0 = no MTP).

    Local (non-TransformerEngine) layer spec; the MTP block spec is derived from it by megatron's own
    ``get_gpt_mtp_block_spec``. Dropout is 0 and positions are learned absolute; ``seq_len`` is the maximum
    sequence length. Weights are a pure function of ``seed`` (``use_cpu_initialization`` draws from torch's CPU
    generator, which is forked so the caller's global RNG state is unchanged). Returned in training mode.
    ``packed_attention`` uses the platform's core attention, so THD micro-batches and context parallelism
    (CP > 1) run; weights are the same as without it.

    Under model parallelism (inside a ``run_cpu_ranks`` rank, after ``init_cpu_megatron(tp, pp, ...)``) the
    config takes megatron's current TP / PP / CP sizes and this rank builds its own shard and pipeline stage
    (the MTP block only where ``get_gpt_mtp_block_spec`` places it, the last stage). ``sequence_parallel``
    needs TP > 1. Weights are *not* the shards of the same-seed TP = 1 model in general: copy them in.

    ``moe_experts`` > 0 makes every MLP (the MTP layers' too) a Megatron ``MoELayer`` with that many
    ungrouped experts (top-2 routing unless overridden), sharded over megatron's current expert-parallel group.
    ``config_overrides`` sets further ``TransformerConfig`` fields (e.g. ``recompute_granularity``) before the
    model is built, since Megatron reads most of them at construction.
    """
    if mtp_num_layers < 0:
        raise ValueError(f"mtp_num_layers must be >= 0, got {mtp_num_layers}")
    tp, pp, cp = _current_parallel_sizes()
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel=True needs tensor parallel size > 1")
    fields = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        mtp_num_layers=mtp_num_layers or None, use_cpu_initialization=True, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, context_parallel_size=cp, sequence_parallel=sequence_parallel,
        pipeline_dtype=torch.float32 if pp > 1 else None,
    )
    if moe_experts:
        fields.update(
            num_moe_experts=moe_experts, moe_router_topk=2, moe_grouped_gemm=False,
            expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        )
    config = TransformerConfig(**{**fields, **(config_overrides or {})})
    layer_spec = _layer_spec(packed_attention, moe_experts)
    mtp_block_spec = (
        get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False) if mtp_num_layers else None
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(cpu_placements())
        stack.enter_context(_attention_env_kept())
        if sequence_parallel:
            stack.enter_context(applied([SEQUENCE_PARALLEL_TORCH_NORM]))
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        model = GPTModel(
            config=config, transformer_layer_spec=layer_spec, vocab_size=vocab_size, max_sequence_length=seq_len,
            pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=share_embeddings, position_embedding_type="learned_absolute",
            mtp_block_spec=mtp_block_spec,
        )
    if mtp_num_layers:
        prepare_mtp_loss_tracker(mtp_num_layers)
    return model


@contextlib.contextmanager
def _attention_env_kept() -> Iterator[None]:
    """Put back Megatron's attention-backend variables after a model build: ``GPTModel`` exports them into
    ``os.environ`` (:data:`verl_cpu.environment.MEGATRON_ATTENTION_ENV`) and asserts in a later build whose
    backend disagrees, so one test's tiny model would break another test's engine build in the same process."""
    saved = {key: os.environ.get(key) for key in MEGATRON_ATTENTION_ENV}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    """Hide the MTP block for one forward: ``_postprocess`` then skips MTP and ``labels.clone()``."""
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

    * ``labels is None``: logits ``[b, s, vocab]`` of the main head (MTP heads are skipped, see module doc);
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
