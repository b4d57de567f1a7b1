r"""Krylov directions carried from one CG solve to the next: a chain of limited-memory preconditioners.

CG's search directions :math:`s_j` and their products :math:`y_j = A s_j` describe ``A`` on
the subspace the solve explored. When the next system's matrix is close (the next outer
step of a hyperparameter or meta-training loop), they give the limited-memory
preconditioner of Gratton, Sartenaer and Tshimanga (2011) around a first-level
preconditioner :math:`M`,

.. math::

    H = (I - S D^{-1} Y^\top)\, M\, (I - Y D^{-1} S^\top) + S D^{-1} S^\top,
    \qquad D = S^\top Y ,

symmetric positive definite whenever :math:`M` and :math:`D` are; for the matrix the
pairs came from, :math:`H A` is the identity on their span, so CG need not explore it
again. One solve's pairs form one such update, and the solves are chained, oldest first:
the first level of each solve's update is the preconditioner built from the solves
before it, and the first level of the oldest is :math:`\gamma I` with
:math:`\gamma = s^\top y / y^\top y` of the most recent pair (the scaling of L-BFGS), or
the user's own preconditioner. This is a block form of the limited-memory BFGS
preconditioner of Morales and Nocedal (2000): a recent solve's directions override what an
older solve, of a matrix further from the current one, said about the same subspace. (Its
pairs are :math:`A`-conjugate, so one block update equals the BFGS updates with its pairs in
turn.) Taking the pairs of several solves at once in one update instead treats their
matrices as one: on the hyperparameter run of ``benchmarks/bench_warm.py`` that needed
about 1.4× the products of the chain.

The most recent ``memory`` pairs are kept (the oldest solve's may be cut). :math:`D` is
symmetrised and its eigenvalues below ``1e-8`` of the largest (nearly dependent
directions) are dropped, so :math:`H` stays positive definite. Each application costs four
products of a solve's kept vectors with a vector per solve kept, and none with ``A``.

:class:`Recycler` lives in a :class:`~implicitgrad.WarmStart`; the core makes it current
for one solve (:func:`recycling`), and :class:`~implicitgrad.CG` reads it: it
preconditions with ``H`` and records its own pairs.

References:
    Gratton, Sartenaer and Tshimanga, On a class of limited memory preconditioners for
    large scale linear systems with multiple right-hand sides, SIAM J. Optim., 2011.

    Morales and Nocedal, Automatic preconditioning by limited memory quasi-Newton
    updating, SIAM J. Optim., 2000.
"""

from __future__ import annotations

import contextvars
from typing import Callable, ContextManager, List, Optional, Tuple

import torch

from ._scoped import scoped

_CURRENT: contextvars.ContextVar[Optional[Recycler]] = contextvars.ContextVar("implicitgrad_recycler", default=None)

Pair = Tuple[torch.Tensor, torch.Tensor]
Operator = Callable[[torch.Tensor], torch.Tensor]


class Recycler:
    """The most recent ``memory`` pairs ``(s, A s)`` of CG solves of one repeated system.

    ``pairs`` lists them oldest first and ``sizes`` how many each solve left, the most
    recent solve last; pairs before those (added by hand) count as one solve.
    """

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.pairs: List[Pair] = []  # (systems, unknowns) each
        self.sizes: List[int] = []
        self._new: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def solves(self) -> List[List[Pair]]:
        """The kept pairs grouped by solve, oldest first."""
        loose = len(self.pairs) - sum(self.sizes)
        groups, start = ([self.pairs[:loose]] if loose > 0 else []), max(loose, 0)
        for size in self.sizes:
            groups.append(self.pairs[start:start + size])
            start += size
        return groups

    def preconditioner(self, like: torch.Tensor, base: Optional[Operator] = None) -> Optional[Operator]:
        """``r ↦ H r`` on ``(systems, unknowns)`` matrices shaped like ``like``, or ``None``
        when no kept pair fits; ``base`` is the first level (default: ``γ I``)."""
        levels = []
        for group in self.solves():
            group = [(s, y) for s, y in group if s.shape == like.shape and s.dtype == like.dtype
                     and s.device == like.device]
            if group:
                levels.append(_level(group))
        if not levels:
            return None
        if base is None:
            s, y = levels[-1][2]
            scale = (torch.linalg.vecdot(s, y) / torch.linalg.vecdot(y, y)).unsqueeze(-1)  # (systems, 1)
            scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)

            def first(v: torch.Tensor) -> torch.Tensor:
                return scale * v

            base = first

        def apply(r: torch.Tensor) -> torch.Tensor:
            # H_i r = w + S_i (c − Y_iᵀ w), with c = S_iᵀ r and w = H_{i−1}(r − Y_i c).
            coefficients = []
            for s, y, _ in reversed(levels):
                c = torch.einsum("jsn,sn->sj", s, r)
                coefficients.append(c)
                r = r - torch.einsum("sj,jsn->sn", c, y)
            w = base(r)
            for (s, y, _), c in zip(levels, reversed(coefficients)):
                w = w + torch.einsum("sj,jsn->sn", c - torch.einsum("jsn,sn->sj", y, w), s)
            return w

        return apply

    def record(self, s: torch.Tensor, y: torch.Tensor, curvature: torch.Tensor) -> None:
        """One CG step's direction, its product and ``sᵀAs`` (kept if positive in every system)."""
        self._new.append((s, y, curvature))

    def finish(self) -> None:
        """Keep this solve's pairs of positive curvature, the most recent ``memory`` of all."""
        new, self._new = self._new, []
        if not new or not self.memory:
            return
        flags = (torch.stack([c for _, _, c in new]) > 0).all(-1).tolist()  # (steps, systems) -> steps
        kept = [(s, y) for (s, y, _), good in zip(new, flags) if good]
        if not kept:
            return
        loose = len(self.pairs) - sum(self.sizes)
        self.pairs = self.pairs + kept
        self.sizes.append(len(kept))
        excess = len(self.pairs) - self.memory
        if excess <= 0:
            return
        self.pairs = self.pairs[excess:]
        excess -= min(loose, excess)
        while excess > 0:  # the oldest solves lose their oldest pairs
            cut = min(self.sizes[0], excess)
            self.sizes[0] -= cut
            excess -= cut
            if not self.sizes[0]:
                self.sizes.pop(0)


def _level(group: List[Pair]) -> Tuple[torch.Tensor, torch.Tensor, Pair]:
    """One solve's pairs ``(S W, Y W, newest pair)``, with ``W`` such that
    ``(S W)ᵀ (Y W) = I`` on the kept eigen-directions of the symmetrised ``D = SᵀY``."""
    s = torch.stack([p[0] for p in group])  # (k, systems, unknowns)
    y = torch.stack([p[1] for p in group])
    d = torch.einsum("ksn,jsn->skj", s, y)
    d = 0.5 * (d + d.transpose(-1, -2))
    lam, vec = torch.linalg.eigh(d)  # (systems, k), (systems, k, k)
    tiny = torch.finfo(lam.dtype).tiny
    keep = lam > 1e-8 * lam.amax(-1, keepdim=True).clamp_min(tiny)
    w = torch.where(keep.unsqueeze(-2), vec / lam.clamp_min(tiny).sqrt().unsqueeze(-2), 0.0)
    return torch.einsum("ksn,skj->jsn", s, w), torch.einsum("ksn,skj->jsn", y, w), group[-1]


def current() -> Optional[Recycler]:
    """The recycler of the solve running now, if any."""
    return _CURRENT.get()


def recycling(recycler: Optional[Recycler]) -> ContextManager[None]:
    """Within the block, CG solves read and feed ``recycler``."""
    return scoped(_CURRENT, recycler)
