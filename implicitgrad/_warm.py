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
    their products :math:`y_j = A s_j` are kept too, and precondition the next CG solve.
    Each solve's pairs update the preconditioner of the solves before it by the
    limited-memory preconditioner of Gratton, Sartenaer and Tshimanga (2011),
    :math:`H = (I - S D^{-1} Y^\top) M (I - Y D^{-1} S^\top) + S D^{-1} S^\top`,
    :math:`D = S^\top Y`, where :math:`M` is the preconditioner of the older solves (the
    oldest: :math:`\gamma I`, :math:`\gamma = s^\top y / y^\top y` of the newest pair, or the
    user's preconditioner); a block form of the L-BFGS preconditioner of Morales and Nocedal
    (2000). :math:`H` is symmetric positive definite, and :math:`HA = I` on the span of the
    newest solve's directions for the matrix they came from: CG need not explore that
    subspace again, and the directions of solves further back (of matrices further from the
    current one) count for less. It costs ``2k`` stored vectors of the size of ``x`` and four
    products of a solve's kept vectors with a vector per kept solve and per iteration, no
    extra Hessian-vector product, and applies when the linear solver is
    :class:`~implicitgrad.CG`. Starting from the previous solution alone saves little when
    an outer step moves the solution by more than the tolerance asks; the recycled
    directions keep saving products there, how many depending on the spectrum and on ``k``
    (``benchmarks/bench_warm.py`` measures it).

    With ``extrapolate=True`` the start is the linear extrapolation of the last two
    solutions, :math:`u_0 = 2u_k - u_{k-1}`: when the outer steps follow a smooth path (a
    small or decaying step size, momentum), its distance to the new solution is of the
    order of the change of the step rather than of the step. On a path that turns sharply
    it can start farther than the previous solution alone; the solve still stops at the
    same tolerance.

    On the hyperparameter run of ``benchmarks/bench_warm.py`` (Adam with step 0.1 on the 30
    penalties of ``examples/hpo_logreg_l2.py``, 50 steps, products to a 1e-6 hypergradient)
    CG needed 1,103 products from 0, 1,003 from the previous solution, 847 from the
    extrapolated start, and 667, 557, 459 and 351 with ``recycle=10``, ``20``, ``30`` and
    ``50`` as well (1.65×, 1.98×, 2.40×, 3.14× fewer than from 0).

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


def warm_template(value: object, owner: str) -> Optional[WarmStart]:
    """The ``warm_start=`` of a layer or a learner: ``False`` (none), ``True`` (a plain
    :class:`WarmStart`) or a :class:`WarmStart`, whose settings it uses."""
    if isinstance(value, WarmStart):
        return value
    if isinstance(value, bool):
        return WarmStart() if value else None
    raise TypeError(
        f"{owner}: warm_start must be True, False or an ig.WarmStart(recycle=..., extrapolate=...) "
        f"giving the settings, got {value!r}."
    )


def settings_of(template: WarmStart) -> WarmStart:
    """A new :class:`WarmStart` with ``template``'s settings and nothing stored."""
    return WarmStart(recycle=template.recycle, extrapolate=template.extrapolate)


def _fits(stored: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """Whether stored leaves have ``b``'s number, shapes, dtypes and devices."""
    return len(stored) == len(b) and all(
        s.shape == t.shape and s.dtype == t.dtype and s.device == t.device for s, t in zip(stored, b)
    )
