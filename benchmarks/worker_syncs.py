"""Host synchronisations of an actor micro-batch through verl's real worker, per MTP regime.

verl's ``ActorRolloutRefWorker`` is built in-process on the CPU platform (:mod:`verl_cpu.engine_smoke`, tiny
MiMo with K MTP heads) once per regime and input format (THD packed, BSHD padded), and each update is counted
with :class:`verl_cpu.testing.host_syncs.HostSyncCounter`: forward (verl's packing, the model, the logits processor and
its unpacking), verl's loss with the MTP term, backward, optimizer step. Every count is taken twice, with one and
with two micro-batches per update, so what one micro-batch costs is the difference and what the update costs
once (splitting, metric gathering, the optimizer) the rest. Printed per regime: both counts and the
micro-batch's difference over ``detach``; ``--sites`` lists where each added synchronisation happens.

    python -m benchmarks.worker_syncs                       # K = 1, 2; THD and BSHD; every regime, *_fused too
    python -m benchmarks.worker_syncs --heads 2 --formats thd --sites --json out.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import sys
import tempfile

MTP = "actor_rollout_ref.model.mtp"
FUSED = "_fused"  # suffix: the regime with verl's use_fused_kernels=True (the main head scored in chunks)
OCC = "_occ"  # suffix: a policy-loss regime with OCC setting its coefficient


def every_regime() -> list[str]:
    """verl-mtp's registered regimes, each policy-loss one also with OCC, then all of them with ``_fused``."""
    from verl_mtp.workers.config import MTP_REGIME_REGISTRY

    names = [n for r in MTP_REGIME_REGISTRY.values() for n in (r.name, *([r.name + OCC] if r.policy_loss else []))]
    return names + [n + FUSED for n in names]


def regime_overrides(name: str) -> list[str]:
    """The trainer overrides of ``name``: a regime verl-mtp registers, with ``_occ`` and / or ``_fused``. Read from
    the registry when asked (importing verl-mtp imports verl, which must come after the CPU platform's set-up)."""
    from verl_mtp.workers.config import get_mtp_regime

    base = name.removesuffix(FUSED)
    regime = get_mtp_regime(base.removesuffix(OCC))
    if base.endswith(OCC) and not regime.policy_loss:
        raise ValueError(f"--regimes {name}: OCC sets the coefficient of a policy-loss regime, {regime.name} has none")
    overrides = [
        f"{MTP}.enable_train=True",
        f"{MTP}.detach_encoder={regime.detach_encoder}",
        f"{MTP}.mtp_loss_type={regime.name}",
    ]
    if base.endswith(OCC):
        overrides.append(f"{MTP}.occ.enable=True")
    if name.endswith(FUSED):
        overrides.append("actor_rollout_ref.model.use_fused_kernels=True")
    return overrides


MICRO_BATCH = 2  # samples per micro-batch


def build_worker(model_dir: str, regime: str, fmt: str):
    """verl's actor worker on the CPU platform with the regime's overrides; its config."""
    from verl_cpu import engine_smoke

    overrides = engine_smoke.default_overrides(model_dir, MICRO_BATCH) + [
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.trust_remote_code=True",
        "actor_rollout_ref.model.external_lib=verl_mtp_example",
        f"actor_rollout_ref.model.use_remove_padding={fmt == 'thd'}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO_BATCH}",
        *regime_overrides(regime),
    ]
    config = engine_smoke.compose_config("verl_mtp.trainer.config", "mtp_ppo_megatron_trainer", overrides)
    with contextlib.redirect_stdout(io.StringIO()):  # verl prints the whole model and config
        worker = engine_smoke.build_actor(config)
    return worker, config


def update_syncs(worker, config, micro_batches: int, seed: int) -> collections.Counter:
    """Every synchronisation of one actor update over ``micro_batches`` micro-batches, by site."""
    from verl_cpu.testing.host_syncs import HostSyncCounter
    from verl.utils import tensordict_utils as tu
    from verl_cpu import engine_smoke

    samples = MICRO_BATCH * micro_batches
    tokenizer = worker.actor.engine.model_config.tokenizer
    data = engine_smoke.synthetic_update_batch(config, tokenizer, samples, seed=seed)
    tu.assign_non_tensor(data, global_batch_size=samples, mini_batch_size=samples)
    with HostSyncCounter() as counter, contextlib.redirect_stdout(io.StringIO()):
        worker.update_actor(data)
    return collections.Counter(counter.by_site())


def regime_counts(model_dir: str, regime: str, fmt: str) -> dict:
    """``{"micro_batch": n, "update": n, "sites": {site: n}}``: one micro-batch's syncs and the rest of an update."""
    worker, config = build_worker(model_dir, regime, fmt)
    update_syncs(worker, config, 1, seed=0)  # warm-up: first-call caches are not the steady state
    one, two = update_syncs(worker, config, 1, seed=1), update_syncs(worker, config, 2, seed=1)
    per_micro_batch = two - one
    return {
        "micro_batch": sum(per_micro_batch.values()),
        "update": sum(one.values()) - sum(per_micro_batch.values()),
        "sites": dict(per_micro_batch),
    }


def tiny_mimo(heads: int, root: str) -> str:
    from verl_mtp_example.tiny_model import make_tiny_mimo

    path = os.path.join(root, f"tiny_mimo_k{heads}")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny_mimo(path, num_mtp_layers=heads)
    return path


def measure(heads: list[int], formats: list[str], regimes: list[str], root: str) -> list[dict]:
    from verl_cpu.testing import prepare_mtp_loss_tracker

    rows = []
    for k in heads:
        model_dir = tiny_mimo(k, root)
        prepare_mtp_loss_tracker(k)  # Megatron's MTP loss tracker is process-global, sized by the first model
        for fmt in formats:
            for regime in regimes:
                row = {"heads": k, "format": fmt, "regime": regime, **regime_counts(model_dir, regime, fmt)}
                rows.append(row)
                print(f"# K={k} {fmt} {regime}: {row['micro_batch']} per micro-batch, {row['update']} per update",
                      file=sys.stderr, flush=True)
    return rows


def report(rows: list[dict], sites: bool) -> None:
    print(f"{'K':>2} {'format':6} {'regime':12} {'per micro-batch':>15} {'over detach':>11} {'per update':>10}")
    base = {(r["heads"], r["format"]): r for r in rows if r["regime"] == "detach"}
    for r in rows:
        ref = base.get((r["heads"], r["format"]))
        added = "" if ref is None else f"{r['micro_batch'] - ref['micro_batch']:+d}"
        print(f"{r['heads']:>2} {r['format']:6} {r['regime']:12} {r['micro_batch']:>15} {added:>11} {r['update']:>10}")
        if sites and ref is not None and r["regime"] != "detach":
            diff = collections.Counter(r["sites"])
            diff.subtract(ref["sites"])
            for site, n in sorted(diff.items(), key=lambda item: -abs(item[1])):
                if n:
                    print(f"      {n:+d} {site}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--formats", nargs="+", default=["thd", "bshd"], choices=["thd", "bshd"])
    p.add_argument("--regimes", nargs="+", default=None,
                   help="verl-mtp's regimes, a policy-loss one with _occ, any with _fused (use_fused_kernels); "
                   "default: every one")
    p.add_argument("--sites", action="store_true", help="list each added synchronisation's call site")
    p.add_argument("--json", help="also write the counts (with their sites) to this file")
    p.add_argument("--model-root", default=None, help="where the tiny MiMo models are written (default: a temp dir)")
    args = p.parse_args(argv)

    from verl_cpu.environment import cpu_process_env

    os.environ.update(cpu_process_env(one_rank=True))
    import verl  # noqa: F401  (the CPU platform, then the entry-point plugins)

    args.regimes = args.regimes or every_regime()
    for name in args.regimes:
        regime_overrides(name)  # an unknown name fails here, before any model is built
    if "detach" not in args.regimes:
        args.regimes.insert(0, "detach")

    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.heads, args.formats, args.regimes, args.model_root or tmp)
    report(rows, args.sites)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
