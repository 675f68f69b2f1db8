"""The GPU check's worker section: one real actor update through verl's worker, in-process, per regime.

verl's ``ActorRolloutRefWorker`` (as ``verl_cpu.engine_smoke`` builds it on CPU) is built for ``detach`` and for
``rl`` + OCC on a MiMo-style model written here (about 1.5B parameters on CUDA, tiny on CPU), and runs one actor
update on a synthetic batch. Checked per regime: the losses and (rl_occ) the MTP coefficient are finite, and both
a trunk weight and an MTP-layer weight changed. On CUDA the machine has no TransformerEngine: the model is built
through verl_cpu's local-spec bridges, placed on the GPU by mbridge (``verl_cpu.patches.MBRIDGE_BRIDGES_ON_GPU``), with
the project's torch attention for packed sequences, under verl's CUDA platform and single-process NCCL.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import socket
import tempfile

REGIMES = {
    "detach": [
        "actor_rollout_ref.model.mtp.detach_encoder=True",
        "actor_rollout_ref.model.mtp.mtp_loss_type=detach",
    ],
    "rl_occ": ["actor_rollout_ref.model.mtp.mtp_loss_type=rl", "actor_rollout_ref.model.mtp.occ.enable=True"],
}
LARGE = dict(hidden_size=2048, num_layers=16, num_attention_heads=16, num_key_value_heads=8,
             intermediate_size=5632, vocab_size=151936, max_position_embeddings=4096)
WATCHED = ("decoder.layers.0.mlp.linear_fc2.weight", "mtp.layers.0.eh_proj.weight")  # a trunk and an MTP weight


def _environment(cpu: bool) -> None:
    """Before verl is imported: a one-rank torch.distributed world; on CPU verl's CPU platform."""
    if cpu:
        from verl_cpu.environment import cpu_process_env

        os.environ.update(cpu_process_env(one_rank=True))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port, "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join(dict.fromkeys([*modules, "verl_mtp.plugin"]))


def _config(model_dir: str, regime: str, cpu: bool):
    from verl_cpu import engine_smoke

    overrides = [o for o in engine_smoke.default_overrides(model_dir, 4) if not o.startswith("trainer.device=")]
    overrides += [
        f"trainer.device={'cpu' if cpu else 'cuda'}",
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.trust_remote_code=True",
        "actor_rollout_ref.model.external_lib=verl_mtp_example",
        *REGIMES[regime],
    ]
    if not cpu:  # the Megatron-without-TransformerEngine settings of the group, on the GPU
        overrides.append("actor_rollout_ref.actor.megatron.override_transformer_config.use_cpu_initialization=False")
    return engine_smoke.compose_config("verl_mtp.trainer.config", "mtp_ppo_megatron_trainer", overrides)


def _watched(worker) -> dict:
    model = worker.actor.engine.module[0]
    params = {name.split("module.")[-1]: p for name, p in model.named_parameters()}
    return {name: params[name].detach().float().cpu().clone() for name in WATCHED}


def _one_update(model_dir: str, regime: str, cpu: bool) -> list[str]:
    """Build the worker, run one update; the result lines (raises on a failed check)."""
    from verl.utils import tensordict_utils as tu
    from verl_cpu import engine_smoke

    config = _config(model_dir, regime, cpu)
    with contextlib.redirect_stdout(io.StringIO()):
        worker = engine_smoke.build_actor(config)
    before = _watched(worker)
    tokenizer = worker.actor.engine.model_config.tokenizer
    data = engine_smoke.synthetic_update_batch(config, tokenizer, 4, prompt_len=16 if cpu else 128,
                                               resp_len=16 if cpu else 128, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = tu.get(worker.update_actor(data), "metrics")
    after = _watched(worker)
    lines = []
    keys = ["actor/pg_loss", *(["actor/mtp_pg_loss", "actor/mtp_1/coef_applied"] if regime != "detach" else [])]
    for key in keys:
        values = [float(v) for v in metrics[key]]
        assert values and all(math.isfinite(v) for v in values), f"{regime}: {key} = {values}"
        lines.append(f"check worker {regime}: {key} {values[0]:+.4g} finite ok")
    for name in WATCHED:
        change = (after[name] - before[name]).abs().max().item()
        assert math.isfinite(change) and change > 0, f"{regime}: {name} did not change ({change})"
        lines.append(f"check worker {regime}: {name} changed by up to {change:.2e} ok")
    del worker
    gc.collect()
    return lines


def worker_updates(cpu: bool) -> int:
    _environment(cpu)
    import torch

    import verl  # noqa: F401  (the platform and the engine plugins, now that the environment is set)
    from verl_cpu.patches import MBRIDGE_BRIDGES_ON_GPU
    from verl_mtp_example.tiny_model import make_tiny_mimo

    if not cpu:
        MBRIDGE_BRIDGES_ON_GPU.apply()
        print("# worker: local layer spec (no TransformerEngine), bf16, one rank", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        architecture = {} if cpu else dict(LARGE, dtype="bfloat16")
        model_dir = make_tiny_mimo(os.path.join(tmp, "mimo"), num_mtp_layers=1, **architecture)
        for regime in REGIMES:
            for line in _one_update(model_dir, regime, cpu):
                print(line, flush=True)
            if not cpu:
                torch.cuda.empty_cache()
    return 0
