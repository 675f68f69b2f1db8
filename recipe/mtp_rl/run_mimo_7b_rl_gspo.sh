#!/usr/bin/env bash
# MiMo-7B-RL + GSPO with its MTP head trained jointly (arXiv 2605.28184, second RL algorithm).
# Same model, data and budget as run_mimo_7b_rl_dapo.sh; the policy loss is GSPO's sequence-level
# ratio, which the MTP policy term reuses on the MTP head's log-probs.
#
#   MTP_MODE=rl_occ bash recipe/mtp_rl/run_mimo_7b_rl_gspo.sh          # OCC (default)
#   MTP_MODE=detach bash recipe/mtp_rl/run_mimo_7b_rl_gspo.sh          # baseline
#   DRY_RUN=1 MTP_MODE=ce bash recipe/mtp_rl/run_mimo_7b_rl_gspo.sh    # check it on a CPU, no GPU, no Ray
#
# Extra Hydra overrides can be appended: ... run_mimo_7b_rl_gspo.sh trainer.total_training_steps=10
# Run it on the Ray head node of a cluster with NNODES x GPUS_PER_NODE GPUs (see recipe/mtp_rl/README.md).
set -xeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=recipe/mtp_rl/common.sh
source "${SCRIPT_DIR}/common.sh"

# ---------------------------------------------------------------- experiment
EXP_NAME=${EXP_NAME:-mimo-7b-rl-gspo-${MTP_TAG}}

# ---------------------------------------------------------------- cluster
NNODES=${NNODES:-16}

# ---------------------------------------------------------------- paths
# MiMo-7B-RL carries one MTP layer (num_nextn_predict_layers=1). Its config.json must allow
# prompt + response (2k + 8k) positions.
MODEL_PATH=${MODEL_PATH:-${DATA_HOME}/models/MiMo-7B-RL}
# MiMo ships its modelling code with the checkpoint.
TRUST_REMOTE_CODE=${TRUST_REMOTE_CODE:-True}

# ---------------------------------------------------------------- algorithm (GSPO; the rest as DAPO's, common.sh)
# GSPO clips the length-normalised sequence ratio, hence the tiny clip range.
CLIP_RATIO_LOW=${CLIP_RATIO_LOW:-3e-4}
CLIP_RATIO_HIGH=${CLIP_RATIO_HIGH:-4e-4}
# GSPO's sequence-level policy loss (verl's loss_mode=gspo).
POLICY_LOSS_MODE=${POLICY_LOSS_MODE:-gspo}
LOSS_AGG_MODE=${LOSS_AGG_MODE:-seq-mean-token-mean}
# Dynamic sampling is DAPO's; off here so the run is plain GSPO (set FILTER_GROUPS=True to add it).
# The DAPO reward manager stays for its overlong-buffer penalty, as in the DAPO script.
FILTER_GROUPS=${FILTER_GROUPS:-False}

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
