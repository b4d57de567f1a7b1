#!/usr/bin/env bash
# Install implicitgrad with its test extras into the current Python, then run the whole suite:
# unit and property tests, docstring examples, quick runs of the examples and benchmarks,
# and the documentation build with warnings as errors (plus its doctests).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
# The suite is many small problems: one thread each avoids oversubscribing small CPUs.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# torch first and pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
"$PYTHON" -m pip install --quiet "torch==2.13.0" || exit 1
"$PYTHON" -m pip install --quiet -e ".[test,docs]" || exit 1

"$PYTHON" -m pytest tests implicitgrad --doctest-modules -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
[ "$status" -eq 0 ] || exit "$status"

if [ -f scripts/build_docs.sh ]; then
    bash scripts/build_docs.sh || exit 1
fi
