"""Pieces for a real verl RL run with MTP heads on a machine without GPU or model hub.

* :mod:`.tiny_model`: ``make_tiny_mimo`` / ``make_tokenizer`` write a tiny MiMo-style HF model directory
  (``model_type: "mimo"``, ``num_nextn_predict_layers`` MTP layers) that mbridge loads into Megatron-Core.
* :mod:`.arithmetic_task`: a verifiable arithmetic task, parquet files in verl's RL dataset format and the
  ``compute_score`` reward function (``reward.custom_reward_function``).
* :mod:`.mimo_config`: the transformers config class for ``model_type: "mimo"`` (transformers 5.10 has none).
* :mod:`.sft_warmup`: a short SFT of that model (MTP heads included) with verl's SFT trainer on CPU.
* :mod:`.launch`: the main job -- prepare, warm up, run verl's PPO trainer (DAPO / GSPO, any MTP regime) on
  CPU, print one line per step, plot the curves (``python -m verl_mtp_example.launch --help``).
* :mod:`.metrics_view`: read verl's file-logger metrics, format the per-step line, draw the PNG.
* :mod:`.preparation`, :mod:`.trainer_command`, :mod:`.validation`, :mod:`.progress`, :mod:`.run_dir`: the
  launcher's stages; ``config/``: the example's Hydra config ("the tiny MiMo example").

Importing the package itself is cheap (the launcher checks its switches within seconds); importing
:mod:`.register_mimo` registers the ``mimo`` config class with ``AutoConfig``, so
``actor_rollout_ref.model.external_lib=verl_mtp_example.register_mimo`` makes verl read a ``mimo`` config
without ``trust_remote_code``.
"""
