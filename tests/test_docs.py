"""The documentation's own machinery (docs/conf.py), without running a Sphinx build.

The build itself — HTML with warnings as errors, then every example as a doctest — is
``bash scripts/build_docs.sh``.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("sphinx")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def conf():
    spec = importlib.util.spec_from_file_location("implicitgrad_docs_conf", DOCS / "conf.py")
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def drop(conf, docname, text, docs):
    app = SimpleNamespace(env=SimpleNamespace(found_docs=set(docs) | {docname}))
    source = [text]
    conf.drop_empty_globs(app, docname, source)
    return [line.strip() for line in source[0].split("\n") if line.startswith("   ")]


TOCTREE = """Title
=====

.. toctree::
   :glob:

{}

After.
"""


def entries(*lines):
    return TOCTREE.format("\n".join(f"   {line}" for line in lines))


def test_glob_that_matches_is_kept(conf):
    kept = drop(conf, "howto/index", entries("custom_solver", "*"),
                ["howto/custom_solver", "howto/testing"])
    assert kept == [":glob:", "custom_solver", "*"]


def test_glob_that_matches_nothing_is_dropped(conf):
    kept = drop(conf, "index", entries("getting_started", "benchmark[s]"),
                ["getting_started"])
    assert kept == [":glob:", "getting_started"]


def test_glob_matching_only_earlier_entries_is_dropped(conf):
    # Sphinx warns about a glob whose matches were all listed before it in the toctree.
    kept = drop(conf, "howto/index", entries("custom_solver", "*"), ["howto/custom_solver"])
    assert kept == [":glob:", "custom_solver"]


def test_glob_is_relative_to_the_document_or_absolute(conf):
    docs = ["tutorials/hpo_ridge", "benchmarks"]
    assert drop(conf, "tutorials/index", entries("hpo_*", "/benchmark[s]", "benchmark[s]"), docs) == [
        ":glob:", "hpo_*", "/benchmark[s]"
    ]


def test_text_outside_toctrees_is_untouched(conf):
    text = "Title\n=====\n\n.. code-block:: bash\n\n   ls *.py\n"
    source = [text]
    conf.drop_empty_globs(SimpleNamespace(env=SimpleNamespace(found_docs=set())), "index", source)
    assert source == [text]


def fake_env(names):
    domain = SimpleNamespace(objects=dict.fromkeys(names))
    return SimpleNamespace(get_domain=lambda name: domain)


def test_api_check_accepts_any_public_name_of_an_object(conf, monkeypatch):
    import implicitgrad

    warnings = []
    monkeypatch.setattr(conf.logger, "warning", lambda message, **kw: warnings.append(message))
    monkeypatch.setattr(conf, "package_modules", lambda: {"implicitgrad.linalg": implicitgrad.linalg})
    conf.check_api_reference(None, fake_env([f"implicitgrad.{n}" for n in implicitgrad.linalg.__all__]))
    assert warnings == []


def test_api_check_reports_a_missing_name_and_its_unrun_example(conf, monkeypatch):
    import implicitgrad

    warnings = []
    monkeypatch.setattr(conf.logger, "warning", lambda message, **kw: warnings.append(message))
    monkeypatch.setattr(conf, "package_modules", lambda: {
        "implicitgrad.linalg": implicitgrad.linalg,
        "implicitgrad.linalg.cg": sys.modules["implicitgrad.linalg.cg"],
    })
    names = [f"implicitgrad.{n}" for n in implicitgrad.linalg.__all__ if n != "CG"]
    conf.check_api_reference(None, fake_env(names))
    assert len(warnings) == 2
    assert warnings[0].startswith("implicitgrad.linalg.CG is in implicitgrad.linalg.__all__")
    assert "docstring example of implicitgrad.linalg.cg.CG is not run" in warnings[1]


def test_every_public_subpackage_has_an_api_page(conf):
    import implicitgrad

    public = {
        f"implicitgrad.{info.name}"
        for info in pkgutil.iter_modules(implicitgrad.__path__)
        if not info.name.startswith("_")
    }
    documented = set(conf.API_PAGES.values())
    assert public <= documented, f"add API pages for {sorted(public - documented)}"
    for page, module in conf.API_PAGES.items():
        text = (DOCS / f"{page}.rst").read_text()
        assert re.search(rf"^\.\. automodule:: {re.escape(module)}$", text, re.M), page


def test_optional_api_page_is_excluded_only_while_its_module_is_missing(conf):
    assert conf._missing("implicitgrad.no_such_module")
    assert not conf._missing("implicitgrad.solvers")
    excluded = set(conf.exclude_patterns)
    for page, module in conf.API_PAGES.items():
        assert (f"{page}.rst" in excluded) == conf._missing(module)
