"""Actor-update cost of each MTP regime against ``detach``, measured in one run.

One actor micro-batch step = model forward with the regime's MTP patch, verl's ``ppo_loss`` (plus the MTP
policy term for ``rl``), backward. Each (regime, vocabulary, sequence length) runs in its own fresh process
so its peak resident memory is its own; step time is the median of timed repeats after a warm-up.
Printed: one ratio per line against ``detach`` at the same size, and the OCC share of the ``rl_occ`` step.

    python benchmarks/mtp_actor_step.py                      # CPU default sizes (a few minutes on 2 cores)
    python benchmarks/mtp_actor_step.py --vocab 151936 --seq 4096 --hidden 1024 --layers 8   # bigger

The model is a real Megatron-Core GPTModel with MTP heads (local layer spec) on CPU, built with the test
support's CPU shims; on a GPU machine the same script measures the GPU when CUDA is available.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial

REGIMES = ("detach", "ce", "rl", "rl_occ", "rl_materialised")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _measure(args) -> dict:
    """Runs inside a child process: build, warm up, time ``args.repeats`` steps; report time and peak RSS."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    from support.rl_batch import make_actor_batch
    from support.tiny_mcore import build_tiny_gpt, causal_attention_mask, prepare_mtp_loss_tracker

    from verl.utils.megatron_utils import patch_engine_mtp
    from verl.workers.utils.losses import ppo_loss
    from verl_mtp.models.mcore.mtp_alignment import align_mtp_outputs
    from verl_mtp.models.mcore.mtp_forward import pack_head_labels
    from verl_mtp.models.mcore.mtp_patch import patch_postprocess_rl, pop_mtp_rl_output, score_mtp_heads
    from verl_mtp.trainer.ppo import mtp_occ
    from verl_mtp.trainer.ppo.mtp_occ import OCCState
    from verl_mtp.workers.config import MtpRLConfig, OCCConfig
    from verl_mtp.workers.utils.losses import with_mtp_policy_loss

    torch.set_num_threads(args.threads)
    regime = args.regime
    loss_type = "rl" if regime.startswith("rl") else regime
    mtp_cfg = MtpRLConfig(
        enable=True,
        mtp_loss_type=loss_type,
        occ=OCCConfig(enable=regime == "rl_occ"),
        logprob_chunk_size=0 if regime == "rl_materialised" else args.chunk,
    )
    model = build_tiny_gpt(
        args.heads, vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), seq_len=args.seq,
    )
    patch_engine_mtp(model, type("M", (), {"mtp": mtp_cfg})())
    if mtp_cfg.is_rl:
        patch_postprocess_rl(model, logprob_chunk_size=mtp_cfg.logprob_chunk_size)

    from hydra import compose, initialize_config_module

    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_module(config_module="verl_mtp.trainer.config", version_base=None):
        cfg = compose("mtp_ppo_megatron_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"])
    actor_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    base_loss = partial(ppo_loss, config=actor_cfg)
    loss_fn = with_mtp_policy_loss(base_loss, mtp_cfg, OCCState(mtp_cfg.occ)) if mtp_cfg.is_rl else base_loss

    prompt = args.seq // 4
    data = make_actor_batch([prompt], [args.seq - prompt], vocab_size=args.vocab, seed=0)
    ids = data["input_ids"].values()[None]
    labels = torch.roll(ids, -1, dims=1)
    pos = torch.arange(args.seq)[None]
    mask = causal_attention_mask(1, args.seq)
    occ_seconds = []
    real_stats = mtp_occ.occ_statistics

    def timed_stats(*a, **kw):
        t0 = time.perf_counter()
        out = real_stats(*a, **kw)
        occ_seconds.append(time.perf_counter() - t0)
        return out

    import verl_mtp.workers.utils.losses as losses_mod

    losses_mod.occ_statistics = timed_stats

    def step():
        prepare_mtp_loss_tracker(args.heads)
        model.zero_grad(set_to_none=True)
        logits = model(ids, pos, mask, labels=labels)
        log_probs = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
        output = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs[0], offsets=data["input_ids"].offsets())}
        mtp_out = pop_mtp_rl_output(model)
        if mtp_out is not None:
            targets = pack_head_labels(data["input_ids"], args.heads, "bshd")
            scored = score_mtp_heads(mtp_out, targets, torch.ones_like(labels, dtype=torch.float32))
            output.update(align_mtp_outputs({
                k: torch.nested.nested_tensor_from_jagged(v[0], offsets=data["input_ids"].offsets())
                for k, v in scored.items()
            }))
        loss, _ = loss_fn(model_output=output, data=data)
        loss.backward()

    step()
    times = []
    occ_seconds.clear()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    occ_per_step = sum(occ_seconds) / args.repeats
    if mtp_cfg.is_rl:  # OCC = the statistics plus lambda; the statistics dominate, lambda is a scalar division
        occ_per_step = occ_per_step if regime == "rl_occ" else 0.0
    return {
        "step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "occ_s": occ_per_step,
    }


def _run_child(args, regime, vocab, seq) -> dict:
    cmd = [sys.executable, __file__, "--child", "--regime", regime, "--vocab", str(vocab), "--seq", str(seq),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
           "--chunk", str(args.chunk), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise RuntimeError(f"{regime} vocab={vocab} seq={seq} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=1, help="number of MTP heads")
    p.add_argument("--chunk", type=int, default=1024, help="logprob_chunk_size of the rl regimes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--regime", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.vocab, args.seq = args.vocab[0], args.seq[0]
        print(json.dumps(_measure(args)))
        return
    print(f"# model: hidden {args.hidden}, {args.layers} layers, {args.heads} MTP head(s); "
          f"rl chunk {args.chunk}; median of {args.repeats} steps; each row its own process")
    for vocab in args.vocab:
        for seq in args.seq:
            base = _run_child(args, "detach", vocab, seq)
            print(f"vocab={vocab} seq={seq} detach: step {base['step_s']:.3f}s peak_rss {base['peak_rss_mb']:.0f}MB")
            for regime in args.regimes:
                if regime == "detach":
                    continue
                r = _run_child(args, regime, vocab, seq)
                line = (f"vocab={vocab} seq={seq} {regime}/detach: step_time {r['step_s'] / base['step_s']:.3f}x "
                        f"peak_rss {r['peak_rss_mb'] / base['peak_rss_mb']:.3f}x")
                if regime == "rl_occ":
                    line += f" occ_share {100 * r['occ_s'] / r['step_s']:.3f}%"
                print(line, flush=True)


if __name__ == "__main__":
    main()
