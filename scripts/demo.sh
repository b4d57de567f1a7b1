#!/usr/bin/env bash
# Install implicitgrad with the example extras, then run the main demo: ridge penalties
# learned by hypergradient (examples/hpo_ridge.py --quick). Installs into the active
# virtual environment, or else into the project's .venv, which it creates (see _env.sh).
#
#   bash scripts/demo.sh                                                   # default torch build
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/demo.sh   # CPU-only torch
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_env.sh
. scripts/_env.sh
choose_python
install_torch_and_package examples
step "running python examples/hpo_ridge.py --quick"
"$PYTHON" examples/hpo_ridge.py --quick "$@"
