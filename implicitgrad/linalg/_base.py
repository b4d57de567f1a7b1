"""Vector-space helpers over lists of tensors, and the shared linear-solver interface.

A "vector" inside the linear solvers is a list of tensors (the leaves of a pytree). The
leading ``batch_ndim`` dimensions of every leaf index independent systems: inner
products and norms reduce over the remaining dimensions only, so one call solves a
batch of block-diagonal systems with per-system step sizes and convergence masks.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any, Callable, List, Optional, Tuple

import torch

from .._diagnostics import LinearSolveInfo
from .._tree import TreeSpec, tree_flatten, tree_unflatten
from .._validation import check_count, check_nonnegative, check_tol

Vector = List[torch.Tensor]
Matvec = Callable[[Vector], Vector]

# float16 / bfloat16: about two units of roundoff (9.8e-4 / 7.8e-3), about the residual their
# products allow.
_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# The dtype the matrix-vector products are computed in, when coarser than the vectors'
# (float16 products in a float32 solve): accuracy is judged by the coarser of the two.
_PRODUCT_DTYPE: contextvars.ContextVar[Optional[torch.dtype]] = contextvars.ContextVar(
    "implicitgrad_product_dtype", default=None
)


@contextlib.contextmanager
def product_precision(dtype: torch.dtype) -> Iterator[None]:
    """Within the block, solves know that their products are computed in ``dtype``."""
    token = _PRODUCT_DTYPE.set(dtype)
    try:
        yield
    finally:
        _PRODUCT_DTYPE.reset(token)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The coarser of ``dtype`` and the products' dtype (see :func:`product_precision`)."""
    products = _PRODUCT_DTYPE.get()
    if products is None or not products.is_floating_point or not dtype.is_floating_point:
        return dtype
    return products if torch.finfo(products).eps > torch.finfo(dtype).eps else dtype


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual a solve aims for when no ``tol`` is given."""
    return _DEFAULT_TOL.get(working_dtype(dtype), 1e-3)


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
    return check_count("check_every", check_every)


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
        solution = propagate_nonfinite(flat_matvec, leaves, solution, info, batch_ndim)
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
        self.maxiter = check_count("maxiter", maxiter, name)
        self.tol = None if tol is None else check_tol("tol", tol, name)
        self.check_every = None if check_every is None else check_count("check_every", check_every, name)

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
        damping = check_nonnegative("damping", damping, name)
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError(f"{name}: preconditioner must be a callable r -> M r.")
        super().__init__(maxiter, tol, check_every)
        self.damping = damping
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
        describes (a ``TreeSpec`` or a :class:`PytreeLayout`; the flat list itself when
        there is none)."""
        if self.preconditioner is None:
            return lambda v: v
        m = self.preconditioner
        if spec is None:
            return lambda v: list(m(v))
        layout = spec if isinstance(spec, PytreeLayout) else PytreeLayout(spec)
        return layout.wrap(m)


NONFINITE_FIX = (
    "Non-finite values appeared in the linear solve: check the inner solution and the "
    "parameters for NaN/Inf, and that the objective is twice differentiable at x*."
)



class PytreeLayout:
    """Where the flat tensor leaves of a solve sit in the pytree a user callable receives.

    Args:
        spec: the pytree structure.
        template: its leaves; tensor positions receive the solver's leaves in order, other
            leaves (ints, strings, None) are passed as they are. ``None``: every leaf is a
            tensor of the solve.
        batch_ndim: leading dimensions of every leaf that index independent systems the
            callable does not know about (a problem batched by ``torch.func.vmap``): the
            callable is vmapped over them, so it sees one system's pytree.
    """

    def __init__(self, spec: TreeSpec, template: Optional[Sequence[Any]] = None, batch_ndim: int = 0):
        self.spec = spec
        self.template = None if template is None else list(template)
        self.index = (
            None if template is None else [i for i, t in enumerate(template) if isinstance(t, torch.Tensor)]
        )
        self.batch_ndim = batch_ndim

    def unflatten(self, leaves: Sequence[torch.Tensor]) -> Any:
        if self.template is None or self.index is None:
            return tree_unflatten(list(leaves), self.spec)
        full = list(self.template)
        for i, t in zip(self.index, leaves):
            full[i] = t
        return tree_unflatten(full, self.spec)

    def flatten(self, tree: Any) -> Vector:
        leaves, spec = tree_flatten(tree)
        if self.index is None or spec != self.spec:
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            expected = len(leaves) if self.index is None else len(self.index)
            if len(tensors) != expected or (self.index is None and spec != self.spec):
                raise ValueError(
                    f"the preconditioner returned a pytree of structure {spec}; return one "
                    f"with the structure of its argument, {self.spec}."
                )
            return tensors
        return [leaves[i] for i in self.index]

    def wrap(self, fn: Callable[[Any], Any]) -> Matvec:
        """``fn`` on pytrees as a function on flat lists of (batched) leaves."""

        def flat(v: Vector) -> Vector:
            return self.flatten(fn(self.unflatten(v)))

        for _ in range(self.batch_ndim):
            flat = torch.func.vmap(flat)
        return flat


def nonfinite_systems(
    matvec: Optional[Matvec], b: Vector, x: Optional[Vector], batch_ndim: int
) -> torch.Tensor:
    """Per system (shape: the batch dims): whether ``b``, ``x`` or ``A x`` has NaN/Inf."""
    vectors = [b] + ([] if x is None else [x]) + ([] if matvec is None or x is None else [matvec(x)])
    bad = None
    for vector in vectors:
        for t in vector:
            flag = ~torch.isfinite(t).reshape(*t.shape[:batch_ndim], -1).all(-1)
            bad = flag if bad is None else bad | flag
    if bad is None:
        raise ValueError("nonfinite_systems: b has no tensor leaves.")
    return bad


def poison(x: Vector, bad: torch.Tensor, batch_ndim: int) -> Vector:
    """``x`` with NaN in every system where ``bad`` holds (no host read)."""
    return [select(bad, torch.full_like(t, float("nan")), t) for t in x]


def propagate_nonfinite(
    matvec: Matvec, b: Vector, x: Vector, info: LinearSolveInfo, batch_ndim: int
) -> Vector:
    """The solution a caller may use: NaN for every system whose data is not finite.

    A solver that met NaN/Inf (status ``"nonfinite"``, or a non-finite residual) returns
    some finite iterate, often its initial guess; used as a solution, that would turn an
    undefined derivative into a wrong finite number. The systems whose ``b``, solution or
    product ``A x`` hold NaN/Inf get NaN (all of them if none can be told apart).
    """
    if info.status != "nonfinite" and math.isfinite(info.residual):
        return poison(x, nonfinite_systems(None, b, None, batch_ndim), batch_ndim)
    bad = nonfinite_systems(matvec, b, x, batch_ndim)
    if not bool(bad.any()):
        bad = torch.ones_like(bad)
    return poison(x, bad, batch_ndim)
