#!/usr/bin/env bash
# On a machine with a GPU: verify what implicitgrad promises for CUDA and write a report
# (runs/gpu_check/gpu_check.md and .json). Installs torch and the test extras when they are
# missing (into the active virtual environment, or the project's .venv, see _env.sh), then
# runs `python -m implicitgrad.testing.gpu_check`, which installs the CUDA build of torch
# if the present one is CPU-only, runs every @pytest.mark.cuda test and
# `benchmarks/run.py --device cuda --quick`. Without a CUDA device it reports
# "no CUDA device: skipped" and exits 0. Arguments go to the Python command (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_env.sh
. scripts/_env.sh

choose_python
# Collecting the CUDA tests imports every test module, hence the whole [test] extra.
if ! "$PYTHON" -c "import implicitgrad, pytest, hypothesis, scipy, sklearn, matplotlib, torchopt" 2>/dev/null; then
    install_torch_and_package test
fi

step "python -m implicitgrad.testing.gpu_check $*"
exec "$PYTHON" -m implicitgrad.testing.gpu_check "$@"
