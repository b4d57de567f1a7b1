"""Tools to test hypergradients: a checker against independent references, and test problems.

* :func:`check_hypergradient` / :func:`assert_hypergradient` compare the implicit
  hypergradient of a user's problem with a dense solve, finite differences through
  re-solving and unrolled differentiation, and explain a mismatch.
* :func:`relative_error` is the one relative error ``‖a − r‖ / ‖r‖`` (over pytrees, in
  float64) the checks, the test suites and the benchmarks report.
* :mod:`implicitgrad.testing.problems` builds well-posed bilevel problems (quadratic,
  ridge, logistic, pytree-structured, iMAML-style) with known solutions.
* :mod:`implicitgrad.testing.strategies` draws them as Hypothesis strategies (imported on
  first use: it needs the ``hypothesis`` package).
"""

from typing import Any

from . import problems
from ._report import relative_error
from .check import (
    HypergradientCheckError,
    HypergradientReport,
    assert_hypergradient,
    check_hypergradient,
    outer_takes_params,
)

__all__ = [
    "HypergradientCheckError",
    "HypergradientReport",
    "assert_hypergradient",
    "check_hypergradient",
    "outer_takes_params",
    "problems",
    "relative_error",
    "strategies",
]


def __getattr__(name: str) -> Any:
    # Hypothesis is a test dependency: import the strategies only when asked for.
    if name == "strategies":
        import importlib

        return importlib.import_module(f"{__name__}.strategies")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
