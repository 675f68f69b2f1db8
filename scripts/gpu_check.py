"""Device check of the ``rl`` MTP path: one Megatron-Core GPTModel with MTP heads on the device, both scoring paths.

On CUDA: bf16 (Megatron's ``Float16Module``), TransformerEngine layer spec when TE imports, local spec otherwise,
single-process NCCL. With ``--cpu``: the tiny fp32 model of ``verl_cpu.testing`` on the CPU platform. For each
``logprob_chunk_size`` (0 = through Megatron's output layer, and chunked) the model runs verl's MTP patch and
ours, scores every head on the sampled tokens and back-propagates a fixed linear functional of the log-probs.
Checked: per-head log-probs finite, fp32, and equal between the two paths; every gradient finite and equal
between the two paths (bf16 tolerances on CUDA). Then the two paths are timed in interleaved rounds and one
ratio per line is printed (chunked over output-layer path: step time, peak memory).

    python scripts/gpu_check.py            # CUDA, about 1B parameters
    python scripts/gpu_check.py --cpu      # CPU, tiny
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the benchmark's reading
from benchmarks.mtp_actor_step import RatioSpread  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny fp32 model on the CPU platform (what CI runs)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--mtp-heads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    tiny, large = dict(hidden=64, layers=2, vocab=512, seq=64), dict(hidden=2048, layers=16, vocab=151936, seq=4096)
    for key, value in (tiny if args.cpu else large).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cpu:
        args.chunk = min(args.chunk, 16)
    return args


def build_cuda_model(args):
    """Single-process NCCL, Megatron's parallel state, a bf16 GPTModel with MTP on the GPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    try:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec, use_te = get_gpt_layer_with_transformer_engine_spec(), True
    except (ImportError, AssertionError):
        spec, use_te = get_gpt_layer_local_spec(), False
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=max(args.hidden // 128, 1),
        mtp_num_layers=args.mtp_heads, bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0,
        attention_dropout=0.0, add_bias_linear=False, gradient_accumulation_fusion=False,
    )
    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=use_te)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope", mtp_block_spec=mtp_spec)
    print(f"# CUDA {torch.cuda.get_device_name()}: bf16, {'TransformerEngine' if use_te else 'local'} spec, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
    return Float16Module(config, model.cuda()), torch.device("cuda")


def build_cpu_model(args):
    from verl_cpu.testing import build_tiny_gpt

    model = build_tiny_gpt(args.mtp_heads, vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                           seq_len=args.seq)
    print(f"# CPU: fp32, local spec, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    return model, torch.device("cpu")


def patch_verl_mtp(model) -> None:
    """verl's MTP patch with the ``rl`` regime's switches, once per model, as the engine applies it."""
    from verl.utils.megatron_utils import patch_engine_mtp
    from verl_mtp.workers.config import MtpRLConfig

    cfg = MtpRLConfig(enable=True, mtp_loss_type="rl", train_lm_head=True)
    with contextlib.redirect_stdout(io.StringIO()):  # verl's patch prints the whole model
        patch_engine_mtp(model, SimpleNamespace(mtp=cfg.with_regime_switches()))


def patch_rl(model, chunk: int):
    """Our RL postprocess with ``logprob_chunk_size=chunk`` (``unpatch`` removes it)."""
    from verl_mtp.models.mcore.mtp_patch import patch_postprocess_rl

    return patch_postprocess_rl(model, train_lm_head=True, logprob_chunk_size=chunk)


def make_batch(args, device):
    g = torch.Generator().manual_seed(0)
    b, s = 1, args.seq
    ids = torch.randint(1, args.vocab, (b, s), generator=g)
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    weights = torch.randn(args.mtp_heads, b, s, generator=g)
    return {k: v.to(device) for k, v in dict(ids=ids, labels=labels, weights=weights).items()}


def step(model, hook, batch, args):
    """Forward, score every head, backward; returns the heads' log-probs."""
    from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys
    from verl_mtp.models.mcore.mtp_head_labels import pack_head_labels
    from verl_mtp.models.mcore.mtp_log_probs import score_mtp_heads

    ids = batch["ids"]
    b, s = ids.shape
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=ids.device), 1).view(1, 1, s, s).expand(b, 1, s, s)
    logits = model(ids, torch.arange(s, device=ids.device).expand(b, s), mask, labels=batch["labels"])
    nested = torch.nested.as_nested_tensor([row for row in ids], layout=torch.jagged)
    targets = [t[:, :s].to(ids.device) for t in pack_head_labels(nested, args.mtp_heads, "bshd")]
    scored = score_mtp_heads(hook.pop_output(), targets, torch.ones(b, s, device=ids.device))
    heads = [scored[mtp_output_keys(k)[0]] for k in range(1, args.mtp_heads + 1)]
    loss = sum((w * lp).sum() for w, lp in zip(batch["weights"], heads)) + 1e-3 * logits.float().mean()
    loss.backward()
    return [lp.detach() for lp in heads]


def grads_of(model):
    out = {}
    for name, p in model.named_parameters():
        g = getattr(p, "main_grad", None) if getattr(p, "grad", None) is None else p.grad
        out[name] = None if g is None else g.detach().float().clone()
        p.grad = None
    return out


def check_paths(model, batch, args, bf16: bool) -> None:
    """Both scoring paths on the same weights: equal log-probs and gradients, everything finite."""
    atol, rtol = (5e-2, 5e-2) if bf16 else (1e-5, 1e-4)
    runs = {}
    for chunk in (0, args.chunk):
        hook = patch_rl(model, chunk)
        runs[chunk] = step(model, hook, batch, args), grads_of(model)
        hook.unpatch()
    (lp0, g0), (lp1, g1) = runs[0], runs[args.chunk]
    for k, (a, b) in enumerate(zip(lp0, lp1), start=1):
        assert a.dtype == torch.float32 and bool(torch.isfinite(a).all()), f"head {k}: non-finite or not fp32"
        diff = (a - b).abs().max().item()
        assert diff <= atol, f"head {k}: log-probs differ between the paths by {diff}"
        print(f"check head {k} log-probs chunked vs output layer: max abs diff {diff:.2e} (<= {atol}) ok")
    worst = 0.0
    for name, a in g0.items():
        b = g1[name]
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert bool(torch.isfinite(a).all() and torch.isfinite(b).all()), f"{name}: non-finite gradient"
        worst = max(worst, ((a - b).norm() / a.norm().clamp_min(1e-12)).item())
    assert worst <= rtol, f"gradients differ between the paths by {worst} (relative)"
    print(f"check gradients chunked vs output layer: max relative diff {worst:.2e} (<= {rtol}) ok", flush=True)


def time_paths(model, batch, args, device) -> None:
    """Interleaved rounds of both paths: the per-round ratio chunked / output layer with its spread, read as
    the actor-step benchmark reads it, and the peak memory."""
    times = {0: [], args.chunk: []}
    peaks = {}
    for r in range(args.rounds):
        for chunk in ((0, args.chunk) if r % 2 == 0 else (args.chunk, 0)):
            hook = patch_rl(model, chunk)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step(model, hook, batch, args)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[chunk] = torch.cuda.max_memory_allocated()
            times[chunk].append(time.perf_counter() - start)
            grads_of(model)
            hook.unpatch()
    print(f"ratio step_time rl_chunked/rl_output_layer: {RatioSpread.of(times[args.chunk], times[0])}")
    if peaks:
        print(f"ratio peak_mem rl_chunked/rl_output_layer: {peaks[args.chunk] / peaks[0]:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:
        torch.set_num_threads(2)
        model, device = build_cpu_model(args)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; run with --cpu", file=sys.stderr)
            return 2
        model, device = build_cuda_model(args)
    patch_verl_mtp(model)
    batch = make_batch(args, device)
    check_paths(model, batch, args, bf16=not args.cpu)
    time_paths(model, batch, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
