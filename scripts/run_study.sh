#!/usr/bin/env bash
# The regime study (python -m verl_mtp_example.study): the stress study of docs/results.md by default -- detach, ce
# and rl at fixed coefficients 1 and 10, and rl + OCC, 5 seeds x 60 steps on the local example, from one shared
# SFT warm-up; resumable (run it again to continue). Writes the record <out>/data (steps.csv, updates.csv,
# study.json) and, from it alone, <out>/report.md, results.json, reward.png, decomposition.png, lambda_scatter.png.
#
#   bash scripts/run_study.sh                                   # the stress study -> runs/study
#   bash scripts/run_study.sh --reduced --out runs/study_ci     # 2 regimes, 1 seed, 2 steps
#   bash scripts/run_study.sh --seeds 0 --regimes detach rl_occ --steps 8
#   bash scripts/run_study.sh --report-only --data docs/results/data --out docs/results --doc docs/results.md docs/mtp_rl.md
#
# Arguments go to the study (see `python -m verl_mtp_example.study --help`). Sets up .venv first.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
bash scripts/setup_env.sh
export PYTHONWARNINGS=ignore
overlay="$(bash scripts/venv_path.sh --overlay)"  # another megatron-core version (VERL_MTP_MCORE), or empty
if [[ -n "$overlay" ]]; then
    export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
fi
exec .venv/bin/python -m verl_mtp_example.study --prep-dir runs/prep "$@"
