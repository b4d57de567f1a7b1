"""implicitgrad: differentiate through any inner optimizer by the implicit function theorem."""

import importlib
import sys
from types import ModuleType

from . import distributed, linalg, meta, nn, projections, prox, qp, solvers, testing
from ._api import fixed_point_solve, implicit, implicit_solve, root_solve
from ._diagnostics import ConvergenceError, ImplicitGradWarning, LinearSolveInfo, SolveInfo
from ._moved import FormerPaths
from ._warm import WarmStart
from .linalg import CG, CGNR, GMRES, MINRES, BiCGStab, Exact, LinearSolver, Neumann, Status
from .qp import QPInfo, qp_solve

__version__ = "0.1.0"

#: Imported on first use, not by ``import implicitgrad`` (see :mod:`implicitgrad.contrib`).
_ON_USE = {"contrib": "implicitgrad.contrib", "data": "implicitgrad.contrib.data",
           "training": "implicitgrad.contrib.training"}


if not any(isinstance(finder, FormerPaths) for finder in sys.meta_path):
    sys.meta_path.insert(0, FormerPaths())


def __getattr__(name: str) -> ModuleType:
    if name in _ON_USE:
        return importlib.import_module(_ON_USE[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BiCGStab",
    "CG",
    "CGNR",
    "ConvergenceError",
    "Exact",
    "GMRES",
    "ImplicitGradWarning",
    "LinearSolveInfo",
    "LinearSolver",
    "MINRES",
    "Neumann",
    "QPInfo",
    "SolveInfo",
    "Status",
    "contrib",
    "data",
    "distributed",
    "fixed_point_solve",
    "implicit",
    "implicit_solve",
    "linalg",
    "meta",
    "nn",
    "projections",
    "prox",
    "qp",
    "qp_solve",
    "root_solve",
    "solvers",
    "testing",
    "training",
    "WarmStart",
]
