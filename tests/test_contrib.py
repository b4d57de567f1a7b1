"""The trainer and the few-shot datasets live in implicitgrad.contrib, imported only on use;
their former paths name the same modules."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_implicitgrad_loads_no_contrib_module():
    loaded = _run(
        "import sys, implicitgrad\n"
        "print(sorted(m for m in sys.modules if m.startswith(('implicitgrad.contrib', 'implicitgrad.data',"
        " 'implicitgrad.training'))))"
    )
    assert loaded == "[]"


@pytest.mark.parametrize("old, new", [
    ("implicitgrad.training", "implicitgrad.contrib.training"),
    ("implicitgrad.data", "implicitgrad.contrib.data"),
    ("implicitgrad.data.omniglot", "implicitgrad.contrib.data.omniglot"),
    ("implicitgrad.data.sinusoid", "implicitgrad.contrib.data.sinusoid"),
])
def test_former_paths_name_the_same_modules(old, new):
    # A fresh interpreter, so that the former path is the first one imported.
    assert _run(f"import {old} as a, {new} as b; print(a is b)") == "True"


def test_attributes_import_on_use():
    import implicitgrad as ig
    import implicitgrad.contrib.data
    import implicitgrad.contrib.training

    assert ig.training is implicitgrad.contrib.training and ig.contrib.training is ig.training
    assert ig.data is implicitgrad.contrib.data
    from implicitgrad.data import Sinusoid
    from implicitgrad.training import run_training
    assert run_training.__module__ == "implicitgrad.contrib.training"
    assert Sinusoid.__module__ == "implicitgrad.contrib.data.sinusoid"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ig.nothing  # noqa: B018
