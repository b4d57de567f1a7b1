"""Damped fixed-point iteration."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from .._tree import tree_flatten
from .._validation import check_fraction
from ..linalg._base import check_interval, norm, select
from ._base import InnerSolver, SolverStats, check_positive, check_tol, default_tol, flatten_x


class FixedPointIteration(InnerSolver):
    r"""Damped (Krasnosel'skii-Mann) iteration :math:`x \leftarrow (1-\beta) x + \beta T(x, \theta)`.

    Converges to the fixed point when ``T`` is a contraction (any ``β ∈ (0, 1]``) or
    non-expansive (``β < 1``). Stops when
    :math:`\|x - T(x)\| \le \text{tol} \cdot \max(1, \|x_0 - T(x_0)\|)`. Under
    ``torch.func.vmap`` (a batch of problems) the rule holds per problem: a problem stops
    moving once it meets its own tolerance, and the iteration ends when every problem has.

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
    per_system = True

    def __init__(
        self,
        maxiter: int = 1000,
        tol: Optional[float] = None,
        damping: float = 1.0,
        check_every: Optional[int] = None,
    ) -> None:
        check_positive("maxiter", "FixedPointIteration", maxiter, integer=True)
        check_fraction("damping", damping, "FixedPointIteration")
        check_tol("FixedPointIteration", tol)
        if check_every is not None:
            check_positive("check_every", "FixedPointIteration", check_every, integer=True)
        self.maxiter, self.tol, self.damping, self.check_every = maxiter, tol, damping, check_every

    def __repr__(self) -> str:
        return (f"FixedPointIteration(maxiter={self.maxiter}, tol={self.tol}, "
                f"damping={self.damping})")

    def run(self, fn: Callable, x0: Any, *params: Any, batch_ndim: int = 0) -> Tuple[Any, SolverStats]:
        """Iterate; with ``batch_ndim > 0`` the leading dims of every leaf index independent problems.

        Each problem then has its own stopping rule: it stops moving once its residual
        meets its own tolerance, and the run ends when every problem has (or at
        ``maxiter``), so a well-converged problem cannot hide one that is not.
        """
        x, rebuild = flatten_x(x0)
        tol = self.tol if self.tol is not None else default_tol(x[0].dtype)
        every = check_interval(self.check_every, x[0].device)
        beta = self.damping
        threshold: Optional[torch.Tensor] = None
        moving: Optional[torch.Tensor] = None
        r_norm = torch.tensor(float("nan"))
        k = 0
        for k in range(1, self.maxiter + 1):
            t = [v for v in tree_flatten(fn(rebuild(x), *params))[0] if isinstance(v, torch.Tensor)]
            if len(t) != len(x):
                raise ValueError("FixedPointIteration: the mapping must return the structure of x.")
            if tol > 0 and (k == 1 or k % every == 0):
                r_norm = norm([(a - b).detach() for a, b in zip(x, t)], batch_ndim)
                if threshold is None:
                    threshold = tol * r_norm.clamp_min(1.0)
                # NaN counts as not converged: it keeps the run going and is reported.
                moving = ~(r_norm <= threshold)
                if not bool(moving.any()):
                    k -= 1
                    break
            step = [(1 - beta) * a + beta * b for a, b in zip(x, t)] if beta != 1 else t
            x = step if moving is None or batch_ndim == 0 else [select(moving, s, a) for s, a in zip(step, x)]
        if threshold is None:
            return rebuild(x), SolverStats(k, float(r_norm), None)
        failed = ~(r_norm <= threshold)
        converged = not bool(failed.any())
        message = ""
        if not converged and batch_ndim:
            worst = float((r_norm / threshold * tol).max())
            message = (f"relative fixed-point residual up to {worst:.3e} above tol={tol:.1e} in "
                       f"{int(failed.sum())} of {failed.numel()} problems after {k} iterations")
        return rebuild(x), SolverStats(k, float(r_norm.square().sum().sqrt()), converged, message)
