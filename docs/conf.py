"""Sphinx configuration of the implicitgrad documentation.

Build with ``bash scripts/build_docs.sh`` (HTML with warnings as errors, then every code
example of the pages and of the documented docstrings as doctests).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import posixpath
import re
import sys
from pathlib import Path

from sphinx.util import logging
from sphinx.util.matching import patfilter

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document the checked-out sources, not whatever copy of the package is installed.
sys.path.insert(0, str(ROOT))

import implicitgrad  # noqa: E402

logger = logging.getLogger("implicitgrad.docs")

project = "implicitgrad"
author = "the implicitgrad authors"
copyright = "the implicitgrad authors"
release = implicitgrad.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax 3 served from the site itself (copied into _static/mathjax), not from a CDN:
    # the documentation renders its math offline.
    "sphinx-mathjax-offline",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

# API pages of subpackages that do not exist (yet) are left out of the build; a
# subpackage that exists but fails to import still fails it.
API_PAGES = {
    "api/solvers": "implicitgrad.solvers",
    "api/linalg": "implicitgrad.linalg",
    "api/testing": "implicitgrad.testing",
    "api/testing_problems": "implicitgrad.testing.problems",
    "api/testing_strategies": "implicitgrad.testing.strategies",
    "api/meta": "implicitgrad.meta",
    "api/contrib": "implicitgrad.contrib",
    "api/data": "implicitgrad.contrib.data",
    "api/training": "implicitgrad.contrib.training",
    "api/nn": "implicitgrad.nn",
    "api/prox": "implicitgrad.prox",
    "api/projections": "implicitgrad.projections",
    "api/qp": "implicitgrad.qp",
    "api/distributed": "implicitgrad.distributed",
    "api/testing_syncs": "implicitgrad.testing.syncs",
}


def _missing(module: str) -> bool:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return True
    # An empty folder is found as a namespace package: nothing to document yet.
    return spec is None or spec.origin is None


exclude_patterns = ["_build", "_static", "Thumbs.db", ".DS_Store"]
exclude_patterns += [f"{page}.rst" for page, module in API_PAGES.items() if _missing(module)]

root_doc = "index"
source_suffix = {".rst": "restructuredtext"}
# Without network access there is no intersphinx: references to torch and the standard
# library stay plain text, so unresolved references cannot be errors.
nitpicky = False
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# -- autodoc and napoleon ------------------------------------------------------------
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# A subclass re-documenting the base-class contract on every solver is noise.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as fields, so an "Attributes:" section never duplicates a member entry.
napoleon_use_ivar = False
napoleon_use_rtype = False

# -- doctest ---------------------------------------------------------------------------
# Every ``>>>`` example of the pages and of the docstrings that autodoc pulls in runs
# under ``sphinx-build -b doctest``. Warnings of the library are errors there, as in
# the test suite, so an example that only works with a warning fails. The setup binds
# private names only: every example imports what it uses, as a reader would.
doctest_global_setup = """
import warnings as _warnings
import torch as _torch
import implicitgrad as _ig
_torch.manual_seed(0)
_warnings.simplefilter("error", _ig.ImplicitGradWarning)
"""
doctest_global_cleanup = """
_torch.set_default_dtype(_torch.float32)
"""
doctest_test_doctest_blocks = "default"

# -- HTML ------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"implicitgrad {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_theme_options = {"navigation_with_keys": True}


# -- every public name, and every docstring example, is in the API reference -------------
def package_modules() -> dict:
    """Every module of the package, by dotted name.

    A module that needs an optional third-party package which is not installed is left
    out; any other import error fails the build.
    """
    modules = {"implicitgrad": implicitgrad}
    for info in pkgutil.walk_packages(implicitgrad.__path__, "implicitgrad.", onerror=lambda name: None):
        try:
            modules[info.name] = importlib.import_module(info.name)
        except ImportError as error:
            if error.name and not error.name.startswith("implicitgrad"):
                logger.info(f"[api check] skipped {info.name}: {error}")
                continue
            raise
    return modules


def _identity(obj) -> int:
    # Methods are looked up as new bound objects each time; compare their functions.
    return id(getattr(obj, "__func__", obj))


def _resolve(fullname: str):
    parts = fullname.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def check_api_reference(app, env) -> None:
    """Warn (an error under ``-W``) about what the reference leaves out.

    * every name in the ``__all__`` of a public module (no ``_`` in its dotted path) must
      be documented, under that name or any other public name of the same object;
    * every docstring with a ``>>>`` example must belong to a documented object, because
      the doctest build runs exactly the examples of the documented docstrings.
    """
    documented = set()
    for fullname in env.get_domain("py").objects:
        obj = _resolve(fullname)
        if obj is not None:
            documented.add(_identity(obj))
    modules = package_modules()
    for module_name, module in modules.items():
        if any(part.startswith("_") for part in module_name.split(".")):
            continue
        for name in getattr(module, "__all__", ()):
            if _identity(getattr(module, name, None)) not in documented:
                logger.warning(
                    f"{module_name}.{name} is in {module_name}.__all__ but not in the API "
                    "reference; add it to the matching page in docs/api/.",
                    type="implicitgrad",
                )
    finder = doctest.DocTestFinder(exclude_empty=True)
    for module_name, module in modules.items():
        for test in finder.find(module, module_name):
            obj = _resolve(test.name)
            if test.examples and obj is not None and _identity(obj) not in documented:
                logger.warning(
                    f"the docstring example of {test.name} is not run by the doctest build: "
                    "the object is not in the API reference. Document it, or move the example "
                    "to a documented docstring.",
                    type="implicitgrad",
                )


def skip_namedtuple_fields(app, what, name, obj, skip, options):
    """Leave out the generated "Alias for field number N" members of a NamedTuple.

    Its docstring's "Attributes:" section already describes each field.
    """
    if re.fullmatch(r"Alias for field number \d+", (getattr(obj, "__doc__", None) or "").strip()):
        return True
    return None


# -- pages written later appear automatically --------------------------------------------
GLOB_CHARS = re.compile(r"[*?\[]")


def drop_empty_globs(app, docname, source) -> None:
    """Remove toctree glob entries that match no document yet.

    The toctrees list pages that are added over time (how-to guides, tutorials, the
    benchmarks page, API pages of new subpackages) by glob patterns; Sphinx warns about a
    pattern that matches nothing, so such an entry is left out until its page exists.
    """
    folder = posixpath.dirname(docname)

    def resolve(entry: str) -> str:
        entry = re.sub(r"^.*<(.+)>$", r"\1", entry)
        return entry[1:] if entry.startswith("/") else posixpath.normpath(posixpath.join(folder, entry))

    lines = source[0].split("\n")
    in_toctree = False
    remaining: set = set()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not line[0].isspace():
            in_toctree = stripped.startswith(".. toctree::")
            # As Sphinx does, an entry matched once is not matched again in a toctree.
            remaining = set(app.env.found_docs) - {docname}
            continue
        if not in_toctree or not stripped or stripped.startswith(":"):
            continue
        if not GLOB_CHARS.search(stripped):
            remaining.discard(resolve(stripped))
            continue
        matches = patfilter(remaining, resolve(stripped))
        if matches:
            remaining.difference_update(matches)
        else:
            lines[i] = ""
    source[0] = "\n".join(lines)


def setup(app):
    app.connect("source-read", drop_empty_globs)
    app.connect("autodoc-skip-member", skip_namedtuple_fields)
    app.connect("env-check-consistency", check_api_reference)
