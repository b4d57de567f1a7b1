"""Running the linear solver inside the rules: precision, a symmetry check, the record.

float16 / bfloat16 systems are solved in float32; a solver that assumes a symmetric
matrix is checked on a condition that is not symmetric by construction; every solve's
:class:`LinearSolveInfo` goes to the info sink of its call, and a failed or useless solve
is reported with the measured numbers and the fix.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ._compat import host_readable
from ._diagnostics import LinearSolveInfo, SolveInfo, report
from ._forward import Options
from ._problem import Condition
from ._status import Status
from .linalg._base import (
    PytreeLayout,
    deferred_checks,
    dot,
    norm,
    product_precision,
    propagate_nonfinite,
    run_linear_solver,
)
from .linalg._recycle import recycling
from .linalg.cgnr import transposed_product

#: Dtypes whose linear solves run in float32: their reductions lose too much precision.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def solve_linear(cond: Condition, options: Options, sink: SolveInfo, lin, transpose: bool,
                 b: List[torch.Tensor]) -> List[torch.Tensor]:
    """Run the linear solver of ``options`` on ``A`` or ``Aᵀ``, record its info in ``sink``
    and report its outcome.

    float16 / bfloat16 systems are solved in float32 (the products stay in the problem's
    dtype; the solver's vectors and reductions, whose sums of many rounded terms would
    stall or overflow, do not), for every solver alike. A solve that met non-finite
    values returns NaN for the systems concerned, never a finite guess. With
    ``on_failure="defer"`` the solve and its checks run without a host read (the solver
    returns NaN itself where it met NaN/Inf) and its outcome is kept for
    :meth:`SolveInfo.verify`.
    """
    op = lin.rmatvec if transpose else lin.matvec
    dtype = b[0].dtype
    n = cond.batch_ndim
    layout = PytreeLayout(cond.codec.x_spec, list(cond.codec.x_template), n)
    if dtype in LOW_PRECISION:
        low_op = op

        def op(v):  # noqa: F811 - the same product, computed in the problem's dtype
            return [o.float() for o in low_op([t.to(dtype) for t in v])]

        b = [t.float() for t in b]
    # A solver that needs products with Aᵀ as well (ig.CGNR) receives the other product.
    needs_other = getattr(options.linear_solver, "needs_transpose", False)
    other = (lin.matvec if transpose else lin.rmatvec) if needs_other else None
    kind = "backward" if transpose else "forward"
    warm = options.warm_start if options.warm_start is not None and options.warm_start.usable(b) else None
    init = None if warm is None else warm.initial_guess(kind, b)
    recycler = None if warm is None else warm.recycler(kind)
    defer = options.on_failure == "defer"
    with product_precision(dtype), transposed_product(other), recycling(recycler), deferred_checks(defer):
        if not cond.symmetric and getattr(options.linear_solver, "symmetric", False):
            _check_symmetric(cond, options, sink, op, b)
        solution, info = run_linear_solver(options.linear_solver, op, b, batch_ndim=n, layout=layout, init=init)
    if not defer:
        solution = propagate_nonfinite(op, b, solution, info, n,
                                       rhs_flagged=getattr(options.linear_solver, "_flags_nonfinite_rhs", False))
    if warm is not None:
        warm.store(kind, solution)
    solution = [t if t.dtype == dtype else t.to(dtype) for t in solution]
    record_outcome(cond, options, sink, info, transpose)
    return solution


def record_outcome(cond: Condition, options: Options, sink: SolveInfo, info: LinearSolveInfo,
                   transpose: bool) -> None:
    """Record a linear solve's info in ``sink`` and report a failed or useless solve (with
    ``on_failure="defer"``: when :meth:`SolveInfo.verify` has read its outcome)."""
    sink.record(info)
    if info.status is Status.DEFERRED:
        def settle(values):
            info.settle(values)
            return outcome_message(cond, info, transpose)

        sink.defer(info.deferred_values(), settle)
        return
    if options.on_failure == "ignore":
        return  # the outcome stays in sink, the message would not be shown
    message = outcome_message(cond, info, transpose)
    if message is not None:
        report(message, options.on_failure)


def outcome_message(cond: Condition, info: LinearSolveInfo, transpose: bool) -> Optional[str]:
    """What to report about a failed or useless linear solve, ``None`` for a good one."""
    worse_than_zero = info.residual > 1
    if not info.converged or worse_than_zero:
        failures = []
        if not info.converged:
            failures.append("did not converge")
            fits = (
                "For this condition A is symmetric (a Hessian): ig.CG fits a positive definite A, "
                "ig.MINRES an indefinite one, ig.Exact a small one."
                if cond.symmetric
                else "For this condition A is not symmetric in general: ig.GMRES or ig.BiCGStab fit, "
                "ig.Exact a small one, ig.Neumann a contractive fixed point."
            )
        if worse_than_zero:
            # u = 0 has relative residual 1: anything above is worse than no solve at all.
            failures.append(
                f"returned a solution worse than zero (relative residual {info.residual:.3e} "
                "> 1, the residual of u = 0). For a symmetric indefinite matrix use ig.MINRES, "
                "for a non-symmetric one ig.GMRES; or add damping, or solve the inner problem "
                "further"
            )
        return (
            f"implicit differentiation: the linear solve for the "
            f"{'backward' if transpose else 'forward-mode'} pass {' and '.join(failures)}. {info}"
            + (f" {fits}" if not info.converged else "")
        )
    return None


def _check_symmetric(cond: Condition, options: Options, sink: SolveInfo, op: Callable, b: List[torch.Tensor]) -> None:
    """Measures whether ``A`` is symmetric before a solver that assumes it (CG, MINRES) runs.

    With ``u = b`` and a fixed, non-random probe ``w``: ``|⟨Au, w⟩ − ⟨u, Aw⟩| ≤ τ ‖Au‖‖w‖``
    per system, ``τ = 1e3·ε`` of the dtype (products of a symmetric ``A`` agree to rounding).
    Two products; skipped on batched tensors, whose values the host cannot read. With
    ``on_failure="defer"`` the measure is kept for :meth:`SolveInfo.verify`.
    """
    if not all(host_readable(t) for t in b):
        return
    n = cond.batch_ndim
    w = [torch.sin(1.0 + 0.7548776662 * torch.arange(t.numel(), device=t.device, dtype=t.dtype)).reshape(t.shape)
         for t in b]
    au, aw = op(list(b)), op(w)
    gap = (dot(au, w, n) - dot(b, aw, n)).abs()
    scale = norm(au, n) * norm(w, n)
    tau = 1e3 * torch.finfo(b[0].dtype).eps
    asymmetric = gap > tau * scale

    def worst() -> torch.Tensor:
        return (gap / scale.clamp_min(torch.finfo(b[0].dtype).tiny)).max()

    if options.on_failure == "defer":
        sink.defer(torch.stack([asymmetric.any().to(gap.dtype), worst()]),
                   lambda values: _asymmetry_message(cond, options, values[1]) if values[0] else None,
                   warn_only=True)
    elif bool(asymmetric.any()):
        report(_asymmetry_message(cond, options, float(worst())),
               "ignore" if options.on_failure == "ignore" else "warn")


def _asymmetry_message(cond: Condition, options: Options, worst: float) -> str:
    return (
        f"{type(options.linear_solver).__name__} assumes a symmetric matrix, but the {cond.name} "
        f"condition's matrix A = {cond.matrix} is not symmetric: measured |⟨Au, w⟩ − ⟨u, Aw⟩| / (‖Au‖‖w‖) = "
        f"{worst:.2e}. The backward solve can stop with a wrong gradient. Use linear_solver=ig.GMRES() "
        "(or ig.BiCGStab(), or ig.Exact() for small problems)."
    )
