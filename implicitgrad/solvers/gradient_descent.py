"""Plain gradient descent."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from .._tree import tree_flatten
from ..linalg._base import check_interval
from ._base import (
    InnerSolver,
    SolverStats,
    check_positive,
    check_tol,
    default_tol,
    flatten_x,
    leaves_norm,
    objective_grad,
)


class GradientDescent(InnerSolver):
    r"""Gradient descent :math:`x_{k+1} = x_k - \eta \nabla_x f(x_k, \theta)`.

    Stops when :math:`\|\nabla_x f(x_k)\| \le \text{tol} \cdot \max(1, \|\nabla_x f(x_0)\|)`
    or after ``maxiter`` steps. With ``tol=0`` it runs exactly ``maxiter`` steps and
    never synchronises with the host (the fixed-step inner loop of MAML / iMAML papers).

    In ``mode="implicit"`` it runs without recording a graph; in ``mode="unrolled"`` (grad
    mode on and ``x0`` or a parameter requiring grad) it records every step
    (``create_graph``) so the result can be differentiated through the iterations.

    Args:
        lr: step size ``η``; converges for ``η < 2 / L`` with ``L`` the gradient's
            Lipschitz constant.
        maxiter: largest number of steps.
        tol: relative gradient norm at which to stop; ``None``: 1e-8 (float64), 1e-4
            otherwise; ``0``: always ``maxiter`` steps.
        check_every: steps between convergence checks (``None``: 1 on CPU, 10 elsewhere).

    Example:
        >>> import torch, implicitgrad as ig
        >>> gd = ig.solvers.GradientDescent(lr=0.5, maxiter=100)
        >>> gd(lambda x, c: ((x - c) ** 2).sum(), torch.zeros(2), torch.ones(2))
        tensor([1., 1.])
    """

    unrollable = True
    batchable = True

    def __init__(
        self,
        lr: float = 0.1,
        maxiter: int = 1000,
        tol: Optional[float] = None,
        check_every: Optional[int] = None,
    ) -> None:
        check_positive("lr", "GradientDescent", lr)
        check_positive("maxiter", "GradientDescent", maxiter, integer=True)
        check_tol("GradientDescent", tol)
        if check_every is not None:
            check_positive("check_every", "GradientDescent", check_every, integer=True)
        self.lr, self.maxiter, self.tol, self.check_every = lr, maxiter, tol, check_every

    def __repr__(self) -> str:
        return f"GradientDescent(lr={self.lr}, maxiter={self.maxiter}, tol={self.tol})"

    def run(self, fn: Callable, x0: Any, *params: Any) -> Tuple[Any, SolverStats]:
        x, rebuild = flatten_x(x0)
        # Record the iterations only when a result could be differentiated (mode="unrolled").
        record = torch.is_grad_enabled() and any(
            t.requires_grad for t in x + tree_flatten(params)[0] if isinstance(t, torch.Tensor)
        )
        tol = self.tol if self.tol is not None else default_tol(x[0].dtype)
        every = check_interval(self.check_every, x[0].device)
        threshold = None
        g_norm: Any = float("nan")  # tol = 0 reads nothing: a fixed amount of device work
        k = 0
        for k in range(1, self.maxiter + 1):
            g = objective_grad(fn, x, rebuild, params, create_graph=record)[1]
            if tol > 0 and (k == 1 or k % every == 0):
                g_norm = leaves_norm(g)
                if threshold is None:
                    threshold = tol * max(1.0, float(g_norm))
                if float(g_norm) <= threshold:
                    k -= 1
                    break
            x = [xi - self.lr * gi for xi, gi in zip(x, g)]
        converged = None if threshold is None else bool(float(g_norm) <= threshold)
        return rebuild(x), SolverStats(k, float(g_norm), converged)

