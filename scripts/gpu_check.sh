#!/usr/bin/env bash
# The GPU check in one command (docs/mtp_rl.md, "GPU check").
#
#   bash scripts/gpu_check.sh --wheels DIR   bare GPU machine: install the project and the wheels in DIR (no
#                                            network), run the model-level and loss tests, then the device check
#                                            (CUDA, bf16, ~1B parameters: both rl scoring paths agree, ratios)
#   bash scripts/gpu_check.sh                same, nothing installed (the current environment)
#   bash scripts/gpu_check.sh --cpu          the same flow on CPU at tiny size, in the current environment (CI)
#   bash scripts/gpu_check.sh --fetch-wheels DIR   (machine with network) download what --wheels needs
#
# Prints one "check ... ok" or "ratio ...: x" line per result; exits non-zero on the first failure.
set -euo pipefail

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

requirements() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/gpu_check_wheels.txt; }

if [[ -n "$fetch" ]]; then
    mkdir -p "$fetch"
    requirements | xargs "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$fetch"
    size_mib=$(( $(du -sb "$fetch" | cut -f1) / 1048576 ))
    echo "gpu_check: $fetch holds ${size_mib} MiB of wheels (cap 64 MiB)"
    [[ "$size_mib" -le 64 ]] || { echo "gpu_check: over the 64 MiB cap" >&2; exit 1; }
    exit 0
fi

if [[ -n "$wheels" ]]; then
    [[ "$mode" == cuda ]] || { echo "gpu_check: --wheels is for the GPU machine; --cpu uses the current env" >&2; exit 2; }
    "$python" -m pip install --no-index --no-deps "$wheels"/*.whl
    "$python" -m pip install --no-index --no-deps --no-build-isolation -e .
fi

"$python" - <<'PY'
import importlib, sys
missing = []
for name in ("torch", "megatron.core", "verl", "verl_mtp", "pytest", "hydra", "tensordict"):
    try:
        importlib.import_module(name)
    except ImportError as exc:
        missing.append(f"{name} ({exc})")
if missing:
    sys.exit("gpu_check: missing " + ", ".join(missing) + ": carry its wheel (scripts/gpu_check_wheels.txt)")
PY

start=$SECONDS
if [[ "$mode" == cpu ]]; then
    tests=(tests/models/mcore/test_mtp_log_probs_on_cpu.py)
    driver=(--cpu)
    bench=(--vocab 512 --seq 64 --hidden 64 --layers 2 --repeats 3 --regimes detach rl)
else
    tests=(tests/models tests/workers/utils)
    driver=()
    bench=()
fi

echo "gpu_check: tests ${tests[*]}"
"$python" -m pytest -q -x -m "not multiprocess" -p no:cacheprovider "${tests[@]}" | tail -n 1
echo "gpu_check: device check ($mode)"
"$python" scripts/gpu_check.py "${driver[@]}" 2> >(grep -v -i "warn" >&2)
if [[ "$mode" == cpu ]]; then
    # the actor-step benchmark runs on the CPU platform only; on CUDA the device check above prints the ratios
    echo "gpu_check: actor-step benchmark (CPU, tiny)"
    "$python" -m benchmarks.mtp_actor_step "${bench[@]}" 2> >(grep -v -i "warn" >&2) | grep -v "^#"
fi
echo "gpu_check: done in $(( SECONDS - start ))s"
