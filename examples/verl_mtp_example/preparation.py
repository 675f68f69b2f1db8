"""What a run trains on, built once and cached: the tiny model, the task's data, the SFT'd model.

Every directory is a pure function of the arguments in its name and is built under a temporary name and
renamed when complete, so an interrupted preparation is rebuilt and a finished one is reused by every later
run with the same settings (all runs of the regime study, ``scripts/run_study.sh``, share one).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from verl_mtp_example import metrics_view as mv
from verl_mtp_example.progress import log

N_TRAIN, N_VAL, N_SFT = 2048, 64, 4096


@dataclass
class SftSettings:
    steps: int = 100
    lr: float = 3e-3
    batch: int = 32


class PreparationError(RuntimeError):
    """A preparation stage failed; the message says which and where its log is."""


def _atomic_dir(path: str, build: Callable[[str], object]) -> str:
    """Build ``path`` with ``build(tmp_dir)`` unless it exists complete (marker ``.done``)."""
    if os.path.exists(os.path.join(path, ".done")):
        return path
    tmp = path.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    build(tmp)
    open(os.path.join(tmp, ".done"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _write_data(out_dir: str, seed: int, max_operand: int) -> None:
    from verl_mtp_example.arithmetic_task import write_dataset
    from verl_mtp_example.sft_warmup import write_sft_dataset

    write_dataset(out_dir, n_train=N_TRAIN, n_val=N_VAL, seed=seed, max_operand=max_operand)
    write_sft_dataset(os.path.join(out_dir, "sft.parquet"), n=N_SFT, seed=seed, max_operand=max_operand)


def _run_sft_warmup(base: str, data: str, sft_dir: str, sft: SftSettings, seed: int, env: Optional[dict],
                    log_file: Optional[str]) -> dict:
    """The warm-up in a fresh process (the CPU platform is chosen before verl is imported there)."""
    cmd = [sys.executable, "-m", "verl_mtp_example.sft_warmup", "--model", base,
           "--train-file", os.path.join(data, "sft.parquet"), "--out", sft_dir, "--workdir", sft_dir + ".work",
           "--steps", str(sft.steps), "--lr", str(sft.lr), "--batch-size", str(sft.batch), "--seed", str(seed)]
    with open(log_file or os.devnull, "a") as out:
        out.write(f"\n===== SFT warm-up: {shlex.join(cmd)}\n")
        out.flush()
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise PreparationError(f"SFT warm-up failed (exit {rc}); see {log_file}")
    shutil.rmtree(sft_dir + ".work", ignore_errors=True)
    with open(os.path.join(sft_dir, "sft_warmup.json")) as f:
        return json.load(f)


def _sft_model(prep_dir: str, base: str, data: str, mtp_layers: int, seed: int, max_operand: int,
               sft: SftSettings, env: Optional[dict], log_file: Optional[str]) -> str:
    name = f"sft_k{mtp_layers}_s{seed}_op{max_operand}_n{sft.steps}_lr{sft.lr:g}_b{sft.batch}"
    sft_dir = os.path.join(prep_dir, name)
    if os.path.exists(os.path.join(sft_dir, "sft_warmup.json")):
        log(f"SFT warm-up: cached {sft_dir}")
        return sft_dir
    log(f"SFT warm-up: {sft.steps} steps of verl's SFT trainer (Megatron engine, MTP CE on) -> {sft_dir}")
    t0 = time.time()
    info = _run_sft_warmup(base, data, sft_dir, sft, seed, env, log_file)
    log(f"SFT warm-up done in {time.time() - t0:.0f}s: loss {mv.fmt_num(info.get('loss_first'))} -> "
        f"{mv.fmt_num(info.get('loss_last'))}, MTP-1 CE {mv.fmt_num(info.get('mtp_1_ce_first'))} -> "
        f"{mv.fmt_num(info.get('mtp_1_ce_last'))}")
    return sft_dir


def prepare(prep_dir: str, mtp_layers: int = 1, seed: int = 0, sft: Optional[SftSettings] = None,
            max_operand: int = 9, env: Optional[dict] = None, log_file: Optional[str] = None) -> dict:
    """Base model, data and (``sft.steps > 0``) the SFT'd model under ``prep_dir``; returns their paths
    (``model`` is the one RL starts from)."""
    from verl_mtp_example.tiny_model import make_tiny_mimo

    sft = sft or SftSettings()
    os.makedirs(prep_dir, exist_ok=True)
    base = _atomic_dir(os.path.join(prep_dir, f"model_k{mtp_layers}_s{seed}"),
                       lambda d: make_tiny_mimo(d, num_mtp_layers=mtp_layers, seed=seed))
    data = _atomic_dir(os.path.join(prep_dir, f"data_s{seed}_op{max_operand}"),
                       lambda d: _write_data(d, seed, max_operand))
    paths = {"base_model": base, "data": data, "model": base, "sft": None}
    if sft.steps > 0:
        paths["model"] = paths["sft"] = _sft_model(prep_dir, base, data, mtp_layers, seed, max_operand, sft, env,
                                                   log_file)
    return paths
