"""Damped fixed-point iteration."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from .._tree import tree_flatten
from ..linalg._base import check_interval
from ._base import InnerSolver, SolverStats, check_positive, check_tol, default_tol, flatten_x, leaves_norm


class FixedPointIteration(InnerSolver):
    r"""Damped (Krasnosel'skii-Mann) iteration :math:`x \leftarrow (1-\beta) x + \beta T(x, \theta)`.

    Converges to the fixed point when ``T`` is a contraction (any ``β ∈ (0, 1]``) or
    non-expansive (``β < 1``). Stops when
    :math:`\|x - T(x)\| \le \text{tol} \cdot \max(1, \|x_0 - T(x_0)\|)`.

    Args:
        maxiter: largest number of iterations.
        tol: relative residual at which to stop; ``None``: 1e-8 (float64), 1e-4 otherwise;
            ``0``: always ``maxiter`` iterations.
        damping: ``β`` in ``(0, 1]``; 1 is plain iteration.
        check_every: iterations between convergence checks (``None``: 1 on CPU, 10
            elsewhere).

    Example:
        >>> import torch, implicitgrad as ig
        >>> fpi = ig.solvers.FixedPointIteration(maxiter=200)
        >>> x = fpi(lambda x, c: 0.5 * x + c, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
        >>> round(float(x), 6)   # the fixed point of x = x/2 + 1
        2.0
    """

    unrollable = True
    batchable = True

    def __init__(
        self,
        maxiter: int = 1000,
        tol: Optional[float] = None,
        damping: float = 1.0,
        check_every: Optional[int] = None,
    ) -> None:
        check_positive("maxiter", "FixedPointIteration", maxiter, integer=True)
        if not (isinstance(damping, (int, float)) and 0 < damping <= 1):
            raise ValueError(f"FixedPointIteration: damping must be in (0, 1], got {damping!r}.")
        check_tol("FixedPointIteration", tol)
        self.maxiter, self.tol, self.damping, self.check_every = maxiter, tol, damping, check_every

    def __repr__(self) -> str:
        return (f"FixedPointIteration(maxiter={self.maxiter}, tol={self.tol}, "
                f"damping={self.damping})")

    def run(self, fn: Callable, x0: Any, *params: Any) -> Tuple[Any, SolverStats]:
        x, rebuild = flatten_x(x0)
        tol = self.tol if self.tol is not None else default_tol(x[0].dtype)
        every = check_interval(self.check_every, x[0].device)
        beta = self.damping
        threshold = None
        r_norm = torch.tensor(float("nan"))
        k = 0
        for k in range(1, self.maxiter + 1):
            t = [v for v in tree_flatten(fn(rebuild(x), *params))[0] if isinstance(v, torch.Tensor)]
            if len(t) != len(x):
                raise ValueError("FixedPointIteration: the mapping must return the structure of x.")
            if tol > 0 and (k == 1 or k % every == 0):
                r_norm = leaves_norm([a - b for a, b in zip(x, t)])
                if threshold is None:
                    threshold = tol * max(1.0, float(r_norm))
                if float(r_norm) <= threshold:
                    k -= 1
                    break
            x = [(1 - beta) * a + beta * b for a, b in zip(x, t)] if beta != 1 else t
        converged = None if threshold is None else bool(float(r_norm) <= threshold)
        return rebuild(x), SolverStats(k, float(r_norm), converged)
