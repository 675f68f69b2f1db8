#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh, a no-op when up to date) and run the fast tier of the test suite on CPU:
# every test not marked `slow` (unit, model, CPU platform, example, multi-process), with pytest's --durations
# report. Extra arguments go to pytest and win, e.g. `bash scripts/run_tests.sh -k occ -x`, or
# `bash scripts/run_tests.sh -m slow` for the slow tier (verl's trainer end to end, tests/e2e); test paths among
# them replace the whole suite (`bash scripts/run_tests.sh tests/models -x`).
# VERL_MTP_MCORE=<version> runs them on that megatron-core version (see scripts/setup_env.sh).
# Exits non-zero on any failure, including "no tests collected" (pytest exit code 5).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash scripts/setup_env.sh
venv="$(bash scripts/venv_path.sh)"
overlay="$(bash scripts/venv_path.sh --overlay)"  # another megatron-core version (VERL_MTP_MCORE), or empty
if [[ -n "$overlay" ]]; then
    export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"  # inherited by every process the tests start
fi

paths=(tests)  # the whole suite, unless the arguments name test files or directories themselves
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then paths=(); break; fi
done
echo "[run_tests] $venv/bin/python -m pytest ${paths[*]} -q -m 'not slow' --durations=25 $*" >&2
rc=0
"$venv/bin/python" -m pytest "${paths[@]}" -q -m "not slow" --durations=25 "$@" || rc=$?

case "$rc" in
    0) echo "[run_tests] all tests passed" >&2 ;;
    5) echo "[run_tests] ERROR: pytest collected no tests (exit code 5); treating as failure" >&2 ;;
    *) echo "[run_tests] ERROR: pytest exited with code $rc" >&2 ;;
esac
exit "$rc"
