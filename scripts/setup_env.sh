#!/usr/bin/env bash
# Create / update the project virtualenv at <repo>/.venv (idempotent).
#
#   1. python3 -m venv .venv                       (only if .venv/bin/python is missing)
#   2. pip install "$VERL_MTP_TORCH_SPEC"          (only if the installed torch does not satisfy it)
#   3. pip install -c .venv/verl-mtp-constraints.txt -e ".[test]"
#      The generated constraints file pins torch to the version installed in step 2 (so no
#      dependency can swap it for another build, e.g. pull CUDA wheels onto a CPU box) plus the
#      tested set in scripts/constraints-cpu.txt (verl==0.9.1, megatron-core==0.16.1, ...).
#      Skipped when .venv/.verl-mtp-setup.stamp holds the same sha256 of pyproject.toml + constraints.
#   4. Only with VERL_MTP_MCORE set to another megatron-core version: that version and triton installed
#      with `pip install --no-deps --target .venv/mcore-<version>` (cached by its own stamp), the folder
#      scripts/run_tests.sh and scripts/run_main.sh put first on PYTHONPATH (scripts/venv_path.sh --overlay).
#
# Environment variables:
#   VERL_MTP_TORCH_SPEC      torch requirement (default: torch==2.13.0, the CPU wheel on the test box).
#                            GPU users: set it to the CUDA build matching the cluster, e.g.
#                            VERL_MTP_TORCH_SPEC='torch==2.9.1'.
#   VERL_MTP_TORCH_PIP_ARGS  extra pip args for the torch install only, e.g.
#                            '--index-url https://download.pytorch.org/whl/cu128'.
#   VERL_MTP_LOCK=0          pin only torch, verl==0.9.1 and megatron-core==0.16.1 instead of the
#                            whole tested set (try this if another torch conflicts with the set).
#   VERL_MTP_PYTHON          interpreter used to create the venv (default: python3).
#   VERL_MTP_MCORE           megatron-core version: 0.16.1 (default), 0.18.0 (verl 0.9.x's pin) or 0.19.2.
#                            0.17+ declares Requires-Python >= 3.12 but its code runs on 3.11: below 3.12 it
#                            is built from its sdist (needs a C++ compiler) with --ignore-requires-python,
#                            and it imports triton, which is installed too (scripts/constraints-mcore.txt).
#
# Usable as `bash scripts/setup_env.sh` or `source scripts/setup_env.sh` (sourcing also activates .venv).

_verl_mtp_setup() {
    set -euo pipefail

    local repo_root venv py torch_spec torch_pip_args constraints stamp want have mcore
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    mcore="$(bash "$repo_root/scripts/venv_path.sh" --default-mcore)"
    venv="$(bash "$repo_root/scripts/venv_path.sh")"
    py="$venv/bin/python"
    torch_spec="${VERL_MTP_TORCH_SPEC:-torch==2.13.0}"
    torch_pip_args="${VERL_MTP_TORCH_PIP_ARGS:-}"
    constraints="$venv/verl-mtp-constraints.txt"
    stamp="$venv/.verl-mtp-setup.stamp"

    export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

    log() { echo "[setup_env] $*" >&2; }
    die() { echo "[setup_env] ERROR: $*" >&2; exit 1; }

    # megatron-core $2 and the pins of scripts/constraints-mcore.txt into the folder $1 (no dependencies: the
    # venv has them). PyPI's 0.17+ declares Python >= 3.12; below that it is built from its sdist.
    install_overlay() {
        local dir="$1" version="$2" pins want_overlay args=()
        pins="$(grep -v -i -E '^[[:space:]]*(#|$)' "$repo_root/scripts/constraints-mcore.txt" | tr '\n' ' ')"
        want_overlay="megatron-core==$version $pins"
        if [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$want_overlay" ]]; then
            log "megatron-core $version overlay up to date ($dir)"
            return
        fi
        "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
            || args=(--ignore-requires-python --no-binary megatron-core)
        log "pip install --no-deps --target $dir ${args[*]} $want_overlay"
        rm -rf "$dir" "$dir.tmp"
        # shellcheck disable=SC2086  # pins is deliberately word-split
        "$py" -m pip install --no-deps --target "$dir.tmp" "${args[@]}" "megatron-core==$version" $pins \
            || die "installing megatron-core $version failed"
        mv "$dir.tmp" "$dir"
        echo "$want_overlay" >"$dir/.stamp"
    }

    # --- 1. venv ------------------------------------------------------------------------------------
    mkdir -p "$venv"
    # Serialise concurrent runs (e.g. run_main.sh and run_tests.sh started together).
    exec 9>"$venv/.setup.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi

    if [[ ! -x "$py" ]]; then
        local base_py="${VERL_MTP_PYTHON:-python3}"
        command -v "$base_py" >/dev/null 2>&1 || die "'$base_py' not found (set VERL_MTP_PYTHON)"
        log "creating virtualenv $venv with $("$base_py" --version 2>&1)"
        "$base_py" -m venv "$venv" || die "python -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
    fi
    "$py" -c 'import sys' 2>/dev/null || die "$py is broken; delete $venv and re-run"
    log "using $("$py" --version 2>&1) at $py"

    # --- 2. torch -----------------------------------------------------------------------------------
    # Prints the installed torch version if it satisfies $1, else nothing; exit 2 on a bad spec.
    torch_ok() {
        "$py" - "$1" <<'EOF'
import sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
try:
    req = Requirement(sys.argv[1])
except Exception as exc:
    sys.exit(f"invalid VERL_MTP_TORCH_SPEC {sys.argv[1]!r}: {exc}")
if req.name.lower() != "torch":
    sys.exit(f"VERL_MTP_TORCH_SPEC must be a requirement on torch, got {sys.argv[1]!r}")
try:
    have = metadata.version("torch")
except metadata.PackageNotFoundError:
    sys.exit(0)
if req.url or req.specifier.contains(have, prereleases=True):
    print(have)
EOF
    }

    have="$(torch_ok "$torch_spec")" || die "bad VERL_MTP_TORCH_SPEC"
    if [[ -n "$have" ]]; then
        log "torch $have already satisfies '$torch_spec'"
    else
        log "installing '$torch_spec' ${torch_pip_args:+(pip args: $torch_pip_args)}"
        # shellcheck disable=SC2086  # torch_pip_args is deliberately word-split
        "$py" -m pip install $torch_pip_args "$torch_spec" || die "torch install failed"
        have="$(torch_ok "$torch_spec")" || die "bad VERL_MTP_TORCH_SPEC"
        [[ -n "$have" ]] || die "torch still does not satisfy '$torch_spec' after install"
        log "installed torch $have"
    fi

    # --- 3. project + deps under constraints --------------------------------------------------------
    {
        echo "# Generated by scripts/setup_env.sh -- do not edit."
        echo "torch==$have"
        echo "megatron-core==$mcore"
        if [[ "${VERL_MTP_LOCK:-1}" == "0" ]]; then
            echo "verl==0.9.1"
        else
            grep -v -i -E '^[[:space:]]*(#|$|torch==|megatron-core==)' "$repo_root/scripts/constraints-cpu.txt"
        fi
    } >"$constraints.tmp"
    mv "$constraints.tmp" "$constraints"

    want="$(cat "$repo_root/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
        && "$py" -c 'from importlib import metadata; metadata.version("verl-mtp")' 2>/dev/null; then
        log "dependencies up to date (stamp $stamp matches); skipping pip install"
    else
        rm -f "$stamp"
        log "pip install -c $constraints -e \"$repo_root[test]\""
        (cd "$repo_root" && "$py" -m pip install -c "$constraints" -e ".[test]") \
            || die "pip install failed"
        log "pip check"
        "$py" -m pip check || die "pip check found broken requirements"
        local after
        after="$("$py" -c 'from importlib import metadata; print(metadata.version("torch"))')"
        [[ "$after" == "$have" ]] || die "torch changed from $have to $after during install"
        echo "$want" >"$stamp"
    fi

    [[ "$("$py" -c 'from importlib import metadata; print(metadata.version("megatron-core"))')" == "$mcore" ]] \
        || die "$venv does not hold megatron-core $mcore; delete it and re-run"
    # --- 4. another megatron-core version, as an overlay ---------------------------------------------
    local overlay
    overlay="$(bash "$repo_root/scripts/venv_path.sh" --overlay)"
    if [[ -n "$overlay" ]]; then
        install_overlay "$overlay" "$(bash "$repo_root/scripts/venv_path.sh" --mcore)"
    fi
    PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}" "$py" - <<'EOF' >&2
from importlib import metadata
vs = {d: metadata.version(d) for d in ("torch", "verl", "megatron-core", "verl-mtp")}
print("[setup_env] ready: " + ", ".join(f"{k} {v}" for k, v in vs.items()))
EOF
    exec 9>&-
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    _verl_mtp_setup
else
    # Sourced: run in a subshell so set -e / exit cannot kill the caller's shell, then activate.
    ( _verl_mtp_setup ) || return $?
    # shellcheck disable=SC1091
    source "$(bash "$(dirname "${BASH_SOURCE[0]}")/venv_path.sh")/bin/activate"
    _verl_mtp_overlay="$(bash "$(dirname "${BASH_SOURCE[0]}")/venv_path.sh" --overlay)"
    if [[ -n "$_verl_mtp_overlay" ]]; then
        export PYTHONPATH="$_verl_mtp_overlay${PYTHONPATH:+:$PYTHONPATH}"
    fi
    unset _verl_mtp_overlay
fi
