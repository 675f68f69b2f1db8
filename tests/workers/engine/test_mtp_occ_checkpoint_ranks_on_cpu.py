"""OCC's per-rank state in the checkpoint belongs to the number of ranks that wrote it.

The engine's real ``save_checkpoint`` / ``load_checkpoint`` (model and optimizer state aside, as in
``test_mtp_occ_checkpoint_upload_on_cpu.py``) run in this process (world 1) and on 2 gloo CPU ranks. Asserted:
a resume restores every rank's own lambdas; a checkpoint of 2 ranks is refused by 1 rank, and one missing a
rank's file is refused by that rank, each with the fix in the message; a checkpoint without OCC files (as
``detach`` writes) and one written before the world size was recorded still load; a run without
``occ.carry_last_lambda`` (whose OCC state is never read) resumes from any of them.
"""

import json
import os

import pytest
import torch
from support.occ_checkpoint_engine import engine_with_occ
from verl_cpu.testing import init_cpu_megatron, run_cpu_ranks

pytestmark = pytest.mark.usefixtures("cpu_megatron")

RANK_LAMBDAS = [{1: 0.25, 2: -0.5}, {1: 0.75, 2: 0.125}]  # rank r's carried lambdas: the ranks' differ


def lambdas(engine) -> dict[str, float]:
    return engine.mtp_state.occ_state.state_dict()["last_lambda"]


def test_resume_restores_the_state_and_the_file_records_rank_and_world_size(tmp_path):
    saved = engine_with_occ(RANK_LAMBDAS[0])
    saved.save_checkpoint(str(tmp_path))
    with open(tmp_path / "mtp_occ_state_rank0.json") as f:
        record = json.load(f)
    assert (record["world_size"], record["rank"]) == (1, 0)

    resumed = engine_with_occ({})
    resumed.load_checkpoint(str(tmp_path))
    assert lambdas(resumed) == pytest.approx({"1": 0.25, "2": -0.5}) and lambdas(resumed) == lambdas(saved)


def test_a_checkpoint_without_occ_files_leaves_the_state_fresh(tmp_path):
    (tmp_path / "model").mkdir()  # the rest of verl's checkpoint, as a detach run leaves it
    resumed = engine_with_occ({}, initial_lambda=0.05)
    resumed.load_checkpoint(str(tmp_path))
    assert lambdas(resumed) == {}


def test_a_file_from_before_the_world_size_was_recorded_loads(tmp_path):
    with open(tmp_path / "mtp_occ_state_rank0.json", "w") as f:
        json.dump({"last_lambda": {"1": 0.5}}, f)  # what save_occ_state wrote before
    resumed = engine_with_occ({})
    resumed.load_checkpoint(str(tmp_path))
    assert lambdas(resumed) == {"1": 0.5}


def _save_then_resume_rank(info, checkpoint_dir: str) -> dict:
    """Save this rank's OCC state, resume all ranks from it, then resume again after rank 1's file is gone."""
    init_cpu_megatron(rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    engine_with_occ(RANK_LAMBDAS[info.rank]).save_checkpoint(checkpoint_dir)
    torch.distributed.barrier()
    resumed = engine_with_occ({})
    resumed.load_checkpoint(checkpoint_dir)
    torch.distributed.barrier()
    if info.rank == 0:
        os.remove(os.path.join(checkpoint_dir, "mtp_occ_state_rank1.json"))
    torch.distributed.barrier()
    try:
        engine_with_occ({}).load_checkpoint(checkpoint_dir)
        missing = None
    except RuntimeError as error:
        missing = str(error)
    return {"resumed": lambdas(resumed), "missing_error": missing}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """The ranks' results and the checkpoint they leave: rank 0's file, written by 2 ranks."""
    checkpoint_dir = tmp_path_factory.mktemp("two_ranks")
    return run_cpu_ranks(_save_then_resume_rank, 2, str(checkpoint_dir)), checkpoint_dir


@pytest.mark.multiprocess
def test_two_ranks_resume_their_own_state_and_refuse_a_missing_rank_file(two_rank_run):
    ranks, _ = two_rank_run
    for rank, result in enumerate(ranks):
        want = {str(head): lam for head, lam in RANK_LAMBDAS[rank].items()}
        assert result["resumed"] == pytest.approx(want)
    assert ranks[0]["missing_error"] is None  # rank 0's own file is still there
    message = ranks[1]["missing_error"]
    assert "hold ranks [0] but not this rank's (1) of 2" in message
    assert "delete the mtp_occ_state_rank*.json files" in message and "occ.initial_lambda=0.0" in message


@pytest.mark.multiprocess
def test_one_rank_refuses_the_state_of_two(two_rank_run):
    _, checkpoint_dir = two_rank_run
    resumed = engine_with_occ({})
    with pytest.raises(RuntimeError) as error:
        resumed.load_checkpoint(str(checkpoint_dir))
    message = str(error.value)
    assert "were written by 2 ranks; this run has 1" in message
    assert "resume with 2 ranks (trainer.nnodes x trainer.n_gpus_per_node)" in message
    assert "delete the mtp_occ_state_rank*.json files" in message
    assert lambdas(resumed) == {}


@pytest.mark.multiprocess
def test_a_run_that_carries_no_lambdas_resumes_from_any_number_of_ranks(two_rank_run):
    _, checkpoint_dir = two_rank_run
    resumed = engine_with_occ({}, carry_last_lambda=False)  # its OCC state is never read: nothing to restore
    resumed.load_checkpoint(str(checkpoint_dir))
    assert lambdas(resumed) == {}
