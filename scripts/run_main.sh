#!/usr/bin/env bash
# The main job: verl's real PPO trainer (DAPO or GSPO, GRPO advantages) with joint MTP training on CPU,
# on a tiny MiMo-style model after a short SFT warm-up; one line per step, curves in a PNG at the end.
#
#   bash scripts/run_main.sh                           # DAPO + OCC (rl_occ), default steps
#   MODE=detach bash scripts/run_main.sh               # detach | ce | rl | rl_occ | frozen
#   ALGO=gspo STEPS=8 bash scripts/run_main.sh
#   bash scripts/run_main.sh --mtp-layers 2 -- actor_rollout_ref.actor.optim.lr=5e-4
#
# Environment: MODE (rl_occ), ALGO (dapo), STEPS (launcher default), WORKDIR (runs/<algo>_<mode>),
# PREP_DIR (runs/prep: tiny model, data and SFT warm-up, built once and shared by all runs), SEED (0),
# VERL_MTP_MCORE (megatron-core version, see scripts/setup_env.sh).
# Arguments go to `python -m verl_mtp_example.launch` (see its --help), which checks every switch before
# anything starts; after `--`, Hydra overrides for the trainer. Sets up .venv first (scripts/setup_env.sh;
# a no-op when up to date).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

t0=$(date +%s)
bash scripts/setup_env.sh
t1=$(date +%s)
echo "[run_main] environment ready in $((t1 - t0))s" >&2

MODE="${MODE:-rl_occ}"
ALGO="${ALGO:-dapo}"
SEED="${SEED:-0}"
WORKDIR="${WORKDIR:-runs/${ALGO}_${MODE}}"
PREP_DIR="${PREP_DIR:-runs/prep}"
args=(--mode "$MODE" --algo "$ALGO" --seed "$SEED" --workdir "$WORKDIR" --prep-dir "$PREP_DIR")
if [[ -n "${STEPS:-}" ]]; then
    args+=(--steps "$STEPS")
fi

# The launcher gives the SFT and trainer processes the CPU platform's environment (verl_cpu.environment);
# PYTHONWARNINGS keeps the terminal to the launcher's lines (verl's full output goes to <workdir>/train.log).
export PYTHONWARNINGS=ignore
overlay="$(bash scripts/venv_path.sh --overlay)"  # another megatron-core version (VERL_MTP_MCORE), or empty
if [[ -n "$overlay" ]]; then
    export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
fi
rc=0
.venv/bin/python -m verl_mtp_example.launch "${args[@]}" "$@" || rc=$?
t2=$(date +%s)
echo "[run_main] setup $((t1 - t0))s, main job $((t2 - t1))s, total $((t2 - t0))s (exit $rc)" >&2
exit "$rc"
