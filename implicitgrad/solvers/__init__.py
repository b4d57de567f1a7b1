"""Inner solvers: anything that maps ``(fn, x0, *params)`` to a solution."""

from ._base import InnerSolver, SolverStats
from .fixed_point import FixedPointIteration
from .gradient_descent import GradientDescent

__all__ = ["FixedPointIteration", "GradientDescent", "InnerSolver", "SolverStats"]
