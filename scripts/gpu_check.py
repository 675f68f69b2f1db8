"""The GPU check: is the ``rl`` path right on the device, and what each MTP regime costs there; one line per result.

    python scripts/gpu_check.py scoring       # both rl scoring paths agree (log-probs, gradients); their ratio
    python scripts/gpu_check.py actor-step    # every regime's micro-batch step vs detach: time, memory, host syncs
    python scripts/gpu_check.py worker        # one real actor update through verl's worker: detach and rl_occ

With ``--cpu`` each section runs at tiny size on the CPU platform (what CI runs). ``scripts/gpu_check.sh`` runs
all three in the environment a bare GPU machine needs. On CUDA the model is bf16 with TransformerEngine's layer
spec when TE imports, Megatron's local spec otherwise (printed): without TE or flash attention the trunk is
slower than in a real run, so the ratios over ``detach`` are the figures to read, not the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from types import SimpleNamespace

import torch

TINY = dict(hidden=64, layers=2, vocab=512, seq=64)
LARGE = dict(hidden=2048, layers=16, vocab=151936, seq=4096)  # about 1.5B parameters with one MTP layer


def scoring(args) -> None:
    """Both rl scoring paths (chunked, and through the output layer) on the same weights: equal log-probs and
    gradients, everything finite; then their step-time and memory ratio."""
    from benchmarks.mtp_actor_step import build_model

    model_args = SimpleNamespace(device="cpu" if args.cpu else "cuda", heads=args.heads, **(TINY if args.cpu else LARGE))
    model = build_model(model_args)
    _patch_verl_mtp(model)
    batch = _scoring_batch(model_args)
    chunk = 16 if args.cpu else 1024
    _check_paths(model, batch, model_args, chunk, bf16=not args.cpu)
    _time_paths(model, batch, model_args, chunk, rounds=3 if args.cpu else 5)


def _patch_verl_mtp(model) -> None:
    """verl's MTP patch with the ``rl`` regime's switches, once per model, as the engine applies it."""
    from verl.utils.megatron_utils import patch_engine_mtp
    from verl_mtp.workers.config import MtpRLConfig

    cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", train_lm_head=True)
    with contextlib.redirect_stdout(io.StringIO()):  # verl's patch prints the whole model
        patch_engine_mtp(model, SimpleNamespace(mtp=cfg))


def _scoring_batch(a) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, a.vocab, (1, a.seq), generator=g)
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    weights = torch.randn(a.heads, 1, a.seq, generator=g)
    return {k: v.to(a.device) for k, v in dict(ids=ids, labels=labels, weights=weights).items()}


def _scoring_step(model, hook, batch, a) -> list[torch.Tensor]:
    """Forward, score every head, backward; the heads' log-probs."""
    from verl_cpu.testing import causal_attention_mask, prepare_mtp_loss_tracker
    from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys
    from verl_mtp.models.mcore.mtp_head_labels import bshd_sequence_ids, head_targets
    from verl_mtp.models.mcore.mtp_log_probs import score_mtp_heads

    ids = batch["ids"]
    b, s = ids.shape
    positions = torch.arange(s, device=ids.device).expand(b, s)
    prepare_mtp_loss_tracker(a.heads, device=ids.device)
    logits = model(ids, positions, causal_attention_mask(b, s, ids.device), labels=batch["labels"])
    nested = torch.nested.as_nested_tensor(list(ids), layout=torch.jagged)
    targets = head_targets(nested, bshd_sequence_ids(b, s, ids.device), positions, a.heads)
    scored = score_mtp_heads(hook.pop_output(), targets, torch.ones(b, s, device=ids.device))
    heads = [scored[mtp_output_keys(k)[0]] for k in range(1, a.heads + 1)]
    loss = sum((w * lp).sum() for w, lp in zip(batch["weights"], heads)) + 1e-3 * logits.float().mean()
    loss.backward()
    return [lp.detach() for lp in heads]


def _grads_of(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        g = getattr(p, "main_grad", None) if getattr(p, "grad", None) is None else p.grad
        out[name] = None if g is None else g.detach().float().clone()
        p.grad = None
    return out


def _check_paths(model, batch, a, chunk: int, bf16: bool) -> None:
    from verl_mtp.models.mcore.mtp_patch import patch_postprocess_rl

    atol, rtol = (5e-2, 5e-2) if bf16 else (1e-5, 1e-4)
    runs = {}
    for size in (0, chunk):
        hook = patch_postprocess_rl(model, train_lm_head=True, logprob_chunk_size=size)
        runs[size] = _scoring_step(model, hook, batch, a), _grads_of(model)
        hook.unpatch()
    (lp0, g0), (lp1, g1) = runs[0], runs[chunk]
    for k, (x, y) in enumerate(zip(lp0, lp1), start=1):
        assert x.dtype == torch.float32 and bool(torch.isfinite(x).all()), f"head {k}: non-finite or not fp32"
        diff = (x - y).abs().max().item()
        assert diff <= atol, f"head {k}: log-probs differ between the paths by {diff}"
        print(f"check head {k} log-probs chunked vs output layer: max abs diff {diff:.2e} (<= {atol}) ok")
    worst = 0.0
    for name, x in g0.items():
        y = g1[name]
        assert (x is None) == (y is None), name
        if x is not None:
            assert bool(torch.isfinite(x).all() and torch.isfinite(y).all()), f"{name}: non-finite gradient"
            worst = max(worst, ((x - y).norm() / x.norm().clamp_min(1e-12)).item())
    assert worst <= rtol, f"gradients differ between the paths by {worst} (relative)"
    print(f"check gradients chunked vs output layer: max relative diff {worst:.2e} (<= {rtol}) ok", flush=True)


def _time_paths(model, batch, a, chunk: int, rounds: int) -> None:
    """Interleaved rounds of both paths: the per-round ratio chunked / output layer with its spread, and memory."""
    from benchmarks.mtp_actor_step import RatioSpread, _Clock
    from verl_mtp.models.mcore.mtp_patch import patch_postprocess_rl

    clock, times, peaks = _Clock(a.device), {0: [], chunk: []}, {}
    for r in range(rounds):
        for size in (0, chunk) if r % 2 == 0 else (chunk, 0):
            hook = patch_postprocess_rl(model, train_lm_head=True, logprob_chunk_size=size)
            times[size].append(clock.time(lambda: _scoring_step(model, hook, batch, a)))
            _grads_of(model)
            peaks[size] = clock.peak(lambda: _scoring_step(model, hook, batch, a)) if r == 0 else peaks[size]
            _grads_of(model)
            hook.unpatch()
    print(f"ratio step_time rl_chunked/rl_output_layer: {RatioSpread.of(times[chunk], times[0])}")
    print(f"ratio peak_mem rl_chunked/rl_output_layer: {peaks[chunk] / peaks[0]:.3f}", flush=True)


def actor_step(args) -> None:
    """``benchmarks.mtp_actor_step`` on the device: K = 1 with every regime, K = 2 with detach and rl_occ."""
    from benchmarks import mtp_actor_step

    size = TINY if args.cpu else LARGE
    common = ["--device", "cpu" if args.cpu else "cuda", "--vocab", str(size["vocab"]), "--seq", str(size["seq"]),
              "--hidden", str(size["hidden"]), "--layers", str(size["layers"]), "--syncs",
              "--repeats", "3" if args.cpu else "7"]
    mtp_actor_step.main([*common, "--heads", "1"])
    mtp_actor_step.main([*common, "--heads", "2", "--regimes", "detach", "rl_occ"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=["scoring", "actor-step", "worker"])
    p.add_argument("--cpu", action="store_true", help="tiny size on the CPU platform (what CI runs)")
    p.add_argument("--heads", type=int, default=1, help="MTP heads of the scoring section's model")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu", file=sys.stderr)
        return 2
    if args.section == "worker":
        from gpu_check_worker import worker_updates  # this directory, next to this script

        return worker_updates(args.cpu)
    _init_distributed(args.cpu)
    torch.set_num_threads(2 if args.cpu else os.cpu_count() or 1)
    {"scoring": scoring, "actor-step": actor_step}[args.section](args)
    return 0


def _init_distributed(cpu: bool) -> None:
    if cpu:
        from verl_cpu.testing import init_cpu_megatron

        init_cpu_megatron()
    # on CUDA benchmarks.mtp_actor_step.build_cuda_gpt sets up single-process NCCL itself


if __name__ == "__main__":
    sys.exit(main())
