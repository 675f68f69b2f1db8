"""Smoke test of verl's *real* Megatron actor on CPU: one PPO actor update (``update_actor``) in-process.

Builds verl's ``ActorRolloutRefWorker(role="actor")`` from a verl trainer config (verl's own
``ppo_megatron_trainer`` by default, or any config that extends it, e.g. an extension's, with ``--config-module``
/ ``--config-name``) plus the Megatron-on-CPU group (``cpu_engine@actor_rollout_ref.actor.megatron: megatron``,
see ``verl_cpu/config``). The worker builds a ``TrainingWorker`` whose engine comes from ``EngineRegistry`` (the
CPU variant of whichever Megatron engine is registered for cuda) with ``ppo_loss`` installed as its loss. Then
it feeds synthetic batches shaped like ``RayPPOTrainer._update_actor``'s (padded DataProto -> TensorDict ->
``left_right_2_no_padding`` + the same non-tensor keys) and prints the metrics. World size 1, gloo, CPU.

Run::

    python -m verl_cpu.engine_smoke --model /path/to/tiny_hf_model [--config-module M --config-name N] [overrides]

(the module selects the CPU platform itself, :func:`verl_cpu.environment.cpu_process_env`, before importing verl.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def default_overrides(model_path: str, batch: int) -> list[str]:
    return [
        # replaces the primary config's own search path: a config that extends verl's needs verl's there too
        "hydra.searchpath=[pkg://verl.trainer.config,pkg://verl_cpu.config]",
        "+cpu_engine@actor_rollout_ref.actor.megatron=megatron",
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.model.use_remove_padding=True",  # THD (verl default); False = BSHD, both work on CPU
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


def compose_config(config_module: str, config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=config_module, version_base=None):
        return compose(config_name=config_name, overrides=overrides)


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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local HF model dir (tiny, fp32)")
    ap.add_argument("--config-module", default="verl.trainer.config", help="package holding the trainer config")
    ap.add_argument("--config-name", default="ppo_megatron_trainer", help="trainer config (extends verl's)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, applied after the defaults")
    return ap.parse_args(argv)


def main(argv=None):
    from verl_cpu.environment import cpu_process_env

    args = parse_args(argv)
    os.environ.update(cpu_process_env(one_rank=True))
    import verl  # noqa: F401  (loads the CPU plugin, then the entry-point plugins)
    from verl.utils import tensordict_utils as tu

    overrides = default_overrides(args.model, args.batch) + list(args.overrides)
    config = compose_config(args.config_module, args.config_name, overrides)
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
