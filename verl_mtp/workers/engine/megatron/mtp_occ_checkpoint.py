"""OCC's carried state in verl's actor checkpoint: one JSON file per rank, ``mtp_occ_state_rank{R}.json``.

Each rank carries its own lambdas (``occ.carry_last_lambda``; with ``occ.scope=micro_batch`` they differ between
data-parallel ranks), so a file belongs to the rank that wrote it and is only meaningful with the number of ranks
that wrote it. Both are recorded in the file; a resume with another number of ranks is refused rather than
dropping or handing out another rank's lambdas.
"""

from __future__ import annotations

import json
import os
import re

import torch

from verl_mtp.trainer.ppo.mtp_occ import OCCState

__all__ = ["save_occ_state_file", "load_occ_state_file"]

_FILE = re.compile(r"mtp_occ_state_rank(\d+)\.json")


def _file_name(rank: int) -> str:
    return f"mtp_occ_state_rank{rank}.json"


def save_occ_state_file(occ_state: OCCState, local_path: str) -> None:
    """This rank's OCC state, with the rank and the world size that wrote it."""
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    os.makedirs(local_path, exist_ok=True)
    with open(os.path.join(local_path, _file_name(rank)), "w") as f:
        json.dump({"world_size": world_size, "rank": rank, **occ_state.state_dict()}, f)


def load_occ_state_file(occ_state: OCCState, local_path: str) -> None:
    """This rank's OCC state from ``local_path``; a checkpoint without OCC files (``detach``, ``ce``) leaves it
    fresh. Raises when the files were written by another number of ranks or this rank's file is missing."""
    files = _occ_state_files(local_path)
    if not files:
        return
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    own = files.get(rank)
    with open(own or files[min(files)]) as f:
        saved = json.load(f)
    saved_world_size = saved.get("world_size", len(files))  # files from before it was recorded: one per rank
    if saved_world_size != world_size or own is None:
        raise RuntimeError(_resume_error(occ_state, local_path, rank, world_size, saved_world_size, sorted(files)))
    occ_state.load_state_dict(saved)


def _occ_state_files(local_path: str) -> dict[int, str]:
    """The OCC state files in ``local_path`` by the rank that wrote them."""
    if not os.path.isdir(local_path):
        return {}
    matches = (_FILE.fullmatch(name) for name in os.listdir(local_path))
    return {int(m.group(1)): os.path.join(local_path, m.group(0)) for m in matches if m}


def _resume_error(occ_state, local_path, rank, world_size, saved_world_size, saved_ranks) -> str:
    if saved_world_size != world_size:
        situation = f"were written by {saved_world_size} ranks; this run has {world_size}"
        fix = f"resume with {saved_world_size} ranks (trainer.nnodes x trainer.n_gpus_per_node)"
    else:
        situation = f"hold ranks {saved_ranks} but not this rank's ({rank}) of {world_size}"
        fix = "restore the missing file"
    return (
        f"OCC's carried lambdas in {local_path} (mtp_occ_state_rank*.json, one per rank: each rank carries its own "
        f"under occ.carry_last_lambda) {situation}. Either {fix}, or delete the mtp_occ_state_rank*.json files "
        f"there to start OCC's carried lambdas afresh from occ.initial_lambda={occ_state.config.initial_lambda} "
        "(the model and optimizer still resume)."
    )
