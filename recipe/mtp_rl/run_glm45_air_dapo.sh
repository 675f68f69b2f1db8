#!/usr/bin/env bash
# GLM-4.5-Air (106B MoE, 12B active, one MTP layer) + DAPO with its MTP head trained jointly
# (arXiv 2605.28184, larger-model setting). Same algorithm and budget as run_mimo_7b_rl_dapo.sh;
# only the model, the parallel layout (expert parallelism) and the cluster size differ.
#
#   MTP_MODE=rl_occ bash recipe/mtp_rl/run_glm45_air_dapo.sh           # OCC (default)
#   MTP_MODE=detach bash recipe/mtp_rl/run_glm45_air_dapo.sh           # baseline
#   DRY_RUN=1 MTP_MODE=rl bash recipe/mtp_rl/run_glm45_air_dapo.sh     # check it on a CPU, no GPU, no Ray
#
# Extra Hydra overrides can be appended: ... run_glm45_air_dapo.sh trainer.total_training_steps=10
# Run it on the Ray head node of a cluster with NNODES x GPUS_PER_NODE GPUs (see recipe/mtp_rl/README.md).
set -xeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=recipe/mtp_rl/common.sh
source "${SCRIPT_DIR}/common.sh"

# ---------------------------------------------------------------- experiment
EXP_NAME=${EXP_NAME:-glm45-air-dapo-${MTP_TAG}}

# ---------------------------------------------------------------- cluster
NNODES=${NNODES:-32}

# ---------------------------------------------------------------- paths
# GLM-4.5-Air carries one MTP layer (num_nextn_predict_layers=1).
MODEL_PATH=${MODEL_PATH:-${DATA_HOME}/models/GLM-4.5-Air}
# GLM-4.5 is native to transformers: no remote code (verl's default).
TRUST_REMOTE_CODE=${TRUST_REMOTE_CODE:-False}

# ---------------------------------------------------------------- algorithm
# The paper's DAPO settings and budget: mtp_rl_paper_defaults in common.sh (override any by its variable).

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

# ---------------------------------------------------------------- launch
# Everything not set above: the paper's shared budget and DAPO settings (common.sh).
mtp_rl_paper_defaults
# DATA_ARGS ... TRAINER_ARGS: the overrides all recipes share, built by common.sh from the variables above;
# MTP_ARGS: the MTP_MODE regime. Only GLM-4.5-Air's MoE settings are spelled out here.
mtp_rl_overrides

# GLM-4.5-Air's own: expert parallelism, full recomputation, an fp32 router.
ACTOR_ARGS+=(
    actor_rollout_ref.actor.megatron.expert_model_parallel_size="${TRAIN_EP}"
    actor_rollout_ref.actor.megatron.expert_tensor_parallel_size="${TRAIN_ETP}"
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1
    ++actor_rollout_ref.actor.megatron.override_transformer_config.moe_router_dtype=fp32
)
REF_ARGS+=(
    actor_rollout_ref.ref.megatron.expert_model_parallel_size="${TRAIN_EP}"
    actor_rollout_ref.ref.megatron.expert_tensor_parallel_size="${TRAIN_ETP}"
)
mtp_rl_launch "$@"
