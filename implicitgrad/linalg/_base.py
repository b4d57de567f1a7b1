"""Vector-space helpers over lists of tensors, and the shared linear-solver interface.

A "vector" inside the linear solvers is a list of tensors (the leaves of a pytree). The
leading ``batch_ndim`` dimensions of every leaf index independent systems: inner
products and norms reduce over the remaining dimensions only, so one call solves a
batch of block-diagonal systems with per-system step sizes and convergence masks.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple, Union

import torch

from .._compat import host_readable
from .._defaults import linear_tol
from .._diagnostics import LinearSolveInfo, user_stacklevel
from .._status import Status
from .._tree import TreeSpec, tree_flatten, tree_unflatten
from .._validation import check_count, check_nonnegative, check_tol
from ._recycle import recycling
from ._scoped import scoped

Vector = List[torch.Tensor]
Matvec = Callable[[Vector], Vector]

# The dtype the matrix-vector products are computed in, when coarser than the vectors'
# (float16 products in a float32 solve): accuracy is judged by the coarser of the two.
_PRODUCT_DTYPE: contextvars.ContextVar[Optional[torch.dtype]] = contextvars.ContextVar(
    "implicitgrad_product_dtype", default=None
)


def product_precision(dtype: torch.dtype) -> ContextManager[None]:
    """Within the block, solves know that their products are computed in ``dtype``."""
    return scoped(_PRODUCT_DTYPE, dtype)


# Whether the solve runs for an on_failure="defer" call: no value read by the host.
_DEFERRING: contextvars.ContextVar[bool] = contextvars.ContextVar("implicitgrad_deferring", default=False)


def deferred_checks(defer: bool) -> ContextManager[None]:
    """Within the block (``defer`` true), a solver that supports it (``defers = True``:
    :class:`~implicitgrad.CG`) reads no value back to the host: it runs its ``maxiter``
    iterations, systems that converge stop moving, and its outcome is a
    :meth:`LinearSolveInfo.deferred`."""
    return scoped(_DEFERRING, defer)


def deferring() -> bool:
    """Whether the enclosing block is a :func:`deferred_checks` block."""
    return _DEFERRING.get()


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The coarser of ``dtype`` and the products' dtype (see :func:`product_precision`)."""
    products = _PRODUCT_DTYPE.get()
    if products is None or not products.is_floating_point or not dtype.is_floating_point:
        return dtype
    return products if torch.finfo(products).eps > torch.finfo(dtype).eps else dtype


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual a solve aims for when no ``tol`` is given."""
    return linear_tol(working_dtype(dtype))


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], batch_ndim: int) -> torch.Tensor:
    """Inner product per system: shape ``batch_shape`` (a 0-d tensor without batch)."""
    total = None
    for x, y in zip(a, b):
        if batch_ndim == 0:
            term = torch.dot(x.reshape(-1), y.reshape(-1))  # one fused kernel for one system
        else:
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
    return [torch.addcmul(b, s.reshape(s.shape + (1,) * (a.ndim - s.ndim)), a) for a, b in zip(x, y)]


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
    """Base class of the linear solvers; one call shape for all of them.

    ``x, info = solver.solve(matvec, b, init=None, batch_ndim=0)`` (or ``solver(matvec, b)``)
    solves ``A x = b``, where ``matvec`` maps a pytree with the structure of ``b`` to
    another such pytree and must be linear; ``x`` has the structure of ``b`` and ``info``
    is a :class:`~implicitgrad.LinearSolveInfo` whose ``status`` is a :class:`Status`.
    A preconditioner receives and returns pytrees with the structure of ``b``.

    A new solver implements :meth:`solve_leaves`, the same solve on the flat list of
    ``b``'s tensor leaves, and builds its info with
    :meth:`LinearSolveInfo.from_residual <implicitgrad.LinearSolveInfo.from_residual>`.
    :func:`~implicitgrad.implicit_solve` also accepts a plain callable
    ``linear_solver(matvec, b) -> x`` or ``-> (x, info)`` on pytrees.
    """

    #: Whether the solver assumes a symmetric matrix (CG, MINRES).
    symmetric: bool = False
    #: Whether a right-hand side holding NaN/Inf always ends the solve with status
    #: ``"nonfinite"`` or a non-finite residual (CG: its first residual norm is ``‖b‖``'s),
    #: so that a finite outcome proves ``b`` finite (see :func:`propagate_nonfinite`).
    _flags_nonfinite_rhs: bool = False

    def __call__(self, matvec: Callable, b: Any, *, init: Any = None, batch_ndim: int = 0,
                 **deprecated: Any) -> Tuple[Any, LinearSolveInfo]:
        """Same as :meth:`solve`; the keyword ``x0`` is a deprecated name of ``init``."""
        if "x0" in deprecated:
            warnings.warn(
                f"{type(self).__name__}(matvec, b, x0=...): the initial guess is now called init; "
                "x0 stays accepted for now. Pass init=... instead.",
                DeprecationWarning,
                stacklevel=user_stacklevel(),
            )
            init = deprecated.pop("x0") if init is None else init
        if deprecated:
            raise TypeError(f"{type(self).__name__}: unexpected keyword(s) {sorted(deprecated)}.")
        return self.solve(matvec, b, init=init, batch_ndim=batch_ndim)

    def solve(self, matvec: Callable, b: Any, *, init: Any = None,
              batch_ndim: int = 0) -> Tuple[Any, LinearSolveInfo]:
        """Solve ``A x = b`` where ``A`` is given by ``matvec``.

        Args:
            matvec: the linear map ``v ↦ A v`` on pytrees shaped like ``b``.
            b: right-hand side, a Tensor or a pytree of Tensors.
            init: optional initial guess with the structure of ``b`` (default 0).
            batch_ndim: number of leading dimensions of every leaf that index
                independent systems (block-diagonal ``A``; per-system step sizes and
                stopping).

        Returns:
            ``(x, info)`` with ``x`` structured like ``b`` and a
            :class:`~implicitgrad.LinearSolveInfo`. Systems whose data hold NaN/Inf get a
            NaN solution.
        """
        leaves, spec = tree_flatten(b)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise TypeError("b must be a Tensor or a pytree whose leaves are all Tensors.")
        layout = PytreeLayout(spec)
        flat_matvec = layout.wrap(matvec, "matvec's output")
        start = None if init is None else layout.flatten(init, "init")
        with recycling(None):  # a solve of its own: no directions of an enclosing implicit solve
            solution, info = self.solve_leaves(flat_matvec, leaves, init=start, batch_ndim=batch_ndim,
                                               layout=layout)
        solution = propagate_nonfinite(flat_matvec, leaves, solution, info, batch_ndim,
                                       rhs_flagged=self._flags_nonfinite_rhs)
        return layout.unflatten(solution), info

    def solve_leaves(
        self,
        matvec: Matvec,
        b: Vector,
        *,
        init: Optional[Vector] = None,
        batch_ndim: int = 0,
        layout: Optional[PytreeLayout] = None,
    ) -> Tuple[Vector, LinearSolveInfo]:
        """:meth:`solve` on the flat list of ``b``'s tensor leaves; ``layout`` says where
        they sit in the pytree a preconditioner receives."""
        raise NotImplementedError

    def _finish(
        self,
        iterations: int,
        rel_residual: Union[torch.Tensor, float],
        tol: float,
        status: Optional[str],
    ) -> LinearSolveInfo:
        """The info of this solver from its final per-system relative residuals."""
        return LinearSolveInfo.from_residual(rel_residual, tol, iterations=iterations, status=status,
                                             solver=type(self).__name__)


#: What ``implicit_solve`` accepts as ``linear_solver``.
LinearSolverLike = Union[LinearSolver, Callable[..., Any]]


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

    def _flat_preconditioner(self, layout: Optional[PytreeLayout], b: Vector) -> Matvec:
        """The preconditioner on flat lists of leaves; it receives the pytree ``layout``
        describes (that of ``b``; a list of tensors for a solve called on leaves alone)."""
        if self.preconditioner is None:
            return lambda v: v
        return (layout or PytreeLayout(tree_flatten(list(b))[1])).wrap(self.preconditioner)


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

    def flatten(self, tree: Any, what: str = "the preconditioner's output") -> Vector:
        """The tensor leaves of ``tree``, which must have this layout's structure."""
        leaves, spec = tree_flatten(tree)
        if self.index is None or spec != self.spec:
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            expected = len(leaves) if self.index is None else len(self.index)
            if len(tensors) != expected or (self.index is None and spec != self.spec):
                raise ValueError(
                    f"{what} is a pytree of structure {spec}; it must have the structure of "
                    f"b, {self.spec}."
                )
            return tensors
        return [leaves[i] for i in self.index]

    def wrap(self, fn: Callable[[Any], Any], what: str = "the preconditioner's output") -> Matvec:
        """``fn`` on pytrees as a function on flat lists of (batched) leaves."""
        if self.template is None and self.spec.is_leaf() and not self.batch_ndim:
            # b is one tensor: no pytree to build or take apart (about 9 µs per product).
            def single(v: Vector) -> Vector:
                out = fn(v[0])
                return [out] if isinstance(out, torch.Tensor) else self.flatten(out, what)

            return single

        def flat(v: Vector) -> Vector:
            return self.flatten(fn(self.unflatten(v)), what)

        for _ in range(self.batch_ndim):
            flat = torch.func.vmap(flat)
        return flat

    def wrap_tree(self, fn: Callable[[Vector], Vector]) -> Callable[[Any], Any]:
        """``fn`` on flat lists of leaves as a function on pytrees of this layout."""

        def tree(v: Any) -> Any:
            return self.unflatten(fn(self.flatten(v, "the vector given to matvec")))

        return tree


def entry_sum(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The sum of every entry of ``tensors`` (detached, 0-d), ``None`` when they have none:
    the reduction of :func:`all_finite`, for a caller that reads it with other values."""
    total = None
    for t in tensors:
        if t.numel():
            s = t.detach().sum()
            total = s if total is None else total + s
    return total


def finite_given_sum(total: float, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether no tensor holds NaN/Inf, given the value of their :func:`entry_sum`.

    A NaN or Inf entry makes the sum non-finite, so a finite sum proves every entry finite.
    Only when it is not finite — a NaN/Inf, or finite entries whose sum overflows — are the
    entries tested one by one.
    """
    return math.isfinite(total) or all(bool(torch.isfinite(t).all()) for t in tensors)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether no tensor holds NaN/Inf, in one reduction read once by the host (a pass over
    the data, no boolean copy of it); see :func:`finite_given_sum`."""
    total = entry_sum(tensors)
    return total is None or finite_given_sum(float(total), tensors)


def nonfinite_systems(
    matvec: Optional[Matvec], b: Vector, x: Optional[Vector], batch_ndim: int
) -> torch.Tensor:
    """Per system (shape: the batch dims): whether ``b``, ``x`` or ``A x`` has NaN/Inf."""
    if matvec is None and x is None and all(host_readable(t) for t in b) and all_finite(b):
        return torch.zeros(b[0].shape[:batch_ndim], dtype=torch.bool, device=b[0].device)
    vectors = [b] + ([] if x is None else [x]) + ([] if matvec is None or x is None else [matvec(x)])
    return nonfinite_flags(vectors, batch_ndim)


def nonfinite_flags(vectors: Sequence[Vector], batch_ndim: int) -> torch.Tensor:
    """Per system (shape: the batch dims): whether any of ``vectors`` has NaN/Inf in it.
    Computed on the device, not read."""
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
    matvec: Matvec, b: Vector, x: Vector, info: LinearSolveInfo, batch_ndim: int, *,
    rhs_flagged: bool = False,
) -> Vector:
    """The solution a caller may use: NaN for every system whose data is not finite.

    A solver that met NaN/Inf (status ``"nonfinite"``, or a non-finite residual) returns
    some finite iterate, often its initial guess; used as a solution, that would turn an
    undefined derivative into a wrong finite number. The systems whose ``b``, solution or
    product ``A x`` hold NaN/Inf get NaN (all of them if none can be told apart).
    ``rhs_flagged``: the solver ends with such an outcome whenever ``b`` holds NaN/Inf
    (``LinearSolver._flags_nonfinite_rhs``), so a finite outcome needs no read of ``b``.
    """
    if info.status is not Status.NONFINITE and math.isfinite(info.residual):
        if rhs_flagged:
            return x
        if all(host_readable(t) for t in b) and all_finite(b):
            return x  # the common case: nothing to poison, one read
        return poison(x, nonfinite_systems(None, b, None, batch_ndim), batch_ndim)
    bad = nonfinite_systems(matvec, b, x, batch_ndim)
    if not bool(bad.any()):
        bad = torch.ones_like(bad)
    return poison(x, bad, batch_ndim)


def run_linear_solver(
    solver: Any, matvec: Matvec, b: Vector, *, batch_ndim: int, layout: PytreeLayout,
    init: Optional[Vector] = None,
) -> Tuple[Vector, LinearSolveInfo]:
    """Any accepted linear solver on flat leaves: an :class:`LinearSolver`, or a plain
    callable ``solver(matvec, b) -> x`` or ``-> (x, info)`` on pytrees shaped like ``b``.

    A plain callable knows nothing of a batch of systems: under ``batch_ndim`` it is
    called once per system, on that system's block of ``A`` (one product of the batched
    ``matvec`` per product it asks for). When it returns ``x`` alone, its relative
    residual is measured (one product) and held to the dtype's default tolerance.
    ``init``, the initial guess, goes to a :class:`LinearSolver`; a plain callable starts
    where it chooses.
    """
    if isinstance(solver, LinearSolver):
        if _flat_signature(type(solver)):
            # A subclass written against the flat ``solve(matvec, b, x0, batch_ndim, spec)``.
            flat_solve: Any = solver.solve
            return flat_solve(matvec, b, x0=init, batch_ndim=batch_ndim, spec=layout)
        return solver.solve_leaves(matvec, b, init=init, batch_ndim=batch_ndim, layout=layout)
    if batch_ndim == 0:
        return _run_callable(solver, matvec, b, layout)
    batch = b[0].shape[:batch_ndim]
    size = math.prod(batch)
    flat_b = [t.reshape(size, *t.shape[batch_ndim:]) for t in b]
    one = PytreeLayout(layout.spec, layout.template)

    def block(i: int) -> Matvec:
        def product(v: Vector) -> Vector:
            full = [torch.zeros_like(t).index_copy(0, torch.tensor([i], device=t.device), vi.unsqueeze(0))
                    for t, vi in zip(flat_b, v)]
            out = matvec([t.reshape(*batch, *t.shape[1:]) for t in full])
            return [o.reshape(size, *o.shape[batch_ndim:])[i] for o in out]
        return product

    results = [_run_callable(solver, block(i), [t[i] for t in flat_b], one) for i in range(size)]
    x = [torch.stack(column).reshape(*batch, *column[0].shape) for column in zip(*(r[0] for r in results))]
    infos = [r[1] for r in results]
    worst = max(infos, key=lambda info: (not info.converged, info.residual))
    return x, dataclasses.replace(worst, iterations=sum(info.iterations for info in infos))


_FLAT: Dict[type[LinearSolver], bool] = {}


def _flat_signature(cls: type[LinearSolver]) -> bool:
    """Whether a solver class implements the older flat ``solve(..., spec)`` (cached per class)."""
    if cls not in _FLAT:
        _FLAT[cls] = "spec" in inspect.signature(cls.solve).parameters
    return _FLAT[cls]


def _run_callable(solver: Callable, matvec: Matvec, b: Vector, layout: PytreeLayout) -> Tuple[Vector, LinearSolveInfo]:
    name = getattr(solver, "__name__", type(solver).__name__)
    out = solver(layout.wrap_tree(matvec), layout.unflatten(b))
    info = None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], LinearSolveInfo):
        out, info = out
    x = layout.flatten(out, f"the solution of linear_solver {name}")
    if info is None:
        residual = [bi - ai for bi, ai in zip(b, matvec(x))]
        rel = safe_div(norm(residual, 0), norm(b, 0))
        info = LinearSolveInfo.from_residual(rel, default_tol(b[0].dtype), iterations=1, solver=name)
    return x, info


def packing(leaves: Sequence[torch.Tensor], batch_ndim: int) -> Tuple[Callable[[Sequence[torch.Tensor]], torch.Tensor],
                                                                      Callable[[torch.Tensor], Vector]]:
    """Maps between the leaves of a vector and one ``(systems, unknowns)`` matrix.

    The ``batch_ndim`` leading dimensions of every leaf become the rows, the rest is
    concatenated into the columns, in the leaves' common dtype; ``unpack`` restores each
    leaf's shape and dtype. One tensor per system turns a solver's inner products and
    updates into a few fused operations instead of a Python loop over the leaves.
    """
    systems = math.prod(leaves[0].shape[:batch_ndim])
    shapes = [t.shape for t in leaves]
    dtypes = [t.dtype for t in leaves]
    sizes = [math.prod(shape[batch_ndim:]) for shape in shapes]
    common = functools.reduce(torch.promote_types, dtypes)

    def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(tensors) == 1:
            t = tensors[0]
            return (t if t.dtype == common else t.to(common)).reshape(systems, sizes[0])
        return torch.cat([t.to(common).reshape(systems, n) for t, n in zip(tensors, sizes)], dim=1)

    def unpack(flat: torch.Tensor) -> Vector:
        if len(shapes) == 1:
            t = flat.reshape(shapes[0])
            return [t if t.dtype == dtypes[0] else t.to(dtypes[0])]
        return [part.reshape(shape).to(dtype) for part, shape, dtype in zip(flat.split(sizes, dim=1), shapes, dtypes)]

    return pack, unpack
