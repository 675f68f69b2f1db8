"""Smoke test of verl's *real* Megatron actor on CPU: one PPO actor update (``update_actor``) in-process.

Builds verl's ``ActorRolloutRefWorker(role="actor")`` from the project's Hydra config
(``verl_mtp/trainer/config/mtp_ppo_megatron_trainer.yaml``), which builds a ``TrainingWorker`` whose engine
comes from ``EngineRegistry`` (verl's Megatron LM engine, swapped for verl_mtp's by the verl_mtp plugin) with
``ppo_loss`` installed as its loss. Then feeds one synthetic batch shaped like ``RayPPOTrainer._update_actor``'s
(padded DataProto -> TensorDict -> ``left_right_2_no_padding`` + the same non-tensor keys) and prints the
metrics. World size 1, gloo, fp32, CPU platform from :mod:`verl_mtp.utils.cpu`.

Run::

    VERL_PLATFORM=cpu VERL_USE_EXTERNAL_MODULES=verl_mtp.utils.cpu.plugin \
        python -m verl_mtp.utils.cpu.engine_smoke --model /path/to/tiny_hf_model [hydra overrides...]

(the module sets both variables itself when they are missing, before importing verl.)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time


def _set_env():
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    mods = os.environ.get("VERL_USE_EXTERNAL_MODULES", "")
    if "verl_mtp.utils.cpu.plugin" not in mods.split(","):
        os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join(x for x in ["verl_mtp.utils.cpu.plugin", mods] if x)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                 "CUDA_DEVICE_MAX_CONNECTIONS": "1"}.items():
        os.environ.setdefault(k, v)


def default_overrides(model_path: str, batch: int) -> list[str]:
    return [
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.model.use_remove_padding=True",  # THD (verl default); False = BSHD, both work on CPU
        "actor_rollout_ref.actor.megatron.dtype=bfloat16",  # verl asserts bf16|fp16 (workers/config/engine.py:218)
        "actor_rollout_ref.actor.megatron.use_mbridge=True",
        "actor_rollout_ref.actor.megatron.vanilla_mbridge=True",
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1",
        "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1",
        "++actor_rollout_ref.actor.megatron.override_transformer_config.use_cpu_initialization=True",
        "++actor_rollout_ref.actor.megatron.override_transformer_config.attention_backend=local",
        "++actor_rollout_ref.actor.megatron.override_transformer_config.gradient_accumulation_fusion=False",
        "++actor_rollout_ref.actor.megatron.override_transformer_config.bias_activation_fusion=False",
        "++actor_rollout_ref.actor.megatron.override_transformer_config.bias_dropout_fusion=False",
        "++actor_rollout_ref.actor.megatron.override_transformer_config.masked_softmax_fusion=False",
        "++actor_rollout_ref.actor.megatron.override_transformer_config.apply_rope_fusion=False",
        "++actor_rollout_ref.actor.megatron.override_transformer_config.persist_layer_norm=False",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.use_dynamic_bsz=False",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.actor.optim.total_training_steps=100",  # the trainer injects this at runtime
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "trainer.device=cpu",
    ]


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl_mtp.trainer.config", version_base=None):
        return compose(config_name="mtp_ppo_megatron_trainer", overrides=overrides)


def synthetic_update_batch(config, tokenizer, batch: int, prompt_len: int = 8, resp_len: int = 8, seed: int = 0):
    """A padded batch with the keys ``RayPPOTrainer`` has before ``_update_actor`` (left-padded prompts,
    right-padded responses), converted the way ``_update_actor`` converts it."""
    import torch

    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id
    prompts = torch.full((batch, prompt_len), pad, dtype=torch.long)
    responses = torch.full((batch, resp_len), pad, dtype=torch.long)
    p_mask = torch.zeros(batch, prompt_len, dtype=torch.long)
    r_mask = torch.zeros(batch, resp_len, dtype=torch.long)
    for i in range(batch):
        pl = int(torch.randint(3, prompt_len + 1, (1,), generator=g))
        rl = int(torch.randint(2, resp_len + 1, (1,), generator=g))
        prompts[i, prompt_len - pl:] = torch.randint(4, vocab, (pl,), generator=g)
        p_mask[i, prompt_len - pl:] = 1
        responses[i, :rl] = torch.randint(4, vocab, (rl,), generator=g)
        r_mask[i, :rl] = 1
    input_ids = torch.cat([prompts, responses], dim=1)
    attention_mask = torch.cat([p_mask, r_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    old_log_probs = -2.0 + 0.1 * torch.randn(batch, resp_len, generator=g)
    advantages = torch.randn(batch, 1, generator=g).expand(batch, resp_len) * r_mask
    data = DataProto.from_dict(tensors={
        "prompts": prompts, "responses": responses, "input_ids": input_ids, "attention_mask": attention_mask,
        "position_ids": position_ids, "response_mask": r_mask, "old_log_probs": old_log_probs * r_mask,
        "advantages": advantages.contiguous(), "ref_log_prob": old_log_probs * r_mask,
    })
    data.meta_info["temperature"] = config.actor_rollout_ref.rollout.temperature
    data.meta_info["multi_turn"] = False
    td = left_right_2_no_padding(data.to_tensordict())
    mini = config.actor_rollout_ref.actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    tu.assign_non_tensor(
        td, calculate_entropy=True, distillation_use_topk=False, distillation_only=False,
        global_batch_size=mini, mini_batch_size=mini, epochs=1, seed=0,
        dataloader_kwargs={"shuffle": False}, compute_loss=True,
    )
    return td


def build_actor(config):
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = ActorRolloutRefWorker(config=config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def main(argv=None):
    _set_env()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="local HF model dir (tiny, fp32)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import verl  # noqa: F401  (loads the CPU plugin, then verl_mtp's)
    from verl.utils import tensordict_utils as tu

    config = compose_config(default_overrides(args.model, args.batch) + list(args.overrides))
    t0 = time.time()
    worker = build_actor(config)
    print(f"[engine_smoke] engine={type(worker.actor.engine).__name__} built in {time.time() - t0:.1f}s", flush=True)
    tokenizer = worker.actor.engine.model_config.tokenizer
    for step in range(args.steps):
        td = synthetic_update_batch(config, tokenizer, args.batch, seed=step)
        t0 = time.time()
        out = worker.update_actor(td)
        metrics = tu.get(out, "metrics")
        print(f"[engine_smoke] step {step} ({time.time() - t0:.1f}s):", flush=True)
        for k in sorted(metrics):
            print(f"    {k}: {metrics[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
