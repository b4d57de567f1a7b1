"""The inner-solver protocol and helpers shared by the built-in solvers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Tuple, Union, cast

import torch

from .. import _validation as validation
from .._defaults import inner_tol
from .._tree import tree_flatten, tree_unflatten


@dataclasses.dataclass
class SolverStats:
    """What an inner solver reports.

    Attributes:
        iterations: iterations run (as the solver counts them; see each solver).
        residual: norm of the optimality condition (gradient or fixed-point residual) at
            the returned point, ``nan`` if not measured.
        converged: whether the solver's stopping criterion was met; ``None`` if it was not
            checked (``tol=0``).
        message: why the solver stopped, when it has more to say (e.g. SciPy's message).
    """

    iterations: int
    residual: float = float("nan")
    converged: Optional[bool] = None
    message: str = ""


class InnerSolver:
    """Base class of the built-in inner solvers.

    A solver is called as ``solver(fn, x0, *params) -> x``; :meth:`run` also returns a
    :class:`SolverStats`, which :func:`~implicitgrad.implicit_solve` copies into its
    ``SolveInfo``. Class attributes declare what the core may do with it:

    * ``unrollable``: it can run with autograd recording (``mode="unrolled"``).
    * ``batchable``: it can solve a sum of independent problems jointly (used under
      ``torch.func.vmap``); otherwise a batch is solved problem by problem.
    * ``per_system``: with ``batchable``, its :meth:`run` takes ``batch_ndim=k`` (the
      leading ``k`` dims of every leaf index the independent problems) and treats each
      problem on its own: step sizes, stopping rule.
    """

    unrollable: bool = False
    batchable: bool = False
    per_system: bool = False

    def __call__(self, fn: Callable, x0: Any, *params: Any) -> Any:
        return self.run(fn, x0, *params)[0]

    def run(self, fn: Callable, x0: Any, *params: Any) -> Tuple[Any, SolverStats]:
        raise NotImplementedError


def flatten_x(x0: Any) -> Tuple[List[torch.Tensor], Callable[[List[torch.Tensor]], Any]]:
    """Tensor leaves of ``x0`` and a function that rebuilds the pytree from new leaves."""
    leaves, spec = tree_flatten(x0)
    index = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]

    def rebuild(tensors: List[torch.Tensor]) -> Any:
        out = list(leaves)
        for i, t in zip(index, tensors):
            out[i] = t
        return tree_unflatten(out, spec)

    return [leaves[i] for i in index], rebuild


def leaves_norm(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(cast(torch.Tensor, sum((t.detach() ** 2).sum() for t in tensors)))


def objective_grad(
    fn: Callable,
    x: List[torch.Tensor],
    rebuild: Callable[[List[torch.Tensor]], Any],
    params: Tuple[Any, ...],
    create_graph: bool = False,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``fn(x, *params)`` and its gradient with respect to the tensor leaves ``x``.

    ``create_graph=False``: computed on detached copies, results detached (a solver's
    forward step). ``True``: leaves that already require grad are used as they are and the
    gradient keeps its graph, so iterations can be differentiated (``mode="unrolled"``).
    Leaves ``fn`` does not use get a zero gradient.

    Raises:
        ValueError: ``fn`` does not return a scalar tensor.
    """
    with torch.enable_grad():
        if create_graph:
            xs = [t if t.requires_grad else t.detach().requires_grad_(True) for t in x]
        else:
            xs = [t.detach().requires_grad_(True) for t in x]
        value = fn(rebuild(xs), *params)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"The objective must return a scalar Tensor, got {got}. Reduce it (e.g. .sum() or .mean())."
            )
        if not value.requires_grad:
            return value.detach(), [torch.zeros_like(t) for t in xs]
        grads = torch.autograd.grad(value, xs, create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True)
    if create_graph:
        return value, list(grads)
    return value.detach(), [g.detach() for g in grads]


def check_float_leaves(owner: str, leaves: List[torch.Tensor], real: bool = False) -> None:
    """The variable must have at least one leaf and only floating (or complex) leaves."""
    if not leaves:
        raise TypeError(f"{owner}: x0 must be a Tensor or a pytree with at least one Tensor leaf.")
    for t in leaves:
        if not (t.is_floating_point() or (t.is_complex() and not real)):
            kind = "real floating point" if real else "floating point"
            raise TypeError(f"{owner}: every tensor leaf of x0 must be {kind}, got dtype {t.dtype}.")


def relative_threshold(tol: float, initial: Union[torch.Tensor, float]) -> float:
    """The stopping threshold ``tol · max(1, ‖initial‖)`` every built-in solver uses."""
    return tol * max(1.0, float(initial))


def check_tol(owner: str, tol: Optional[float], allow_zero: bool = True) -> None:
    """An inner tolerance: ``None`` (dtype default) or a finite number in ``[0, 1)``
    (``(0, 1)`` without ``allow_zero``); see :mod:`implicitgrad._validation`."""
    if tol is not None:
        validation.check_tol("tol", tol, owner, allow_zero=allow_zero)


def check_positive(name: str, owner: str, value, integer: bool = False) -> None:
    """A count ``≥ 1`` (``integer=True``) or a finite number ``> 0``."""
    if integer:
        validation.check_count(name, value, owner)
    else:
        validation.check_positive_number(name, value, owner)


def default_tol(dtype: torch.dtype) -> float:
    """Inner tolerance (relative gradient / residual norm) when none is given."""
    return inner_tol(dtype)


def where_leaves(mask: torch.Tensor, a: List[torch.Tensor], b: List[torch.Tensor]) -> List[torch.Tensor]:
    """Leaf by leaf, ``a`` for the problems where ``mask`` (shape ``batch_shape``) holds, else ``b``."""
    return [torch.where(mask.reshape(mask.shape + (1,) * (ai.ndim - mask.ndim)), ai, bi) for ai, bi in zip(a, b)]


def threshold_stats(best_norm: torch.Tensor, threshold: torch.Tensor, tol: float, iterations: int,
                    batch_ndim: int, quantity: str, detail: str) -> SolverStats:
    """The :class:`SolverStats` of a per-problem solver that stops when ``best_norm ≤ threshold``
    (``threshold = tol · scale`` per problem); ``quantity`` and ``detail`` word the message."""
    failed = ~(best_norm <= threshold)
    converged = not bool(failed.any())
    message = ""
    if not converged:
        worst = float((best_norm / threshold * tol).max())
        where = f" in {int(failed.sum())} of {failed.numel()} problems" if batch_ndim else ""
        message = f"relative {quantity} {worst:.3e} above tol={tol:.1e}{where} {detail}"
    return SolverStats(iterations, float(best_norm.square().sum().sqrt()), converged, message)


def batch_stats(best_norm: torch.Tensor, initial_norm: torch.Tensor, tol: float, iterations: int,
                batch_ndim: int, detail: str) -> SolverStats:
    """The :class:`SolverStats` of a per-problem gradient method that returns its best points.

    ``best_norm`` and ``initial_norm`` hold each problem's gradient norm at the returned and
    the starting point; a problem has converged when ``best ≤ tol · max(1, initial)``.
    """
    relative = best_norm / initial_norm.clamp_min(1.0)
    converged = bool((relative <= tol).all())
    message = ""
    if not converged:
        of = f" in {int((relative > tol).sum())} of {relative.numel()} problems" if batch_ndim else ""
        message = f"relative gradient norm up to {float(relative.max()):.3e} above tol={tol:.1e}{of} {detail}"
    return SolverStats(iterations, float(best_norm.square().sum().sqrt()), converged, message)
