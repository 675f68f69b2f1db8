#!/usr/bin/env bash
# Prints the virtualenv the scripts use for the megatron-core version in $VERL_MTP_MCORE (default
# below): <repo>/.venv for the default version, <repo>/.venv-mcore-<version> for any other.
# With --mcore it prints the version instead.
set -euo pipefail
default_mcore=0.16.1
mcore="${VERL_MTP_MCORE:-$default_mcore}"
[[ "$mcore" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "VERL_MTP_MCORE must be a version like 0.18.0, got '$mcore'" >&2; exit 2; }
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${1:-}" == "--mcore" ]]; then
    echo "$mcore"
elif [[ "$mcore" == "$default_mcore" ]]; then
    echo "$repo_root/.venv"
else
    echo "$repo_root/.venv-mcore-$mcore"
fi
