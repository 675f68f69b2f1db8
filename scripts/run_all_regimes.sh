#!/usr/bin/env bash
# All MTP regimes with the same seed, data, SFT warm-up and settings, one after the other, then one PNG
# with their curves side by side (runs/regimes_<algo>/compare.png).
#
#   bash scripts/run_all_regimes.sh                     # DAPO: detach, ce, rl, rl_occ
#   ALGO=gspo STEPS=12 bash scripts/run_all_regimes.sh
#   REGIMES="detach rl_occ" bash scripts/run_all_regimes.sh -- actor_rollout_ref.actor.optim.lr=5e-4
#
# Environment: ALGO (dapo), STEPS (launcher default), SEED (0), REGIMES ("detach ce rl rl_occ"; "frozen"
# = MTP loaded, not trained), OUT (runs/regimes_<algo>). Arguments go to every launcher call.
# Rollouts are sampled, so two regimes see different samples after the first update; the shared seed
# fixes the model, the data order and the SFT warm-up.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
bash scripts/setup_env.sh

ALGO="${ALGO:-dapo}"
SEED="${SEED:-0}"
REGIMES="${REGIMES:-detach ce rl rl_occ}"
OUT="${OUT:-runs/regimes_${ALGO}}"
export PYTHONWARNINGS=ignore

steps=()
if [[ -n "${STEPS:-}" ]]; then
    steps=(--steps "$STEPS")
fi
t0=$(date +%s)
dirs=()
failed=0
for mode in $REGIMES; do
    echo "[run_all_regimes] ===== $ALGO / $mode" >&2
    if .venv/bin/python -m verl_mtp_example.launch --mode "$mode" --algo "$ALGO" --seed "$SEED" \
        --workdir "$OUT/$mode" --prep-dir "$OUT/prep" "${steps[@]}" "$@"; then
        dirs+=("$OUT/$mode")
    else
        echo "[run_all_regimes] $mode failed (see $OUT/$mode/train.log)" >&2
        failed=1
    fi
done
if [[ ${#dirs[@]} -gt 0 ]]; then
    .venv/bin/python -m verl_mtp_example.metrics_view "${dirs[@]}" --out "$OUT/compare.png" \
        --title "verl PPO on CPU, tiny MiMo: $ALGO, MTP regimes side by side (seed $SEED)"
fi
echo "[run_all_regimes] done in $(($(date +%s) - t0))s; plot: $OUT/compare.png" >&2
exit "$failed"
