#!/usr/bin/env bash
# DRY_RUN=1 (python -m verl_mtp.trainer.main_ppo --check) of each recipe at its defaults and at the scale-down
# settings of docs/cluster.md, each with its exit status, wall time and CPU time, on this machine (no GPU, no Ray).
# Output: docs/results/cluster_dry_runs.txt. Run from the repository root with the environment active:
#   bash scripts/cluster_dry_runs.sh > docs/results/cluster_dry_runs.txt
set -uo pipefail

run() {  # run <label> <VAR=value ...> -- <script> [hydra overrides ...]
    local label=$1; shift
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    local script=$1; shift
    echo "=== ${label}"
    echo "\$ ${envs[*]} DRY_RUN=1 bash recipe/mtp_rl/${script} $*"
    local err timing rc
    err=$(mktemp)
    timing=$(mktemp)
    /usr/bin/time -o "${timing}" -f "%e %U %S" env "${envs[@]}" DRY_RUN=1 bash "recipe/mtp_rl/${script}" "$@" \
        2>"${err}"
    rc=$?
    grep "REFUSED" "${err}"
    read -r wall user sys < <(tail -n 1 "${timing}")
    rm -f "${err}" "${timing}"
    printf 'exit status %d, wall %.1f s, CPU (user + sys) %.1f s\n\n' "${rc}" "${wall}" "$(echo "${user} + ${sys}" | bc)"
}

export DATA_HOME=/cluster/verl_mtp  # where the recipes look for the model and the data: absent on this machine
echo "# bash scripts/cluster_dry_runs.sh, $(date -u +%Y-%m-%d), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
run "MiMo-7B-RL DAPO, 16 nodes (default)" MTP_MODE=rl_occ -- run_mimo_7b_rl_dapo.sh
run "MiMo-7B-RL GSPO, 16 nodes (default)" MTP_MODE=rl_occ -- run_mimo_7b_rl_gspo.sh
run "GLM-4.5-Air DAPO, 32 nodes (default)" MTP_MODE=rl_occ -- run_glm45_air_dapo.sh
run "MiMo-7B-RL DAPO, 2 nodes" MTP_MODE=rl_occ NNODES=2 TRAIN_PROMPT_BSZ=32 TRAIN_PROMPT_MINI_BSZ=8 -- \
    run_mimo_7b_rl_dapo.sh
run "MiMo-7B-RL DAPO, 1 node" MTP_MODE=rl_occ NNODES=1 TRAIN_PROMPT_BSZ=16 TRAIN_PROMPT_MINI_BSZ=4 -- \
    run_mimo_7b_rl_dapo.sh
run "GLM-4.5-Air DAPO, 2 nodes" MTP_MODE=rl_occ NNODES=2 -- run_glm45_air_dapo.sh
run "GLM-4.5-Air DAPO, 1 node (refused)" MTP_MODE=rl_occ NNODES=1 -- run_glm45_air_dapo.sh
run "MiMo-7B-RL DAPO, OCC diagnostics on the default layout (refused)" MTP_MODE=rl_occ -- \
    run_mimo_7b_rl_dapo.sh actor_rollout_ref.model.mtp.occ.diagnose_every=10
run "MiMo-7B-RL DAPO, OCC diagnostics without the distributed optimizer" MTP_MODE=rl_occ -- \
    run_mimo_7b_rl_dapo.sh actor_rollout_ref.model.mtp.occ.diagnose_every=10 \
    actor_rollout_ref.actor.megatron.use_distributed_optimizer=False
run "MiMo-7B-RL DAPO, one mini-batch per step (warned)" MTP_MODE=rl_occ TRAIN_PROMPT_MINI_BSZ=128 -- \
    run_mimo_7b_rl_dapo.sh
