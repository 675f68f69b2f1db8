"""The main job's launcher run from a test, and what its runs leave behind (metrics, HF weights), for the e2e
tests of ``python -m verl_mtp_example.launch``."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from verl_mtp_example import launch
from verl_mtp_example.metrics_view import read_metrics

SFT_STEPS = "40"  # enough for bare-integer answers (non-zero, varied rewards)
RUN_TIMEOUT = "600"

# Greedy (top-k 1) rollouts with one sample per prompt make two runs see the same tokens (the hf_cpu rollout's
# sampling is not seeded per request); GRPO gives a single-sample group the advantage (score - 0) / 1, so the
# trunk still gets a real policy-gradient update.
SAME_ROLLOUTS = ("--steps", "2", "--batch", "8", "--n", "1", "--top-k", "1", "--lr-warmup-steps", "0")


def run_launcher(workdir, prep_dir, *args, overrides=()) -> dict:
    """One launch with the shared prepared model; its merged metrics by step. A failed launch fails the test
    with the tail of verl's log."""
    argv = ["--workdir", str(workdir), "--prep-dir", str(prep_dir), "--sft-steps", SFT_STEPS,
            "--timeout", RUN_TIMEOUT, *args]
    if overrides:
        argv += ["--", *overrides]
    rc = launch.main(argv)
    log = os.path.join(workdir, "train.log")
    if rc != 0 and os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = "".join(f.readlines()[-60:])
        pytest.fail(f"launcher exited {rc}; tail of {log}:\n{tail}")
    return read_metrics(os.path.join(workdir, "metrics.jsonl"))


def hf_weights(path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in ``path``, by HF name."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    assert files, f"no safetensors under {path}"
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def checkpoint_hf(workdir, step) -> dict[str, torch.Tensor]:
    """The HF export (through the bridge) of the actor's checkpoint at ``step``."""
    return hf_weights(os.path.join(workdir, "checkpoints", f"global_step_{step}", "actor", "model", "huggingface"))


def initial_hf(workdir) -> dict[str, torch.Tensor]:
    """The weights the run started from (the SFT warm-up's export)."""
    with open(os.path.join(workdir, "summary.json")) as f:
        return hf_weights(json.load(f)["paths"]["model"])


def is_mtp(name: str) -> bool:
    return ".mtp_layers." in name


def finite(metrics: dict, key: str) -> float:
    assert key in metrics, f"{key} not logged; logged: {sorted(k for k in metrics if k.startswith('actor/'))}"
    value = float(metrics[key])
    assert math.isfinite(value), f"{key} = {value}"
    return value


def changed(a: dict, b: dict, names) -> list[str]:
    """The names whose tensors differ between ``a`` and ``b``."""
    return [n for n in names if not torch.equal(a[n], b[n])]
