"""The inner-solver protocol and helpers shared by the built-in solvers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Tuple

import torch

from .._tree import tree_flatten, tree_unflatten


@dataclasses.dataclass
class SolverStats:
    """What an inner solver reports: iterations run, final residual, whether it met tol."""

    iterations: int
    residual: float = float("nan")
    converged: Optional[bool] = None


class InnerSolver:
    """Base class of the built-in inner solvers.

    A solver is called as ``solver(fn, x0, *params) -> x``; :meth:`run` also returns a
    :class:`SolverStats`, which :func:`~implicitgrad.implicit_solve` copies into its
    ``SolveInfo``. Class attributes declare what the core may do with it:

    * ``unrollable``: it can run with autograd recording (``mode="unrolled"``).
    * ``batchable``: it can solve a sum of independent problems jointly (used under
      ``torch.func.vmap``); otherwise a batch is solved problem by problem.
    """

    unrollable: bool = False
    batchable: bool = False

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
    return torch.sqrt(sum((t.detach() ** 2).sum() for t in tensors))


def check_positive(name: str, owner: str, value, integer: bool = False) -> None:
    if integer:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}.")
    elif not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{owner}: {name} must be a positive number, got {value!r}.")


def default_tol(dtype: torch.dtype) -> float:
    """Inner tolerance (relative gradient / residual norm) when none is given."""
    return 1e-8 if dtype == torch.float64 else 1e-4
