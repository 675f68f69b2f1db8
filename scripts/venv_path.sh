#!/usr/bin/env bash
# Where the scripts find their Python environment for the megatron-core version in $VERL_MTP_MCORE (default below).
#   (no argument)  the virtualenv: always <repo>/.venv, set up for the default version
#   --mcore        the version
#   --overlay      the folder that holds another version (megatron-core + triton, installed with --target by
#                  scripts/setup_env.sh) and goes first on PYTHONPATH; empty for the default version
# Every other package is the same for all versions (megatron-core's only requirements are torch, numpy and
# packaging), so one virtualenv serves them all and another version costs one small install, not a second venv.
set -euo pipefail
default_mcore=0.16.1
mcore="${VERL_MTP_MCORE:-$default_mcore}"
[[ "$mcore" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "VERL_MTP_MCORE must be a version like 0.18.0, got '$mcore'" >&2; exit 2; }
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
    --mcore) echo "$mcore" ;;
    --default-mcore) echo "$default_mcore" ;;
    --overlay) [[ "$mcore" == "$default_mcore" ]] || echo "$repo_root/.venv/mcore-$mcore" ;;
    "") echo "$repo_root/.venv" ;;
    *) echo "venv_path.sh: unknown option '$1' (--mcore, --default-mcore, --overlay)" >&2; exit 2 ;;
esac
