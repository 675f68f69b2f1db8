"""Exact cost of one actor micro-batch step per MTP regime at real model shapes, without the real weights.

The step is the one ``benchmarks/mtp_actor_step.py`` times (model forward with the regime's MTP patch, the main
head through verl's logits processor or, ``*_fused``, the chunked scoring of ``use_fused_kernels``, verl's
``ppo_loss`` plus the MTP policy term for ``rl``, backward), run on a real Megatron-Core ``GPTModel`` built at
full size under torch's ``FakeTensorMode``: every operator runs on shapes only, so a 106B-parameter MoE fits
on a laptop. Counted per step, operator by operator:

* FLOPs of the matrix products, with torch's own formulas (``torch.utils.flop_counter``);
* bytes read and written by every operator that moves data (unfused: each pass over a tensor counts; views
  and bare allocations move nothing, an ``out=`` buffer is written, not read);
* peak live tensor bytes (activations, gradients and transients; the parameters are excluded).

Printed per model: each regime over ``detach``, and for the chunked ``rl`` path the share of the step spent
recomputing the head's logits in the backward pass.

    python -m benchmarks.mtp_flops                        # 1b, mimo-7b, glm-4.5-air at sequence 8192
    python -m benchmarks.mtp_flops --models mimo-7b --seq 4096

Model shapes are the published ``config.json`` values (see ``MODELS``); what the counting model differs in
(bf16 parameters without Megatron's fp32 gradient buffers, learned positions instead of RoPE, TP = 1,
capacity-padded routing with capacity factor 1) changes no regime's matrix products relative to another's.
Attention runs through the flash-attention operator (causal, no ``[s, s]`` scores kept, as on GPUs); torch
counts its FLOPs for the full square, so the causal kernels' real attention work is about half of it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from benchmarks.mtp_actor_step import REGIMES, PeakTensorMemory, base_ppo_loss, make_step, patch_regime


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    mtp_layers: int = 1
    qkv_bias: bool = False
    experts: int = 0  # routed experts; 0 = dense
    topk: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0
    first_dense: int = 0
    source: str = ""


MODELS = {
    "1b": ModelShape(
        hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=6144, vocab=151936,
        source="Qwen3-1.7B config.json trunk with one MTP layer added",
    ),
    "mimo-7b": ModelShape(
        hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, ffn=11008, vocab=151680, qkv_bias=True,
        source="XiaomiMiMo/MiMo-7B-RL config.json (Qwen2-style, num_nextn_predict_layers 1)",
    ),
    "glm-4.5-air": ModelShape(
        hidden=4096, layers=46, heads=96, kv_heads=8, head_dim=128, ffn=10944, vocab=151552, qkv_bias=True,
        experts=128, topk=8, moe_ffn=1408, shared_ffn=1408, first_dense=1,
        source="zai-org/GLM-4.5-Air config.json (first_k_dense_replace 1, num_nextn_predict_layers 1)",
    ),
}

_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_backward,
}


_SHADOW_NUMEL = 1 << 20  # batch-sized integer tensors: offsets, masks, labels


_ALLOCATES_ONLY = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"}


def _moves_data(func, ins, outs) -> bool:
    """Whether an operator reads or writes tensor data (not a view, alias, metadata query or bare allocation)."""
    if func.is_view or not outs or func._overloadpacket.__name__ in _ALLOCATES_ONLY:
        return False
    if func._schema.is_mutable:
        return True
    inputs = {t.untyped_storage()._cdata for t in ins}
    return not all(t.untyped_storage()._cdata in inputs for t in outs)


def _bytes_touched(t: torch.Tensor) -> int:
    """Bytes of ``t``, an expanded (stride 0) tensor counted once per element it really holds."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class StepCost(PeakTensorMemory):
    """Counts FLOPs and bytes moved of everything run under it, on top of the peak of live tensor bytes.

    ``phase`` (set by :meth:`in_phase`) attributes FLOPs to a named part of the step as well; in the
    ``chunked_backward`` phase a product whose output is a logits chunk ``[rows, vocab]`` counts as
    ``chunked_recompute`` (the others there are the head's input / weight gradients). ``peak_vocab`` is the
    part of the peak held by tensors with a ``vocab``-sized dimension (logits, softmaxes, their gradients, kept
    exponentials, the output layer's weight gradient): the rest is what the step needs whatever the heads do.
    """

    def __init__(self, fake_mode: FakeTensorMode, vocab: int | None = None):
        super().__init__()
        self._fake_mode = fake_mode
        self.vocab = vocab
        self.flops = 0
        self.attention_flops = 0
        self.bytes = 0
        self.phase_flops: dict[str, int] = {}
        self._phase = None
        self._real = WeakIdKeyDictionary()  # fake tensor -> its real value
        self.live_vocab = 0
        self.peak_vocab = 0

    def _track(self, t):
        """The peak's vocabulary-sized part too (see the class docstring)."""
        if not isinstance(t, torch.Tensor) or t.is_nested or t.untyped_storage()._cdata in self._seen:
            return
        super()._track(t)
        if self.vocab is not None and self.vocab in t.shape:
            size = t.untyped_storage().nbytes()
            self.live_vocab += size
            weakref.finalize(t.untyped_storage(), self._release_vocab, size)
        if self.live == self.peak:
            self.peak_vocab = self.live_vocab

    def _release_vocab(self, size: int) -> None:
        self.live_vocab -= size

    @contextlib.contextmanager
    def in_phase(self, name: str):
        saved, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = saved

    def _host_read(self, t: torch.Tensor):
        """The value of a scalar the step reads back to the host.

        Known when it derives from the batch (offsets, masks: see :meth:`_run_known`); otherwise it is a model
        value (e.g. verl's ``num_tokens > 0``), which never changes what is computed, so any non-zero serves.
        """
        real = self._real.get(t)
        if real is not None:
            with unset_fake_temporarily():
                return real.item()
        return True if t.dtype == torch.bool else 1

    def _known(self, t: torch.Tensor) -> bool:
        return not t.is_floating_point() and t.numel() <= _SHADOW_NUMEL and (
            not isinstance(t, FakeTensor) or t in self._real
        )

    def _run_known(self, func, args, kwargs):
        """Batch bookkeeping (offsets, masks, label shifts: small integer tensors of known value) runs for real,
        so data-dependent shapes and host reads get their true answer; its results enter as fake tensors."""
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not ins or not all(self._known(t) for t in ins):
            return NotImplemented

        def real(x):
            return self._real[x] if isinstance(x, FakeTensor) else x

        with unset_fake_temporarily():
            out = func(*torch.utils._pytree.tree_map(real, args), **torch.utils._pytree.tree_map(real, kwargs))
        mode = self._fake_mode

        def fake(x):
            if not isinstance(x, torch.Tensor):
                return x
            f = mode.from_tensor(x)
            self._real[f] = x
            return f

        return torch.utils._pytree.tree_map(fake, out)

    def _remember_factory(self, func, args, kwargs, out) -> None:
        """Small deterministic integer tensors made from nothing (``arange``) get their real value too."""
        if not isinstance(out, FakeTensor) or out.is_floating_point() or out.numel() > _SHADOW_NUMEL:
            return
        if torch.Tag.nondeterministic_seeded in func.tags:
            return
        with unset_fake_temporarily():
            self._real[out] = func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return self._host_read(args[0])
        out = self._run_known(func, args, kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
            if not any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves((args, kwargs))):
                self._remember_factory(func, args, kwargs, out)
        packet = func._overloadpacket
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            self.flops += flops
            if packet in _ATTENTION_OPS:
                self.attention_flops += flops
            phase = self._phase
            if phase == "chunked_backward" and isinstance(out, torch.Tensor) and out.shape[-1] == self.vocab:
                phase = "chunked_recompute"
            if phase is not None:
                self.phase_flops[phase] = self.phase_flops.get(phase, 0) + flops
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if _moves_data(func, ins, outs):
            # an ``out=`` buffer is written, not read: it counts once, as an output
            reads = [t for t in torch.utils._pytree.tree_leaves((args, {**kwargs, "out": None}))
                     if isinstance(t, torch.Tensor)]
            self.bytes += sum(_bytes_touched(t) for t in reads + outs)
        self._track_allocated(ins, outs)
        return out


class _FlashCoreAttention(torch.nn.Module):
    """Megatron core attention through torch's flash-attention operator: causal, no ``[s, s]`` scores."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        super().__init__()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


@contextlib.contextmanager
def _megatron_moe_on_fake_cpu():
    """Let Megatron's local MoE layer run on CPU fake tensors (megatron-core 0.16.1).

    The router places its buffers on ``torch.cuda.current_device()``; the all-to-all dispatcher creates a CUDA
    stream it never uses at TP = EP = 1 and, with capacity padding, builds its per-expert token counts from
    shapes alone (real tensors: the experts split on them with ``tolist``); the router's gating linear reads
    an optional TransformerEngine symbol that is undefined without TransformerEngine.
    """
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as Dispatcher

    saved = (torch.cuda.current_device, Dispatcher.cuda_dtoh_stream, Dispatcher.preprocess)
    real_preprocess = Dispatcher.preprocess

    def preprocess(self, routing_map):
        with unset_fake_temporarily():
            return real_preprocess(self, routing_map)

    torch.cuda.current_device = lambda: torch.device("cpu")
    Dispatcher.cuda_dtoh_stream = Dispatcher.cuda_dtoh_stream or "unused at TP = EP = 1"
    Dispatcher.preprocess = preprocess
    had_te_gemm = hasattr(moe_utils, "te_general_gemm")
    if not had_te_gemm:
        moe_utils.te_general_gemm = None
    try:
        yield
    finally:
        torch.cuda.current_device, Dispatcher.cuda_dtoh_stream, Dispatcher.preprocess = saved
        if not had_te_gemm:
            del moe_utils.te_general_gemm


def transformer_config(shape: ModelShape, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = {}
    if shape.experts:
        moe = dict(
            num_moe_experts=shape.experts, moe_router_topk=shape.topk, moe_ffn_hidden_size=shape.moe_ffn,
            moe_shared_expert_intermediate_size=shape.shared_ffn or None,
            moe_layer_freq=[0] * shape.first_dense + [1] * (shape.layers - shape.first_dense),
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=1.0,
            moe_pad_expert_input_to_capacity=True, moe_aux_loss_coeff=0.0,
        )
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads, kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        normalization="RMSNorm", mtp_num_layers=shape.mtp_layers or None, use_cpu_initialization=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0, **moe,
    )


def build_counting_gpt(shape: ModelShape, seq: int, dtype: torch.dtype = torch.bfloat16):
    """A Megatron ``GPTModel`` of ``shape`` with flash core attention; call under a ``FakeTensorMode``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(shape, dtype)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    for layer in block.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = _FlashCoreAttention
    mtp = get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=False)
    return GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=shape.vocab, max_sequence_length=seq,
        position_embedding_type="learned_absolute", mtp_block_spec=mtp,
    )


def _grads_into_main_grad_buffer(model: torch.nn.Module) -> None:
    """Each parameter's gradient leaves the live tensors once accumulated, as Megatron's DDP hands it to its
    pre-allocated ``main_grad`` buffer (counted like the parameters: not at all). Without this, a gradient
    computed early in the backward (the shared embedding's, reached early through the MTP inputs under
    ``rl``) would count as activation memory until the step ends."""
    for param in model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


@contextlib.contextmanager
def _chunked_phases(cost: StepCost):
    """Mark the chunked log-prob function's forward and backward as phases of ``cost``."""
    from verl_mtp.models.mcore import token_scores

    fn = token_scores._ChunkedTokenLogProb
    saved = fn.__dict__["forward"], fn.__dict__["backward"]
    fwd, bwd = saved[0].__func__, saved[1].__func__

    def forward(ctx, *a):
        with cost.in_phase("chunked_forward"):
            return fwd(ctx, *a)

    def backward(ctx, *grads):
        with cost.in_phase("chunked_backward"):
            return bwd(ctx, *grads)

    fn.forward, fn.backward = staticmethod(forward), staticmethod(backward)
    try:
        yield
    finally:
        fn.forward, fn.backward = saved


def count_regimes(shape: ModelShape, seq: int, regimes, chunk: int, dtype=torch.bfloat16) -> dict[str, StepCost]:
    """One counted actor step per regime on a fresh fake model of ``shape``; returns each regime's cost."""
    from verl_cpu.testing import init_cpu_megatron, make_actor_batch

    init_cpu_megatron()
    base_loss = base_ppo_loss()
    prompt = seq // 4
    data = make_actor_batch([prompt], [seq - prompt], vocab_size=shape.vocab, seed=0)
    step_args = argparse.Namespace(seq=seq, heads=shape.mtp_layers)
    costs = {}
    saved_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # Megatron's CPU fallback norms take the default dtype
    try:
        for regime in regimes:
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
            with _megatron_moe_on_fake_cpu(), fake_mode:
                model = build_counting_gpt(shape, seq, dtype)
                _grads_into_main_grad_buffer(model)
                hooks, loss_fn = patch_regime(model, regime, chunk, base_loss)
                step = make_step(step_args, model, hooks, loss_fn, data)
                cost = StepCost(fake_mode, vocab=shape.vocab)
                with _chunked_phases(cost), cost:
                    step()
                costs[regime] = cost
                del model, step, hooks
    finally:
        torch.set_default_dtype(saved_dtype)
    return costs


def report(name: str, shape: ModelShape, seq: int, chunk: int, costs: dict[str, StepCost]) -> None:
    base = costs["detach"]
    print(f"{name} seq={seq} ({shape.source}): detach step {base.flops / 1e12:.1f} TFLOP "
          f"(attention {100 * base.attention_flops / base.flops:.1f}%), {base.bytes / 2**30:.0f} GiB moved, "
          f"peak {base.peak / 2**30:.1f} GiB ({base.peak_vocab / 2**30:.1f} GiB vocabulary-sized)")
    for regime, cost in costs.items():
        if regime == "detach":
            continue
        line = (f"{name} seq={seq} {regime}/detach: flops {cost.flops / base.flops:.4f}x "
                f"bytes {cost.bytes / base.bytes:.4f}x peak_mem {cost.peak / base.peak:.4f}x")
        if regime in ("rl", "rl_occ") and chunk > 0:
            recompute = cost.phase_flops.get("chunked_recompute", 0)
            line += f" recompute_share {100 * recompute / cost.flops:.2f}%"
        line += f" (peak {cost.peak / 2**30:.1f} GiB, {cost.peak_vocab / 2**30:.1f} GiB vocabulary-sized)"
        print(line, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=1024, help="logprob_chunk_size of the chunked rl regimes")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    args = p.parse_args()
    regimes = ["detach"] + [r for r in args.regimes if r != "detach"]
    for name in args.models:
        shape = MODELS[name]
        report(name, shape, args.seq, args.chunk, count_regimes(shape, args.seq, regimes, args.chunk))


if __name__ == "__main__":
    main()
