#!/usr/bin/env bash
# The regime study (python -m verl_mtp_example.study): detach, ce, rl with fixed coefficients 0.1 and 1.0, and
# rl + OCC, over 3 seeds on the local example, from one shared SFT warm-up; resumable (run it again to continue).
# Writes <out>/table.md, results.json, reward.png, decomposition.png, lambda_scatter.png (docs/results.md).
#
#   bash scripts/run_study.sh                                   # the full study -> runs/study
#   bash scripts/run_study.sh --reduced --out runs/study_ci     # 2 regimes, 1 seed, 2 steps
#   bash scripts/run_study.sh --seeds 0 --regimes detach rl_occ --steps 8
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
