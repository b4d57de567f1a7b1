r"""``WarmStart``: initial guesses for the linear solves of repeated implicit solves."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ._compat import host_readable
from .linalg._base import all_finite
from .linalg._recycle import Recycler

__all__ = ["WarmStart"]


class WarmStart:
    r"""Starts each linear solve of a repeated implicit solve from the previous solution.

    In a hyperparameter or meta-training loop the backward system
    :math:`A(x^\star, \theta)^\top u = \partial L / \partial x^\star` changes little from one
    outer step to the next, so the previous step's :math:`u` is a better initial guess than
    0. Pass the same ``WarmStart`` to the calls that solve the same problem again
    (``ig.implicit_solve(..., warm_start=ws)``): each linear solve starts from the solution
    the previous solve of the same kind (backward or forward mode) stored, when it has the
    same shapes, dtypes and devices, and stores its own.

    An iterative solver stops at the same tolerance, relative to ``‖b‖``, whatever its start:
    from a start close to the solution it gets there in fewer products
    (``info.backward.iterations`` counts them), and from a poor start it is no less
    accurate. :class:`~implicitgrad.Exact` ignores the start, and a plain-callable
    ``linear_solver`` chooses its own. Solutions with NaN/Inf are not stored. A batch of
    problems under ``torch.func.vmap`` warm-starts as a whole when the batch repeats.

    With ``recycle=k`` the last ``k`` search directions :math:`s_j` of the CG solves and
    their products :math:`y_j = A s_j` are kept too, and precondition the next CG solve with
    the limited-memory preconditioner :math:`H = (I - S D^{-1} Y^\top)(I - Y D^{-1} S^\top)
    + S D^{-1} S^\top`, :math:`D = S^\top Y` (Gratton, Sartenaer and Tshimanga, 2011),
    symmetric positive definite, with :math:`HA = I` on the span of the kept directions for
    the matrix they came from: CG need not explore that subspace again. It costs ``2k``
    stored vectors of the size of ``x`` and four products of them with a vector per
    iteration, no extra Hessian-vector product, and applies when the linear solver is
    :class:`~implicitgrad.CG` without a preconditioner of the user's. Starting from the
    previous solution alone saves little when an outer step moves the solution by more than
    the tolerance asks; the recycled directions can keep saving products there, but how
    many depends on the spectrum — measure it (``benchmarks/bench_warm.py``).

    With ``extrapolate=True`` the start is the linear extrapolation of the last two
    solutions, :math:`u_0 = 2u_k - u_{k-1}`: when the outer steps follow a smooth path (a
    small or decaying step size, momentum), its distance to the new solution is of the
    order of the change of the step rather than of the step. On the hyperparameter run of
    ``benchmarks/bench_warm.py`` (Adam on 30 penalties, 20 steps) it put the start at a
    median relative distance of 3e-3 instead of 4e-2 at step size 0.1, and 3e-5 instead of
    3e-3 at 0.01, and CG needed 214 and 106 products instead of 240 and 163 (246 and 183
    from 0). Over 50 steps at step size 0.1, with ``recycle=10`` as well, CG needed 757
    products against 1,103 from 0 (946 with ``recycle=10`` alone). On a path that turns
    sharply it can start farther than the previous solution alone; the solve still stops
    at the same tolerance.

    Keep one ``WarmStart`` per problem that repeats (per task of a fixed task pool, per
    layer): a solution of another problem is a valid start but rarely a good one.

    Args:
        recycle: CG directions to keep across solves (0: the solution only).
        extrapolate: start from :math:`2u_k - u_{k-1}` once two solutions are stored.

    Attributes:
        hits: solves that started from a stored solution.
        misses: solves that found none (first call, or another shape) and started from 0.

    Example:
        >>> import torch, implicitgrad as ig
        >>> X = torch.randn(30, 4, dtype=torch.float64); y = torch.randn(30, dtype=torch.float64)
        >>> ridge = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> solve = lambda f, w0, lam: torch.linalg.solve(X.T @ X + lam * torch.eye(4, dtype=X.dtype), X.T @ y)
        >>> ws, lam = ig.WarmStart(), torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> for step in range(3):
        ...     w = ig.implicit_solve(ridge, torch.zeros(4, dtype=torch.float64), lam, solver=solve, warm_start=ws)
        ...     (w ** 2).sum().backward()
        >>> ws.hits, ws.misses
        (2, 1)
    """

    def __init__(self, recycle: int = 0, extrapolate: bool = False) -> None:
        if isinstance(recycle, bool) or not isinstance(recycle, int) or recycle < 0:
            raise ValueError(
                f"WarmStart: recycle must be a non-negative integer (CG directions kept), got {recycle!r}."
            )
        if not isinstance(extrapolate, bool):
            raise ValueError(f"WarmStart: extrapolate must be True or False, got {extrapolate!r}.")
        self.recycle = recycle
        self.extrapolate = extrapolate
        self._stored: Dict[str, List[torch.Tensor]] = {}
        self._previous: Dict[str, List[torch.Tensor]] = {}
        self._recyclers: Dict[str, Recycler] = {}
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return (f"WarmStart(recycle={self.recycle}, extrapolate={self.extrapolate}, hits={self.hits}, "
                f"misses={self.misses}, stored={sorted(self._stored)})")

    def reset(self) -> None:
        """Forget the stored solutions and directions (the counters stay)."""
        self._stored.clear()
        self._previous.clear()
        self._recyclers.clear()

    def recycler(self, kind: str) -> Optional[Recycler]:
        """The directions kept for the solves of ``kind`` (``None`` without ``recycle``)."""
        if not self.recycle:
            return None
        return self._recyclers.setdefault(kind, Recycler(self.recycle))

    def initial_guess(self, kind: str, b: Sequence[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """The stored solution of the solves of ``kind`` (extrapolated with the one before
        it, with ``extrapolate``) if it fits ``b``'s leaves, else ``None``."""
        stored = self._stored.get(kind)
        if stored is None or not _fits(stored, b):
            self.misses += 1
            return None
        self.hits += 1
        previous = self._previous.get(kind) if self.extrapolate else None
        if previous is not None and _fits(previous, b):
            return [2 * s - p for s, p in zip(stored, previous)]
        return list(stored)

    def store(self, kind: str, x: Sequence[torch.Tensor]) -> None:
        """Keep ``x`` (detached) as the next start of the solves of ``kind``; non-finite
        solutions and tensors wrapped by a ``torch.func`` transform are not kept."""
        if not self.usable(x):
            return
        x = [t.detach() for t in x]
        if not all_finite(x):
            self._stored.pop(kind, None)
            self._previous.pop(kind, None)
            return
        if self.extrapolate and kind in self._stored:
            self._previous[kind] = self._stored[kind]
        self._stored[kind] = x

    @staticmethod
    def usable(b: Sequence[torch.Tensor]) -> bool:
        """Whether the solve of ``b`` can take a stored start (plain tensors, not wrapped)."""
        return all(host_readable(t) for t in b)


def _fits(stored: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """Whether stored leaves have ``b``'s number, shapes, dtypes and devices."""
    return len(stored) == len(b) and all(
        s.shape == t.shape and s.dtype == t.dtype and s.device == t.device for s, t in zip(stored, b)
    )
