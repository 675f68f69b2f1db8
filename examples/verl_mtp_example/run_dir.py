"""The launcher's work directory: what one run leaves there and how a new launch treats an earlier one.

``metrics.partN.jsonl`` is verl's file-logger output of the N-th launch in the directory (a resumed run is a
second launch), merged into ``metrics.jsonl``; ``checkpoints/`` is verl's ``trainer.default_local_dir``,
``rollouts/`` its ``trainer.rollout_data_dir``; ``updates.jsonl`` holds every update's ``actor/mtp_*`` values of
all launches (``--record-updates``; a resumed launch's later line for a step replaces the earlier one).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from typing import Optional

UPDATE_METRICS = "updates.jsonl"  # every update's actor/mtp_* values (launcher --record-updates)
RUN_FILES = ("checkpoints", "rollouts", "rollout_weights", "metrics.jsonl", UPDATE_METRICS, "curves.png",
             "summary.json", "command.txt", "train.log")
# verl's checkpoint manager writes the number of the last complete checkpoint here (trainer.default_local_dir)
LATEST_STEP_FILE = "latest_checkpointed_iteration.txt"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def metrics_parts(workdir: str) -> list[str]:
    """The per-launch metric files, in launch order."""
    parts = glob.glob(os.path.join(workdir, "metrics.part*.jsonl"))
    return sorted(parts, key=lambda p: int(p.rsplit("part", 1)[1].split(".")[0]))


def next_metrics_part(workdir: str) -> str:
    return os.path.join(workdir, f"metrics.part{len(metrics_parts(workdir)) + 1}.jsonl")


def set_aside_previous(workdir: str) -> Optional[str]:
    """Move an earlier run's files to ``<workdir>/previous/`` (replacing an older one there); return that
    directory, or None when there was nothing to move."""
    names = list(RUN_FILES) + [os.path.basename(p) for p in metrics_parts(workdir)]
    present = [n for n in names if os.path.exists(os.path.join(workdir, n))]
    if not present:
        return None
    dest = os.path.join(workdir, "previous")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for name in present:
        os.replace(os.path.join(workdir, name), os.path.join(dest, name))
    return dest


def checkpoint_step(path: str) -> Optional[int]:
    """N for a ``.../global_step_N`` directory, else None."""
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def latest_checkpoint_step(workdir: str) -> Optional[int]:
    """The step ``trainer.resume_mode=auto`` would resume from in this work directory, or None."""
    tracker = os.path.join(workdir, "checkpoints", LATEST_STEP_FILE)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit() or not os.path.isdir(os.path.join(workdir, "checkpoints", f"global_step_{text}")):
        return None
    return int(text)
