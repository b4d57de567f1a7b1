#!/usr/bin/env bash
# Build the documentation with warnings as errors, then run its code as doctests: the
# examples of every page and of every docstring the API reference pulls in.
#
#   bash scripts/build_docs.sh            # output in docs/_build (HTML: docs/_build/html)
#   DOCS_BUILD_DIR=/tmp/docs bash scripts/build_docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import importlib, sphinx, furo; importlib.import_module('sphinx-mathjax-offline')" 2>/dev/null; then
    echo "error: the docs need Sphinx, furo and sphinx-mathjax-offline: pip install -e '.[docs]'" >&2
    exit 1
fi

out="${DOCS_BUILD_DIR:-docs/_build}"
# A fresh environment every time: nothing from an earlier build is reused.
rm -rf "$out/doctrees" "$out/html" "$out/doctest"
mkdir -p "$out"

echo "== sphinx html (warnings are errors)"
"$PYTHON" -m sphinx -W --keep-going -q -E -b html -d "$out/doctrees" docs "$out/html"

echo "== sphinx doctest"
# Reuses the environment the HTML build just read; runs every example.
"$PYTHON" -m sphinx -W --keep-going -q -b doctest -d "$out/doctrees" docs "$out/doctest"
tail -n 5 "$out/doctest/output.txt"
echo "docs: OK ($out/html/index.html)"
