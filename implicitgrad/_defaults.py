"""Every default tolerance of the library, per dtype, in one table.

=========  ==============  =============  ===============  ====================
dtype      linear ``tol``  inner ``tol``  ``forward_tol``  check_hypergradient
=========  ==============  =============  ===============  ====================
float64    1e-10           1e-8           1e-6             eps 1e-3, rtol 1e-6
float32    1e-5            1e-4           1e-3             eps 5e-2, rtol 1e-3
float16    2e-3            1e-4           3e-2             as float32
bfloat16   1.5e-2          1e-4           3e-2             as float32
=========  ==============  =============  ===============  ====================

* linear: the relative residual ``‖Ax − b‖ / ‖b‖`` a linear solver aims for; float16 and
  bfloat16 at about two units of roundoff (9.8e-4, 7.8e-3), what their products allow.
* inner: the relative gradient or residual norm an inner solver stops at.
* forward: the forward residual ``‖F(x*, θ)‖ / max(1, ‖F(x0, θ)‖)`` above which
  ``implicit_solve`` reports the inner solution as not stationary.
* check: the finite-difference step and the tolerances of
  :func:`~implicitgrad.testing.check_hypergradient`.

:func:`default_linear_solver` is the backward linear solver used when none is given.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict

import torch

if TYPE_CHECKING:
    from .linalg import LinearSolver

__all__ = [
    "Tolerances",
    "check_settings",
    "default_linear_solver",
    "forward_tol",
    "inner_tol",
    "linear_tol",
    "tolerances",
]


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """The default tolerances of one dtype (see the module docstring)."""

    linear: float
    inner: float
    forward: float
    check: Dict[str, float]


_CHECK_64 = {"eps": 1e-3, "rtol": 1e-6, "fd_rtol": 1e-4, "unrolled_rtol": 1e-4, "atol": 1e-5}
_CHECK_32 = {"eps": 5e-2, "rtol": 1e-3, "fd_rtol": 5e-2, "unrolled_rtol": 1e-2, "atol": 1e-3}

TABLE: Dict[torch.dtype, Tolerances] = {
    torch.float64: Tolerances(linear=1e-10, inner=1e-8, forward=1e-6, check=_CHECK_64),
    torch.float32: Tolerances(linear=1e-5, inner=1e-4, forward=1e-3, check=_CHECK_32),
    torch.float16: Tolerances(linear=2e-3, inner=1e-4, forward=3e-2, check=_CHECK_32),
    torch.bfloat16: Tolerances(linear=1.5e-2, inner=1e-4, forward=3e-2, check=_CHECK_32),
}

#: For any other dtype (the coarsest settings).
OTHER = Tolerances(linear=1e-3, inner=1e-4, forward=3e-2, check=_CHECK_32)


def tolerances(dtype: torch.dtype) -> Tolerances:
    """The row of the table for ``dtype``."""
    return TABLE.get(dtype, OTHER)


def linear_tol(dtype: torch.dtype) -> float:
    """Relative residual a linear solve aims for when no ``tol`` is given."""
    return tolerances(dtype).linear


def inner_tol(dtype: torch.dtype) -> float:
    """Relative gradient / residual norm an inner solver stops at when no ``tol`` is given."""
    return tolerances(dtype).inner


def forward_tol(dtype: torch.dtype) -> float:
    """Relative forward residual above which the inner solution is reported as not stationary."""
    return tolerances(dtype).forward


def check_settings(dtype: torch.dtype) -> Dict[str, float]:
    """``check_hypergradient``'s finite-difference step and tolerances (a fresh dict)."""
    return dict(tolerances(dtype).check)


def default_linear_solver(symmetric: bool) -> LinearSolver:
    """The backward linear solver used when none is given, from the condition's ``symmetric`` flag.

    :class:`~implicitgrad.CG` when ``A = ∂ₓF`` is symmetric by construction (an
    objective's Hessian), :class:`~implicitgrad.GMRES` otherwise (a residual's Jacobian,
    ``I − ∂ₓT`` of a mapping).
    """
    from .linalg import CG, GMRES  # linalg reads its tolerances from this module

    return CG() if symmetric else GMRES()
