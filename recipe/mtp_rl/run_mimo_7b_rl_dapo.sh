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
# MiMo ships its modelling code with the checkpoint.
TRUST_REMOTE_CODE=${TRUST_REMOTE_CODE:-True}
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
# The paper's layout, TP2 / PP2 / CP2 (DP 16 on 128 GPUs), in every mode: the four regimes stay
# comparable, and mtp_loss_type=rl (MTP_MODE=rl, rl_occ) runs under context parallelism like the others.
TRAIN_TP=${TRAIN_TP:-2}
TRAIN_PP=${TRAIN_PP:-2}
TRAIN_CP=${TRAIN_CP:-2}
GEN_TP=${GEN_TP:-2}
GEN_GPU_MEMORY_UTILIZATION=${GEN_GPU_MEMORY_UTILIZATION:-0.7}
OFFLOAD=${OFFLOAD:-True}
# Weights are converted by mbridge (the legacy backend, vanilla_mbridge=True, which has MiMo and
# GLM-4.5 support and is the bridge this project installs). Set False for Megatron-Bridge.
VANILLA_MBRIDGE=${VANILLA_MBRIDGE:-True}

# ---------------------------------------------------------------- launch
# DATA_ARGS ... TRAINER_ARGS: the overrides all recipes share, built by common.sh from the variables above;
# MTP_ARGS: the MTP_MODE regime.
mtp_rl_overrides

python3 -m verl_mtp.trainer.main_ppo "${HYDRA_RUN_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${ALGORITHM_ARGS[@]}" \
    "${ACTOR_ARGS[@]}" \
    "${REF_ARGS[@]}" \
    "${ROLLOUT_ARGS[@]}" \
    "${MTP_ARGS[@]}" \
    "${TRAINER_ARGS[@]}" \
    "$@"
