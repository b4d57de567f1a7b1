"""Conjugate gradient for symmetric positive definite systems."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from .._tree import tree_flatten, tree_unflatten
from ._base import (
    NONFINITE_FIX,
    IterativeSolver,
    Matvec,
    Vector,
    axpy,
    dot,
    norm,
    safe_div,
)


class CG(IterativeSolver):
    r"""Preconditioned conjugate gradient for ``(A + damping·I) x = b``.

    For symmetric positive definite ``A`` (the Hessian of a strictly convex objective at
    its minimum) CG minimises the ``A``-norm of the error over the Krylov space
    :math:`\mathcal{K}_k(A, b)`; after ``k`` iterations

    .. math::

        \|x_k - x\|_A \le 2 \left(\frac{\sqrt{\kappa} - 1}{\sqrt{\kappa} + 1}\right)^k
        \|x_0 - x\|_A ,

    with :math:`\kappa` the condition number. Each iteration costs one ``matvec`` (one
    Hessian-vector product inside :func:`~implicitgrad.implicit_solve`). Convergence is
    declared when :math:`\|r_k\| \le \text{tol}\,\|b\|` per system.

    Args:
        maxiter: largest number of iterations (``matvec`` calls).
        tol: relative residual to reach; ``None`` picks 1e-10 in float64, 1e-5 in float32.
        damping: ``λ ≥ 0`` added to the diagonal. It makes an indefinite or singular
            Hessian positive definite at the price of solving a regularised system
            (the hypergradient of a proximal problem).
        preconditioner: optional ``M`` with ``M(r) ≈ (A + λI)^{-1} r`` on pytrees shaped
            like ``b``; must be symmetric positive definite.
        check_every: iterations between convergence checks. Each check reads a number
            back to the host; on CUDA a larger interval keeps the solve asynchronous.
            ``None``: every iteration on CPU, every 10 elsewhere.

    Negative curvature (``pᵀ A p ≤ 0``) stops the solve with status
    ``"negative_curvature"``: the Hessian is not positive definite at ``x``. The step along
    that direction is not taken, so the solution is the last iterate before it (as in
    truncated CG); in a batch only the affected system stops, the others go on.

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = ig.CG()(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> info.converged, torch.allclose(A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64))
        (True, True)

    References:
        Hestenes and Stiefel, Methods of Conjugate Gradients for Solving Linear Systems,
        1952.
    """

    symmetric = True

    def __init__(
        self,
        maxiter: int = 100,
        tol: Optional[float] = None,
        damping: float = 0.0,
        preconditioner: Optional[Callable] = None,
        check_every: Optional[int] = None,
    ) -> None:
        if not damping >= 0:
            raise ValueError(f"CG: damping must be non-negative, got {damping!r}.")
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError("CG: preconditioner must be a callable r -> M r.")
        super().__init__(maxiter, tol, check_every)
        self.damping = float(damping)
        self.preconditioner = preconditioner

    def __repr__(self) -> str:
        return f"CG(maxiter={self.maxiter}, tol={self.tol}, damping={self.damping})"

    def solve(
        self,
        matvec: Matvec,
        b: Vector,
        *,
        x0: Optional[Vector] = None,
        batch_ndim: int = 0,
        spec=None,
    ) -> Tuple[Vector, LinearSolveInfo]:
        tol, every = self._tolerances(b)
        damping = self.damping

        def op(v: Vector) -> Vector:
            out = matvec(v)
            return out if damping == 0 else [o + damping * t for o, t in zip(out, v)]

        precond = self._flat_preconditioner(spec)
        if batch_ndim == 0:
            return self._solve_single(op, precond, b, x0, tol, every)
        b_norm = norm(b, batch_ndim)
        threshold = tol * b_norm
        if x0 is None:
            x = [torch.zeros_like(t) for t in b]
            r = [t.clone() for t in b]
        else:
            x = [t.clone() for t in x0]
            r = [bi - ai for bi, ai in zip(b, op(x))]
        z = precond(r)
        p = list(z)
        rz = dot(r, z, batch_ndim)
        r_norm = norm(r, batch_ndim)
        negative = torch.zeros_like(r_norm, dtype=torch.bool)
        status = None
        iterations = 0
        for k in range(1, self.maxiter + 1):
            if k == 1 and bool((r_norm <= threshold).all()):
                break
            # A system that met negative curvature keeps its last iterate (the step along
            # a direction of non-positive curvature is not taken) and leaves the batch;
            # the others go on.
            active = (r_norm > threshold) & ~negative
            ap = op(p)
            pap = dot(p, ap, batch_ndim)
            negative = negative | (active & (pap <= 0))
            alpha = torch.where(active & ~negative, safe_div(rz, pap), torch.zeros_like(rz))
            x = axpy(alpha, p, x)
            r = axpy(-alpha, ap, r)
            iterations = k
            r_norm = norm(r, batch_ndim)
            if k % every == 0 or k == self.maxiter:
                if not bool(torch.isfinite(r_norm).all()):
                    status = "nonfinite"
                    break
                if bool(((r_norm <= threshold) | negative).all()):
                    break
            z = precond(r)
            rz_new = dot(r, z, batch_ndim)
            beta = safe_div(rz_new, rz)
            p = axpy(beta, p, z)
            rz = rz_new
        if status is None and bool(negative.any()):
            status = "negative_curvature"
        rel = safe_div(r_norm, b_norm)
        info = self._finish(iterations, rel, tol, status, _FIXES)
        return x, info

    def _solve_single(self, op, precond, b, x0, tol, every) -> Tuple[Vector, LinearSolveInfo]:
        """One system: the same iterates with fused updates, no per-system masks, and the
        negative-curvature, non-finite and convergence checks read in one host sync."""
        plain = self.preconditioner is None
        b_norm = _flat_dot(b, b).sqrt()
        threshold2 = (tol * b_norm) ** 2
        if x0 is None:
            x = [torch.zeros_like(t) for t in b]
            r = [t.clone() for t in b]
        else:
            x = [t.clone() for t in x0]
            r = [bi - ai for bi, ai in zip(b, op(x))]
        z = r if plain else precond(r)
        p = [t.clone() for t in z]
        rz = _flat_dot(r, z)
        rr = rz if plain else _flat_dot(r, r)
        healthy = torch.ones((), dtype=torch.bool, device=rr.device)
        zero = torch.zeros((), dtype=rr.dtype, device=rr.device)
        status, iterations = None, 0
        for k in range(1, self.maxiter + 1):
            if k == 1 and bool(rr <= threshold2):
                break
            ap = op(p)
            pap = _flat_dot(p, ap)
            # No step along a direction of non-positive curvature: x keeps its last iterate.
            healthy = healthy & (pap > 0)
            alpha = torch.where(healthy, rz / pap, zero)
            x = [torch.addcmul(xi, alpha, pi) for xi, pi in zip(x, p)]
            r = [torch.addcmul(ri, -alpha, ai) for ri, ai in zip(r, ap)]
            z = r if plain else precond(r)
            rz_new = _flat_dot(r, z)
            rr = rz_new if plain else _flat_dot(r, r)
            iterations = k
            if k % every == 0 or k == self.maxiter:
                nonfinite, negative, done = torch.stack(
                    [~torch.isfinite(rr), ~healthy, rr <= threshold2]
                ).tolist()
                if nonfinite:
                    status = "nonfinite"
                    break
                if negative:
                    status = "negative_curvature"
                    break
                if done:
                    break
            p = [torch.addcmul(zi, rz_new / rz, pi) for zi, pi in zip(z, p)]
            rz = rz_new
        rel = safe_div(rr.clamp_min(0).sqrt(), b_norm)
        return x, self._finish(iterations, rel, tol, status, _FIXES)

    def _flat_preconditioner(self, spec) -> Callable[[Vector], Vector]:
        if self.preconditioner is None:
            return lambda v: v
        m = self.preconditioner
        if spec is None:
            return lambda v: list(m(v))
        return lambda v: tree_flatten(m(tree_unflatten(v, spec)))[0]


def _flat_dot(a: Vector, b: Vector) -> torch.Tensor:
    """Inner product over all leaves of one system."""
    total = None
    for x, y in zip(a, b):
        term = torch.dot(x.reshape(-1), y.reshape(-1))
        total = term if total is None else total + term
    return total


_FIXES = {
    "max_iterations": (
        "CG did not reach tol={tol:.1e} (relative residual {res:.2e}). Increase maxiter, "
        "add damping to improve the conditioning, or pass a preconditioner."
    ),
    "negative_curvature": (
        "CG met negative curvature: the Hessian at x is not positive definite, so x is not "
        "a strict local minimum (or the inner solve stopped early). Solve the inner problem "
        "further, add damping (e.g. CG(damping=1e-3)), or use GMRES / Exact."
    ),
    "nonfinite": NONFINITE_FIX,
}
