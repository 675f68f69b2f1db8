"""The Megatron engine with the MTP hooks as ``initialize`` leaves it for ``rl`` + OCC with ``carry_last_lambda``,
minus the model, with a checkpoint manager that does only what the OCC checkpoint tests are about: verl's upload."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from verl.utils import hdfs_io
from verl.utils.fs import local_mkdir_safe
from verl_mtp.trainer.ppo.mtp_occ import OCCState, OCCStatistics
from verl_mtp.workers.config import MtpRLConfig
from verl_mtp.workers.engine.megatron import mtp_engine_hooks
from verl_mtp.workers.engine.megatron.transformer_impl import MegatronMTPEngineWithLMHead


class UploadingCheckpointManager:
    """The parts of verl's checkpoint manager the OCC state depends on: it creates ``local_path`` first (with
    verl's ``local_mkdir_safe``) and uploads it last."""

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        local_path = local_mkdir_safe(local_path)
        if hdfs_path is not None:
            hdfs_io.makedirs(hdfs_path, exist_ok=True)
            hdfs_io.copy(src=local_path, dst=hdfs_path, dirs_exist_ok=True)

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        pass


def engine_with_occ(
    carried: dict[int, float], initial_lambda: float = 0.0, carry_last_lambda: bool = True
) -> MegatronMTPEngineWithLMHead:
    """The engine whose OCC state carries ``carried`` (head -> lambda), set through OCC itself."""
    occ = {"enable": True, "carry_last_lambda": carry_last_lambda, "initial_lambda": initial_lambda}
    mtp = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", occ=occ)
    engine = MegatronMTPEngineWithLMHead.__new__(MegatronMTPEngineWithLMHead)
    engine.model_config = SimpleNamespace(mtp=mtp)
    engine.module, engine._is_offload_param, engine._is_offload_optimizer = [], False, False
    engine.checkpoint_mananager = UploadingCheckpointManager()  # verl's attribute name
    mtp_engine_hooks.init_mtp_state(engine)
    engine.mtp_state.occ_state = OCCState(mtp.occ)
    for head, lam in carried.items():  # an informative micro-batch sets the carried lambda
        stats = OCCStatistics(
            numerator=torch.tensor(lam, dtype=torch.float64), denominator=torch.tensor(1.0, dtype=torch.float64),
            abs_drl_sum=torch.tensor(1.0, dtype=torch.float64), dmtp_sum=torch.tensor(0.0, dtype=torch.float64),
            count=torch.tensor(1.0, dtype=torch.float64),
        )
        engine.mtp_state.occ_state.resolve(head, stats)
    return engine
