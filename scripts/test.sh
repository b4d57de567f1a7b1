#!/usr/bin/env bash
# Install implicitgrad with its test extras, then run the whole suite: the type check
# (mypy), unit and property tests, docstring examples, quick runs of the examples and
# benchmarks, and the documentation build with warnings as errors (plus its doctests).
# Installs into the active virtual environment, or else into the project's .venv, which it
# creates (see _env.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_env.sh
. scripts/_env.sh
# The suite is many small problems: one thread each avoids oversubscribing small CPUs.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

choose_python
install_torch_and_package test,docs

step "type check: mypy implicitgrad"
"$PYTHON" -m mypy implicitgrad

step "pytest"
set +e
"$PYTHON" -m pytest tests implicitgrad --doctest-modules -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
[ "$status" -eq 0 ] || exit "$status"

step "documentation"
PYTHON="$PYTHON" bash scripts/build_docs.sh
