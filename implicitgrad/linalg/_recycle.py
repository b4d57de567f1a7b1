r"""Krylov directions carried from one CG solve to the next: a limited-memory preconditioner.

CG's search directions :math:`s_j` and their products :math:`y_j = A s_j` describe ``A`` on
the subspace the solve explored. When the next system's matrix is close (the next outer
step of a hyperparameter or meta-training loop), they give the limited-memory
preconditioner of Gratton, Sartenaer and Tshimanga (2011),

.. math::

    H = (I - S D^{-1} Y^\top)(I - Y D^{-1} S^\top) + S D^{-1} S^\top,
    \qquad D = S^\top Y ,

symmetric positive definite whenever :math:`D` is; for the matrix the pairs came from,
:math:`H A` is the identity on their span, so CG need not explore it again. Pairs from
several solves are kept (the most recent ``memory``); :math:`D` is symmetrised and its
eigenvalues below ``1e-8`` of the largest (nearly dependent directions) are dropped, so
:math:`H` stays positive definite. Each application costs four products of the ``k`` kept
vectors with a vector — no product with ``A``.

:class:`Recycler` lives in a :class:`~implicitgrad.WarmStart`; the core makes it current
for one solve (:func:`recycling`), and :class:`~implicitgrad.CG` reads it: without a
preconditioner of the user's, it preconditions with ``H`` and records its own pairs.

References:
    Gratton, Sartenaer and Tshimanga, On a class of limited memory preconditioners for
    large scale linear systems with multiple right-hand sides, SIAM J. Optim., 2011.
"""

from __future__ import annotations

import contextvars
from typing import Callable, ContextManager, List, Optional, Tuple

import torch

from ._scoped import scoped

_CURRENT: contextvars.ContextVar[Optional[Recycler]] = contextvars.ContextVar("implicitgrad_recycler", default=None)


class Recycler:
    """The most recent ``memory`` pairs ``(s, A s)`` of CG solves of one repeated system."""

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (systems, unknowns) each
        self._new: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def preconditioner(self, like: torch.Tensor) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """``r ↦ H r`` on ``(systems, unknowns)`` matrices shaped like ``like``, or ``None``
        when no kept pair fits."""
        pairs = [(s, y) for s, y in self.pairs if s.shape == like.shape and s.dtype == like.dtype
                 and s.device == like.device]
        if not pairs:
            return None
        s = torch.stack([p[0] for p in pairs])  # (k, systems, unknowns)
        y = torch.stack([p[1] for p in pairs])
        d = torch.einsum("ksn,jsn->skj", s, y)
        d = 0.5 * (d + d.transpose(-1, -2))
        lam, vec = torch.linalg.eigh(d)  # (systems, k), (systems, k, k)
        keep = lam > 1e-8 * lam.amax(-1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)
        w = torch.where(keep.unsqueeze(-2), vec / lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt().unsqueeze(-2),
                        0.0)
        # With S' = S W, Y' = Y W: S'ᵀ Y' = I on the kept directions.
        s = torch.einsum("ksn,skj->jsn", s, w)
        y = torch.einsum("ksn,skj->jsn", y, w)

        def apply(r: torch.Tensor) -> torch.Tensor:
            c = torch.einsum("jsn,sn->sj", s, r)
            v = r - torch.einsum("sj,jsn->sn", c, y)
            e = torch.einsum("jsn,sn->sj", y, v)
            return v + torch.einsum("sj,jsn->sn", c - e, s)

        return apply

    def record(self, s: torch.Tensor, y: torch.Tensor, curvature: torch.Tensor) -> None:
        """One CG step's direction, its product and ``sᵀAs`` (kept if positive in every system)."""
        self._new.append((s, y, curvature))

    def finish(self) -> None:
        """Keep this solve's pairs of positive curvature, the most recent ``memory`` of all."""
        new, self._new = self._new, []
        if not new:
            return
        flags = (torch.stack([c for _, _, c in new]) > 0).all(-1).tolist()  # (steps, systems) -> steps
        kept = [(s, y) for (s, y, _), good in zip(new, flags) if good]
        self.pairs = (self.pairs + kept)[-self.memory:] if self.memory else []


def current() -> Optional[Recycler]:
    """The recycler of the solve running now, if any."""
    return _CURRENT.get()


def recycling(recycler: Optional[Recycler]) -> ContextManager[None]:
    """Within the block, CG solves read and feed ``recycler``."""
    return scoped(_CURRENT, recycler)
