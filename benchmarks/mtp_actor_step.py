"""Actor-update cost of each MTP regime against ``detach``, measured in one run.

One actor micro-batch step = model forward with the regime's MTP patch (verl's for ``detach``/``ce``, ours for
``rl``), the main head scored as the engine's logits processor scores it (verl's processor on the fp32 logits
Megatron's ``Float16Module`` hands it; for a ``*_fused`` regime, verl's ``use_fused_kernels=True``, the chunked
function on the captured hidden states), verl's ``ppo_loss`` (plus the MTP policy term for ``rl``), backward. All regimes live in one process,
each on its own copy of the same model, and their steps are interleaved round by round (each round starting
with another regime), so a drift of the machine's speed hits every regime alike. A regime's time is read as
its ratio over ``detach`` within each round: printed are the median ratio, its interquartile range and a
bootstrap 95 % interval of the median, flagged when that interval holds 1.0 (the spread exceeds the effect).

Memory is the peak of live tensor bytes during a step, tracked exactly at the operator level (every storage an
operator allocates counts until it is freed; a view or in-place result of an existing tensor, such as a weight's
transpose, allocates nothing), so it does not depend on the allocator or on other processes.

Printed, one ratio per line: step time and peak tensor memory of each regime over ``detach`` at the same size,
and the share of the ``rl_occ`` step spent in OCC (its statistics and lambda). ``rl_occ_gradient`` is the exact
estimator (``occ.estimator=gradient``): the passes the engine adds (the RL loss alone, then each head's
unit-coefficient MTP loss alone, each forward + backward, the trunk-gradient inner products) before the step
with the resulting lambda; its ratio over ``rl_occ`` is printed too.

With ``--syncs`` each regime's step is also counted for host synchronisations
(:class:`verl_cpu.testing.host_syncs.HostSyncCounter`), and on CUDA the profiler's ``cudaStreamSynchronize`` calls of
the same step are printed beside the count, so the CPU count can be checked against what the device does.

    python -m benchmarks.mtp_actor_step                                   # CPU default sizes
    python -m benchmarks.mtp_actor_step --vocab 151936 --seq 4096 --hidden 1024 --layers 8
    python -m benchmarks.mtp_actor_step --device cuda --vocab 151936 --seq 4096 --hidden 2048 --layers 16 --syncs

On CPU the model is a real Megatron-Core GPTModel with MTP heads (local layer spec, fp32) built by
``verl_cpu.testing`` with the CPU platform's own mechanism; on CUDA a bf16 GPTModel (Megatron's ``Float16Module``)
with TransformerEngine's layer spec when it imports, the local spec otherwise (said in the header line). Memory
is the exact peak of live tensor bytes on CPU and the allocator's peak (``max_memory_allocated``) on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import random
import statistics
import time
import weakref
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FUSED = "_fused"  # suffix: the regime with verl's use_fused_kernels=True (the main head scored in chunks)
REGIMES = (
    "detach", "ce", "rl", "rl_occ", "rl_materialised", "rl_occ_gradient",
    *(f"{regime}{FUSED}" for regime in ("detach", "ce", "rl", "rl_occ")),
)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, counting every storage an operator allocates."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.is_nested:
            return
        storage = t.untyped_storage()
        key = storage._cdata  # the storage object itself: fake tensors (mtp_flops) have no data pointer
        if key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def release(key=key, size=size):
            self._seen.discard(key)
            self.live -= size

        weakref.finalize(storage, release)

    def _track_allocated(self, ins, outs) -> None:
        """Count the outputs that hold a storage none of the inputs holds: a view or an in-place result of a
        tensor allocated before (a parameter's ``t()``) allocates nothing."""
        held = {t.untyped_storage()._cdata for t in ins if isinstance(t, torch.Tensor) and not t.is_nested}
        for t in outs:
            if isinstance(t, torch.Tensor) and not t.is_nested and t.untyped_storage()._cdata not in held:
                self._track(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._track_allocated(tree_leaves((args, kwargs)), tree_leaves(out))
        return out


def base_ppo_loss():
    """verl's ``ppo_loss`` with the project's default actor config, as the worker installs it."""
    from hydra import compose, initialize_config_module

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils.losses import ppo_loss

    with initialize_config_module(config_module="verl_mtp.trainer.config", version_base=None):
        cfg = compose("mtp_ppo_megatron_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"])
    return partial(ppo_loss, config=omega_conf_to_dataclass(cfg.actor_rollout_ref.actor))


class RegimeHooks(NamedTuple):
    """What a regime installed on the model that the step reads after the forward."""

    rl_postprocess: object  # the rl postprocess (None for detach / ce)
    main_head: object  # the main-head capture of a ``*_fused`` regime (None: verl's logits)


def patch_regime(model, regime: str, chunk: int, base_loss):
    """Install ``regime``'s MTP patch on ``model`` (verl's for detach/ce, ours for rl), as the engine does at
    start-up, and for ``*_fused`` the main-head capture of ``use_fused_kernels=True``.

    Returns the :class:`RegimeHooks` and the regime's loss.
    """
    from verl_mtp.models.mcore.main_head_scoring import MainHeadCapture

    fused = regime.endswith(FUSED)
    rl_postprocess, loss = _patch_mtp(model, regime.removesuffix(FUSED), chunk, base_loss)
    return RegimeHooks(rl_postprocess, MainHeadCapture(chunk).patch(model) if fused else None), loss


def _patch_mtp(model, regime: str, chunk: int, base_loss):
    """The regime's MTP patches; returns its RL postprocess (``None`` for detach / ce) and its loss."""
    from verl.utils.megatron_utils import patch_engine_mtp
    from verl_mtp.models.mcore.mcore_compat import keep_mtp_ce_off_lm_head
    from verl_mtp.models.mcore.mtp_patch import patch_postprocess_rl
    from verl_mtp.trainer.ppo.mtp_occ import OCCState
    from verl_mtp.workers.config import MtpRLConfig, OCCConfig
    from verl_mtp.workers.utils.losses import with_mtp_policy_loss

    mtp_cfg = MtpRLConfig(
        enable=True,
        enable_train=True,
        detach_encoder=regime == "detach",
        mtp_loss_type="rl" if regime.startswith("rl") else regime,
        occ=OCCConfig(
            enable=regime.startswith("rl_occ"), estimator="gradient" if regime == "rl_occ_gradient" else "proxy"
        ),
        logprob_chunk_size=0 if regime == "rl_materialised" else chunk,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # verl's patch prints the whole module
        patch_engine_mtp(model, type("ModelConfig", (), {"mtp": mtp_cfg})())
    if not mtp_cfg.is_rl:  # what the engine does for verl's own MTP cross-entropy
        keep_mtp_ce_off_lm_head(model)
        return None, base_loss
    hook = patch_postprocess_rl(model, logprob_chunk_size=mtp_cfg.logprob_chunk_size)
    if mtp_cfg.occ.estimator == "gradient":
        return hook, GradientRegimeLoss(base_loss, mtp_cfg)
    return hook, with_mtp_policy_loss(base_loss, mtp_cfg, OCCState(mtp_cfg.occ))


class GradientRegimeLoss:
    """The losses of ``rl_occ_gradient``: one per estimator pass, then the full loss with the lambdas."""

    def __init__(self, base_loss, mtp_cfg):
        from verl_mtp.trainer.ppo.mtp_occ import OCCState
        from verl_mtp.workers.utils.losses import mtp_head_only_loss, with_mtp_policy_loss

        self.base_loss, self.mtp_cfg, self.state = base_loss, mtp_cfg, OCCState(mtp_cfg.occ)
        self.head_loss = partial(mtp_head_only_loss, base_loss, mtp_cfg)
        self.full_loss = partial(with_mtp_policy_loss, base_loss, mtp_cfg, self.state)

    def step(self, model, run_pass, num_heads: int) -> None:
        """What the engine does on a gradient-estimator update, for one micro-batch."""
        from verl_mtp.trainer.ppo.mtp_occ_gradient import (
            GradientSnapshot,
            gradient_occ,
            head_products,
            shared_trunk_parameters,
        )

        params = shared_trunk_parameters([model], self.mtp_cfg.train_lm_head)
        model.zero_grad(set_to_none=True)
        run_pass(self.base_loss)
        rl, per_head = GradientSnapshot.take(params), []
        for k in range(1, num_heads + 1):
            model.zero_grad(set_to_none=True)
            run_pass(self.head_loss(k))
            per_head.append(head_products(rl, params))
        occ = self.mtp_cfg.occ
        lam, _ = gradient_occ(per_head).lambdas(occ.lambda_plus_gradient, occ.eps, occ.max_abs_lambda)
        model.zero_grad(set_to_none=True)
        run_pass(self.full_loss(lam))


def build_cuda_gpt(args, seed: int = 0):
    """A bf16 GPTModel with MTP heads on the current CUDA device; its layer spec's name.

    Single-process NCCL and Megatron's parallel state are set up once. TransformerEngine's layer spec when TE
    imports, the local spec otherwise (megatron-core 0.19's TE spec getter raises ``TypeError`` without TE).
    """
    import importlib.util

    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not dist.is_initialized():
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    use_te = importlib.util.find_spec("transformer_engine") is not None
    spec = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec() if use_te
            else gpt_layer_specs.get_gpt_layer_local_spec())
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=max(args.hidden // 128, 1),
        mtp_num_layers=args.heads, bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0,
        attention_dropout=0.0, add_bias_linear=False, gradient_accumulation_fusion=False,
    )
    mtp_spec = gpt_layer_specs.get_gpt_mtp_block_spec(config, spec, use_transformer_engine=use_te)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope", mtp_block_spec=mtp_spec)
    return Float16Module(config, model.cuda()), "TransformerEngine" if use_te else "local (no TransformerEngine)"


def build_model(args):
    """The benchmark's model on ``args.device``: tiny-GPT builder on CPU (fp32), :func:`build_cuda_gpt` on CUDA."""
    if args.device == "cuda":
        return build_cuda_gpt(args)[0]
    from verl_cpu.testing import build_tiny_gpt

    return build_tiny_gpt(
        args.heads, vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), seq_len=args.seq, seed=0,
    )


def build_regimes(args):
    base_loss = base_ppo_loss()
    regimes = {}
    for regime in args.regimes:
        model = build_model(args)
        regimes[regime] = (model, *patch_regime(model, regime, args.chunk, base_loss))
    return regimes


def main_head_scores(logits, labels, temperature, main_head) -> dict:
    """The main head as the engine's logits processor scores it: verl's processor on the (fp32) logits, or with
    a main-head capture (``use_fused_kernels``) the chunked function on the captured hidden states."""
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead
    from verl_mtp.workers.engine.megatron import mtp_engine_hooks
    from verl_mtp.workers.engine.megatron.mtp_engine_state import MtpEngineState

    flags = dict(
        calculate_sum_pi_squared=False, calculate_entropy=False, distillation_use_topk=False, distillation_only=False,
        logits_processor_func=None,
    )
    if main_head is not None:
        engine = SimpleNamespace(mtp_state=MtpEngineState(main_head_capture={"model": main_head}))
        return mtp_engine_hooks.fused_main_head_scores(engine, labels, temperature, **flags)
    verl_engine = SimpleNamespace(engine_config=SimpleNamespace(entropy_from_logits_with_chunking=False))
    return MegatronEngineWithLMHead._lm_head_logits_processor(
        verl_engine, logits, labels, temperature, batch=None, data_format="bshd", **flags
    )


def make_step(args, model, hooks: RegimeHooks, loss_fn, data):
    """One actor micro-batch step of a regime, with what it installed (``hooks``)."""
    from verl_cpu.testing import causal_attention_mask, prepare_mtp_loss_tracker
    from verl_mtp.models.mcore.mtp_alignment import align_mtp_outputs
    from verl_mtp.models.mcore.mtp_head_labels import bshd_sequence_ids, head_targets
    from verl_mtp.models.mcore.mtp_log_probs import score_mtp_heads

    ids = data["input_ids"].values()[None]
    labels = torch.roll(ids, -1, dims=1)
    pos = torch.arange(args.seq, device=ids.device)[None]
    mask = causal_attention_mask(1, args.seq, device=ids.device)
    offsets = data["input_ids"].offsets()

    def run_pass(loss_fn):
        prepare_mtp_loss_tracker(args.heads, device=ids.device)
        # fp32 logits, as Megatron's Float16Module hands them to verl (the model's own output is freed); under
        # use_fused_kernels an empty stand-in
        logits = model(ids, pos, mask, labels=labels).float()
        temperature = torch.ones_like(labels, dtype=torch.float32)
        log_probs = main_head_scores(logits, labels, temperature, hooks.main_head)["log_probs"]
        del logits
        output = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs[0], offsets=offsets)}
        mtp_out = hooks.rl_postprocess.pop_output() if hooks.rl_postprocess is not None else None
        if mtp_out is not None:
            targets = head_targets(data["input_ids"], bshd_sequence_ids(1, args.seq, ids.device), pos, args.heads)
            scored = score_mtp_heads(mtp_out, targets, temperature)
            output.update(align_mtp_outputs(
                {k: torch.nested.nested_tensor_from_jagged(v[0], offsets=offsets) for k, v in scored.items()}
            ))
        loss, _ = loss_fn(model_output=output, data=data)
        loss.backward()

    def step():
        if isinstance(loss_fn, GradientRegimeLoss):
            loss_fn.step(model, run_pass, args.heads)
        else:
            model.zero_grad(set_to_none=True)
            run_pass(loss_fn)

    return step


class _Clock:
    """Step timing and peak memory on the benchmark's device (CUDA: synchronised, the allocator's peak)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def time(self, step) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def peak(self, step) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        tracker = PeakTensorMemory()
        with tracker:
            step()
        return tracker.peak


def measure(args, vocab, seq):
    import verl_mtp.workers.utils.losses as losses_mod
    from verl_cpu.testing import make_actor_batch

    args = argparse.Namespace(**{**vars(args), "vocab": vocab, "seq": seq})
    regimes = build_regimes(args)
    prompt = seq // 4
    data = make_actor_batch([prompt], [seq - prompt], vocab_size=vocab, seed=0).to(args.device)
    steps = {name: make_step(args, *regime, data) for name, regime in regimes.items()}
    clock = _Clock(args.device)

    occ_time = []
    real_stats = losses_mod.occ_statistics

    def timed_stats(*a, **kw):
        t0 = time.perf_counter()
        out = real_stats(*a, **kw)
        occ_time.append(time.perf_counter() - t0)
        return out

    peaks = {name: clock.peak(step) for name, step in steps.items()}  # also the warm-up
    syncs = {name: count_syncs(step, args.device) for name, step in steps.items()} if args.syncs else {}
    times, occ_share = {name: [] for name in steps}, []
    losses_mod.occ_statistics = timed_stats
    names = list(steps)
    try:
        for round_index in range(args.repeats):
            # each round runs every regime once, starting with a different one, so order effects cancel
            for name in names[round_index % len(names):] + names[: round_index % len(names)]:
                occ_time.clear()
                times[name].append(clock.time(steps[name]))
                if name == "rl_occ" and not clock.cuda:  # host time of OCC's statistics (launches only on CUDA)
                    occ_share.append(sum(occ_time) / times[name][-1])
    finally:
        losses_mod.occ_statistics = real_stats
    return times, peaks, occ_share, syncs


def count_syncs(step, device: str) -> dict:
    """Host synchronisations of one step: the dispatcher-level count and, on CUDA, the profiler's
    ``cudaStreamSynchronize`` calls of the same step."""
    from verl_cpu.testing.host_syncs import HostSyncCounter

    with HostSyncCounter(device) as counter:
        step()
    out = {"counted": counter.total, "by_kind": counter.by_kind()}
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        out["cudaStreamSynchronize"] = sum(1 for e in prof.events() if e.name == "cudaStreamSynchronize")
    return out


@dataclasses.dataclass(frozen=True)
class RatioSpread:
    """A regime's step time over detach's, from the per-round ratios (same round = same machine state)."""

    median: float
    q1: float
    q3: float
    low: float  # 95 % bootstrap interval of the median
    high: float

    @classmethod
    def of(cls, times: list[float], base: list[float], resamples: int = 2000, seed: int = 0) -> "RatioSpread":
        ratios = [t / b for t, b in zip(times, base, strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        rng = random.Random(seed)
        boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
        return cls(statistics.median(ratios), q1, q3, boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1])

    @property
    def spread_exceeds_effect(self) -> bool:
        """The interval holds 1.0: these rounds cannot tell the regime from detach."""
        return self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        text = (f"{self.median:.3f}x (IQR {self.q1:.3f}-{self.q3:.3f}, "
                f"95% CI of the median {self.low:.3f}-{self.high:.3f})")
        return text + (" [spread exceeds the effect]" if self.spread_exceeds_effect else "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=1, help="number of MTP heads")
    p.add_argument("--chunk", type=int, default=1024, help="logprob_chunk_size of the chunked rl regimes")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median ratio is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    p.add_argument("--syncs", action="store_true", help="count each regime's host synchronisations of one step")
    args = p.parse_args(argv)
    if "detach" not in args.regimes:
        args.regimes.insert(0, "detach")
    return args


def report(args, vocab, seq, times, peaks, occ_share, syncs) -> None:
    where = f"vocab={vocab} seq={seq}"
    base_t, base_m = statistics.median(times["detach"]), peaks["detach"]
    print(f"{where} detach: step {base_t:.4f}s peak_mem {base_m / 2**20:.0f}MiB")
    for name in args.regimes:
        if name == "detach":
            continue
        spread = RatioSpread.of(times[name], times["detach"])
        line = f"{where} {name}/detach: step_time {spread} peak_mem {peaks[name] / base_m:.3f}x"
        if name == "rl_occ" and occ_share:
            line += f" occ_share {100 * statistics.median(occ_share):.3f}%"
        print(line, flush=True)
    if "rl_occ" in times and "rl_occ_gradient" in times:
        print(f"{where} rl_occ_gradient/rl_occ: step_time {RatioSpread.of(times['rl_occ_gradient'], times['rl_occ'])}")
    for name, count in syncs.items():
        device = f" cudaStreamSynchronize {count['cudaStreamSynchronize']}" if "cudaStreamSynchronize" in count else ""
        added = count["counted"] - syncs["detach"]["counted"]
        print(f"{where} {name}: host_syncs {count['counted']} ({added:+d} over detach){device} {count['by_kind']}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = ""
    if args.device == "cuda":
        spec = f", {torch.cuda.get_device_name()}, bf16"
    print(f"# model: hidden {args.hidden}, {args.layers} layers, {args.heads} MTP head(s); rl chunk {args.chunk}; "
          f"{args.device}{spec}; per-round ratios over {args.repeats} interleaved rounds: median, interquartile "
          f"range, bootstrap interval; memory = peak of one step")
    for vocab in list(args.vocab):
        for seq in list(args.seq):
            report(args, vocab, seq, *measure(args, vocab, seq))


if __name__ == "__main__":
    main()
