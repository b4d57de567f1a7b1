"""BiCGStab: a short-recurrence Krylov solver for non-symmetric systems."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from ._base import (
    IterativeSolver,
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


class BiCGStab(IterativeSolver):
    r"""Right-preconditioned BiCGStab for ``A x = b`` with any non-singular ``A``.

    Van der Vorst's stabilised bi-conjugate gradients: each iteration takes a BiCG step
    along :math:`\hat p = M p` and then a one-dimensional minimal-residual step along
    :math:`\hat s = M s`,

    .. math::

        \rho_k = \langle \hat r_0, r_k\rangle, \quad
        p_k = r_k + \frac{\rho_k \alpha_{k-1}}{\rho_{k-1}\omega_{k-1}}
              (p_{k-1} - \omega_{k-1} A \hat p_{k-1}), \quad
        \alpha_k = \frac{\rho_k}{\langle \hat r_0, A \hat p_k\rangle},

        s_k = r_k - \alpha_k A \hat p_k, \quad
        \omega_k = \frac{\langle A \hat s_k, s_k\rangle}{\|A \hat s_k\|^2}, \quad
        x_{k+1} = x_k + \alpha_k \hat p_k + \omega_k \hat s_k, \quad
        r_{k+1} = s_k - \omega_k A \hat s_k ,

    with the shadow residual :math:`\hat r_0 = r_0`. Memory is constant (about ten
    vectors, whatever the number of iterations) where :class:`~implicitgrad.GMRES` stores its
    whole basis; the price is a residual that is not monotone and two ways to break down:
    :math:`\rho_k \approx 0` or :math:`\langle \hat r_0, A \hat p_k\rangle \approx 0` (the
    shadow residual is orthogonal to the Krylov vectors) and
    :math:`\omega_k \approx 0` (the minimal-residual step stagnates). Either one stops that
    system with status ``"breakdown"``; GMRES, which cannot break down on a non-singular
    matrix, is the fix.

    Each iteration costs two ``matvec`` calls. ``maxiter`` bounds all of them, including
    the product that measures the true residual :math:`b - A x` once the recurrence claims
    convergence and at the end (the recurrence drifts from the true residual; a system it
    fooled restarts from the measured one); ``info.iterations`` counts every product.

    **Per-system convergence.** With ``batch_ndim > 0`` each system of the batch has its
    own scalars, breakdown checks and stopping rule :math:`\|r_i\| \le \text{tol}\,\|b_i\|`:
    a system that meets it, or breaks down, stops moving while the others go on. The
    reported residual is the largest measured :math:`\|b_i - A x_i\| / \|b_i\|`; a system
    that met NaN/Inf gets a NaN solution (status ``"nonfinite"``).

    Args:
        maxiter: total number of ``matvec`` calls.
        tol: relative residual to reach; ``None``: 1e-10 (float64), 1e-5 (float32).
        preconditioner: optional ``M`` with ``M(r) ≈ A^{-1} r`` on pytrees shaped like
            ``b`` (applied on the right, so the residual tested is that of ``A x = b``).
        check_every: iterations between host-synchronising checks (``None``: 1 on CPU,
            10 elsewhere).

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 4.0, 1.0], [0.0, -2.0, 5.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
        >>> x, info = ig.BiCGStab()(lambda v: A @ v, b)
        >>> info.status, torch.allclose(A @ x, b)
        ('converged', True)

    References:
        van der Vorst, Bi-CGSTAB: A Fast and Smoothly Converging Variant of Bi-CG for the
        Solution of Nonsymmetric Linear Systems, 1992.
    """

    # The preconditioner is wrapped exactly as the symmetric solvers wrap theirs.
    _flat_preconditioner: Callable[..., Matvec] = SymmetricIterativeSolver._flat_preconditioner

    def __init__(
        self,
        maxiter: int = 100,
        tol: Optional[float] = None,
        preconditioner: Optional[Callable] = None,
        check_every: Optional[int] = None,
    ) -> None:
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError("BiCGStab: preconditioner must be a callable r -> M r.")
        super().__init__(maxiter, tol, check_every)
        self.preconditioner = preconditioner

    def __repr__(self) -> str:
        return f"BiCGStab(maxiter={self.maxiter}, tol={self.tol})"

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
        precond = self._flat_preconditioner(layout, b)
        eps = torch.finfo(b[0].dtype).eps
        b_norm = norm(b, batch_ndim)
        threshold = tol * b_norm
        used = 0
        if init is None:
            x = [torch.zeros_like(t) for t in b]
            r = list(b)
        else:
            x = [t.clone() for t in init]
            r = _residual(matvec, b, x)
            used = 1
        true_norm = norm(r, batch_ndim)
        nonfinite = ~torch.isfinite(true_norm)
        done = true_norm <= threshold
        broken = torch.zeros_like(done)
        state = _State(r, batch_ndim)
        count, measured_at = 0, 0
        while True:
            # Each iteration needs two products and leaves one for measuring the residual.
            claimed = bool((done | broken | nonfinite).all()) or used + 3 > self.maxiter
            while not claimed:
                active = ~(done | broken | nonfinite)
                x, half, rho_bad, omega_bad, r_norm = state.step(matvec, precond, x, active, eps)
                used += 2
                count += 1
                broken = broken | (active & (rho_bad | omega_bad) & ~half)
                done = done | (active & (half | (r_norm <= threshold)))
                nonfinite = nonfinite | (active & ~torch.isfinite(r_norm))
                if count % every == 0 or used + 3 > self.maxiter:
                    claimed = bool((done | broken | nonfinite).all()) or used + 3 > self.maxiter
            if count == measured_at:
                break
            measured_at = count
            r = _residual(matvec, b, x)
            used += 1
            measured = norm(r, batch_ndim)
            nonfinite = nonfinite | ~torch.isfinite(measured)
            # The recurrence can claim a residual the iterate does not have: such a
            # system restarts from its measured residual.
            fooled = done & ~nonfinite & (measured > threshold)
            done = done & ~fooled
            true_norm = measured
            if not bool(fooled.any()) or used + 3 > self.maxiter:
                break
            state.restart(r, fooled)
        status = None
        any_nonfinite, any_broken = torch.stack(
            [nonfinite.any(), (broken & ~(true_norm <= threshold)).any()]
        ).tolist()
        if any_nonfinite:
            status = "nonfinite"
            x = [select(nonfinite, torch.full_like(t, float("nan")), t) for t in x]
        elif any_broken:
            status = "breakdown"
        info = self._finish(used, safe_div(true_norm, b_norm), tol, status)
        return x, info


def _residual(matvec: Matvec, b: Vector, x: Vector) -> Vector:
    return [bi - ai for bi, ai in zip(b, matvec(x))]


class _State:
    """The recurrence vectors and scalars of BiCGStab, one set per system of a batch."""

    def __init__(self, r: Vector, batch_ndim: int) -> None:
        self.batch_ndim = batch_ndim
        self.r = list(r)
        self.shadow = list(r)
        ones = torch.ones_like(norm(r, batch_ndim))
        self.rho, self.alpha, self.omega = ones, ones, ones
        self.p = [torch.zeros_like(t) for t in r]
        self.v = [torch.zeros_like(t) for t in r]

    def restart(self, r: Vector, which: torch.Tensor) -> None:
        """Start the systems in ``which`` afresh from the residual ``r``."""
        self.r = [select(which, a, c) for a, c in zip(r, self.r)]
        self.shadow = [select(which, a, c) for a, c in zip(r, self.shadow)]
        one = torch.ones_like(self.rho)
        self.rho, self.alpha, self.omega = (torch.where(which, one, t) for t in (self.rho, self.alpha, self.omega))
        self.p = [select(which, torch.zeros_like(t), t) for t in self.p]
        self.v = [select(which, torch.zeros_like(t), t) for t in self.v]

    def step(self, matvec: Matvec, precond: Matvec, x: Vector, active: torch.Tensor, eps: float):
        """One iteration on the ``active`` systems (the others keep ``x`` and their state).

        Returns ``x``, whether the half step alone solved the system (``s ≈ 0``), the two
        breakdown flags and the norm of each system's new residual.
        """
        n = self.batch_ndim
        r, shadow = self.r, self.shadow
        rho = dot(shadow, r, n)
        r_norm = norm(r, n)
        shadow_norm = norm(shadow, n)
        # A shadow residual (nearly) orthogonal to the residual: BiCG's recurrence ends.
        rho_bad = rho.abs() <= eps * shadow_norm * r_norm
        beta = safe_div(rho, self.rho) * safe_div(self.alpha, self.omega)
        p = axpy(beta, axpy(-self.omega, self.v, self.p), r)
        p_hat = precond(p)
        v = matvec(p_hat)
        pivot = dot(shadow, v, n)
        # BiCG's pivot ⟨r̂₀, A p̂⟩ ≈ 0 ends the recurrence as ρ ≈ 0 does.
        rho_bad = rho_bad | (pivot.abs() <= eps * shadow_norm * norm(v, n))
        alpha = safe_div(rho, pivot)
        s = axpy(-alpha, v, r)
        s_norm = norm(s, n)
        s_hat = precond(s)
        t = matvec(s_hat)
        ts, tt = dot(t, s, n), dot(t, t, n)
        omega = safe_div(ts, tt)
        # The minimal-residual step along A ŝ gains nothing: the next β would divide by 0.
        omega_bad = ts.abs() <= eps * tt.sqrt() * s_norm
        r_new = axpy(-omega, t, s)
        new_norm = norm(r_new, n)
        # The half step is kept when it already solves the system (s ≈ 0 makes ω = 0/0).
        half = s_norm <= eps * r_norm
        go = active & ~rho_bad
        full = go & ~half & ~omega_bad
        x = [select(go, xi + scale(alpha, pi), xi) for xi, pi in zip(x, p_hat)]
        x = [select(full, xi + scale(omega, si), xi) for xi, si in zip(x, s_hat)]
        self.r = [select(full, a, select(go, c, d)) for a, c, d in zip(r_new, s, r)]
        self.p = [select(go, a, c) for a, c in zip(p, self.p)]
        self.v = [select(go, a, c) for a, c in zip(v, self.v)]
        self.rho = torch.where(go, rho, self.rho)
        self.alpha = torch.where(go, alpha, self.alpha)
        self.omega = torch.where(full, omega, self.omega)
        reported = torch.where(full, new_norm, torch.where(go, s_norm, r_norm))
        return x, half & go, rho_bad, omega_bad & ~half, reported

