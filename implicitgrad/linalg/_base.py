"""Vector-space helpers over lists of tensors, and the shared linear-solver interface.

A "vector" inside the linear solvers is a list of tensors (the leaves of a pytree). The
leading ``batch_ndim`` dimensions of every leaf index independent systems: inner
products and norms reduce over the remaining dimensions only, so one call solves a
batch of block-diagonal systems with per-system step sizes and convergence masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, List, Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from .._tree import tree_flatten, tree_unflatten

Vector = List[torch.Tensor]
Matvec = Callable[[Vector], Vector]

_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual a solve aims for when no ``tol`` is given."""
    return _DEFAULT_TOL.get(dtype, 1e-3)


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], batch_ndim: int) -> torch.Tensor:
    """Inner product per system: shape ``batch_shape`` (a 0-d tensor without batch)."""
    total = None
    for x, y in zip(a, b):
        term = (x * y).reshape(*x.shape[:batch_ndim], -1).sum(-1)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("dot: the vectors have no tensor leaves.")
    return total


def norm(a: Sequence[torch.Tensor], batch_ndim: int) -> torch.Tensor:
    return dot(a, a, batch_ndim).clamp_min(0).sqrt()


def scale(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Multiply leaf ``t`` by per-system scalars ``s`` (broadcast over the system dims)."""
    return s.reshape(s.shape + (1,) * (t.ndim - s.ndim)) * t


def axpy(s: torch.Tensor, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vector:
    """``y + s x`` leaf by leaf."""
    return [b + scale(s, a) for a, b in zip(x, y)]


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Leaf ``a`` for the systems where ``mask`` holds, ``b`` elsewhere (no arithmetic, so
    a NaN or Inf in the unselected leaf cannot leak)."""
    return torch.where(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a, b)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (a converged or exhausted system)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def check_interval(check_every: Optional[int], device: torch.device) -> int:
    """How many iterations pass between host-synchronising convergence checks."""
    if check_every is None:
        return 1 if device.type == "cpu" else 10
    if int(check_every) < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}.")
    return int(check_every)


class LinearSolver:
    """Base class: ``solution, info = solver(matvec, b)``.

    ``matvec`` maps a pytree with the structure of ``b`` to another such pytree and must
    be linear. Subclasses implement :meth:`solve` on flat lists of tensors.
    """

    #: Whether the solver assumes a symmetric matrix (CG, MINRES).
    symmetric: bool = False

    def __call__(
        self,
        matvec: Callable,
        b,
        *,
        x0=None,
        batch_ndim: int = 0,
    ) -> Tuple[object, LinearSolveInfo]:
        """Solve ``A x = b`` where ``A`` is given by ``matvec``.

        Args:
            matvec: the linear map ``v ↦ A v`` on pytrees shaped like ``b``.
            b: right-hand side, a Tensor or a pytree of Tensors.
            x0: optional initial guess with the structure of ``b``.
            batch_ndim: number of leading dimensions of every leaf that index
                independent systems.

        Returns:
            ``(solution, info)`` with ``solution`` structured like ``b`` and a
            :class:`~implicitgrad.LinearSolveInfo`.
        """
        leaves, spec = tree_flatten(b)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise TypeError("b must be a Tensor or a pytree whose leaves are all Tensors.")
        init = None if x0 is None else tree_flatten(x0)[0]

        def flat_matvec(v: Vector) -> Vector:
            out = tree_flatten(matvec(tree_unflatten(v, spec)))[0]
            if len(out) != len(v):
                raise ValueError("matvec must return a pytree with the structure of b.")
            return out

        solution, info = self.solve(
            flat_matvec, leaves, x0=init, batch_ndim=batch_ndim, spec=spec
        )
        return tree_unflatten(solution, spec), info

    def solve(
        self,
        matvec: Matvec,
        b: Vector,
        *,
        x0: Optional[Vector] = None,
        batch_ndim: int = 0,
        spec=None,
    ) -> Tuple[Vector, LinearSolveInfo]:
        """Solve on flat lists of tensors; ``spec`` is the pytree structure of ``b``
        (for callables such as preconditioners that take pytrees)."""
        raise NotImplementedError

    def _finish(
        self,
        iterations: int,
        rel_residual: torch.Tensor,
        tol: float,
        status: Optional[str],
        fixes: dict,
    ) -> LinearSolveInfo:
        """Turn the final per-system residuals into one :class:`LinearSolveInfo`."""
        res = float(rel_residual.max()) if rel_residual.numel() else 0.0
        if status is None:
            if not math.isfinite(res):
                status = "nonfinite"
            elif res <= tol:
                status = "converged"
            else:
                status = "max_iterations"
        converged = status == "converged"
        message = "" if converged else fixes.get(status, "").format(res=res, tol=tol)
        return LinearSolveInfo(
            iterations=iterations,
            residual=res,
            converged=converged,
            status=status,
            message=message,
            solver=type(self).__name__,
        )


class IterativeSolver(LinearSolver):
    """A linear solver that iterates: ``maxiter``, ``tol`` and ``check_every`` in common."""

    def __init__(self, maxiter: int, tol: Optional[float], check_every: Optional[int]) -> None:
        name = type(self).__name__
        if int(maxiter) < 1:
            raise ValueError(f"{name}: maxiter must be a positive integer, got {maxiter!r}.")
        if tol is not None and not tol > 0:
            raise ValueError(f"{name}: tol must be positive, got {tol!r}.")
        if check_every is not None and int(check_every) < 1:
            raise ValueError(f"{name}: check_every must be a positive integer, got {check_every!r}.")
        self.maxiter = int(maxiter)
        self.tol = tol
        self.check_every = check_every

    def _tolerances(self, b: Vector) -> Tuple[float, int]:
        """The relative tolerance and the check interval for a right-hand side ``b``."""
        tol = self.tol if self.tol is not None else default_tol(b[0].dtype)
        return tol, check_interval(self.check_every, b[0].device)


class SymmetricIterativeSolver(IterativeSolver):
    """An iterative solver for symmetric ``A``: ``damping`` and a ``preconditioner`` in common."""

    symmetric = True

    def __init__(
        self,
        maxiter: int = 100,
        tol: Optional[float] = None,
        damping: float = 0.0,
        preconditioner: Optional[Callable] = None,
        check_every: Optional[int] = None,
    ) -> None:
        name = type(self).__name__
        if not damping >= 0:
            raise ValueError(f"{name}: damping must be non-negative, got {damping!r}.")
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError(f"{name}: preconditioner must be a callable r -> M r.")
        super().__init__(maxiter, tol, check_every)
        self.damping = float(damping)
        self.preconditioner = preconditioner

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(maxiter={self.maxiter}, tol={self.tol}, "
            f"damping={self.damping})"
        )

    def _damped(self, matvec: Matvec) -> Matvec:
        """``v ↦ (A + damping·I) v``."""
        damping = self.damping
        if damping == 0:
            return matvec
        return lambda v: [o + damping * t for o, t in zip(matvec(v), v)]

    def _flat_preconditioner(self, spec) -> Matvec:
        """The preconditioner on flat lists of leaves; it receives the pytree ``spec``
        describes (the flat list itself when there is none)."""
        if self.preconditioner is None:
            return lambda v: v
        m = self.preconditioner
        if spec is None:
            return lambda v: list(m(v))
        return lambda v: tree_flatten(m(tree_unflatten(v, spec)))[0]


NONFINITE_FIX = (
    "Non-finite values appeared in the linear solve: check the inner solution and the "
    "parameters for NaN/Inf, and that the objective is twice differentiable at x*."
)
