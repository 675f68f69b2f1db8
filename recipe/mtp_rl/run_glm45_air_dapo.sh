#!/usr/bin/env bash
# GLM-4.5-Air (106B MoE, 12B active, one MTP layer) + DAPO with its MTP head trained jointly
# (arXiv 2605.28184, larger-model setting). Same algorithm and budget as run_mimo_7b_rl_dapo.sh;
# only the model, the parallel layout (expert parallelism) and the cluster size differ.
#
#   MTP_MODE=rl_occ bash recipe/mtp_rl/run_glm45_air_dapo.sh           # OCC (default)
#   MTP_MODE=detach bash recipe/mtp_rl/run_glm45_air_dapo.sh           # baseline
#   DRY_RUN=1 MTP_MODE=rl bash recipe/mtp_rl/run_glm45_air_dapo.sh     # print the resolved config only
#
# Extra Hydra overrides can be appended: ... run_glm45_air_dapo.sh trainer.total_training_steps=10
# Run it on the Ray head node of a cluster with NNODES x GPUS_PER_NODE GPUs (see recipe/mtp_rl/README.md).
set -xeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=recipe/mtp_rl/common.sh
source "${SCRIPT_DIR}/common.sh"

# ---------------------------------------------------------------- experiment
PROJECT_NAME=${PROJECT_NAME:-verl_mtp_rl}
EXP_NAME=${EXP_NAME:-glm45-air-dapo-${MTP_TAG}}

# ---------------------------------------------------------------- cluster
NNODES=${NNODES:-32}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# ---------------------------------------------------------------- paths
DATA_HOME=${DATA_HOME:-${HOME}/verl_mtp}
# GLM-4.5-Air carries one MTP layer (num_nextn_predict_layers=1).
MODEL_PATH=${MODEL_PATH:-${DATA_HOME}/models/GLM-4.5-Air}
# GLM-4.5 is native to transformers: no remote code (verl's default).
TRUST_REMOTE_CODE=${TRUST_REMOTE_CODE:-False}
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
# DAPO's policy loss: PPO's token-level clip (verl's vanilla) with the clip-higher range above.
POLICY_LOSS_MODE=${POLICY_LOSS_MODE:-vanilla}
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
# Dense part TP4 x PP2 (46 decoder layers -> 23 per stage; the MTP layer sits on the last stage),
# routed experts EP8 x ETP1. On 256 GPUs: DP 32 for the dense part, expert-DP 16. Context
# parallelism is off by default (one layout for all four regimes, to stay comparable); every regime,
# rl included, accepts TRAIN_CP=2.
TRAIN_TP=${TRAIN_TP:-4}
TRAIN_PP=${TRAIN_PP:-2}
TRAIN_CP=${TRAIN_CP:-1}
TRAIN_EP=${TRAIN_EP:-8}
TRAIN_ETP=${TRAIN_ETP:-1}
GEN_TP=${GEN_TP:-8}
GEN_GPU_MEMORY_UTILIZATION=${GEN_GPU_MEMORY_UTILIZATION:-0.6}
OFFLOAD=${OFFLOAD:-True}
# Weights are converted by mbridge (the legacy backend, vanilla_mbridge=True, which has MiMo and
# GLM-4.5 support and is the bridge this project installs). Set False for Megatron-Bridge.
VANILLA_MBRIDGE=${VANILLA_MBRIDGE:-True}

# ---------------------------------------------------------------- launch
# DATA_ARGS ... TRAINER_ARGS: the overrides all recipes share, built by common.sh from the variables above;
# MTP_ARGS: the MTP_MODE regime. Only GLM-4.5-Air's MoE settings are spelled out here.
mtp_rl_overrides

python3 -m verl_mtp.trainer.main_ppo "${HYDRA_RUN_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${ALGORITHM_ARGS[@]}" \
    "${ACTOR_ARGS[@]}" \
    actor_rollout_ref.actor.megatron.expert_model_parallel_size="${TRAIN_EP}" \
    actor_rollout_ref.actor.megatron.expert_tensor_parallel_size="${TRAIN_ETP}" \
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full \
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform \
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1 \
    ++actor_rollout_ref.actor.megatron.override_transformer_config.moe_router_dtype=fp32 \
    "${REF_ARGS[@]}" \
    actor_rollout_ref.ref.megatron.expert_model_parallel_size="${TRAIN_EP}" \
    actor_rollout_ref.ref.megatron.expert_tensor_parallel_size="${TRAIN_ETP}" \
    "${ROLLOUT_ARGS[@]}" \
    "${MTP_ARGS[@]}" \
    "${TRAINER_ARGS[@]}" \
    "$@"
