"""Pieces for a real verl RL run with MTP heads on a machine without GPU or model hub.

* :mod:`.tiny_model`: ``make_tiny_mimo`` / ``make_tokenizer`` write a tiny MiMo-style HF model directory
  (``model_type: "mimo"``, ``num_nextn_predict_layers`` MTP layers) that mbridge loads into Megatron-Core.
* :mod:`.arithmetic_task`: a verifiable arithmetic task, parquet files in verl's RL dataset format and the
  ``compute_score`` reward function (``reward.custom_reward_function``).
* :mod:`.mimo_config`: the transformers config class for ``model_type: "mimo"`` (transformers 5.10 has none).
* :mod:`.sft_warmup`: a short SFT of that model (MTP heads included) with verl's SFT trainer on CPU.
* :mod:`.launch`: the main job -- prepare, warm up, run verl's PPO trainer (DAPO / GSPO, any MTP regime) on
  CPU, print one line per step, plot the curves (``python -m verl_mtp.utils.local_run.launch --help``).
* :mod:`.metrics_view`: read verl's file-logger metrics, format the per-step line, draw the PNG.

Importing this package registers that config class with ``AutoConfig`` (see :func:`register_mimo_config`),
so ``actor_rollout_ref.model.external_lib=verl_mtp.utils.local_run`` makes verl read a ``mimo`` config
without ``trust_remote_code``. It imports nothing heavy (no torch, no Megatron).
"""

from __future__ import annotations


def register_mimo_config() -> None:
    """Make ``AutoConfig`` know ``model_type: "mimo"`` in this process. Idempotent.

    Skipped when transformers already knows ``mimo`` (natively or registered before), so a future native
    config class wins over ours.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "mimo" in CONFIG_MAPPING:
        return
    from verl_mtp.utils.local_run.mimo_config import MiMoConfig

    AutoConfig.register("mimo", MiMoConfig)


register_mimo_config()
