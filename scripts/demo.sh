#!/usr/bin/env bash
# Install implicitgrad with the example extras into the current Python and run the main demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -m pip install --quiet "torch==2.13.0"
"$PYTHON" -m pip install --quiet -e ".[examples]"
"$PYTHON" examples/hpo_ridge.py --quick "$@"
