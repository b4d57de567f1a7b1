"""Dense direct solve: the whole matrix over every block of the pytree."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from ._base import LinearSolver, Matvec, Vector, default_tol, safe_div


class Exact(LinearSolver):
    r"""Form ``A`` column by column and solve it directly.

    With :math:`n` the total number of entries over *all* leaves of the pytree, ``A`` is
    assembled as the :math:`n \times n` matrix :math:`[A e_1, \dots, A e_n]` — the cross
    blocks between different tensors included (dropping them, as a per-tensor dense
    solve does, gives a wrong gradient whenever the variables are coupled). A
    numerically symmetric matrix is factored by Cholesky, falling back to LU when it is
    not positive definite; a non-symmetric one by LU. A singular matrix (zero pivot, or
    reciprocal condition number below machine precision) gives status ``"singular"`` and
    the minimum-norm least-squares solution.

    Costs ``n`` matvecs and :math:`O(n^3)` flops: for problems up to a few thousand
    unknowns, and as the reference the iterative solvers are tested against.

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = ig.Exact()(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> info.status, torch.allclose(A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64))
        ('converged', True)
    """

    def __init__(self, max_size: int = 20000) -> None:
        if int(max_size) < 1:
            raise ValueError(f"Exact: max_size must be a positive integer, got {max_size!r}.")
        self.max_size = int(max_size)

    def __repr__(self) -> str:
        return "Exact()"

    def matrix(self, matvec: Matvec, like: Vector, batch_ndim: int = 0) -> torch.Tensor:
        """The dense matrix of ``matvec``: shape ``batch_shape + (n, n)``."""
        batch_shape = like[0].shape[:batch_ndim]
        sizes = [t[(0,) * batch_ndim].numel() for t in like]
        n = sum(sizes)
        if n > self.max_size:
            raise ValueError(
                f"Exact: the system has {n} unknowns, more than max_size={self.max_size}; "
                "forming the dense matrix would take too much time and memory. Use CG "
                "(symmetric) or GMRES, or raise max_size."
            )
        columns = []
        for i in range(n):
            e = []
            offset = 0
            for t, size in zip(like, sizes):
                flat = torch.zeros(*batch_shape, size, dtype=t.dtype, device=t.device)
                if offset <= i < offset + size:
                    flat[..., i - offset] = 1
                e.append(flat.reshape(t.shape))
                offset += size
            out = matvec(e)
            columns.append(torch.cat([o.reshape(*batch_shape, -1) for o in out], dim=-1))
        return torch.stack(columns, dim=-1)

    def solve(
        self,
        matvec: Matvec,
        b: Vector,
        *,
        x0: Optional[Vector] = None,
        batch_ndim: int = 0,
        spec=None,
    ) -> Tuple[Vector, LinearSolveInfo]:
        batch_shape = b[0].shape[:batch_ndim]
        a = self.matrix(matvec, b, batch_ndim)
        n = a.shape[-1]
        rhs = torch.cat([t.reshape(*batch_shape, -1) for t in b], dim=-1).unsqueeze(-1)
        status = None
        eps = torch.finfo(a.dtype).eps
        solution = None
        if torch.allclose(a, a.transpose(-1, -2), rtol=1e3 * eps, atol=1e3 * eps * float(a.abs().max())):
            chol, bad = torch.linalg.cholesky_ex(a)
            if not bool(bad.any()) and _well_conditioned(torch.diagonal(chol, dim1=-2, dim2=-1) ** 2, eps, n):
                solution = torch.cholesky_solve(rhs, chol)
        if solution is None:
            lu, pivots, bad = torch.linalg.lu_factor_ex(a)
            if bool(bad.any()) or not _well_conditioned(
                torch.diagonal(lu, dim1=-2, dim2=-1).abs(), eps, n
            ):
                status = "singular"
                solution = torch.linalg.lstsq(a, rhs, driver="gelsd" if a.device.type == "cpu" else None).solution
            else:
                solution = torch.linalg.lu_solve(lu, pivots, rhs)
        res = (a @ solution - rhs).squeeze(-1).norm(dim=-1)
        rel = safe_div(res, rhs.squeeze(-1).norm(dim=-1))
        tol = max(default_tol(a.dtype), 1e3 * n * eps)
        if status is None and not bool(torch.isfinite(solution).all()):
            status = "nonfinite"
        info = self._finish(n, rel, tol, status, _FIXES)
        if status is None and not info.converged:
            # A residual above tol after a direct solve means severe ill-conditioning.
            info.status, info.converged = "singular", False
            info.message = _FIXES["singular"].format(res=info.residual, tol=tol)
        flat = solution.squeeze(-1)
        out, offset = [], 0
        for t in b:
            size = t[(0,) * batch_ndim].numel()
            out.append(flat[..., offset : offset + size].reshape(t.shape))
            offset += size
        return out, info


def _well_conditioned(pivots: torch.Tensor, eps: float, n: int) -> bool:
    """Pivot-ratio test: a crude but cheap estimate of the reciprocal condition number."""
    hi = pivots.amax(dim=-1)
    lo = pivots.amin(dim=-1)
    return bool((lo > n * eps * hi).all()) and bool((hi > 0).all())


_FIXES = {
    "singular": (
        "The matrix is singular or numerically singular (relative residual {res:.2e}): the "
        "optimality condition does not determine x* uniquely, so the implicit gradient is "
        "not defined. Add regularisation to the inner problem (e.g. an L2 term), or use "
        "CG(damping=...) for a regularised gradient. The minimum-norm solution was used."
    ),
    "max_iterations": (
        "The dense solve left relative residual {res:.2e} > {tol:.1e}: the matrix is "
        "severely ill-conditioned."
    ),
    "nonfinite": (
        "Non-finite values in the dense matrix or right-hand side: check x* and the "
        "parameters for NaN/Inf."
    ),
}
