"""Nesterov's accelerated gradient with a step size from a curvature estimate and adaptive restart."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

import torch

from .._tree import tree_flatten
from ..linalg._base import check_interval, dot, norm, safe_div, scale
from ._base import (
    InnerSolver,
    SolverStats,
    batch_stats,
    check_positive,
    check_tol,
    default_tol,
    flatten_x,
    objective_grad,
    where_leaves,
)


class AcceleratedGradient(InnerSolver):
    r"""Nesterov's accelerated gradient descent with adaptive restart.

    With step size :math:`\eta`, momentum weights :math:`t_0 = 1`,
    :math:`t_{k+1} = \tfrac12\big(1 + \sqrt{1 + 4 t_k^2}\big)`:

    .. math::

        x_{k+1} = y_k - \eta \nabla_x f(y_k, \theta), \qquad
        y_{k+1} = x_{k+1} + \frac{t_k - 1}{t_{k+1}} (x_{k+1} - x_k) .

    On an :math:`L`-smooth, :math:`\mu`-strongly convex objective with :math:`\eta = 1/L`
    the error falls like :math:`(1 - \sqrt{\mu/L})^k` — :math:`\sqrt{\kappa}` times fewer
    steps than gradient descent. The momentum is reset (:math:`t_k = 1`) whenever
    :math:`\langle \nabla f(y_k), x_{k+1} - x_k\rangle > 0`, i.e. the step points uphill:
    this gradient restart keeps the accelerated rate without knowing :math:`\mu` and damps
    the oscillations of momentum on non-convex objectives.

    **Step size.** With ``lr=None`` the step is :math:`\eta = 1 / (\text{safety} \cdot
    \hat L)`, with :math:`\hat L` the largest curvature of :math:`f` at ``x0`` estimated
    by ``power_iterations`` steps of the power method on Hessian-vector products (started
    from :math:`\nabla f(x_0)`; two gradient evaluations each). The estimate adapts the
    step to the problem as it is now — in meta-learning, to wherever the meta-parameters
    have moved — where a fixed step eventually exceeds :math:`2/L` and diverges. As a
    safeguard against curvature that grows along the path, a check that finds the
    gradient norm above ``10 ×`` its initial value halves the step and restarts the
    momentum from the best point met so far.

    Stops when :math:`\|\nabla_x f(y_k)\| \le \text{tol} \cdot \max(1, \|\nabla_x
    f(x_0)\|)` or after ``maxiter`` steps, and returns the point with the smallest gradient
    norm it measured. Under ``torch.func.vmap`` every problem of the batch has its own
    curvature estimate, step size, restarts and stopping rule (a problem that has
    converged stops moving while the others go on), and in ``mode="unrolled"`` every step
    is recorded so the result can be differentiated through the iterations.

    Args:
        lr: step size :math:`\eta`; ``None`` (default): from the curvature estimate.
        maxiter: largest number of steps (gradient evaluations, not counting the
            power method).
        tol: relative gradient norm at which to stop; ``None``: 1e-8 (float64), 1e-4
            otherwise; ``0``: always ``maxiter`` steps, no host synchronisation except
            the curvature estimate.
        power_iterations: steps of the power method for the curvature estimate.
        safety: factor :math:`\ge 1` on the estimated curvature (the power method
            approaches the largest eigenvalue from below).
        restart: use the gradient restart (``False``: plain Nesterov momentum).
        check_every: steps between convergence checks (``None``: 1 on CPU, 10 elsewhere).

    Raises:
        ValueError: a setting out of range.

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))
        >>> solver = ig.solvers.AcceleratedGradient(maxiter=500, tol=1e-10)
        >>> x, stats = solver.run(lambda x: 0.5 * x @ A @ x - x.sum(), torch.zeros(2, dtype=torch.float64))
        >>> torch.allclose(x, torch.tensor([1.0, 0.01], dtype=torch.float64)), stats.converged
        (True, True)

    References:
        Nesterov, A Method for Solving the Convex Programming Problem with Convergence
        Rate O(1/k²), 1983. O'Donoghue and Candès, Adaptive Restart for Accelerated
        Gradient Schemes, 2015.
    """

    unrollable = True
    batchable = True
    per_system = True

    def __init__(
        self,
        lr: Optional[float] = None,
        maxiter: int = 100,
        tol: Optional[float] = None,
        power_iterations: int = 8,
        safety: float = 1.25,
        restart: bool = True,
        check_every: Optional[int] = None,
    ) -> None:
        owner = "AcceleratedGradient"
        if lr is not None:
            check_positive("lr", owner, lr)
        check_positive("maxiter", owner, maxiter, integer=True)
        check_positive("power_iterations", owner, power_iterations, integer=True)
        if not (isinstance(safety, (int, float)) and math.isfinite(safety) and safety >= 1):
            raise ValueError(f"{owner}: safety must be a number ≥ 1, got {safety!r}.")
        check_tol(owner, tol)
        if check_every is not None:
            check_positive("check_every", owner, check_every, integer=True)
        self.lr, self.maxiter, self.tol = lr, maxiter, tol
        self.power_iterations, self.safety, self.restart = power_iterations, float(safety), bool(restart)
        self.check_every = check_every

    def __repr__(self) -> str:
        lr = "auto" if self.lr is None else self.lr
        return f"AcceleratedGradient(lr={lr}, maxiter={self.maxiter}, tol={self.tol})"

    def run(self, fn: Callable, x0: Any, *params: Any, batch_ndim: int = 0) -> Tuple[Any, SolverStats]:
        """Solve; with ``batch_ndim > 0`` the leading dims of every leaf index independent problems.

        ``fn`` is then the sum of the independent objectives (as under ``torch.func.vmap``),
        and each problem gets its own step size, momentum, restarts and stopping rule.
        """
        x, rebuild = flatten_x(x0)
        record = torch.is_grad_enabled() and any(
            t.requires_grad for t in x + tree_flatten(params)[0] if isinstance(t, torch.Tensor)
        )
        tol = self.tol if self.tol is not None else default_tol(x[0].dtype)
        every = check_interval(self.check_every, x[0].device)
        g = objective_grad(fn, x, rebuild, params, create_graph=record)[1]
        g0_norm = norm([gi.detach() for gi in g], batch_ndim)
        threshold = tol * g0_norm.clamp_min(1.0)
        lr = self._step_size(fn, x, rebuild, params, g, batch_ndim) if self.lr is None else (
            torch.full_like(g0_norm, self.lr))
        one = torch.ones_like(g0_norm)
        y, x_prev, t = x, x, one
        best, best_norm, g_norm = x, g0_norm, g0_norm
        active = g0_norm > threshold if tol > 0 else torch.ones_like(g0_norm, dtype=torch.bool)
        k = 0
        for k in range(1, self.maxiter + 1):
            if tol > 0 and (k % every == 0 or k == self.maxiter) and not bool(active.any()):
                k -= 1
                break
            if k > 1:
                g = objective_grad(fn, y, rebuild, params, create_graph=record)[1]
            if tol > 0:
                g_norm = norm([gi.detach() for gi in g], batch_ndim)
                improved = g_norm < best_norm
                best = where_leaves(improved, y, best)
                best_norm = torch.where(improved, g_norm, best_norm)
                active = active & (g_norm > threshold)
                # The curvature grew beyond the estimate along the path (or overflowed):
                # that problem restarts from its best point, with half the step, no momentum.
                blown = active & ~(g_norm <= 10 * torch.maximum(g0_norm, best_norm))
                lr = torch.where(blown, 0.5 * lr, lr)
                t = torch.where(blown, one, t)
                y = where_leaves(blown, best, y)
                x_prev = where_leaves(blown, best, x_prev)
                g = where_leaves(blown, [torch.zeros_like(gi) for gi in g], g)
                step = torch.where(active & ~blown, lr, torch.zeros_like(lr))
            else:
                step = lr
            x_new = [yi - scale(step, gi) for yi, gi in zip(y, g)]
            t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
            momentum = (t - 1.0) / t_new
            if self.restart and k > 1:
                # Gradient restart, decided on the device (no host read per step).
                uphill = dot([gi.detach() for gi in g], [(xn - xp).detach() for xn, xp in zip(x_new, x_prev)],
                             batch_ndim) > 0
                momentum = torch.where(uphill, torch.zeros_like(momentum), momentum)
                t_new = torch.where(uphill, one, t_new)
            if tol > 0:
                momentum = torch.where(active, momentum, torch.zeros_like(momentum))
            y = [xn + scale(momentum, xn - xp) for xn, xp in zip(x_new, x_prev)]
            x_prev, t = x_new, t_new
        if tol == 0:
            return rebuild(x_prev), SolverStats(k, float("nan"), None, "")
        source = " from the curvature estimate" if self.lr is None else ""
        return rebuild(best), batch_stats(best_norm, g0_norm, tol, k, batch_ndim,
                                          f"after {k} steps (step size {float(lr.min()):.3g}{source})")

    def _step_size(self, fn: Callable, x: List[torch.Tensor], rebuild: Callable, params, g,
                   batch_ndim: int) -> torch.Tensor:
        """``1 / (safety · L̂)`` per problem, ``L̂`` from the power method on Hessian-vector products."""
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(True) for t in x]
            value = fn(rebuild(xs), *params)
            grads = torch.autograd.grad(value, xs, create_graph=True, allow_unused=True, materialize_grads=True)
            v = [gi.detach() for gi in g]
            estimate = norm(v, batch_ndim)
            curved = any(gi.requires_grad for gi in grads)  # False: a linear objective
            if not curved:
                estimate = torch.zeros_like(estimate)
            for i in range(self.power_iterations if curved else 0):
                v = [scale(safe_div(torch.ones_like(estimate), estimate), vi) for vi in v]
                hv = torch.autograd.grad(grads, xs, v, retain_graph=i + 1 < self.power_iterations,
                                         allow_unused=True, materialize_grads=True)
                v = [h.detach() for h in hv]
                estimate = norm(v, batch_ndim)
        bad = ~(torch.isfinite(estimate) & (estimate > 0))
        if bool(bad.any()):
            raise ValueError(
                "AcceleratedGradient: the curvature estimate at x0 is not a positive number "
                f"({estimate[bad].flatten()[0].item()}); the objective may be linear or non-finite at x0. "
                "Pass lr explicitly."
            )
        return 1.0 / (self.safety * estimate)

