# Sourced by scripts/demo.sh and scripts/test.sh: choose the Python environment to install
# into, then install torch and implicitgrad with the given extras, with pip's progress shown.
#
#   PYTHON=/path/to/python   use this interpreter as it is (no virtual environment is made)
#   an active virtual environment ($VIRTUAL_ENV) is used as it is
#   otherwise the project's own environment .venv (or $IMPLICITGRAD_VENV) is created and used
#   TORCH_INDEX_URL=URL      take torch from this index, e.g. https://download.pytorch.org/whl/cpu
#                            for the CPU-only build (PyPI's Linux build is the CUDA one)

set -euo pipefail

step() { printf '\n== %s\n' "$*"; }

choose_python() {
    if [ -n "${PYTHON:-}" ]; then
        step "using PYTHON=$PYTHON"
        return
    fi
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
        step "using the active virtual environment $VIRTUAL_ENV"
        return
    fi
    local venv="${IMPLICITGRAD_VENV:-.venv}"
    if [ ! -x "$venv/bin/python" ]; then
        local base
        base=$(command -v python3 || command -v python || true)
        if [ -z "$base" ]; then
            echo "error: no python3 on PATH; install Python 3.11 or newer first." >&2
            exit 1
        fi
        if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "error: $base is Python $("$base" -c 'import platform; print(platform.python_version())');" \
                 "implicitgrad needs 3.11 or newer. Run with PYTHON=/path/to/python3.11." >&2
            exit 1
        fi
        step "creating the project's virtual environment $venv (with $base)"
        if ! "$base" -m venv "$venv"; then
            echo "error: '$base -m venv $venv' failed. On Debian/Ubuntu: sudo apt install python3-venv," \
                 "then run this command again." >&2
            exit 1
        fi
    else
        step "using the project's virtual environment $venv"
    fi
    PYTHON="$venv/bin/python"
}

install_torch_and_package() {
    local extras="$1"
    local torch_index=()
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        torch_index=(--index-url "$TORCH_INDEX_URL")
    fi
    # torch first and pinned: implicitgrad declares torch>=2.13, and an unpinned resolve
    # would pull the newest release. From PyPI on Linux this is the CUDA build (about
    # 0.5 GB, plus the nvidia-* packages); TORCH_INDEX_URL picks another build.
    step "installing torch==2.13.0${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (a large download the first time)"
    "$PYTHON" -m pip install "torch==2.13.0" "${torch_index[@]}"
    step "installing implicitgrad (editable) with the extras [$extras]"
    "$PYTHON" -m pip install -e ".[$extras]"
}
