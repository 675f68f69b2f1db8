#!/usr/bin/env bash
# The GPU check in one command (docs/cost.md, "Measured on a GPU").
#
#   bash scripts/gpu_check.sh --fetch-wheels DIR   on a machine that reaches PyPI: the wheels of
#                                                  scripts/gpu_check_wheels.txt for CPython 3.12 manylinux into DIR;
#                                                  a package published as an sdist only is built into a wheel
#                                                  (pure Python only); fails over the 64 MiB that may travel
#   bash scripts/gpu_check.sh --wheels DIR         on the bare GPU machine: install DIR's wheels into DIR/site
#                                                  (no network, no dependencies), then run the check
#   bash scripts/gpu_check.sh                      run the check in the current environment (CUDA)
#   bash scripts/gpu_check.sh --cpu                the same three sections on CPU at tiny size, with only the GPU
#                                                  machine's stack and the carried wheels importable
#                                                  (GPU_CHECK_BARE_STACK=1): what CI runs
#
# Sections (scripts/gpu_check.py), each its own process: scoring (both rl scoring paths agree), actor-step (every
# regime's micro-batch step against detach: time, memory, host syncs with the profiler's cudaStreamSynchronize
# count), worker (one real actor update through verl's worker for detach and rl_occ). ray, wandb, datasets,
# opentelemetry, fastapi, starlette and uvicorn are import-only stand-ins (scripts/gpu_check_stubs): anything
# calling them fails. One line per result; a failed section prints "FAILED <section>" and the exit code is 1.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
python="${PYTHON:-python3}"
mode=cuda
wheels=""
fetch=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) mode=cpu; shift ;;
        --wheels) wheels="$2"; shift 2 ;;
        --fetch-wheels) fetch="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        *) echo "gpu_check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

requirements() { sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^[[:space:]]*$/d' scripts/gpu_check_wheels.txt; }

fetch_one() {  # $1 requirement, $2 target folder
    local req="$1" dir="$2" sdists
    if "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any -d "$dir" "$req" 2>/dev/null; then
        return 0
    fi
    sdists="$(mktemp -d)"
    "$python" -m pip download -q --no-deps --no-binary=:all: -d "$sdists" "$req" || return 1
    "$python" -m pip wheel -q --no-deps -w "$dir" "$sdists"/* || return 1
    if ls "$dir"/*.whl | grep -v -e '-none-any.whl$' -e 'cp312' -e 'abi3' | grep -q .; then
        echo "gpu_check: $req has no Python 3.12 wheel and its sdist is not pure Python" >&2
        return 1
    fi
    echo "gpu_check: $req: built a wheel from its sdist"
}

if [[ -n "$fetch" ]]; then
    mkdir -p "$fetch"
    while read -r req; do
        fetch_one "$req" "$fetch" || { echo "gpu_check: could not fetch $req" >&2; exit 1; }
    done < <(requirements)
    size_mib=$(( $(du -sb "$fetch" | cut -f1) / 1048576 ))
    echo "gpu_check: $fetch holds $(ls "$fetch"/*.whl | wc -l) wheels, ${size_mib} MiB (cap 64 MiB)"
    [[ "$size_mib" -le 64 ]] || { echo "gpu_check: over the 64 MiB cap" >&2; exit 1; }
    exit 0
fi

site=""
if [[ -n "$wheels" ]]; then
    [[ "$mode" == cuda ]] || { echo "gpu_check: --wheels is for the GPU machine; --cpu uses the current env" >&2; exit 2; }
    site="$(cd "$wheels" && pwd)/site"
    "$python" -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl || exit 1
fi
export PYTHONPATH="$repo_root/scripts/gpu_check_stubs${site:+:$site}:$repo_root:$repo_root/examples${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$mode" == cpu ]]; then
    export GPU_CHECK_BARE_STACK=1
    flag=(--cpu)
else
    flag=()
fi

"$python" - <<'PY' || exit 1
import importlib.util

import torch

cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no CUDA"
import megatron.core
import verl

te = "TransformerEngine" if importlib.util.find_spec("transformer_engine") else "no TransformerEngine: local spec"
print(f"gpu_check: torch {torch.__version__} ({cuda}), megatron-core {megatron.core.__version__}, "
      f"verl {verl.__version__}, {te}")
PY

start=$SECONDS
failed=0
for section in scoring actor-step worker; do
    echo "gpu_check: section $section ($mode)"
    "$python" scripts/gpu_check.py "$section" "${flag[@]}" 2> >(grep -v -i -e "warn" -e "^\s*$" >&2)
    rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "FAILED $section (exit $rc)"
        failed=1
    fi
done
echo "gpu_check: done in $(( SECONDS - start ))s"
exit "$failed"
