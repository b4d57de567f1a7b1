"""Truncated Neumann series."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from .._validation import check_positive_number
from ._base import (
    IterativeSolver,
    Matvec,
    PytreeLayout,
    Vector,
    norm,
    safe_div,
)


class Neumann(IterativeSolver):
    r"""Solve ``A x = b`` by the truncated Neumann series of ``A^{-1}``.

    .. math::

        A^{-1} b = \alpha \sum_{j \ge 0} (I - \alpha A)^j b ,
        \qquad x_K = \alpha \sum_{j < K} (I - \alpha A)^j b ,

    which converges when the spectral radius :math:`\rho = \rho(I - \alpha A) < 1` (for
    symmetric positive definite ``A``: :math:`0 < \alpha < 2 / \lambda_{\max}`). The
    residual after ``K`` terms is exactly :math:`b - A x_K = (I - \alpha A)^K b`, so it
    shrinks like :math:`\rho^K`. One ``matvec`` per term. This is the approximation of
    Lorraine et al. (2020); it needs no inner products, so it never synchronises with the
    host except at convergence checks.

    Args:
        maxiter: number of terms ``K`` at most.
        alpha: step size ``α``; for a Hessian, the inner learning rate is a natural choice.
        tol: relative residual at which to stop early; ``None``: 1e-10 (float64), 1e-5
            (float32).
        check_every: iterations between host-synchronising checks (``None``: 1 on CPU,
            10 elsewhere).

    A residual growing past ``1e3·‖b‖`` stops the series with status ``"diverged"``:
    ``α`` is too large for this matrix.

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float64))
        >>> x, info = ig.Neumann(maxiter=200, alpha=1.0)(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(x, torch.tensor([1.0, 2.0], dtype=torch.float64))
        True

    References:
        Lorraine, Vicol and Duvenaud, Optimizing Millions of Hyperparameters by Implicit
        Differentiation, 2020.
    """

    def __init__(
        self,
        maxiter: int = 100,
        alpha: float = 1.0,
        tol: Optional[float] = None,
        check_every: Optional[int] = None,
    ) -> None:
        alpha = check_positive_number("alpha", alpha, "Neumann")
        super().__init__(maxiter, tol, check_every)
        self.alpha = alpha

    def __repr__(self) -> str:
        return f"Neumann(maxiter={self.maxiter}, alpha={self.alpha}, tol={self.tol})"

    def solve_leaves(
        self,
        matvec: Matvec,
        b: Vector,
        *,
        init: Optional[Vector] = None,
        batch_ndim: int = 0,
        layout: Optional[PytreeLayout] = None,
    ) -> Tuple[Vector, LinearSolveInfo]:
        tol, every = self._tolerances(b)
        alpha = self.alpha
        b_norm = norm(b, batch_ndim)
        if init is None:
            term = list(b)
            total = [torch.zeros_like(t) for t in b]
        else:
            # Continue the series from init: the remaining error solves A e = b - A init.
            term = [bi - ai for bi, ai in zip(b, matvec(list(init)))]
            total = [t / alpha for t in init]
        status = None
        iterations = 0
        t_norm = norm(term, batch_ndim)
        for k in range(1, self.maxiter + 1):
            if k == 1 and bool((t_norm <= tol * b_norm).all()):
                break
            total = [s + t for s, t in zip(total, term)]
            a_term = matvec(term)
            term = [t - alpha * a for t, a in zip(term, a_term)]
            iterations = k
            if k % every == 0 or k == self.maxiter:
                t_norm = norm(term, batch_ndim)
                if not bool(torch.isfinite(t_norm).all()):
                    status = "nonfinite"
                    break
                if bool((t_norm > 1e3 * b_norm.clamp_min(torch.finfo(b_norm.dtype).tiny)).any()):
                    status = "diverged"
                    break
                if bool((t_norm <= tol * b_norm).all()):
                    break
        x = [alpha * s for s in total]
        info = self._finish(iterations, safe_div(t_norm, b_norm), tol, status)
        return x, info

