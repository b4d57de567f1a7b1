"""Restarted GMRES for general (non-symmetric) systems."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from ._base import IterativeSolver, Matvec, PytreeLayout, Vector, packing


class GMRES(IterativeSolver):
    r"""Restarted GMRES(m) for ``A x = b`` with any non-singular ``A``.

    Each cycle builds an orthonormal basis :math:`V_k` of the Krylov space
    :math:`\mathcal{K}_k(A, r_0)` by Arnoldi, :math:`A V_k = V_{k+1} \bar H_k` with
    :math:`\bar H_k` upper Hessenberg, and takes the vector of smallest residual in it,

    .. math::

        x = x_0 + V_k y, \qquad y = \arg\min_y \|\beta e_1 - \bar H_k y\|, \qquad
        \beta = \|r_0\| .

    The orthogonalisation is classical Gram-Schmidt with one re-orthogonalisation (two
    block products with the basis per step). Each new column of :math:`\bar H_k` is
    reduced by one Givens rotation as it arrives, :math:`\Omega_k \bar H_k = [R_k; 0]`,
    and the rotated right-hand side :math:`g = \beta\,\Omega_k e_1` gives the residual
    norm of the minimiser for free, :math:`\|b - A x_k\| = |g_{k+1}|`: a step costs one
    ``matvec`` and :math:`O(k)` vector work, and :math:`R_k y = g_{1:k}` is solved once,
    when the cycle ends. Suited to the Jacobians of :func:`~implicitgrad.root_solve` and
    :func:`~implicitgrad.fixed_point_solve`, which are not symmetric.

    **Budget.** ``maxiter`` bounds every ``matvec`` call of the solve: the Arnoldi steps
    of all cycles, the product that measures the true residual :math:`b - A x` after each
    cycle (which also starts the next cycle), and the initial residual when ``init`` is
    given. A cycle gets ``min(restart, remaining budget − 1)`` steps, so that its true
    residual can still be measured; ``info.iterations`` counts all products.

    **Per-system convergence.** With ``batch_ndim > 0`` each system of the batch has its
    own basis, rotations and stopping rule :math:`\|r_i\| \le \text{tol}\,\|b_i\|`: a
    system stops taking steps into its solution at the first step that meets it (the
    others go on), and a system whose measured residual meets it is not restarted. The
    reported residual is the largest measured :math:`\|b_i - A x_i\| / \|b_i\|`.

    An exact breakdown of Arnoldi (the Krylov space is invariant) solves a non-singular
    system (a lucky breakdown: status ``"converged"``). Statuses: ``"converged"``,
    ``"max_iterations"``, ``"nonfinite"`` (the solution of that system is NaN) and
    ``"breakdown"`` (a cycle ended on an invariant subspace without reducing the measured
    residual: ``A`` is singular, or nearly, and ``b`` is not in its range).

    Args:
        maxiter: total number of ``matvec`` calls (see Budget).
        restart: Krylov dimension ``m`` of a cycle (memory: ``m + 1`` vectors).
        tol: relative residual to reach; ``None``: 1e-10 (float64), 1e-5 (float32).
        check_every: Arnoldi steps between host-synchronising checks (``None``: 1 on
            CPU, 10 elsewhere); a cycle always ends with a check.

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> x, info = ig.GMRES()(lambda v: A @ v, b)
        >>> info.converged, info.iterations, torch.allclose(A @ x, b)
        (True, 3, True)

    References:
        Saad and Schultz, GMRES: A Generalized Minimal Residual Algorithm for Solving
        Nonsymmetric Linear Systems, 1986. Giraud, Langou and Rozložník, The loss of
        orthogonality in the Gram-Schmidt orthogonalization process, 2005.
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
        pack, unpack = packing(b, batch_ndim)

        def op(v: torch.Tensor) -> torch.Tensor:
            return pack(matvec(unpack(v)))

        rhs = pack(b)
        b_norm = torch.linalg.vector_norm(rhs, dim=1)
        threshold = tol * b_norm
        used = 0
        if init is None:
            x = torch.zeros_like(rhs)
            r = rhs
        else:
            x = pack(init).clone()
            r = rhs - op(x)
            used = 1
        r_norm = torch.linalg.vector_norm(r, dim=1)
        nonfinite = ~torch.isfinite(r_norm)
        done = r_norm <= threshold
        broken = torch.zeros_like(done)
        basis = None
        while True:
            # One host read per cycle: the measured residuals decide.
            any_nonfinite, finished = torch.stack([nonfinite.any(), (done | broken | nonfinite).all()]).tolist()
            steps = min(self.restart, self.maxiter - used - 1)
            if finished or steps < 1:
                break
            if basis is None:
                basis = rhs.new_empty(min(self.restart, self.maxiter) + 1, *rhs.shape)
            active = ~(done | broken | nonfinite)
            # A finished system enters the cycle with a zero residual: it takes no step.
            beta = torch.where(active, r_norm, torch.zeros_like(r_norm))
            limit = torch.where(active, threshold.clamp_min(torch.finfo(rhs.dtype).tiny), torch.ones_like(threshold))
            update, taken, invariant = _cycle(op, torch.where(active[:, None], r, 0.0), beta, limit, active,
                                              steps, every, basis)
            used += taken + 1
            x = x + update
            r = rhs - op(x)
            new_norm = torch.linalg.vector_norm(r, dim=1)
            nonfinite = nonfinite | ~torch.isfinite(new_norm)
            # A cycle that ends on an invariant Krylov subspace without reducing the
            # residual at all: b has a component outside the range of A.
            broken = broken | (active & invariant & (new_norm > threshold) & (new_norm >= r_norm))
            done = done | (new_norm <= threshold)
            r_norm = new_norm
        status = None
        if any_nonfinite:
            status = "nonfinite"
            x = torch.where(nonfinite[:, None], torch.full_like(x, math.nan), x)
        elif bool(broken.any()):
            status = "breakdown"
        rel = r_norm / torch.where(b_norm == 0, torch.ones_like(b_norm), b_norm)
        return unpack(x), self._finish(used, rel, tol, status)


def _cycle(op, r, beta, limit, active, steps: int, every: int, basis: torch.Tensor):
    """One Arnoldi cycle from the residuals ``r`` (``(systems, n)``, norms ``beta``).

    A system stops taking steps into its correction at the first step whose residual
    estimate reaches ``limit`` (its tolerance × ‖b‖); the checks read only the ``active``
    systems. Returns the correction of ``x``, the number of steps (products) taken, and per
    system whether Arnoldi met a (numerically) invariant subspace.
    """
    dtype, device = r.dtype, r.device
    systems = r.shape[0]
    # ‖w‖ + tiny keeps every division finite: a zero vector (an exact breakdown, or a
    # system that entered the cycle solved) stays zero, and its rotation leaves the
    # residual estimate unchanged.
    tiny = torch.finfo(dtype).tiny
    # The products act on a fresh vector whose copy is in the basis: an in-place matvec
    # cannot corrupt the basis.
    vector = r / (beta + tiny)[:, None]
    basis[0] = vector
    # rows[j] is row j of the product of the rotations met before step j (zero beyond
    # entry j): β |rows[j][0]| is the residual after j steps, and its dot with column j
    # of the Hessenberg matrix is the entry the next rotation acts on.
    minus_unit = -torch.eye(steps + 1, dtype=dtype, device=device)
    rows = [-minus_unit[0].expand(systems, steps + 1)]
    columns, subdiagonal, cosines, sines = [], [], [], []
    # The checks read only active systems (a finished one may carry NaN it no longer uses).
    scale = torch.where(active, beta / limit, torch.zeros_like(beta))
    single = float(scale) if systems == 1 else None
    for j in range(steps):
        w = op(vector).unsqueeze(1)
        known = basis[: j + 1].transpose(0, 1)
        known_t = known.transpose(1, 2)
        h = torch.bmm(w, known_t)
        w = torch.baddbmm(w, h, known, alpha=-1)
        again = torch.bmm(w, known_t)
        w = torch.baddbmm(w, again, known, alpha=-1)
        column = (h + again).squeeze(1)
        w_norm = torch.linalg.vector_norm(w, dim=2) + tiny
        vector = w.squeeze(1) / w_norm
        basis[j + 1] = vector
        row = rows[j]
        # The reflection [[c, s], [s, −c]] maps (row · column, ‖w‖) to (‖·‖, 0).
        diagonal = torch.linalg.vecdot(row[:, : j + 1], column).unsqueeze(1)
        radius = torch.hypot(diagonal, w_norm)
        cosine, sine = diagonal / radius, w_norm / radius
        rows.append(torch.addcmul(row * sine, cosine, minus_unit[j + 1]))
        columns.append(torch.nn.functional.pad(column, (0, steps - j)))
        subdiagonal.append(w_norm)
        cosines.append(cosine)
        sines.append(sine)
        if (j + 1) % every == 0 and j + 1 < steps:
            # NaN fails the comparison and ends the cycle: the measured residual reports it.
            if single is not None:
                estimate = abs(float(rows[j + 1][0, 0])) * single
            else:
                estimate = float((rows[j + 1][:, 0].abs() * scale).max())
            if not estimate > 1.0:
                break
    k = len(columns)
    cosine, sine, below = (torch.cat(parts, dim=1) for parts in (cosines, sines, subdiagonal))
    products = torch.stack(rows, dim=1)[:, :, : k + 1]
    # Row j of the product of all rotations is (c_j · rows[j], s_j) on its first j + 2
    # entries; times the Hessenberg matrix it gives the triangular factor R.
    omega = products[:, :k] * cosine.unsqueeze(2)
    omega.diagonal(offset=1, dim1=1, dim2=2).copy_(sine)
    hess_t = torch.stack(columns, dim=1)[:, :, : k + 1]
    hess_t.diagonal(offset=1, dim1=1, dim2=2).copy_(below)
    upper = torch.bmm(omega, hess_t.transpose(1, 2))
    g = beta[:, None] * omega[:, :, 0]
    estimates = products[:, 1:, 0].abs() * scale[:, None]
    reached = estimates <= 1.0
    # Relative to ‖A v_j‖ (the norm of column j of the Hessenberg matrix): a new basis
    # vector that vanishes means the Krylov space is invariant; a pivot of R that
    # vanishes means A is singular on it, and the directions from there on are dropped
    # (they would only add a null-space component of any size).
    floor = 100 * torch.finfo(dtype).eps * torch.linalg.vector_norm(hess_t, dim=2) + 2 * tiny
    degenerate = upper.diagonal(dim1=1, dim2=2).abs() <= floor
    invariant = ((below <= floor) | degenerate).any(dim=1)
    # Each system keeps the steps up to the first that met its tolerance.
    useful = torch.minimum(_first(reached, k) + 1, _first(degenerate, k))
    keep = torch.arange(k, device=device)[None, :] < useful[:, None]
    upper = torch.where(keep[:, :, None] & keep[:, None, :], upper, torch.eye(k, dtype=dtype, device=device))
    g = torch.where(keep, g, torch.zeros_like(g))
    y = torch.linalg.solve_triangular(upper, g.unsqueeze(2), upper=True)
    update = torch.bmm(y.transpose(1, 2), basis[:k].transpose(0, 1)).squeeze(1)
    return update, k, invariant


def _first(flags: torch.Tensor, default: int) -> torch.Tensor:
    """Per row, the index of the first ``True`` (``default`` when there is none)."""
    return torch.where(flags.any(dim=1), flags.to(torch.int64).argmax(dim=1), default)

