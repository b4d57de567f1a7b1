"""Linear solvers on matrix-vector products over pytrees."""

from .._status import Status
from ._base import LinearSolver
from .bicgstab import BiCGStab
from .cg import CG
from .cgnr import CGNR
from .exact import Exact
from .gmres import GMRES
from .minres import MINRES
from .neumann import Neumann

__all__ = ["BiCGStab", "CG", "CGNR", "Exact", "GMRES", "LinearSolver", "MINRES", "Neumann", "Status"]
