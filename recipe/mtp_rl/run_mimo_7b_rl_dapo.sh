#!/usr/bin/env bash
# MiMo-7B-RL + DAPO with its MTP head trained jointly (arXiv 2605.28184, main setting).
#
#   MTP_MODE=rl_occ bash recipe/mtp_rl/run_mimo_7b_rl_dapo.sh          # OCC (default)
#   MTP_MODE=detach bash recipe/mtp_rl/run_mimo_7b_rl_dapo.sh          # baseline
#   DRY_RUN=1 MTP_MODE=rl bash recipe/mtp_rl/run_mimo_7b_rl_dapo.sh    # check it on a CPU, no GPU, no Ray
#
# Extra Hydra overrides can be appended: ... run_mimo_7b_rl_dapo.sh trainer.total_training_steps=10
# Run it on the Ray head node of a cluster with NNODES x GPUS_PER_NODE GPUs (see recipe/mtp_rl/README.md).
set -xeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=recipe/mtp_rl/common.sh
source "${SCRIPT_DIR}/common.sh"

# ---------------------------------------------------------------- experiment
EXP_NAME=${EXP_NAME:-mimo-7b-rl-dapo-${MTP_TAG}}

# ---------------------------------------------------------------- cluster
NNODES=${NNODES:-16}

# ---------------------------------------------------------------- paths
# MiMo-7B-RL carries one MTP layer (num_nextn_predict_layers=1). Its config.json must allow
# prompt + response (2k + 8k) positions.
MODEL_PATH=${MODEL_PATH:-${DATA_HOME}/models/MiMo-7B-RL}
# MiMo ships its modelling code with the checkpoint.
TRUST_REMOTE_CODE=${TRUST_REMOTE_CODE:-True}

# ---------------------------------------------------------------- algorithm
# The paper's DAPO settings and budget: mtp_rl_paper_defaults in common.sh (override any by its variable).

# ---------------------------------------------------------------- parallel layout
# The paper's layout, TP2 / PP2 / CP2 (DP 16 on 128 GPUs), in every mode: the four regimes stay
# comparable, and mtp_loss_type=rl (MTP_MODE=rl, rl_occ) runs under context parallelism like the others.
TRAIN_TP=${TRAIN_TP:-2}
TRAIN_PP=${TRAIN_PP:-2}
TRAIN_CP=${TRAIN_CP:-2}
GEN_TP=${GEN_TP:-2}
GEN_GPU_MEMORY_UTILIZATION=${GEN_GPU_MEMORY_UTILIZATION:-0.7}

# ---------------------------------------------------------------- launch
# Everything not set above: the paper's shared budget and DAPO settings (common.sh).
mtp_rl_paper_defaults
# DATA_ARGS ... TRAINER_ARGS: the overrides all recipes share, built by common.sh from the variables above;
# MTP_ARGS: the MTP_MODE regime.
mtp_rl_overrides

mtp_rl_launch "$@"
