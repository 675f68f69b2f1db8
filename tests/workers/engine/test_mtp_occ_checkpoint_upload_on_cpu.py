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
from types import SimpleNamespace

import pytest
import torch

from verl.utils import hdfs_io
from verl.utils.fs import local_mkdir_safe
from verl_mtp.trainer.ppo.mtp_occ import OCCState, OCCStatistics
from verl_mtp.workers.config import MtpRLConfig
from verl_mtp.workers.engine.megatron.transformer_impl import MegatronMTPEngineWithLMHead

pytestmark = pytest.mark.usefixtures("cpu_megatron")


class UploadingCheckpointManager:
    """The parts of verl's checkpoint manager this test is about: it creates ``local_path`` first (with verl's
    ``local_mkdir_safe``) and uploads it last."""

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        local_path = local_mkdir_safe(local_path)
        if hdfs_path is not None:
            hdfs_io.makedirs(hdfs_path, exist_ok=True)
            hdfs_io.copy(src=local_path, dst=hdfs_path, dirs_exist_ok=True)

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        pass


def engine_with_occ(carried: dict[int, float]) -> MegatronMTPEngineWithLMHead:
    """The engine as ``initialize`` leaves it for ``rl`` + OCC, minus the model (not needed here)."""
    mtp = MtpRLConfig(enable=True, mtp_loss_type="rl", occ={"enable": True, "carry_last_lambda": True})
    engine = MegatronMTPEngineWithLMHead.__new__(MegatronMTPEngineWithLMHead)
    engine.model_config = SimpleNamespace(mtp=mtp)
    engine.module, engine._is_offload_param, engine._is_offload_optimizer = [], False, False
    engine.checkpoint_mananager = UploadingCheckpointManager()  # verl's attribute name
    engine.occ_state = OCCState(mtp.occ)
    for head, lam in carried.items():  # through OCC itself: an informative micro-batch sets the carried lambda
        stats = OCCStatistics(
            numerator=torch.tensor(lam, dtype=torch.float64), denominator=torch.tensor(1.0, dtype=torch.float64),
            abs_drl_sum=torch.tensor(1.0, dtype=torch.float64), dmtp_sum=torch.tensor(0.0, dtype=torch.float64),
            count=torch.tensor(1.0, dtype=torch.float64),
        )
        engine.occ_state.resolve(head, stats)
    return engine


def test_occ_state_is_in_the_uploaded_checkpoint_and_resumes_from_it(tmp_path):
    saved = engine_with_occ({1: 0.25, 2: -0.5})
    assert saved.occ_state.state_dict()["last_lambda"] == pytest.approx({"1": 0.25, "2": -0.5}, rel=1e-6)
    local = tmp_path / "local" / "global_step_3" / "actor"
    remote = tmp_path / "remote" / "global_step_3" / "actor"
    saved.save_checkpoint(str(local), hdfs_path=str(remote), global_step=3)

    assert sorted(p.name for p in remote.iterdir()) == sorted(p.name for p in local.iterdir())
    assert (remote / "mtp_occ_state_rank0.json").is_file()
    shutil.rmtree(tmp_path / "local")

    resumed = engine_with_occ({})
    resumed.load_checkpoint(str(remote), del_local_after_load=False)
    assert resumed.occ_state.state_dict() == saved.occ_state.state_dict()
