"""Running the inner solver and checking what it returns."""

from __future__ import annotations

import math
from typing import List

import torch

from ._diagnostics import report
from ._problem import Problem

_FORWARD_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}


def default_forward_tol(dtype: torch.dtype) -> float:
    """Relative forward residual above which a warning is issued."""
    return _FORWARD_TOL.get(dtype, 3e-2)


def call_solver(problem: Problem, x0: List[torch.Tensor], p: List[torch.Tensor]):
    """``solver(fn, x0, *params)`` → (tensor leaves of x, iterations or None, message).

    A batched problem passes its vmapped function to solvers that declare
    ``batchable = True`` (the built-in ones: a sum of independent objectives is solved
    jointly); any other solver is called once per problem of the batch.
    """
    solver = problem.solver
    if problem.parent is not None and not getattr(solver, "batchable", False):
        outs, iters, messages = [], [], []
        for i in range(x0[0].shape[0] if x0 else 0):
            xi, it, msg = call_solver(problem.parent, [t[i] for t in x0], [t[i] for t in p])
            outs.append(xi)
            iters.append(it)
            messages.append(msg)
        x = [torch.stack(ts) for ts in zip(*outs)]
        known = [i for i in iters if i is not None]
        return x, (max(known) if known else None), "; ".join(sorted({m for m in messages if m}))
    x_tree, params = problem.x_tree(x0), problem.params_tree(p)
    if hasattr(solver, "run"):
        out, stats = solver.run(problem.fn, x_tree, *params)
        iterations, message = getattr(stats, "iterations", None), getattr(stats, "message", "")
    else:
        out, iterations, message = solver(problem.fn, x_tree, *params), None, ""
    return problem.x_leaves(out, "the solver's output"), iterations, message


def run_forward(problem: Problem, x0: List[torch.Tensor], p: List[torch.Tensor]):
    """Solve, then measure and report the forward residual."""
    x0 = [t.detach() for t in x0]
    p = [t.detach() for t in p]
    with torch.no_grad():
        x, iterations, message = call_solver(problem, x0, p)
    x = [t.detach() for t in x]
    info = problem.info
    info.forward_iterations = iterations
    info.forward_message = message
    if not all(bool(torch.isfinite(t).all()) for t in x):
        info.forward_status = "nonfinite"
        info.forward_residual = float("nan")
        report(
            "The inner solver returned a solution with NaN/Inf entries; its gradient would "
            "be meaningless. Lower the inner step size, add regularisation, or check the "
            "objective for overflow.",
            problem.on_failure,
            stacklevel=6,
        )
        return x
    residual = problem.residual_norm(x, p)
    initial = problem.residual_norm(x0, p, check_captured=False)
    info.forward_residual, info.initial_residual = residual, initial
    tol = problem.forward_tol
    if tol is None:
        tol = default_forward_tol(x[0].dtype if x else torch.float32)
    threshold = tol * max(1.0, initial)
    if math.isfinite(residual) and residual <= threshold:
        info.forward_status = "converged"
    else:
        info.forward_status = "not_converged"
        it = "" if iterations is None else f" after {iterations} iterations"
        said = f" The solver said: {message}." if message else ""
        report(
            f"The inner solution is not stationary: ‖condition‖ = {residual:.3e}{it} "
            f"(initial {initial:.3e}, tolerance {threshold:.3e}).{said} The implicit gradient "
            "assumes x* solves the inner problem; its error grows linearly with this "
            "residual. Run the inner solver longer or to a tighter tol, or pass a larger "
            "forward_tol if this accuracy is enough.",
            problem.on_failure,
            stacklevel=6,
        )
    return x
