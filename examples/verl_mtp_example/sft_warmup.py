"""SFT warm-up of the tiny MiMo model, MTP heads included, with verl's real SFT trainer on CPU.

Why: the tiny model of :mod:`.tiny_model` starts from random weights and almost never emits "digits, then
EOS", so every GRPO group has zero reward variance and RL has nothing to learn from. A short SFT on the
arithmetic task (the same prompts, chat template and tokenizer as the RL run) gives it a partial skill, so the
RL curve that follows can actually move (README: how much). The MTP heads are trained jointly with
Megatron's MTP cross-entropy (verl-mtp's ``ce`` regime: verl's own MTP support, the lm_head kept off it on every
megatron-core version), as MiMo's pre-training does, so they start RL as working drafters.

What runs: ``verl.trainer.sft_trainer.SFTTrainer`` (verl's engine-based SFT trainer) on the example's config
``config/sft_warmup.yaml``: verl's ``sft_trainer_engine`` with the Megatron engine and optimizer and the CPU
platform's engine group (``verl_cpu/config/cpu_engine``); its data is verl's ``MultiTurnSFTDataset`` on a
``messages`` parquet; its checkpoint manager exports the HF weights through the bridge
(``checkpoint.save_contents=[model,hf_model]``), MTP layers included. The exported directory, completed
with ``configuration_mimo.py`` (remote-code config), is the RL run's ``actor_rollout_ref.model.path``.

Run (the launcher does this; a fresh process, because the CPU platform must be chosen before verl is
imported)::

    python -m verl_mtp_example.sft_warmup --model <tiny model dir> --train-file <dir>/sft.parquet \
        --out <hf out dir> --workdir <scratch dir> --steps 40

One thing is done here instead of in verl: the process group. verl 0.9.1's ``verl.trainer.sft_trainer.run_sft``
initialises it with ``verl.utils.distributed.initialize_global_process_group``, whose backend string names
the device type twice on the CPU platform (``"cpu:gloo,cpu:gloo"``), which torch rejects; the CPU plugin
patches only the Ray variant. So this module initialises a world-size-1 gloo group itself and then runs
``SFTTrainer(config).fit()``, which is the rest of ``run_sft``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from typing import Optional, Sequence

from verl_cpu.environment import cpu_process_env

CONFIG_MODULE = "verl_mtp_example.config"
CONFIG_NAME = "sft_warmup"


def _reexec_on_cpu(argv: list[str]) -> None:
    """``import verl`` picks the platform at import time: when this process was started without the CPU
    platform's environment (one rank of its own), start it again with it (same module, same arguments)."""
    env = cpu_process_env(one_rank=True)
    if any(os.environ.get(key) != value for key, value in env.items()):
        os.environ.update(env)
        os.execv(sys.executable, [sys.executable, "-m", __spec__.name, *argv])


def write_sft_dataset(path: str, n: int = 2048, seed: int = 0, max_operand: int = 9,
                      ops: Sequence[str] = ("+",)) -> str:
    """``n`` rows ``{"messages": [user question, assistant answer]}`` from the arithmetic task's own problem
    generator (split ``"sft"``, so a random stream different from the RL ``train``/``val`` splits)."""
    import pandas as pd

    from verl_mtp_example.arithmetic_task import make_rows

    rows = []
    for row in make_rows(n, seed, "sft", max_operand, ops):
        answer = row["reward_model"]["ground_truth"]
        rows.append({"messages": list(row["prompt"]) + [{"role": "assistant", "content": answer}]})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def sft_overrides(model: str, train_file: str, ckpt_dir: str, steps: int, batch_size: int = 32,
                  lr: float = 3e-3, mtp_scale: float = 0.3, seed: int = 0) -> list[str]:
    """The warm-up's per-run values on top of ``config/sft_warmup.yaml``."""
    return [
        f"data.train_files={train_file}",
        f"data.train_batch_size={batch_size}",
        f"data.micro_batch_size_per_gpu={batch_size}",
        f"model.path={model}",
        f"model.mtp.mtp_loss_scaling_factor={mtp_scale}",
        f"engine.seed={seed}",
        f"optim.lr={lr}",
        f"trainer.seed={seed}",
        f"trainer.total_training_steps={steps}",
        f"trainer.default_local_dir={ckpt_dir}",
    ]


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return compose(config_name=CONFIG_NAME, overrides=overrides)


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


def _loss_summary(metrics_file: str) -> dict:
    """First and last SFT loss and MTP-1 cross-entropy from verl's file-logger output."""
    losses = []
    with open(metrics_file) as f:
        for line in f:
            data = json.loads(line).get("data", {})
            if "train/loss" in data:
                losses.append((data["train/loss"], data.get("mtp_losses/mtp_1_loss")))
    first, last = (losses[0], losses[-1]) if losses else ((None, None), (None, None))
    return {"loss_first": first[0], "loss_last": last[0], "mtp_1_ce_first": first[1], "mtp_1_ce_last": last[1]}


def run_sft_warmup(model: str, train_file: str, out_dir: str, workdir: str, steps: int = 40,
                   batch_size: int = 32, lr: float = 3e-3, mtp_scale: float = 0.3, seed: int = 0,
                   extra_overrides: Optional[list[str]] = None) -> dict:
    """In this process: verl's SFTTrainer for ``steps`` steps, then export to ``out_dir``. Returns a summary
    (first/last loss, seconds). The CPU platform's environment must be set before verl is imported
    (:func:`main` does)."""
    import torch

    import verl  # noqa: F401  (loads the CPU plugin named in VERL_USE_EXTERNAL_MODULES)

    ckpt_dir = os.path.join(workdir, "sft_ckpt")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    metrics_file = os.path.join(workdir, "sft_metrics.jsonl")
    os.environ["VERL_FILE_LOGGER_PATH"] = metrics_file
    config = compose_config(sft_overrides(model, train_file, ckpt_dir, steps, batch_size, lr, mtp_scale, seed)
                            + list(extra_overrides or []))
    torch.manual_seed(seed)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo", rank=0, world_size=1)
    from verl.trainer.sft_trainer import SFTTrainer

    t0 = time.time()
    SFTTrainer(config=config).fit()
    seconds = time.time() - t0
    export_hf(ckpt_dir, steps, model, out_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {"steps": steps, "seconds": round(seconds, 1), "out_dir": out_dir, **_loss_summary(metrics_file)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _reexec_on_cpu(argv)
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
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides of config/sft_warmup.yaml")
    args = ap.parse_args(argv)
    summary = run_sft_warmup(args.model, args.train_file, args.out, args.workdir, args.steps, args.batch_size,
                             args.lr, args.mtp_scale, args.seed, args.overrides)
    with open(os.path.join(args.out, "sft_warmup.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[sft_warmup] done: {json.dumps(summary)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
