"""Dense direct solve: the whole matrix over every block of the pytree."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from .._validation import check_count
from ._base import LinearSolver, Matvec, PytreeLayout, Vector, poison, safe_div, working_dtype

#: Columns of the matrix formed per vectorised call of ``matvec``.
CHUNK = 256
#: Power / inverse-iteration steps of the singular-value estimates.
ESTIMATE_STEPS = 8


class Exact(LinearSolver):
    r"""Form ``A`` and solve it directly.

    With :math:`n` the total number of entries over *all* leaves of the pytree, ``A`` is
    assembled as the :math:`n \times n` matrix :math:`[A e_1, \dots, A e_n]` — the cross
    blocks between different tensors included (dropping them, as a per-tensor dense
    solve does, gives a wrong gradient whenever the variables are coupled). The columns
    come from ``matvec`` vectorised over the identity (``torch.func.vmap``, in chunks of
    256 columns), column by column only if ``matvec`` cannot be vectorised. A numerically
    symmetric matrix is factored by Cholesky, falling back to LU when it is not positive
    definite; a non-symmetric one by LU. float16 and bfloat16 matrices are factored in
    float32 and the solution cast back.

    Statuses, each from a measurement:

    * ``"converged"``: the solve is backward stable — the normwise backward error
      :math:`\|A x - b\| / (\|A\|_2 \|x\| + \|b\|)` is at most :math:`100\,n\,\varepsilon`
      — and ``A`` is not numerically singular. The relative residual
      :math:`\|Ax - b\| / \|b\|` can then be as large as about :math:`\kappa\varepsilon`:
      no solver does better in this precision.
    * ``"singular"``: a zero pivot, or :math:`\sigma_{\min} \le n\,\varepsilon\,\sigma_{\max}`
      (estimated by inverse and power iteration on the factors), with :math:`\varepsilon`
      the precision the matrix was computed in. The minimum-norm least-squares solution
      (singular values below :math:`n\,\varepsilon\,\sigma_{\max}` dropped) is returned.
    * ``"ill_conditioned"``: not singular, but the backward error exceeds the bound above
      (the factorisation lost accuracy).
    * ``"nonfinite"``: ``A`` or ``b`` holds NaN/Inf; the solution is NaN.

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
        self.max_size = check_count("max_size", max_size, "Exact")

    def __repr__(self) -> str:
        return "Exact()"

    def matrix(self, matvec: Matvec, like: Vector, batch_ndim: int = 0) -> torch.Tensor:
        """The dense matrix of ``matvec``: shape ``batch_shape + (n, n)``."""
        batch_shape = like[0].shape[:batch_ndim]
        shapes = [t.shape[batch_ndim:] for t in like]
        sizes = [t[(0,) * batch_ndim].numel() for t in like]
        n = sum(sizes)
        if n > self.max_size:
            raise ValueError(
                f"Exact: the system has {n} unknowns, more than max_size={self.max_size}; "
                "forming the dense matrix would take too much time and memory. Use CG "
                "(symmetric) or GMRES, or raise max_size."
            )
        dtype, device = like[0].dtype, like[0].device

        def column(e: torch.Tensor) -> torch.Tensor:
            """``A e`` for a unit vector ``e`` of the flattened variable, the same in every system."""
            parts = torch.split(e, sizes)
            v = [p.reshape(s).expand(tuple(batch_shape) + tuple(s)) for p, s in zip(parts, shapes)]
            return torch.cat([o.reshape(*batch_shape, -1) for o in matvec(v)], dim=-1)

        eye = torch.eye(n, dtype=dtype, device=device)
        try:
            columns = torch.cat([torch.func.vmap(column)(eye[i : i + CHUNK]) for i in range(0, n, CHUNK)])
        except RuntimeError:
            # An operation of the product without a batching rule: one column at a time.
            columns = torch.stack([column(eye[i]) for i in range(n)])
        return columns.movedim(0, -1)

    def solve_leaves(
        self,
        matvec: Matvec,
        b: Vector,
        *,
        init: Optional[Vector] = None,
        batch_ndim: int = 0,
        layout: Optional[PytreeLayout] = None,
    ) -> Tuple[Vector, LinearSolveInfo]:
        batch_shape = b[0].shape[:batch_ndim]
        source = working_dtype(b[0].dtype)
        a = self.matrix(matvec, b, batch_ndim)
        work = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
        a = a.to(work)
        rhs = torch.cat([t.reshape(*batch_shape, -1) for t in b], dim=-1).to(work).unsqueeze(-1)
        n = a.shape[-1]
        eps = max(torch.finfo(source).eps, torch.finfo(work).eps)
        nonfinite = ~(torch.isfinite(a).all(-1).all(-1) & torch.isfinite(rhs).all(-1).all(-1))
        # Systems with NaN/Inf are replaced by I x = 0 for the factorisation and get NaN.
        eye = torch.eye(n, dtype=work, device=a.device)
        a = torch.where(nonfinite[..., None, None], eye, a)
        rhs = torch.where(nonfinite[..., None, None], torch.zeros_like(rhs), rhs)

        solution, solve_t, zero_pivot = _factor_solve(a, rhs, eps)
        sigma_max = _sigma_max(a)
        sigma_min = _sigma_min(solve_t, a, zero_pivot)
        singular = (zero_pivot | (sigma_min <= n * eps * sigma_max)) & ~nonfinite
        flags = torch.stack([nonfinite.any(), singular.any()]).tolist()
        if flags[1]:
            # Minimum-norm least squares, dropping the singular values below n·ε·σ_max.
            least = torch.linalg.lstsq(
                a, rhs, rcond=n * eps, driver="gelsd" if a.device.type == "cpu" else None
            ).solution
            solution = torch.where(singular[..., None, None], least, solution)
        res = (a @ solution - rhs).squeeze(-1).norm(dim=-1)
        x_norm = solution.squeeze(-1).norm(dim=-1)
        b_norm = rhs.squeeze(-1).norm(dim=-1)
        backward_error = safe_div(res, sigma_max * x_norm + b_norm)
        bound = 100 * n * eps
        inaccurate = (backward_error > bound) & ~singular & ~nonfinite
        rel = torch.where(nonfinite, torch.full_like(res, float("nan")), safe_div(res, b_norm))
        if flags[0]:
            status = "nonfinite"
        elif flags[1]:
            status = "singular"
        elif bool(inaccurate.any()):
            status = "ill_conditioned"
        else:
            status = "converged"
        info = self._finish(n, rel, bound, status)
        flat = poison([solution.squeeze(-1)], nonfinite, batch_ndim)[0].to(b[0].dtype)
        out, offset = [], 0
        for t in b:
            size = t[(0,) * batch_ndim].numel()
            out.append(flat[..., offset : offset + size].reshape(t.shape))
            offset += size
        return out, info


def _factor_solve(a: torch.Tensor, rhs: torch.Tensor, eps: float):
    """Cholesky when ``a`` is numerically symmetric positive definite, LU otherwise.

    Returns the solution, a function applying ``(AᵀA)⁻¹`` to a block of vectors (for the
    smallest singular value) and the systems with a zero pivot.
    """
    symmetric = bool(
        ((a - a.transpose(-1, -2)).abs().amax() <= 1e3 * eps * a.abs().amax()).item()
    )
    if symmetric:
        chol, bad = torch.linalg.cholesky_ex(a)
        if not bool(bad.any()):
            return (
                torch.cholesky_solve(rhs, chol),
                lambda y: torch.cholesky_solve(torch.cholesky_solve(y, chol), chol),
                torch.zeros_like(bad, dtype=torch.bool),
            )
    lu, pivots, bad = torch.linalg.lu_factor_ex(a)
    zero_pivot = bad > 0
    # A zero pivot makes the triangular solves divide by zero: those systems are replaced.
    lu = torch.where(zero_pivot[..., None, None], torch.eye(a.shape[-1], dtype=a.dtype, device=a.device), lu)
    return (
        torch.linalg.lu_solve(lu, pivots, rhs),
        lambda y: torch.linalg.lu_solve(lu, pivots, torch.linalg.lu_solve(lu, pivots, y, adjoint=True)),
        zero_pivot,
    )


def _start(shape, a_like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=a_like.device, dtype=a_like.dtype)
    return v / v.norm(dim=-2, keepdim=True)


def _sigma_max(a: torch.Tensor) -> torch.Tensor:
    """Largest singular value per system, by power iteration on ``AᵀA`` (a lower bound
    that is tight to a few digits after ``ESTIMATE_STEPS`` steps)."""
    v = _start(a.shape[:-1] + (1,), a)
    est = torch.zeros(a.shape[:-2], dtype=a.dtype, device=a.device)
    for _ in range(ESTIMATE_STEPS):
        w = a @ v
        est = w.squeeze(-1).norm(dim=-1)
        v = a.transpose(-1, -2) @ w
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return torch.maximum(est, a.abs().amax((-2, -1)) / a.shape[-1] ** 0.5)


def _sigma_min(solve_t, a: torch.Tensor, zero_pivot: torch.Tensor) -> torch.Tensor:
    """Smallest singular value per system, by inverse iteration on ``AᵀA`` (an upper
    bound; it converges fastest exactly when ``A`` is nearly singular)."""
    v = _start(a.shape[:-1] + (1,), a)
    growth = torch.ones(a.shape[:-2], dtype=a.dtype, device=a.device)
    for _ in range(ESTIMATE_STEPS):
        w = solve_t(v)
        norms = w.norm(dim=-2, keepdim=True)
        v = w / norms.clamp_min(torch.finfo(a.dtype).tiny)
        growth = norms.squeeze(-1).squeeze(-1)
    # ‖(AᵀA)⁻¹ v‖ for a unit v tends to 1/σ_min²; an overflow means σ_min = 0.
    sigma = growth.rsqrt()
    sigma = torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma))
    return torch.where(zero_pivot, torch.zeros_like(sigma), sigma)

