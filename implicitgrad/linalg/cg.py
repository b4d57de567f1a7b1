"""Conjugate gradient for symmetric positive definite systems."""

from __future__ import annotations

from typing import Optional, Tuple

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
    working_dtype,
)

#: A residual above this multiple of the best one met so far stops CG as diverging.
DIVERGENCE_FACTOR = 1e2


class CG(SymmetricIterativeSolver):
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

    The residual of CG is not monotone, and on a matrix that is not positive definite an
    iterate can be worse than the initial guess. CG therefore returns, per system, the
    iterate of lowest residual it met — the initial guess included (``x = 0``, relative
    residual 1, without ``init``) — and reports that iterate's residual. It stops a system
    early in three cases, returning that best iterate:

    * ``"negative_curvature"``: a search direction with ``pᵀ A p ≤ 0`` that proves ``A``
      indefinite — ``pᵀAp`` clearly negative, or ``pᵀAp ≈ 0`` with ``Ap`` far from 0,
      impossible for a positive semidefinite matrix (the Hessian is not positive
      semidefinite at ``x``); the step along it is not taken.
    * ``"singular"``: a search direction with ``pᵀ A p ≤ 0`` and ``A p ≈ 0`` (below
      rounding relative to ``‖A‖ ‖p‖``): a null vector of a singular matrix, met because
      ``b`` is not in the range of ``A``. One more product tells the two apart. A null
      direction of tiny positive curvature makes a giant step instead; checked in that
      iteration (``check_every=1``), it is reported as ``"singular"`` too.
    * ``"diverging"``: the residual grew above ``1e2`` times the best residual met so far.
      On a positive definite ``A`` the ``A``-norm of the error never increases, so the
      residual can exceed its best by at most :math:`\sqrt{\kappa}`: the rule never fires
      for :math:`\kappa \le 10^4`, and when it fires ``A`` is indefinite or very badly
      conditioned (then the residual can stay above ``‖b‖`` for many steps while the
      error still decreases: precondition or damp such a matrix).

    In a batch only the affected system stops; the others go on. For a symmetric
    indefinite ``A`` use :class:`~implicitgrad.MINRES`.

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

    #: CG steps between recomputations of the true residual ``b − A x`` (one product each,
    #: counted in ``iterations``); in between, the residual follows the recursion
    #: ``r ← r − α A p``, which drifts from the true one over long runs.
    RESIDUAL_EVERY = 50

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
        n = batch_ndim
        b_norm = norm(b, n)
        threshold2 = (tol * b_norm).square()
        if init is None:
            x = [torch.zeros_like(t) for t in b]
            r = [t.clone() for t in b]
        else:
            x = [t.clone() for t in init]
            r = [bi - ai for bi, ai in zip(b, op(x))]
        z = r if plain else precond(r)
        p = list(z)
        rz = dot(r, z, n)
        rr = rz if plain else dot(r, r, n)  # squared residual norms, per system
        best_x, best_rr = list(x), rr
        negative = torch.zeros_like(rr, dtype=torch.bool)
        stopped = negative  # negative curvature or diverging: the system keeps its iterate
        null_step = negative  # diverged by a giant step along a null vector
        curvature = _Curvature(rr)
        status, used, step = None, 0, 0
        growth2 = DIVERGENCE_FACTOR**2
        zero = torch.zeros_like(rr)
        ap = p
        if not bool((rr <= threshold2).all()):
            while used < self.maxiter:
                step += 1
                # A system that met negative curvature or diverges keeps its iterate (the step
                # along a direction of non-positive curvature is not taken) and leaves the
                # batch; the others go on.
                active = (rr > threshold2) & ~stopped
                ap = op(p)
                used += 1
                pap = dot(p, ap, n)
                bad = active & (pap <= 0)
                curvature.step(step, pap, rr, bad)
                negative, stopped = negative | bad, stopped | bad
                alpha = torch.where(active & ~bad, rz / pap, zero)
                x = axpy(alpha, p, x)
                if step % self.RESIDUAL_EVERY == 0 and used < self.maxiter:
                    true_r = [bi - ai for bi, ai in zip(b, op(x))]
                    used += 1
                    r = [select(active, t, ri - scale(alpha, ai)) for t, ri, ai in zip(true_r, r, ap)]
                else:
                    r = axpy(-alpha, ap, r)
                z = r if plain else precond(r)
                rz_new = dot(r, z, n)
                rr = rz_new if plain else dot(r, r, n)
                grew = active & (rr > growth2 * best_rr)
                stopped = stopped | grew
                improved = rr < best_rr
                best_rr = torch.where(improved, rr, best_rr)
                best_x = [select(improved, xi, bi) for xi, bi in zip(x, best_x)]
                if step % every == 0 or used >= self.maxiter:
                    nonfinite, done, giant = torch.stack(
                        [~torch.isfinite(rr).all(), ((rr <= threshold2) | stopped).all(), grew.any()]
                    ).tolist()
                    if nonfinite:
                        status = "nonfinite"
                        break
                    if giant and every == 1:
                        # A giant step along a direction of tiny positive curvature; checked in
                        # the step it happened, that direction is still at hand.
                        null_step = null_step | (grew & curvature.classify(op, p, z, n, ap=ap, current=True)[0])
                    if done:
                        break
                p = axpy(safe_div(rz_new, rz), p, z)
                curvature.p_index = step + 1
                rz = rz_new
        if status is None:
            any_negative, any_stopped = torch.stack([negative.any(), stopped.any()]).tolist()
            if any_stopped:
                singular = torch.zeros_like(negative)
                if any_negative:
                    singular, products = curvature.classify(op, p, z, n, ap=ap)
                    used += products
                real_negative = negative & ~singular
                real_diverging = stopped & ~negative & ~null_step
                status = ("negative_curvature" if bool(real_negative.any()) else
                          "diverging" if bool(real_diverging.any()) else "singular")
        best_res = best_rr.clamp_min(0).sqrt()
        info = self._finish(used, safe_div(best_res, b_norm), tol, status)
        return best_x, info


class _Curvature:
    """Tells a singular matrix from an indefinite one when CG meets ``pᵀAp ≤ 0``.

    For positive semidefinite ``A``, ``‖Ap‖² ≤ ‖A‖ pᵀAp``: a direction of zero curvature
    is a null vector, ``Ap = 0``. So a direction with ``pᵀAp`` clearly below zero, or
    with ``pᵀAp ≈ 0`` but ``Ap`` far from zero, proves ``A`` indefinite
    (``"negative_curvature"``); one with ``‖Ap‖ ≈ 0`` relative to ``‖A‖ ‖p‖`` is a
    numerical null vector: ``A`` is singular (``"singular"``). ``‖A‖`` is estimated from
    below by the largest ``pᵀAp / ‖r‖²`` met (two scalar operations per iteration).

    The direction itself is not kept: after the stop, ``x``, ``r`` and ``z`` are frozen
    and ``β = 1``, so ``p`` has moved by ``z`` per iteration since and is recovered as
    ``p_j = p − (index − j) z``; one more product gives ``A p_j``.
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.peak = torch.zeros_like(like)
        self.flip = torch.zeros_like(like)
        self.p_index = 1
        self.eps = torch.finfo(working_dtype(like.dtype)).eps

    def step(self, k: int, pap: torch.Tensor, rr: torch.Tensor, stops: torch.Tensor) -> None:
        self.peak = torch.maximum(self.peak, safe_div(pap, rr))
        self.flip = torch.where(stops, float(k), self.flip)
        self.p_index = k

    def classify(
        self, op: Matvec, p: Vector, z: Vector, batch_ndim: int, ap: Optional[Vector] = None,
        current: bool = False,
    ):
        """Per system: whether the direction that stopped CG (``p`` itself if ``current``)
        is a null vector; and the number of products spent."""
        lag = torch.zeros_like(self.flip) if current else float(self.p_index) - self.flip
        products = 0
        if ap is None or bool((lag != 0).any()):
            p = axpy(-lag, z, p)
            ap, products = op(p), 1
        pp, pap, apap = dot(p, p, batch_ndim), dot(p, ap, batch_ndim), dot(ap, ap, batch_ndim)
        scale = torch.maximum(self.peak, safe_div(apap, pp).sqrt())
        delta = 32 * self.eps
        clearly_negative = pap < -delta * scale * pp
        annihilated = apap <= delta * scale.square() * pp
        return annihilated & ~clearly_negative, products
