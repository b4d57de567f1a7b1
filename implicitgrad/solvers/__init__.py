"""Inner solvers: anything that maps ``(fn, x0, *params)`` to a solution.

Built-in loops (:class:`GradientDescent`, :class:`AcceleratedGradient`, :class:`LBFGS`,
:class:`FixedPointIteration`, :class:`AndersonAcceleration`, :class:`Broyden`), solvers of constrained and
nonsmooth problems that state their own optimality condition (:class:`ProximalGradient`,
:class:`ProjectedGradient`) and adapters that run an existing optimizer: any
``torch.optim`` class (:class:`TorchOptimizer`), TorchOpt's functional optimizers
(:class:`TorchOpt`) and ``scipy.optimize.minimize`` (:class:`SciPy`).
All subclass :class:`InnerSolver` and report a :class:`SolverStats`.
"""

from ._base import InnerSolver, SolverStats
from .accelerated import AcceleratedGradient
from .anderson import AndersonAcceleration
from .broyden import Broyden
from .fixed_point import FixedPointIteration
from .gradient_descent import GradientDescent
from .lbfgs import LBFGS
from .proximal import ProjectedGradient, ProximalGradient
from .scipy_adapter import SciPy
from .torch_optimizer import TorchOptimizer
from .torchopt_adapter import TorchOpt

__all__ = [
    "AcceleratedGradient",
    "AndersonAcceleration",
    "Broyden",
    "FixedPointIteration",
    "GradientDescent",
    "InnerSolver",
    "LBFGS",
    "ProjectedGradient",
    "ProximalGradient",
    "SciPy",
    "SolverStats",
    "TorchOpt",
    "TorchOptimizer",
]
