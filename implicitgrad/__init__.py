"""implicitgrad: differentiate through any inner optimizer by the implicit function theorem."""

from . import data, distributed, linalg, meta, nn, projections, prox, qp, solvers, testing, training
from ._api import fixed_point_solve, implicit, implicit_solve, root_solve
from ._diagnostics import ConvergenceError, ImplicitGradWarning, LinearSolveInfo, SolveInfo
from .linalg import CG, GMRES, MINRES, BiCGStab, Exact, LinearSolver, Neumann
from .qp import QPInfo, qp_solve

__version__ = "0.1.0"

__all__ = [
    "BiCGStab",
    "CG",
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
]
