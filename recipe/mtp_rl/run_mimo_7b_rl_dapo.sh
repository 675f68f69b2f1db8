#!/usr/bin/env bash
# MiMo-7B-RL + DAPO with its MTP head trained jointly (arXiv 2605.28184, main setting).
#
#   MTP_MODE=rl_occ bash recipe/mtp_rl/run_mimo_7b_rl_dapo.sh          # OCC (default)
#   MTP_MODE=detach bash recipe/mtp_rl/run_mimo_7b_rl_dapo.sh          # baseline
#   DRY_RUN=1 MTP_MODE=rl bash recipe/mtp_rl/run_mimo_7b_rl_dapo.sh    # print the resolved config only
#
# Extra Hydra overrides can be appended: ... run_mimo_7b_rl_dapo.sh trainer.total_training_steps=10
# Run it on the Ray head node of a cluster with NNODES x GPUS_PER_NODE GPUs (see recipe/mtp_rl/README.md).
set -xeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=recipe/mtp_rl/common.sh
source "${SCRIPT_DIR}/common.sh"

# ---------------------------------------------------------------- experiment
PROJECT_NAME=${PROJECT_NAME:-verl_mtp_rl}
EXP_NAME=${EXP_NAME:-mimo-7b-rl-dapo-${MTP_TAG}}

# ---------------------------------------------------------------- cluster
NNODES=${NNODES:-16}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# ---------------------------------------------------------------- paths
DATA_HOME=${DATA_HOME:-${HOME}/verl_mtp}
# MiMo-7B-RL carries one MTP layer (num_nextn_predict_layers=1). Its config.json must allow
# prompt + response (2k + 8k) positions.
MODEL_PATH=${MODEL_PATH:-${DATA_HOME}/models/MiMo-7B-RL}
TRAIN_FILE=${TRAIN_FILE:-${DATA_HOME}/data/dapo-math-17k.parquet}
VAL_FILE=${VAL_FILE:-${DATA_HOME}/data/aime-2024.parquet}
CKPTS_DIR=${CKPTS_DIR:-${DATA_HOME}/ckpts/${PROJECT_NAME}/${EXP_NAME}}

# ---------------------------------------------------------------- algorithm (paper's DAPO settings)
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-2048}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-8192}
OVERLONG_BUFFER_LEN=${OVERLONG_BUFFER_LEN:-4096}
OVERLONG_PENALTY_FACTOR=${OVERLONG_PENALTY_FACTOR:-1.0}
TRAIN_PROMPT_BSZ=${TRAIN_PROMPT_BSZ:-128}
N_RESP_PER_PROMPT=${N_RESP_PER_PROMPT:-16}
TRAIN_PROMPT_MINI_BSZ=${TRAIN_PROMPT_MINI_BSZ:-32}
LR=${LR:-1e-6}
CLIP_RATIO_LOW=${CLIP_RATIO_LOW:-0.2}
CLIP_RATIO_HIGH=${CLIP_RATIO_HIGH:-0.28}
CLIP_RATIO_C=${CLIP_RATIO_C:-10.0}
LOSS_AGG_MODE=${LOSS_AGG_MODE:-token-mean}
# DAPO dynamic sampling: drop groups whose responses all score the same and refill the batch.
FILTER_GROUPS=${FILTER_GROUPS:-True}
FILTER_GROUPS_METRIC=${FILTER_GROUPS_METRIC:-acc}
FILTER_MAX_INFLIGHT=${FILTER_MAX_INFLIGHT:-1}
TOTAL_STEPS=${TOTAL_STEPS:-200}
TEMPERATURE=${TEMPERATURE:-1.0}
VAL_TOP_P=${VAL_TOP_P:-0.7}
VAL_N=${VAL_N:-32}   # avg@32, as the paper reports

# ---------------------------------------------------------------- parallel layout
# The paper trains with TP2 / PP2 / CP2. mtp_loss_type=rl (MTP_MODE=rl, rl_occ) does not support
# context parallelism yet, so every mode here runs TP2 / PP2 / CP1 (DP 32 on 128 GPUs) to keep the
# four regimes comparable. detach / ce accept TRAIN_CP=2.
TRAIN_TP=${TRAIN_TP:-2}
TRAIN_PP=${TRAIN_PP:-2}
TRAIN_CP=${TRAIN_CP:-1}
GEN_TP=${GEN_TP:-2}
OFFLOAD=${OFFLOAD:-True}
# Weights are converted by mbridge (the legacy backend, vanilla_mbridge=True, which has MiMo and
# GLM-4.5 support and is the bridge this project installs). Set False for Megatron-Bridge.
VANILLA_MBRIDGE=${VANILLA_MBRIDGE:-True}
mtp_rl_check_layout "${TRAIN_CP}"

ACTOR_MAX_TOKEN_LEN=$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2 ))
INFER_MAX_TOKEN_LEN=$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 3 ))
LOGGER=${LOGGER:-'["console","tensorboard"]'}

python3 -m verl_mtp.trainer.main_ppo "${HYDRA_RUN_ARGS[@]}" \
    data.train_files="${TRAIN_FILE}" \
    data.val_files="${VAL_FILE}" \
    data.prompt_key=prompt \
    data.truncation=left \
    data.max_prompt_length="${MAX_PROMPT_LENGTH}" \
    data.max_response_length="${MAX_RESPONSE_LENGTH}" \
    data.train_batch_size="${TRAIN_PROMPT_BSZ}" \
    data.trust_remote_code=True \
    algorithm.adv_estimator=grpo \
    critic.enable=False \
    algorithm.use_kl_in_reward=False \
    algorithm.kl_ctrl.kl_coef=0.0 \
    algorithm.filter_groups.enable="${FILTER_GROUPS}" \
    algorithm.filter_groups.metric="${FILTER_GROUPS_METRIC}" \
    algorithm.filter_groups.max_inflight_gen_batches="${FILTER_MAX_INFLIGHT}" \
    reward.reward_manager.name=dapo \
    +reward.reward_kwargs.overlong_buffer_cfg.enable=True \
    +reward.reward_kwargs.overlong_buffer_cfg.len="${OVERLONG_BUFFER_LEN}" \
    +reward.reward_kwargs.overlong_buffer_cfg.penalty_factor="${OVERLONG_PENALTY_FACTOR}" \
    +reward.reward_kwargs.overlong_buffer_cfg.log=False \
    +reward.reward_kwargs.max_resp_len="${MAX_RESPONSE_LENGTH}" \
    actor_rollout_ref.model.path="${MODEL_PATH}" \
    actor_rollout_ref.model.trust_remote_code=True \
    actor_rollout_ref.actor.strategy=megatron \
    actor_rollout_ref.actor.optim.lr="${LR}" \
    actor_rollout_ref.actor.optim.lr_warmup_steps=10 \
    actor_rollout_ref.actor.optim.weight_decay=0.1 \
    actor_rollout_ref.actor.optim.clip_grad=1.0 \
    actor_rollout_ref.actor.ppo_mini_batch_size="${TRAIN_PROMPT_MINI_BSZ}" \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu="${ACTOR_MAX_TOKEN_LEN}" \
    actor_rollout_ref.actor.clip_ratio_low="${CLIP_RATIO_LOW}" \
    actor_rollout_ref.actor.clip_ratio_high="${CLIP_RATIO_HIGH}" \
    actor_rollout_ref.actor.clip_ratio_c="${CLIP_RATIO_C}" \
    actor_rollout_ref.actor.policy_loss.loss_mode=vanilla \
    actor_rollout_ref.actor.loss_agg_mode="${LOSS_AGG_MODE}" \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.kl_loss_coef=0.0 \
    actor_rollout_ref.actor.megatron.use_mbridge=True \
    actor_rollout_ref.actor.megatron.vanilla_mbridge="${VANILLA_MBRIDGE}" \
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size="${TRAIN_TP}" \
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size="${TRAIN_PP}" \
    actor_rollout_ref.actor.megatron.context_parallel_size="${TRAIN_CP}" \
    actor_rollout_ref.actor.megatron.param_offload="${OFFLOAD}" \
    actor_rollout_ref.actor.megatron.optimizer_offload="${OFFLOAD}" \
    actor_rollout_ref.ref.megatron.tensor_model_parallel_size="${TRAIN_TP}" \
    actor_rollout_ref.ref.megatron.pipeline_model_parallel_size="${TRAIN_PP}" \
    actor_rollout_ref.ref.megatron.context_parallel_size="${TRAIN_CP}" \
    actor_rollout_ref.ref.megatron.param_offload="${OFFLOAD}" \
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True \
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu="${INFER_MAX_TOKEN_LEN}" \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n="${N_RESP_PER_PROMPT}" \
    actor_rollout_ref.rollout.tensor_model_parallel_size="${GEN_TP}" \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.7 \
    actor_rollout_ref.rollout.enable_chunked_prefill=True \
    actor_rollout_ref.rollout.max_num_batched_tokens=$(( MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH )) \
    actor_rollout_ref.rollout.temperature="${TEMPERATURE}" \
    actor_rollout_ref.rollout.top_p=1.0 \
    actor_rollout_ref.rollout.top_k=-1 \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu="${INFER_MAX_TOKEN_LEN}" \
    actor_rollout_ref.rollout.val_kwargs.do_sample=True \
    actor_rollout_ref.rollout.val_kwargs.temperature="${TEMPERATURE}" \
    actor_rollout_ref.rollout.val_kwargs.top_p="${VAL_TOP_P}" \
    actor_rollout_ref.rollout.val_kwargs.top_k=-1 \
    actor_rollout_ref.rollout.val_kwargs.n="${VAL_N}" \
    "${MTP_ARGS[@]}" \
    trainer.logger="${LOGGER}" \
    trainer.project_name="${PROJECT_NAME}" \
    trainer.experiment_name="${EXP_NAME}" \
    trainer.nnodes="${NNODES}" \
    trainer.n_gpus_per_node="${GPUS_PER_NODE}" \
    trainer.default_local_dir="${CKPTS_DIR}" \
    trainer.total_training_steps="${TOTAL_STEPS}" \
    trainer.total_epochs=100 \
    trainer.val_before_train=True \
    trainer.test_freq=10 \
    trainer.save_freq=50 \
    trainer.resume_mode=auto \
    trainer.log_val_generations=10 \
    "$@"
