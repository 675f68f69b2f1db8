#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh, a no-op when up to date) and run the test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k occ -x`.
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

echo "[run_tests] $venv/bin/python -m pytest tests -q $*" >&2
rc=0
"$venv/bin/python" -m pytest tests -q "$@" || rc=$?

case "$rc" in
    0) echo "[run_tests] all tests passed" >&2 ;;
    5) echo "[run_tests] ERROR: pytest collected no tests (exit code 5); treating as failure" >&2 ;;
    *) echo "[run_tests] ERROR: pytest exited with code $rc" >&2 ;;
esac
exit "$rc"
