#!/usr/bin/env bash
# The megatron-core versions other than the default one (which `bash scripts/run_tests.sh` runs); `.ci/run`
# runs it after the default version's fast and slow tiers. For each version: install it over the one virtualenv
# (.venv/mcore-<version>, cached, see scripts/setup_env.sh) and run on it the fast tier's tests that build a
# Megatron-Core model (unit and multi-process), and on verl's pin one run of verl's trainer (tests/e2e: rl + OCC,
# GSPO, two MTP heads). The other trainer runs of tests/e2e (detach vs frozen, resume, multi-rank, the regime
# study) run in the default version's slow tier only: each costs minutes of Ray and worker start-up.
#   VERL_MTP_MATRIX      versions to run (default: the tested ones other than the default, see venv_path.sh)
#   VERL_MTP_E2E_MCORE   versions whose leg runs that trainer run (default: 0.18.0, verl 0.9.x's pin)
# Prints one line per leg (set-up time, test time, pytest's summary); exits non-zero if any leg fails.
# Extra arguments go to pytest.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
summary=()
failed=0
# Tests that build no Megatron-Core model, so the default run has proven them for every version: recipe
# configs (Hydra composition only) and the GPU check's CPU mode (a subset of tests/models plus the benchmark,
# which the legs run anyway); the upstream series (verl's tree with each pull request, its tests on this
# version) runs on the e2e leg only.
VERSION_FREE_TESTS=(--ignore=tests/trainer/test_recipes_on_cpu.py --ignore=tests/test_gpu_check_script_on_cpu.py)
# On an e2e leg: every tier (-m ""), less the trainer runs of the default version's slow tier only.
main_job=tests/e2e/test_main_job_on_cpu.py
E2E_LEG=(-m "" --ignore=tests/e2e/test_main_job_multirank_on_cpu.py --ignore=tests/e2e/test_regime_study_on_cpu.py
         --deselect=$main_job::test_detach_two_steps_trains_the_mtp_head
         --deselect=$main_job::test_detach_leaves_the_trunk_exactly_as_mtp_off
         --deselect=$main_job::test_rl_occ_dapo_two_steps_calibrates_and_trains_the_head
         --deselect=$main_job::test_resume_from_step_1_continues_exactly)
default_mcore="$(bash scripts/venv_path.sh --default-mcore)"
tested="0.16.1 0.18.0 0.19.2"
for mcore in ${VERL_MTP_MATRIX:-${tested//$default_mcore/}}; do
    log="$(mktemp)"
    t0=$SECONDS
    VERL_MTP_MCORE="$mcore" bash scripts/setup_env.sh
    rc=$?
    t1=$SECONDS
    if [[ $rc -eq 0 ]]; then
        select=("${VERSION_FREE_TESTS[@]}")
        if [[ " ${VERL_MTP_E2E_MCORE:-0.18.0} " == *" $mcore "* ]]; then
            select+=("${E2E_LEG[@]}")
        else
            select+=(--ignore=tests/upstream)
        fi
        VERL_MTP_MCORE="$mcore" bash scripts/run_tests.sh "${select[@]}" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    t2=$SECONDS
    result="$(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -1 | tr -d '=')"
    rm -f "$log"
    summary+=("[matrix] megatron-core $mcore: set-up $((t1 - t0))s, tests $((t2 - t1))s, rc $rc:${result:- no summary}")
    [[ $rc -eq 0 ]] || failed=1
done
printf '%s\n' "${summary[@]}" >&2
exit "$failed"
