"""Restarted GMRES for general (non-symmetric) systems."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from ._base import (
    NONFINITE_FIX,
    IterativeSolver,
    Matvec,
    Vector,
    axpy,
    dot,
    norm,
    safe_div,
    scale,
)


class GMRES(IterativeSolver):
    r"""Restarted GMRES(m) for ``A x = b`` with any non-singular ``A``.

    Each cycle builds an orthonormal basis :math:`V_m` of the Krylov space
    :math:`\mathcal{K}_m(A, r_0)` by Arnoldi (modified Gram-Schmidt) with
    :math:`A V_m = V_{m+1} \bar H_m`, and takes :math:`x = x_0 + V_m y` with
    :math:`y = \arg\min_y \|\beta e_1 - \bar H_m y\|`, the minimal residual over the
    space. Suited to the Jacobians of :func:`~implicitgrad.root_solve` and
    :func:`~implicitgrad.fixed_point_solve`, which are not symmetric.

    Args:
        maxiter: total number of ``matvec`` calls over all cycles.
        restart: Krylov dimension ``m`` of a cycle (memory: ``m + 1`` vectors).
        tol: relative residual to reach; ``None``: 1e-10 (float64), 1e-5 (float32).
        check_every: Arnoldi steps between host-synchronising checks (``None``: 1 on
            CPU, 10 elsewhere); a cycle always ends with a check.

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> x, info = ig.GMRES()(lambda v: A @ v, b)
        >>> info.converged, torch.allclose(A @ x, b)
        (True, True)

    References:
        Saad and Schultz, GMRES: A Generalized Minimal Residual Algorithm for Solving
        Nonsymmetric Linear Systems, 1986.
    """

    def __init__(
        self,
        maxiter: int = 100,
        restart: int = 20,
        tol: Optional[float] = None,
        check_every: Optional[int] = None,
    ) -> None:
        if int(restart) < 1:
            raise ValueError(f"GMRES: restart must be a positive integer, got {restart!r}.")
        super().__init__(maxiter, tol, check_every)
        self.restart = int(restart)

    def __repr__(self) -> str:
        return f"GMRES(maxiter={self.maxiter}, restart={self.restart}, tol={self.tol})"

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
        b_norm = norm(b, batch_ndim)
        threshold = tol * b_norm
        x = [torch.zeros_like(t) for t in b] if x0 is None else [t.clone() for t in x0]
        r = list(b) if x0 is None else [bi - ai for bi, ai in zip(b, matvec(x))]
        r_norm = norm(r, batch_ndim)
        iterations = 0
        status = None
        while iterations < self.maxiter and not bool((r_norm <= threshold).all()):
            if not bool(torch.isfinite(r_norm).all()):
                status = "nonfinite"
                break
            x, r_norm, used = self._cycle(matvec, b, x, r, r_norm, threshold, batch_ndim, every)
            iterations += used
            if iterations < self.maxiter:
                r = [bi - ai for bi, ai in zip(b, matvec(x))]
                r_norm = norm(r, batch_ndim)
        if status is None and not bool(torch.isfinite(r_norm).all()):
            status = "nonfinite"
        info = self._finish(iterations, safe_div(r_norm, b_norm), tol, status, _FIXES)
        return x, info

    def _cycle(self, matvec, b, x, r, r_norm, threshold, batch_ndim, every):
        """One Arnoldi cycle; returns the updated ``x``, its residual norm, steps used."""
        m = min(self.restart, self.maxiter)
        batch_shape = r_norm.shape
        dtype, device = r_norm.dtype, r_norm.device
        inv = safe_div(torch.ones_like(r_norm), r_norm)
        basis = [[scale(inv, t) for t in r]]
        h = torch.zeros(*batch_shape, m + 1, m, dtype=dtype, device=device)
        rhs = torch.zeros(*batch_shape, m + 1, dtype=dtype, device=device)
        rhs[..., 0] = r_norm
        y = None
        steps = 0
        res = r_norm
        for j in range(m):
            w = matvec(basis[j])
            for i in range(j + 1):
                hij = dot(w, basis[i], batch_ndim)
                h[..., i, j] = hij
                w = axpy(-hij, basis[i], w)
            w_norm = norm(w, batch_ndim)
            h[..., j + 1, j] = w_norm
            basis.append([scale(safe_div(torch.ones_like(w_norm), w_norm), t) for t in w])
            steps = j + 1
            if steps % every == 0 or steps == m:
                y, res = _least_squares(h[..., : j + 2, : j + 1], rhs[..., : j + 2])
                if bool((res <= threshold).all()) or bool((w_norm == 0).all()):
                    break
        if y is None or y.shape[-1] != steps:
            y, res = _least_squares(h[..., : steps + 1, :steps], rhs[..., : steps + 1])
        for i in range(steps):
            x = axpy(y[..., i], basis[i], x)
        return x, res, steps


def _least_squares(h: torch.Tensor, rhs: torch.Tensor):
    """``y = argmin ‖rhs − H y‖`` per system (small dense problems), and that residual."""
    q, rr = torch.linalg.qr(h, mode="reduced")
    qtb = (q.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1)
    diag = torch.diagonal(rr, dim1=-2, dim2=-1)
    # A zero pivot is a lucky breakdown: the solution lies in the smaller space already.
    safe = rr + torch.diag_embed((diag == 0).to(rr.dtype))
    y = torch.linalg.solve_triangular(safe, qtb.unsqueeze(-1), upper=True).squeeze(-1)
    res = (rhs - (h @ y.unsqueeze(-1)).squeeze(-1)).norm(dim=-1)
    return y, res


_FIXES = {
    "max_iterations": (
        "GMRES did not reach tol={tol:.1e} (relative residual {res:.2e}). Increase maxiter "
        "or restart (a larger Krylov space per cycle), or check that the Jacobian is "
        "well conditioned at x (solve the inner problem further)."
    ),
    "nonfinite": NONFINITE_FIX,
}
