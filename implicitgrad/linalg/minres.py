"""MINRES for symmetric, possibly indefinite or singular systems."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from ._base import (
    Matvec,
    PytreeLayout,
    SymmetricIterativeSolver,
    Vector,
    axpy,
    dot,
    norm,
    safe_div,
    scale,
    select,
)


class MINRES(SymmetricIterativeSolver):
    r"""Preconditioned MINRES for ``(A + damping·I) x = b`` with symmetric ``A``.

    ``A`` may be indefinite or singular (with ``b`` in its range): the Hessian at a saddle
    point, or iMAML's ``I + H/λ`` when the inner loss is not convex. MINRES runs the
    Lanczos process (a three-term recurrence: a few vectors of memory) and updates a QR
    factorisation of its tridiagonal matrix with one Givens rotation per step, which gives

    .. math::

        x_k = \arg\min_{x \in x_0 + \mathcal{K}_k(A, r_0)} \|b - A x\| ,
        \qquad r_0 = b - A x_0 ,

    so the residual never increases, and the recurrence estimates its norm without extra
    products. If the eigenvalues of ``A`` lie in :math:`[-\beta, -\alpha] \cup [\alpha, \beta]`, with
    :math:`\kappa = \beta / \alpha`,

    .. math::

        \frac{\|r_{2m}\|}{\|r_0\|} \le 2 \left(\frac{\kappa - 1}{\kappa + 1}\right)^m ,

    the rate of CG on a matrix of condition number :math:`\kappa^2`; on a positive
    definite ``A`` the residual obeys CG's bound :math:`2 ((\sqrt\kappa - 1) /
    (\sqrt\kappa + 1))^k`. Each iteration costs one ``matvec`` (one Hessian-vector product
    inside :func:`~implicitgrad.implicit_solve`). Each system of a batch stops on its own
    when the estimate reaches :math:`\|r\| \le \text{tol}\,\|b\|`; an exact breakdown
    of Lanczos (the Krylov space is invariant) means that system is solved. The reported
    residual is measured, :math:`\|b - A x\| / \|b\|`, with one more ``matvec`` at the end
    (counted in ``iterations``): near a singular matrix the estimate can claim a residual
    the solution does not have.

    Args:
        maxiter: largest number of Lanczos iterations (``matvec`` calls).
        tol: relative residual to reach; ``None`` picks 1e-10 in float64, 1e-5 in float32.
        damping: ``λ ≥ 0`` added to the diagonal (a proximal regularisation, as for
            :class:`~implicitgrad.CG`); MINRES does not need it to be definite.
        preconditioner: optional ``M`` with ``M(r) ≈ (A + λI)^{-1} r`` in magnitude
            (e.g. the inverse of the absolute diagonal), on pytrees shaped like ``b``; it
            must be symmetric positive definite even when ``A`` is not. MINRES then
            minimises the residual in the norm :math:`\|r\|_M = \sqrt{r^\top M r}`, so the
            true residual :math:`\|b - A x\|` is measured (one more ``matvec``, counted in
            ``iterations``) before a system is declared converged.
        check_every: iterations between convergence checks. Each check reads a number
            back to the host; on CUDA a larger interval keeps the solve asynchronous.
            ``None``: every iteration on CPU, every 10 elsewhere.

    Statuses: ``"converged"``, ``"max_iterations"``, ``"nonfinite"``,
    ``"preconditioner_not_spd"`` (:math:`r^\top M r < 0` was met; the system stops at its
    last iterate) and ``"breakdown"`` (Lanczos ended, or its estimate claimed ``tol``,
    with the measured residual above ``tol``: ``A`` is singular, or nearly, and ``b`` is
    not in its range). A solution whose measured residual exceeds that of the initial
    guess, which only such a breakdown produces, is replaced by the initial guess.

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.tensor([[2.0, 1.0, 0.0], [1.0, -3.0, 1.0], [0.0, 1.0, 1.0]],
        ...                  dtype=torch.float64)  # eigenvalues of both signs
        >>> b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> x, info = ig.MINRES()(lambda v: A @ v, b)
        >>> info.status, info.iterations, torch.allclose(A @ x, b)
        ('converged', 4, True)

    References:
        Paige and Saunders, Solution of Sparse Indefinite Systems of Linear Equations,
        1975.
    """

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
        op = self._damped(matvec)
        plain = self.preconditioner is None
        precond = self._flat_preconditioner(layout, b)

        def residual_norm(x: Vector) -> torch.Tensor:
            return norm([bi - ai for bi, ai in zip(b, op(x))], batch_ndim)

        b_norm = norm(b, batch_ndim)
        threshold = tol * b_norm
        if init is None:
            x = [torch.zeros_like(t) for t in b]
            r1 = list(b)
        else:
            x = [t.clone() for t in init]
            r1 = [bi - ai for bi, ai in zip(b, op(x))]
        y = r1 if plain else precond(r1)
        beta_sq = dot(r1, y, batch_ndim)
        not_spd = beta_sq < 0
        beta = beta_sq.clamp_min(0).sqrt()
        inv_beta = _reciprocal(beta)
        initial_res = beta if plain else norm(r1, batch_ndim)
        true_res: Optional[torch.Tensor] = initial_res
        x_init = x
        # phibar is the residual in the M-norm (the 2-norm without M). Its target starts at
        # tol·‖b‖ rescaled by the ratio of the two norms at r0, and is tightened for a
        # system whose measured residual missed tol.
        target = threshold if plain else threshold * safe_div(beta, initial_res)
        phibar = beta
        zero = torch.zeros_like(beta)
        inv_oldb, dbar, epsln, sn = zero, zero, zero, zero
        cs = -torch.ones_like(beta)
        r2 = r1
        w = w2 = [torch.zeros_like(t) for t in b]
        # A frozen system keeps x and phibar: converged (measured), not SPD, or stalled
        # (Lanczos ended, γ = 0, with the residual above tol).
        frozen = not_spd | (initial_res <= threshold)
        status, iterations, measured = None, 0, 0
        nonfinite, ready = _flags(phibar, frozen)
        if nonfinite:
            status = "nonfinite"
        for k in range(1, self.maxiter + 1):
            if status is not None or ready:
                break
            active = ~frozen
            # Lanczos: v_k = y / β_k, β_{k+1} r_{k+1} = A v_k − α_k r_k − (β_k/β_{k-1}) r_{k-1}.
            v = [scale(inv_beta, t) for t in y]
            y = op(v)
            if k > 1:
                y = axpy(-beta * inv_oldb, r1, y)
            alfa = dot(v, y, batch_ndim)
            y = axpy(-alfa * inv_beta, r2, y)
            r1, r2 = r2, y
            y = r2 if plain else precond(r2)
            inv_oldb = inv_beta
            beta_sq = dot(r2, y, batch_ndim)
            beta = beta_sq.clamp_min(0).sqrt()
            inv_beta = _reciprocal(beta)
            # Previous rotation on the new column of the tridiagonal matrix, then the new one.
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = torch.hypot(gbar, beta)
            inv_gamma = _reciprocal(gamma)
            cs = gbar * inv_gamma
            sn = beta * inv_gamma
            phi = cs * phibar
            w1, w2 = w2, w
            w = [scale(inv_gamma, vi - scale(oldeps, a) - scale(delta, c)) for vi, a, c in zip(v, w1, w2)]
            # r2ᵀ M r2 < 0 (M not positive definite) or γ = 0 invalidate this step.
            halt = gamma == 0
            if not plain:
                negative = beta_sq < 0
                not_spd = not_spd | (active & negative)
                halt = halt | negative
            step = active & ~halt
            x = [select(step, xi + scale(phi, wi), xi) for xi, wi in zip(x, w)]
            phibar = torch.where(step, sn * phibar, phibar)
            frozen = ~step
            if plain:
                frozen = frozen | (phibar <= threshold)
            true_res = None
            iterations = k
            if k % every == 0 or k == self.maxiter:
                nonfinite, ready = _flags(phibar, frozen | (phibar <= target))
                if nonfinite:
                    status = "nonfinite"
                elif ready and not plain:
                    true_res = residual_norm(x)
                    measured += 1
                    frozen = frozen | (true_res <= threshold)
                    ready = bool(frozen.all())
                    target = torch.where(frozen, target, phibar * safe_div(threshold, true_res))
        if status is None:
            if true_res is None:
                true_res = residual_norm(x)
                measured += 1
            # In exact arithmetic the residual never grows; a measured one above the initial
            # residual means the recurrence broke down: keep the initial guess instead.
            worse = true_res > initial_res
            x = [select(worse, a, c) for a, c in zip(x_init, x)]
            true_res = torch.where(worse, initial_res, true_res)
            rel = safe_div(true_res, b_norm)
            # A frozen system short of tol that met no rᵀ M r < 0 stalled: Lanczos ended
            # (γ = 0), or the recurrence lost track of the residual (a nearly singular
            # tridiagonal matrix; the estimate claimed tol, the measurement denies it).
            stalled = (frozen & ~not_spd & (true_res > threshold)) | worse
            any_not_spd, any_stalled = torch.stack([not_spd.any(), stalled.any()]).tolist()
            if any_not_spd:
                status = "preconditioner_not_spd"
            elif any_stalled:
                status = "breakdown"
        else:
            rel = safe_div(phibar, b_norm)
        return x, self._finish(iterations + measured, rel, tol, status)


def _reciprocal(t: torch.Tensor) -> torch.Tensor:
    """``1 / t`` with 0 where ``t == 0`` (an exhausted or converged system)."""
    return torch.where(t == 0, torch.zeros_like(t), t.reciprocal())


def _flags(phibar: torch.Tensor, done: torch.Tensor) -> List[bool]:
    """``[any residual non-finite, every system done]`` in one host read."""
    return torch.stack([~torch.isfinite(phibar).all(), done.all()]).tolist()

