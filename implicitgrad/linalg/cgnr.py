"""Conjugate gradients on the normal equations (CGNR) for non-symmetric systems."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from .._tree import tree_flatten
from ._base import IterativeSolver, Matvec, PytreeLayout, Vector, safe_div, working_dtype
from ._scoped import scoped
from .gmres import Packed

# The product with Aᵀ for a solve whose caller knows it (the core passes the other
# Jacobian product of the condition), on flat lists of leaves like the matvec.
_TRANSPOSE: contextvars.ContextVar[Optional[Matvec]] = contextvars.ContextVar(
    "implicitgrad_transposed_product", default=None
)


@contextlib.contextmanager
def transposed_product(rmatvec: Optional[Matvec]) -> Iterator[None]:
    """Within the block, a solver that needs ``Aᵀ`` (``needs_transpose``) uses ``rmatvec``
    (on flat lists of leaves, computed in the products' dtype); ``None`` changes nothing."""
    with contextlib.ExitStack() as stack:
        if rmatvec is not None:
            stack.enter_context(scoped(_TRANSPOSE, rmatvec))
        yield


class CGNR(IterativeSolver):
    r"""Conjugate gradients on the normal equations, :math:`A^\top A x = A^\top b`.

    CG applied to the symmetric positive definite :math:`A^\top A` in the CGLS form, which
    updates the residual :math:`r = b - A x` of the original system and never forms
    :math:`A^\top A`:

    .. math::

        q_k = A p_k, \quad \alpha_k = \frac{\|s_k\|^2}{\|q_k\|^2}, \quad
        x_{k+1} = x_k + \alpha_k p_k, \quad r_{k+1} = r_k - \alpha_k q_k,

        s_{k+1} = A^\top r_{k+1}, \quad
        p_{k+1} = s_{k+1} + \frac{\|s_{k+1}\|^2}{\|s_k\|^2}\, p_k,

    from :math:`s_0 = p_0 = A^\top r_0`. Each iteration costs one product with :math:`A`
    and one with :math:`A^\top`; memory is five vectors. It minimises :math:`\|b - A x\|`
    over :math:`x_0 + \mathcal{K}_k(A^\top A, A^\top r_0)`, so its speed is set by the
    *singular values* of :math:`A` (the rate of CG with condition number
    :math:`\kappa(A)^2`), not by its eigenvalues: it wins where those are spread around
    the origin but the singular values are clustered — a Jacobian close to an orthogonal
    matrix (a rotation, a permutation) times a scalar, where GMRES and BiCGStab stall —
    and loses, often badly, on well-conditioned fixed points such as
    :math:`I - \partial T` of a contractive layer.

    ``A^\top`` comes from, in this order: the ``rmatvec`` keyword of a call; the other
    Jacobian product of the condition, passed by :func:`~implicitgrad.implicit_solve`,
    :func:`~implicitgrad.root_solve` and :func:`~implicitgrad.fixed_point_solve`
    (``needs_transpose`` asks for it); or autograd through ``matvec`` (a vector-Jacobian
    product of the linear map, exact; ``matvec`` must then be made of differentiable
    operations).

    **Stopping and budget.** A system stops when its recurrence residual meets
    :math:`\|r_i\| \le \text{tol}\,\|b_i\|`; the true residual :math:`b - A x` is then
    measured (one product), and a system the recurrence fooled restarts from it.
    ``maxiter`` bounds every product, those with :math:`A^\top` included, and
    ``info.iterations`` counts them all. With ``batch_ndim > 0`` each system has its own
    step sizes and stopping rule. Statuses: ``"converged"``, ``"max_iterations"``,
    ``"nonfinite"``, and ``"breakdown"`` when :math:`A^\top r = 0` with :math:`r \ne 0`
    (``A`` is singular and ``b`` is not in its range; ``x`` is then a least-squares
    solution).

    Args:
        maxiter: total number of products with ``A`` and ``Aᵀ``.
        tol: relative residual ``‖b − A x‖ / ‖b‖`` to reach; ``None``: 1e-10 (float64),
            1e-5 (float32).
        check_every: iterations between host-synchronising checks (``None``: 1 on CPU,
            10 elsewhere).

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.tensor([[0.0, -2.0], [2.0, 0.0]], dtype=torch.float64)  # a rotation, scaled
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> x, info = ig.CGNR()(lambda v: A @ v, b, rmatvec=lambda u: A.T @ u)
        >>> info.status, info.iterations, torch.allclose(A @ x, b)  # Aᵀb; A p, Aᵀr; the measured residual
        ('converged', 4, True)

    References:
        Hestenes and Stiefel, Methods of Conjugate Gradients for Solving Linear Systems,
        1952. Nachtigal, Reddy and Trefethen, How Fast Are Nonsymmetric Matrix
        Iterations?, 1992.
    """

    #: The solver needs products with ``Aᵀ`` as well as with ``A``.
    needs_transpose: bool = True

    def __init__(self, maxiter: int = 200, tol: Optional[float] = None, check_every: Optional[int] = None) -> None:
        super().__init__(maxiter, tol, check_every)

    def __repr__(self) -> str:
        return f"CGNR(maxiter={self.maxiter}, tol={self.tol})"

    def __call__(self, matvec: Callable, b: Any, *, rmatvec: Optional[Callable] = None,
                 **kwargs: Any) -> Tuple[Any, LinearSolveInfo]:
        """Same as :meth:`solve`."""
        with transposed_product(_flat(rmatvec, b)):
            return super().__call__(matvec, b, **kwargs)

    def solve(self, matvec: Callable, b: Any, *, init: Any = None, batch_ndim: int = 0,
              rmatvec: Optional[Callable] = None) -> Tuple[Any, LinearSolveInfo]:
        """Solve ``A x = b``; ``rmatvec`` (``u ↦ Aᵀ u`` on pytrees shaped like ``b``) is
        optional (see the class docstring); the other arguments are those of
        :meth:`LinearSolver.solve <implicitgrad.LinearSolver.solve>`."""
        with transposed_product(_flat(rmatvec, b)):
            return super().solve(matvec, b, init=init, batch_ndim=batch_ndim)

    def solve_leaves(
        self,
        matvec: Matvec,
        b: Vector,
        *,
        init: Optional[Vector] = None,
        batch_ndim: int = 0,
        layout: Optional[PytreeLayout] = None,
    ) -> Tuple[Vector, LinearSolveInfo]:
        rmatvec = _transpose_of(matvec, b)
        # A solver inside this solve's products must not take its Aᵀ.
        with scoped(_TRANSPOSE, None):
            return self._iterate(matvec, rmatvec, b, init, batch_ndim)

    def _iterate(self, matvec: Matvec, rmatvec: Matvec, b: Vector, init: Optional[Vector],
                 batch_ndim: int) -> Tuple[Vector, LinearSolveInfo]:
        tol, every = self._tolerances(b)
        system = Packed(matvec, b, init, batch_ndim, tol)
        op, rhs, x, r, r_norm, used = system.op, system.rhs, system.x, system.r, system.r_norm, system.used
        threshold, nonfinite, done = system.threshold, system.nonfinite, system.done

        def op_t(v: torch.Tensor) -> torch.Tensor:
            return system.pack(rmatvec(system.unpack(v)))

        broken = torch.zeros_like(done)
        eps2 = torch.finfo(rhs.dtype).eps ** 2
        count, measured_at = 0, 0
        while True:
            # From the (measured) residual r: s = Aᵀ r, the first direction.
            s = None
            claimed = bool((done | broken | nonfinite).all()) or used + 4 > self.maxiter
            while not claimed:
                if s is None:
                    s = op_t(r)
                    used += 1
                    p, gamma = s, torch.linalg.vecdot(s, s)
                    vanished = eps2 * gamma
                active = ~(done | broken | nonfinite)
                q = op(p)
                alpha = torch.where(active, safe_div(gamma, torch.linalg.vecdot(q, q)), 0.0)[:, None]
                x = torch.addcmul(x, alpha, p)
                r = torch.addcmul(r, alpha, q, value=-1)
                s = op_t(r)
                used += 2
                count += 1
                new_gamma = torch.linalg.vecdot(s, s)
                p = torch.addcmul(s, torch.where(active, safe_div(new_gamma, gamma), 0.0)[:, None], p)
                gamma = new_gamma
                r_norm = torch.linalg.vector_norm(r, dim=1)
                met = r_norm <= threshold
                # Aᵀ r = 0 (to rounding: ‖Aᵀ r‖ ≤ ε ‖Aᵀ r₀‖) with r ≠ 0: x is a least-squares
                # solution, and b is not in the range of A.
                broken = broken | (active & ~met & (new_gamma <= vanished))
                done = done | (active & met)
                nonfinite = nonfinite | (active & ~torch.isfinite(r_norm))
                if count % every == 0 or used + 3 > self.maxiter:
                    claimed = bool((done | broken | nonfinite).all()) or used + 3 > self.maxiter
            if count == measured_at:
                break
            measured_at = count
            r = rhs - op(x)
            used += 1
            r_norm = torch.linalg.vector_norm(r, dim=1)
            nonfinite = nonfinite | ~torch.isfinite(r_norm)
            # The recurrence can claim a residual the iterate does not have: such a system
            # goes on from its measured residual (the others are not moved: α = 0).
            fooled = done & ~nonfinite & (r_norm > threshold)
            done = done & ~fooled
            if not bool(fooled.any()):
                break
        x, status = system.outcome(x, nonfinite, broken & ~done)
        return system.unpack(x), self._finish(used, system.relative(r_norm), tol, status)


def _flat(rmatvec: Optional[Callable], b: Any) -> Optional[Matvec]:
    """A user's ``rmatvec`` on pytrees shaped like ``b`` as a function on flat leaves."""
    if rmatvec is None:
        return None
    if not callable(rmatvec):
        raise TypeError("CGNR: rmatvec must be a callable u -> Aᵀ u on pytrees shaped like b.")
    return PytreeLayout(tree_flatten(b)[1]).wrap(rmatvec, "rmatvec's output")


def _transpose_of(matvec: Matvec, b: Vector) -> Matvec:
    """``u ↦ Aᵀ u``: the product given to the call (cast to and from the products' dtype),
    else a vector-Jacobian product of the linear ``matvec``."""
    given = _TRANSPOSE.get()
    if given is not None:
        products = working_dtype(b[0].dtype)
        if products == b[0].dtype:
            return given
        return lambda u: [o.to(t.dtype) for o, t in zip(given([t.to(products) for t in u]), b)]
    probe = [torch.zeros_like(t).requires_grad_(True) for t in b]
    with torch.enable_grad():
        out = matvec(probe)
    if not all(o.requires_grad for o in out):
        raise TypeError(
            "CGNR needs products with Aᵀ: pass rmatvec=... (u -> Aᵀ u), or a matvec made of "
            "differentiable torch operations (Aᵀ u is then its vector-Jacobian product)."
        )

    def rmatvec(u: Vector) -> Vector:
        return list(torch.autograd.grad(out, probe, u, retain_graph=True, allow_unused=True,
                                        materialize_grads=True))

    return rmatvec
