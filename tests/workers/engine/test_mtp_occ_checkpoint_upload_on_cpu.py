"""The OCC state travels with verl's checkpoint upload (``trainer.default_hdfs_dir``) and resumes from it.

verl's ``MegatronCheckpointManager.save_checkpoint`` copies ``local_path`` to ``hdfs_path`` with
``verl.utils.hdfs_io.copy`` as the last step of its own save. The engine's real ``save_checkpoint`` /
``load_checkpoint`` (the MTP-RL hooks around verl's ``MegatronEngine`` ones) run here with a checkpoint
manager that does only that last step, verl's own upload, on a local directory standing for the remote one
(``hdfs_io`` copies local paths with the file system); model and optimizer state are not part of this test
(the e2e resume test covers them). Asserted: the uploaded copy holds every saved rank file, and an engine
resumed from the uploaded copy, after the local checkpoint is gone, carries the same OCC state.
"""

import shutil

import pytest
from support.occ_checkpoint_engine import engine_with_occ

pytestmark = pytest.mark.usefixtures("cpu_megatron")


def test_occ_state_is_in_the_uploaded_checkpoint_and_resumes_from_it(tmp_path):
    saved = engine_with_occ({1: 0.25, 2: -0.5})
    assert saved.mtp_state.occ_state.state_dict()["last_lambda"] == pytest.approx({"1": 0.25, "2": -0.5}, rel=1e-6)
    local = tmp_path / "local" / "global_step_3" / "actor"
    remote = tmp_path / "remote" / "global_step_3" / "actor"
    saved.save_checkpoint(str(local), hdfs_path=str(remote), global_step=3)

    assert sorted(p.name for p in remote.iterdir()) == sorted(p.name for p in local.iterdir())
    assert (remote / "mtp_occ_state_rank0.json").is_file()
    shutil.rmtree(tmp_path / "local")

    resumed = engine_with_occ({})
    resumed.load_checkpoint(str(remote), del_local_after_load=False)
    assert resumed.mtp_state.occ_state.state_dict() == saved.mtp_state.occ_state.state_dict()
