"""Running the inner solver and checking what it returns."""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple

import torch

from ._defaults import forward_tol as default_forward_tol
from ._diagnostics import SolveInfo, report
from ._problem import Condition


@dataclasses.dataclass(frozen=True)
class Options:
    """How one implicit solve is run: checked once at the API boundary, never changed."""

    solver: Any
    linear_solver: Any
    on_failure: str = "warn"
    forward_tol: Optional[float] = None



def call_solver(
    cond: Condition, solver: Any, x0: List[torch.Tensor], p: List[torch.Tensor]
) -> Tuple[List[torch.Tensor], Optional[int], str]:
    """``solver(fn, x0, *params)`` → (tensor leaves of x, iterations or None, message).

    A batched problem passes its vmapped function to solvers that declare
    ``batchable = True`` (the built-in ones: a sum of independent objectives is solved
    jointly); any other solver is called once per problem of the batch.
    """
    if cond.parent is not None and not getattr(solver, "batchable", False):
        outs, iters, messages = [], [], []
        for i in range(x0[0].shape[0] if x0 else 0):
            xi, it, msg = call_solver(cond.parent, solver, [t[i] for t in x0], [t[i] for t in p])
            outs.append(xi)
            iters.append(it)
            messages.append(msg)
        x = [torch.stack(ts) for ts in zip(*outs)]
        known = [i for i in iters if i is not None]
        return x, (max(known) if known else None), "; ".join(sorted({m for m in messages if m}))
    x_tree, params = cond.codec.x_tree(x0), cond.codec.params_tree(p)
    if hasattr(solver, "run"):
        extra = {"batch_ndim": cond.batch_ndim} if getattr(solver, "per_system", False) else {}
        out, stats = solver.run(cond.fn, x_tree, *params, **extra)
        iterations, message = getattr(stats, "iterations", None), getattr(stats, "message", "")
    else:
        out, iterations, message = solver(cond.fn, x_tree, *params), None, ""
    return cond.codec.x_leaves(out, "the solver's output"), iterations, message


def run_forward(cond: Condition, options: Options, info: SolveInfo, x0: List[torch.Tensor],
                p: List[torch.Tensor]) -> List[torch.Tensor]:
    """Solve, then measure the forward residual into ``info`` and report it."""
    x0 = [t.detach() for t in x0]
    p = [t.detach() for t in p]
    with torch.no_grad():
        x, iterations, message = call_solver(cond, options.solver, x0, p)
    x = [t.detach() for t in x]
    info.forward_iterations = iterations
    info.forward_message = message
    if not all(bool(torch.isfinite(t).all()) for t in x):
        info.forward_status = "nonfinite"
        info.forward_residual = float("nan")
        report(
            "The inner solver returned a solution with NaN/Inf entries; its gradient would "
            "be meaningless. Lower the inner step size, add regularisation, or check the "
            "objective for overflow.",
            options.on_failure,
        )
        return x
    residuals = cond.residual_norms(x, p, options.on_failure)
    initials = cond.residual_norms(x0, p, options.on_failure, check_captured=False)
    residual = float(residuals.square().sum().sqrt())
    initial = float(initials.square().sum().sqrt())
    info.forward_residual, info.initial_residual = residual, initial
    tol = options.forward_tol
    if tol is None:
        tol = default_forward_tol(x[0].dtype if x else torch.float32)
    # Every problem of a batch meets its own tolerance: a well-solved problem cannot hide
    # an unsolved one in a batch norm.
    thresholds = tol * initials.clamp_min(1.0)
    failed = ~(residuals <= thresholds)
    if cond.batch_ndim:
        info.forward_residuals = residuals.flatten().tolist()
        info.initial_residuals = initials.flatten().tolist()
    if not bool(failed.any()):
        info.forward_status = "converged"
    else:
        info.forward_status = "not_converged"
        it = "" if iterations is None else f" after {iterations} iterations"
        said = f" The solver said: {message}." if message else ""
        if cond.batch_ndim:
            worst = int(torch.argmax(torch.where(failed, residuals / thresholds, torch.zeros_like(residuals))))
            where = (f" in {int(failed.sum())} of {failed.numel()} problems of the batch (worst: "
                     f"{residuals.flatten()[worst]:.3e}, initial {initials.flatten()[worst]:.3e}, "
                     f"tolerance {thresholds.flatten()[worst]:.3e})")
        else:
            where = f" (initial {initial:.3e}, tolerance {float(thresholds):.3e})"
        report(
            f"The inner solution is not stationary: ‖condition‖ = {residual:.3e}{it}{where}.{said} "
            "The implicit gradient assumes x* solves the inner problem; its error grows linearly "
            "with this residual. Run the inner solver longer or to a tighter tol, or pass a larger "
            "forward_tol if this accuracy is enough.",
            options.on_failure,
        )
    return x
