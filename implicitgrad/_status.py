"""How a linear solve ended: one enumeration, one table of messages.

Every linear solver — built in or a user's own — reports a :class:`Status`. The message
for a status says what happened and what to change; it is looked up here, first for the
solver by name, then for the status alone, so a user's solver gets a useful message
without writing one.
"""

from __future__ import annotations

import enum
from typing import Dict, Tuple, Union

__all__ = ["Status", "status_message"]


class Status(str, enum.Enum):
    """The outcome of a linear solve. A ``str`` subclass: ``Status.CONVERGED == "converged"``.

    ============================  =========================================================
    value                         meaning
    ============================  =========================================================
    ``converged``                 the relative residual reached ``tol``
    ``max_iterations``            the budget ran out first
    ``negative_curvature``        CG met ``pᵀAp ≤ 0`` with ``Ap`` far from 0: A is indefinite
    ``singular``                  A is (numerically) singular and b is not in its range
    ``diverging``                 CG: the residual grew far above its best value
    ``diverged``                  Neumann: the series grew: ``ρ(I − αA) ≥ 1``
    ``breakdown``                 GMRES, MINRES, BiCGStab, CGNR cannot extend their space
    ``preconditioner_not_spd``    MINRES: the preconditioner is not positive definite
    ``ill_conditioned``           Exact: the factorisation lost accuracy on a regular matrix
    ``nonfinite``                 NaN/Inf met in the data or the iterates
    ``deferred``                  not read yet (``on_failure="defer"``): ``SolveInfo.verify()``
                                  reads it
    ============================  =========================================================
    """

    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    NEGATIVE_CURVATURE = "negative_curvature"
    SINGULAR = "singular"
    DIVERGING = "diverging"
    DIVERGED = "diverged"
    BREAKDOWN = "breakdown"
    PRECONDITIONER_NOT_SPD = "preconditioner_not_spd"
    ILL_CONDITIONED = "ill_conditioned"
    NONFINITE = "nonfinite"
    DEFERRED = "deferred"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        # Printed like the plain strings statuses were: ``'converged'``.
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


_NONFINITE = (
    "Non-finite values appeared in the linear solve: check the inner solution and the "
    "parameters for NaN/Inf, and that the objective is twice differentiable at x*."
)

#: Keyed by ``(solver name, status)`` for advice specific to a solver, by status alone for
#: any solver. Placeholders: ``{res}`` (relative residual), ``{tol}``, ``{solver}``.
MESSAGES: Dict[Union[Status, Tuple[str, Status]], str] = {
    Status.CONVERGED: "",
    Status.MAX_ITERATIONS: (
        "{solver} did not reach tol={tol:.1e} (relative residual {res:.2e}). Increase its "
        "maxiter, precondition the system, or solve the inner problem further."
    ),
    Status.NEGATIVE_CURVATURE: (
        "{solver} met negative curvature (relative residual {res:.2e}): the matrix is not "
        "positive definite. Use ig.MINRES for a symmetric indefinite matrix or ig.GMRES."
    ),
    Status.SINGULAR: (
        "{solver}: the matrix is singular and the right-hand side is not in its range "
        "(relative residual {res:.2e}). Regularise the inner problem, or add damping."
    ),
    Status.DIVERGING: "{solver} diverged (relative residual {res:.2e}). Add damping or use ig.GMRES.",
    Status.DIVERGED: "{solver} diverged (relative residual {res:.2e}). Use ig.GMRES.",
    Status.BREAKDOWN: (
        "{solver} broke down at relative residual {res:.2e} (tol={tol:.1e}): the matrix is "
        "singular or nearly so. Use ig.Exact for the least-squares solution."
    ),
    Status.PRECONDITIONER_NOT_SPD: (
        "{solver}: the preconditioner is not positive definite (relative residual {res:.2e}). "
        "Use a symmetric positive definite preconditioner, or none."
    ),
    Status.ILL_CONDITIONED: (
        "{solver} lost accuracy (relative residual {res:.2e}, bound {tol:.1e}). Rescale the "
        "problem, or compute in float64."
    ),
    Status.NONFINITE: _NONFINITE,
    Status.DEFERRED: (
        "{solver}: the outcome of this solve is still on the device (on_failure='defer'); "
        "SolveInfo.verify() reads it and reports it."
    ),
    ("CG", Status.MAX_ITERATIONS): (
        "CG did not reach tol={tol:.1e} (relative residual {res:.2e}). Increase maxiter, "
        "add damping to improve the conditioning, or pass a preconditioner."
    ),
    ("CG", Status.NEGATIVE_CURVATURE): (
        "CG met negative curvature (pᵀAp ≤ 0) and returned its best iterate, relative "
        "residual {res:.2e} (tol={tol:.1e}): the matrix is not positive definite, so x is "
        "not a strict local minimum (or the inner solve stopped early). For a symmetric "
        "indefinite matrix use MINRES; otherwise add damping (e.g. CG(damping=1e-3)) or "
        "solve the inner problem further (a more converged x)."
    ),
    ("CG", Status.SINGULAR): (
        "CG met a direction p with A p ≈ 0 (zero curvature, pᵀAp ≈ 0, below rounding relative "
        "to ‖A‖): the matrix is singular, and the right-hand side has a component in its null "
        "space, so the system has no solution (or no unique one). CG returned its best "
        "iterate, relative residual {res:.2e} (tol={tol:.1e}). The inner problem does not "
        "determine x* uniquely (e.g. a flat direction of the objective): add regularisation "
        "to it (e.g. an L2 term), or damping (e.g. CG(damping=1e-3)) for the gradient of a "
        "regularised problem; ig.Exact gives the minimum-norm solution."
    ),
    ("CG", Status.DIVERGING): (
        "CG diverged: the residual grew above 1e2 × the best one met, and CG returned its "
        "best iterate, relative residual {res:.2e} (tol={tol:.1e}). The matrix is "
        "indefinite, singular or very badly conditioned: for a symmetric indefinite matrix use "
        "MINRES; otherwise add damping (e.g. CG(damping=1e-3)), pass a preconditioner, or "
        "solve the inner problem further (a more converged x)."
    ),
    ("Neumann", Status.MAX_ITERATIONS): (
        "The Neumann series did not reach tol={tol:.1e} (relative residual {res:.2e}); it "
        "converges like ρ(I − αA)^K. Increase maxiter, increase alpha (keeping "
        "alpha < 2/λ_max), or use CG, which converges much faster on the same products."
    ),
    ("Neumann", Status.DIVERGED): (
        "The Neumann series diverged (relative residual {res:.2e}): alpha is too large, "
        "ρ(I − αA) ≥ 1. Use alpha < 2/λ_max(A) (e.g. the inner learning rate), or CG."
    ),
    ("MINRES", Status.MAX_ITERATIONS): (
        "MINRES did not reach tol={tol:.1e} (relative residual {res:.2e}). Increase maxiter, "
        "or pass a symmetric positive definite preconditioner (e.g. the inverse of the "
        "absolute diagonal of the matrix); damping also improves the conditioning."
    ),
    ("MINRES", Status.PRECONDITIONER_NOT_SPD): (
        "The preconditioner is not positive definite: rᵀ M r < 0 was met, and MINRES stopped "
        "at relative residual {res:.2e} (tol={tol:.1e}). MINRES needs a symmetric positive "
        "definite M even for an indefinite matrix: use e.g. the inverse of the absolute "
        "diagonal, or no preconditioner."
    ),
    ("MINRES", Status.BREAKDOWN): (
        "MINRES broke down at measured relative residual {res:.2e} (tol={tol:.1e}): the "
        "Krylov space is exhausted, or the residual recurrence lost track of the residual. "
        "The matrix is singular (or nearly) and the right-hand side is not in its range. Add "
        "damping (e.g. MINRES(damping=1e-3)) for the solution of a regularised system, or use "
        "Exact for the least-squares solution."
    ),
    ("GMRES", Status.MAX_ITERATIONS): (
        "GMRES did not reach tol={tol:.1e} (relative residual {res:.2e}). Increase maxiter "
        "or restart (a larger Krylov space per cycle), or check that the Jacobian is "
        "well conditioned at x (solve the inner problem further)."
    ),
    ("GMRES", Status.BREAKDOWN): (
        "GMRES broke down at relative residual {res:.2e} (tol={tol:.1e}): a cycle ended on an "
        "invariant Krylov subspace without reducing the residual, so the matrix is singular "
        "(or nearly) and the right-hand side is not in its range. Solve the inner problem "
        "further (a Jacobian that is singular at x), or use Exact for the least-squares "
        "solution."
    ),
    ("BiCGStab", Status.MAX_ITERATIONS): (
        "BiCGStab did not reach tol={tol:.1e} (relative residual {res:.2e}). Increase maxiter, "
        "pass a preconditioner, or use GMRES (a minimal residual at every step)."
    ),
    ("BiCGStab", Status.BREAKDOWN): (
        "BiCGStab broke down at relative residual {res:.2e} (tol={tol:.1e}): ρ = ⟨r̂₀, r⟩ ≈ 0 "
        "or ⟨r̂₀, A p̂⟩ ≈ 0 (the shadow residual became orthogonal to the Krylov vectors) or ω ≈ 0 "
        "(the stabilising step stagnated). Use GMRES, which does not break down on a non-singular matrix."
    ),
    ("CGNR", Status.BREAKDOWN): (
        "CGNR broke down at relative residual {res:.2e} (tol={tol:.1e}): Aᵀr vanished while r "
        "did not, so the returned x is a least-squares solution of a singular (or nearly "
        "singular) system whose right-hand side is not in the range of A. Solve the inner "
        "problem further (a Jacobian that is singular at x), or regularise it."
    ),
    ("Exact", Status.SINGULAR): (
        "The matrix is numerically singular (smallest singular value at most n·ε times the "
        "largest, relative residual {res:.2e}): the optimality condition does not determine "
        "x* uniquely, so the implicit gradient is not defined. The minimum-norm least-squares "
        "solution was used. Add regularisation to the inner problem (e.g. an L2 term), or "
        "use CG(damping=...) for the gradient of a regularised problem."
    ),
    ("Exact", Status.ILL_CONDITIONED): (
        "The dense factorisation lost accuracy: its backward error exceeds {tol:.1e} "
        "(relative residual {res:.2e}) although the matrix is not singular. Rescale the "
        "variables or the problem, or compute in float64."
    ),
    ("Exact", Status.NONFINITE): (
        "Non-finite values in the dense matrix or right-hand side: the solution is NaN. "
        "Check x* and the parameters for NaN/Inf."
    ),
}


def status_message(status: Status, solver: str, residual: float, tol: float) -> str:
    """The message for ``status`` from ``solver`` (empty for :attr:`Status.CONVERGED`)."""
    template = MESSAGES.get((solver, status), MESSAGES[status])
    return template.format(res=residual, tol=tol, solver=solver or "the linear solver")
