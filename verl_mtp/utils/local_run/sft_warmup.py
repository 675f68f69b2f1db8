"""SFT warm-up of the tiny MiMo model, MTP heads included, with verl's real SFT trainer on CPU.

Why: the tiny model of :mod:`.tiny_model` starts from random weights and almost never emits "digits, then
EOS", so every GRPO group has zero reward variance and RL has nothing to learn from. A short SFT on the
arithmetic task (the same prompts, chat template and tokenizer as the RL run) gives it a partial skill
(about 10-20 % exact answers when sampled at temperature 1 after 40 steps), so the RL curve that follows can
actually move. The MTP heads are trained jointly with Megatron's MTP cross-entropy (verl's own MTP support:
``model.mtp.enable_train=True``), as MiMo's pre-training does, so they start RL as working drafters.

What runs: ``verl.trainer.sft_trainer.SFTTrainer`` (verl's engine-based SFT trainer) with the Megatron engine
(``engine=megatron optim=megatron``), the CPU platform of :mod:`verl_mtp.utils.cpu` and the same Megatron
overrides as the RL run; its data is ``verl.utils.dataset.multiturn_sft_dataset.MultiTurnSFTDataset`` on a
``messages`` parquet; its checkpoint manager exports the HF weights through the bridge
(``checkpoint.save_contents=[model,hf_model]``), MTP layers included. The exported directory, completed
with ``configuration_mimo.py`` (remote-code config), is the RL run's ``actor_rollout_ref.model.path``.

Run (the launcher does this; a fresh process, because the CPU platform must be chosen before verl is
imported)::

    python -m verl_mtp.utils.local_run.sft_warmup --model <tiny model dir> --data <dir> --out <hf out dir> \
        --workdir <scratch dir> --steps 40

One thing is done here instead of in verl: the process group. verl's ``run_sft`` calls
``verl.utils.distributed.initialize_global_process_group``, whose backend string is
``f"cpu:gloo,{get_device_name()}:{nccl}"`` = ``"cpu:gloo,cpu:gloo"`` on the CPU platform, which torch rejects
("ValueError: Duplicate device type cpu in backend string"); the CPU plugin patches only the Ray variant. So
this module initialises a world-size-1 gloo group itself and then runs ``SFTTrainer(config).fit()``, which
is the rest of ``run_sft``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import sys
import time
from typing import Optional, Sequence

__all__ = ["write_sft_dataset", "megatron_cpu_overrides", "sft_overrides", "run_sft_warmup", "main"]

CPU_PLUGIN = "verl_mtp.utils.cpu.plugin"


def _cpu_env_missing() -> bool:
    mods = os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",")
    return os.environ.get("VERL_PLATFORM") != "cpu" or CPU_PLUGIN not in mods


def _reexec_with_cpu_env(module: str, argv: list[str]) -> None:
    """``import verl_mtp`` imports verl, which picks its platform at import time: when this process was
    started without the CPU platform selected, start it again with it (same module, same arguments)."""
    if _cpu_env_missing():
        _cpu_env()
        os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def _cpu_env() -> None:
    """Select the CPU platform (before verl is imported) and a world-size-1 torch.distributed env."""
    os.environ["VERL_PLATFORM"] = "cpu"
    mods = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if CPU_PLUGIN not in mods:
        os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join([CPU_PLUGIN] + mods)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "CUDA_DEVICE_MAX_CONNECTIONS": "1"}.items():
        os.environ.setdefault(key, value)


def write_sft_dataset(path: str, n: int = 2048, seed: int = 0, max_operand: int = 9,
                      ops: Sequence[str] = ("+",)) -> str:
    """``n`` rows ``{"messages": [user question, assistant answer]}`` from the arithmetic task's own problem
    generator (split ``"sft"``, so a random stream different from the RL ``train``/``val`` splits)."""
    import pandas as pd

    from verl_mtp.utils.local_run.arithmetic_task import make_rows

    rows = []
    for row in make_rows(n, seed, "sft", max_operand, ops):
        answer = row["reward_model"]["ground_truth"]
        rows.append({"messages": list(row["prompt"]) + [{"role": "assistant", "content": answer}]})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def megatron_cpu_overrides(prefix: str) -> list[str]:
    """Megatron-Core settings that the CPU platform needs (no TransformerEngine, no fused CUDA kernels);
    ``prefix`` is the engine config node (``engine`` for SFT, ``actor_rollout_ref.actor.megatron`` for RL)."""
    tc = f"++{prefix}.override_transformer_config"
    return [
        f"{prefix}.dtype=bfloat16",  # verl's Megatron engine accepts bf16/fp16 only
        f"{prefix}.use_mbridge=True",
        f"{prefix}.vanilla_mbridge=True",
        f"{prefix}.tensor_model_parallel_size=1",
        f"{prefix}.pipeline_model_parallel_size=1",
        f"{tc}.use_cpu_initialization=True",
        f"{tc}.attention_backend=local",
        f"{tc}.gradient_accumulation_fusion=False",
        f"{tc}.bias_activation_fusion=False",
        f"{tc}.bias_dropout_fusion=False",
        f"{tc}.masked_softmax_fusion=False",
        f"{tc}.apply_rope_fusion=False",
        f"{tc}.persist_layer_norm=False",
    ]


def sft_overrides(model: str, train_file: str, ckpt_dir: str, steps: int, batch_size: int = 32,
                  lr: float = 3e-3, mtp_scale: float = 0.3, seed: int = 0) -> list[str]:
    """Hydra overrides of verl's ``sft_trainer_engine`` config for the warm-up."""
    return [
        "engine=megatron",
        "optim=megatron",
        f"data.train_files={train_file}",
        f"data.train_batch_size={batch_size}",
        f"data.micro_batch_size_per_gpu={batch_size}",
        "data.use_dynamic_bsz=False",
        "data.num_workers=0",
        "data.max_length=64",
        # our chat template starts every rendering with BOS, so the per-turn concatenation the dataset
        # builds differs from rendering all messages at once; the concatenation is the right sequence
        "data.ignore_input_ids_mismatch=True",
        f"model.path={model}",
        "model.trust_remote_code=True",
        "model.external_lib=verl_mtp.utils.local_run",
        "model.use_remove_padding=True",
        "model.enable_gradient_checkpointing=False",
        "model.mtp.enable=True",
        "model.mtp.enable_train=True",
        f"model.mtp.mtp_loss_scaling_factor={mtp_scale}",
        *megatron_cpu_overrides("engine"),
        f"engine.seed={seed}",
        f"optim.lr={lr}",
        "optim.lr_warmup_steps=0",
        "trainer.device=cpu",
        f"trainer.seed={seed}",
        f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=1000",
        "trainer.logger=[console,file]",  # file: VERL_FILE_LOGGER_PATH (set by run_sft_warmup)
        f"trainer.default_local_dir={ckpt_dir}",
        "trainer.save_freq=-1",  # the trainer always saves after the last step
        "trainer.resume_mode=disable",
        "trainer.project_name=verl_mtp_local",
        "trainer.experiment_name=sft_warmup",
        "checkpoint.save_contents=[model,hf_model]",
    ]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="sft_trainer_engine", overrides=overrides)


def export_hf(ckpt_dir: str, steps: int, base_model: str, out_dir: str) -> str:
    """Copy the bridge-exported HF model of the last SFT checkpoint to ``out_dir``, plus the remote-code
    config file of the base model (verl's HF export writes config.json with ``auto_map`` but not the file)."""
    src = os.path.join(ckpt_dir, f"global_step_{steps}", "model", "huggingface")
    if not glob.glob(os.path.join(src, "*.safetensors")):
        raise FileNotFoundError(f"SFT warm-up: no HF weights exported under {src}")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for name in ("configuration_mimo.py",):
        if os.path.exists(os.path.join(base_model, name)):
            shutil.copyfile(os.path.join(base_model, name), os.path.join(tmp, name))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def run_sft_warmup(model: str, train_file: str, out_dir: str, workdir: str, steps: int = 40,
                   batch_size: int = 32, lr: float = 3e-3, mtp_scale: float = 0.3, seed: int = 0,
                   extra_overrides: Optional[list[str]] = None) -> dict:
    """In this process: verl's SFTTrainer for ``steps`` steps, then export to ``out_dir``. Returns a summary
    (first/last loss, seconds). Call :func:`_cpu_env` before verl is imported (``main`` does)."""
    import torch

    import verl  # noqa: F401  (loads the CPU plugin named in VERL_USE_EXTERNAL_MODULES)

    ckpt_dir = os.path.join(workdir, "sft_ckpt")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    metrics_file = os.path.join(workdir, "sft_metrics.jsonl")
    os.environ["VERL_FILE_LOGGER_PATH"] = metrics_file
    config = _compose(sft_overrides(model, train_file, ckpt_dir, steps, batch_size, lr, mtp_scale, seed)
                      + list(extra_overrides or []))
    torch.manual_seed(seed)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo", rank=0, world_size=1)
    from verl.trainer.sft_trainer import SFTTrainer

    t0 = time.time()
    trainer = SFTTrainer(config=config)
    trainer.fit()
    seconds = time.time() - t0
    export_hf(ckpt_dir, steps, model, out_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    losses = []
    with open(metrics_file) as f:
        for line in f:
            data = json.loads(line).get("data", {})
            if "train/loss" in data:
                losses.append((data["train/loss"], data.get("mtp_losses/mtp_1_loss")))
    return {"steps": steps, "seconds": round(seconds, 1), "out_dir": out_dir,
            "loss_first": losses[0][0] if losses else None, "loss_last": losses[-1][0] if losses else None,
            "mtp_1_ce_first": losses[0][1] if losses else None, "mtp_1_ce_last": losses[-1][1] if losses else None}


def main(argv=None) -> int:
    _reexec_with_cpu_env("verl_mtp.utils.local_run.sft_warmup", sys.argv[1:] if argv is None else list(argv))
    _cpu_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="tiny MiMo HF dir (make_tiny_mimo)")
    ap.add_argument("--train-file", required=True, help="messages parquet (write_sft_dataset)")
    ap.add_argument("--out", required=True, help="where the SFT'd HF model directory goes")
    ap.add_argument("--workdir", required=True, help="scratch dir for verl's SFT checkpoint")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mtp-scale", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides of sft_trainer_engine")
    args = ap.parse_args(argv)
    summary = run_sft_warmup(args.model, args.train_file, args.out, args.workdir, args.steps, args.batch_size,
                             args.lr, args.mtp_scale, args.seed, args.overrides)
    with open(os.path.join(args.out, "sft_warmup.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[sft_warmup] done: {json.dumps(summary)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
