"""Limited-memory (good) Broyden method for fixed points and roots."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from .._tree import tree_flatten
from ..linalg._base import check_interval
from ._base import InnerSolver, SolverStats, check_positive, check_tol, default_tol, flatten_x, threshold_stats
from .anderson import _flattener

__all__ = ["Broyden"]

FORMS = ("fixed_point", "root")


class Broyden(InnerSolver):
    r"""Limited-memory good Broyden method for :math:`x = T(x, \theta)` or :math:`F(x, \theta) = 0`.

    It seeks a zero of :math:`g(x) = T(x) - x` (``form="fixed_point"``, the solver of
    :func:`~implicitgrad.fixed_point_solve` and :class:`~implicitgrad.nn.DEQ`) or of
    :math:`g = F` (``form="root"``, for :func:`~implicitgrad.root_solve`) with quasi-Newton
    steps :math:`x_{k+1} = x_k - H_k g(x_k)`, where :math:`H_k` approximates
    :math:`(\partial g)^{-1}`. It starts from :math:`H_0 = -I` (the first step of the
    fixed-point form is the plain iteration :math:`x \leftarrow T(x)`) and after each step,
    with :math:`\Delta x = x_{k+1} - x_k`, :math:`\Delta g = g(x_{k+1}) - g(x_k)`, makes the
    rank-one update of the inverse that satisfies the secant condition
    :math:`H_{k+1}\Delta g = \Delta x` (Broyden's "good" update, Sherman–Morrison form):

    .. math::

        H_{k+1} = H_k + \frac{(\Delta x - H_k \Delta g)\, \Delta x^\top H_k}
        {\Delta x^\top H_k \Delta g} .

    :math:`H_k = -I + \sum_i u_i v_i^\top` is kept as at most ``memory`` pairs
    :math:`(u_i, v_i)`, so a step costs :math:`O(mn)` and one evaluation of ``T``; when the
    memory is full the method restarts from :math:`H_0` (dropping only the oldest pair
    instead leaves an :math:`H` that no longer satisfies the earlier secant conditions, and
    on slowly contracting linear problems it stalls). For a linear problem with ``memory ≥ 2n`` it reaches the solution
    in at most :math:`2n` steps (Gay, 1979); near a solution with a nonsingular Jacobian it
    converges superlinearly. An update whose denominator vanishes is skipped; a step to a
    non-finite point is refused and that problem's memory cleared.

    Stops when :math:`\|g(x)\| \le \text{tol}\cdot\max(1, \|g(x_0)\|)` and returns the
    iterate with the smallest residual it measured (Broyden steps are not monotone). With
    ``batch_ndim > 0`` in :meth:`run` (used by :func:`~implicitgrad.fixed_point_solve` under
    ``torch.func.vmap`` and by :class:`~implicitgrad.nn.DEQ`) every problem of the batch has
    its own matrix :math:`H`, stopping rule and returned iterate; a problem that has met
    its tolerance stops moving, and the run ends when every problem has.

    Args:
        memory: the number :math:`m \ge 1` of rank-one pairs kept before a restart.
        maxiter: largest number of evaluations of ``T`` (or ``F``).
        tol: relative residual at which to stop; ``None``: 1e-8 (float64), 1e-4
            otherwise; ``0``: always ``maxiter`` steps.
        form: ``"fixed_point"`` (``fn`` is the mapping ``T``) or ``"root"`` (``fn`` is the
            residual ``F``).
        check_every: steps between convergence checks (``None``: 1 on CPU, 10 elsewhere).

    Raises:
        TypeError, ValueError: a setting of the wrong kind or out of range; a function that
            does not return the structure of ``x``.

    Example:
        >>> import torch, implicitgrad as ig
        >>> b = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        >>> def residual(x, b):                     # x + x³/10 = b, one root per entry
        ...     return x + 0.1 * x**3 - b
        >>> x = ig.root_solve(residual, torch.zeros(2, dtype=torch.float64), b,
        ...                   solver=ig.solvers.Broyden(form="root"))
        >>> bool(residual(x, b).abs().max() < 1e-8)
        True
        >>> x.sum().backward(); torch.allclose(b.grad, 1 / (1 + 0.3 * x.detach()**2))
        True

    References:
        Broyden, A Class of Methods for Solving Nonlinear Simultaneous Equations, 1965.
        Gay, Some Convergence Properties of Broyden's Method, 1979. Bai, Kolter and Koltun,
        Deep Equilibrium Models, 2019 (limited-memory Broyden for equilibrium layers).
    """

    batchable = True
    per_system = True

    def __init__(
        self,
        memory: int = 20,
        maxiter: int = 1000,
        tol: Optional[float] = None,
        form: str = "fixed_point",
        check_every: Optional[int] = None,
    ) -> None:
        owner = "Broyden"
        check_positive("memory", owner, memory, integer=True)
        check_positive("maxiter", owner, maxiter, integer=True)
        check_tol(owner, tol)
        if form not in FORMS:
            raise ValueError(f"Broyden: form must be one of {FORMS}, got {form!r}: 'fixed_point' when fn is the "
                             "mapping T of x = T(x), 'root' when fn is the residual F of F(x) = 0.")
        if check_every is not None:
            check_positive("check_every", owner, check_every, integer=True)
        self.memory, self.maxiter, self.tol, self.form, self.check_every = memory, maxiter, tol, form, check_every

    def __repr__(self) -> str:
        return f"Broyden(memory={self.memory}, maxiter={self.maxiter}, tol={self.tol}, form={self.form!r})"

    def run(self, fn: Callable, x0: Any, *params: Any, batch_ndim: int = 0) -> Tuple[Any, SolverStats]:
        """Iterate; with ``batch_ndim > 0`` the leading dims of every leaf index independent problems."""
        leaves, rebuild = flatten_x(x0)
        if not leaves:
            raise TypeError("Broyden: x0 must be a Tensor or a pytree with a Tensor leaf.")
        flat, unflatten = _flattener(leaves, batch_ndim)
        tol = self.tol if self.tol is not None else default_tol(leaves[0].dtype)
        every = check_interval(self.check_every, leaves[0].device)
        fixed_point = self.form == "fixed_point"

        def g(x: torch.Tensor) -> torch.Tensor:
            out = [v for v in tree_flatten(fn(rebuild(unflatten(x)), *params))[0] if isinstance(v, torch.Tensor)]
            if len(out) != len(leaves) or any(o.shape != t.shape for o, t in zip(out, leaves)):
                raise ValueError(f"Broyden: fn must return the structure and shapes of x ({self.form} form).")
            return flat(out) - x if fixed_point else flat(out)

        x = flat(leaves)
        gx = g(x)
        norm = torch.linalg.vector_norm(gx, dim=-1)
        best, best_norm = x, norm
        threshold = tol * norm.clamp_min(1.0)
        # H = −I + Uᵀ V with the pairs as rows; rows not yet written are zero and add nothing.
        U = x.new_zeros(x.shape[:-1] + (self.memory, x.shape[-1]))
        V = torch.zeros_like(U)
        pairs = 0
        moving = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        k = 1
        while k < self.maxiter:
            if tol > 0 and (k == 1 or k % every == 0):
                # NaN counts as not converged: it keeps the run going and is reported.
                moving = moving & ~(best_norm <= threshold)
                if not bool(moving.any()):
                    break
            x_new = x - _apply(U, V, gx, pairs)
            g_new = g(x_new)
            k += 1
            # In the fixed-point form a non-finite x_new makes g_new non-finite too.
            finite = torch.isfinite(g_new if fixed_point else torch.cat([g_new, x_new], -1)).all(-1)
            accept = (moving & finite).unsqueeze(-1)
            dx, dg = x_new - x, g_new - gx
            if pairs == self.memory:  # restart from H₀ = −I
                U.zero_()
                V.zero_()
                pairs = 0
            v = _apply(V, U, dx, pairs)  # Hᵀ Δx
            denom = (v * dg).sum(-1, keepdim=True)
            # A denominator at rounding level (relative to |v| |Δg|) would make u meaningless: no update.
            scale = torch.finfo(x.dtype).eps * torch.linalg.vector_norm(v, dim=-1, keepdim=True) \
                * torch.linalg.vector_norm(dg, dim=-1, keepdim=True)
            update = accept & (denom.abs() > scale) & torch.isfinite(denom)
            u = (dx - _apply(U, V, dg, pairs)) / denom.masked_fill(~update, 1.0)
            U[..., pairs, :] = u.masked_fill(~update, 0.0)  # not a product with the mask: NaN · 0 is NaN
            V[..., pairs, :] = v.masked_fill(~update, 0.0)
            pairs += 1
            keep = (finite | ~moving).unsqueeze(-1).unsqueeze(-1)  # a non-finite step clears the memory
            U.mul_(keep)
            V.mul_(keep)
            x = torch.where(accept, x_new, x)
            gx = torch.where(accept, g_new, gx)
            norm = torch.linalg.vector_norm(gx, dim=-1)
            improved = norm < best_norm
            best = torch.where(improved.unsqueeze(-1), x, best)
            best_norm = torch.where(improved, norm, best_norm)
        if tol == 0:
            return rebuild(unflatten(best)), SolverStats(k, float(best_norm.square().sum().sqrt()), None, "")
        stats = threshold_stats(best_norm, threshold, tol, k, batch_ndim,
                                f"{'fixed-point ' if fixed_point else ''}residual",
                                f"after {k} evaluations (memory={self.memory})")
        return rebuild(unflatten(best)), stats


def _apply(U: torch.Tensor, V: torch.Tensor, y: torch.Tensor, pairs: int) -> torch.Tensor:
    """``(−I + Uᵀ V) y`` with the first ``pairs`` rows of ``U, V`` (shape ``(*batch, m, n)``) and
    ``y`` of shape ``(*batch, n)``; ``_apply(V, U, y, pairs)`` is the transpose, ``(−I + Vᵀ U) y``."""
    if not pairs:
        return -y
    U, V = U[..., :pairs, :], V[..., :pairs, :]
    return (U.transpose(-1, -2) @ (V @ y.unsqueeze(-1))).squeeze(-1) - y
