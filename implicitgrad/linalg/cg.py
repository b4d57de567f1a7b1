"""Conjugate gradient for symmetric positive definite systems."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple, Union, cast

import torch

from .._diagnostics import LinearSolveInfo
from .._status import Status
from ._base import (
    Matvec,
    PytreeLayout,
    SymmetricIterativeSolver,
    Vector,
    deferring,
    packing,
    safe_div,
    working_dtype,
)
from ._recycle import current as current_recycler

#: A residual above this multiple of the best one met so far stops CG as diverging.
DIVERGENCE_FACTOR = 1e2
#: Residuals below this multiple of ε‖b‖ are rounding noise: their growth is not divergence.
ROUNDING_FACTOR = 1e2


class CG(SymmetricIterativeSolver):
    r"""Preconditioned conjugate gradient for ``(A + damping·I) x = b``.

    For symmetric positive definite ``A`` (the Hessian of a strictly convex objective at
    its minimum) CG minimises the ``A``-norm of the error over the Krylov space
    :math:`\mathcal{K}_k(A, b)`; after ``k`` iterations

    .. math::

        \|x_k - x\|_A \le 2 \left(\frac{\sqrt{\kappa} - 1}{\sqrt{\kappa} + 1}\right)^k
        \|x_0 - x\|_A ,

    with :math:`\kappa` the condition number. Each iteration costs one ``matvec`` (one
    Hessian-vector product inside :func:`~implicitgrad.implicit_solve`). Convergence is
    declared when :math:`\|r_k\| \le \text{tol}\,\|b\|` per system.

    Args:
        maxiter: largest number of iterations (``matvec`` calls).
        tol: relative residual to reach; ``None`` picks 1e-10 in float64, 1e-5 in float32.
        damping: ``λ ≥ 0`` added to the diagonal. It makes an indefinite or singular
            Hessian positive definite at the price of solving a regularised system
            (the hypergradient of a proximal problem).
        preconditioner: optional ``M`` with ``M(r) ≈ (A + λI)^{-1} r`` on pytrees shaped
            like ``b``; must be symmetric positive definite.
        check_every: iterations between convergence checks. Each check reads a number
            back to the host; on CUDA a larger interval keeps the solve asynchronous.
            ``None``: every iteration on CPU, every 10 elsewhere.
        compile: inside the backward pass of :func:`~implicitgrad.implicit_solve` (an
            objective's symmetric Hessian, first-order gradients), run exactly ``maxiter``
            iterations with no host read and hand the whole hypergradient — the
            linearisation by ``torch.func.vjp``, the iterations, the parameter VJP — to
            :func:`torch.compile` as one graph, which fuses the Hessian-vector products with
            the CG updates. ``True``, or a dict of :func:`torch.compile` arguments (e.g.
            ``{"mode": "reduce-overhead"}`` to capture it as a CUDA graph). The first call of
            each layout compiles (seconds to a minute); the objective must be traceable by
            ``torch.compile`` (``fullgraph``). A system that meets non-positive curvature
            stops moving and is reported; the reported residual is that of the recursion.
            Preconditioners are not supported there; other calls (higher order,
            ``torch.func`` transforms, CG used alone) run the loop below.

    The residual of CG is not monotone, and on a matrix that is not positive definite an
    iterate can be worse than the initial guess. CG therefore returns, per system, the
    iterate of lowest residual it met — the initial guess included (``x = 0``, relative
    residual 1, without ``init``) — and reports that iterate's residual. It stops a system
    early in three cases, returning that best iterate:

    * ``"negative_curvature"``: a search direction with ``pᵀ A p ≤ 0`` that proves ``A``
      indefinite — ``pᵀAp`` clearly negative, or ``pᵀAp ≈ 0`` with ``Ap`` far from 0,
      impossible for a positive semidefinite matrix (the Hessian is not positive
      semidefinite at ``x``); the step along it is not taken.
    * ``"singular"``: a search direction with ``pᵀ A p ≤ 0`` and ``A p ≈ 0`` (below
      rounding relative to ``‖A‖ ‖p‖``): a null vector of a singular matrix, met because
      ``b`` is not in the range of ``A``. One more product tells the two apart. A null
      direction of tiny positive curvature makes a giant step instead; checked in that
      iteration (``check_every=1``), it is reported as ``"singular"`` too.
    * ``"diverging"``: the residual grew above ``1e2`` times the best residual met so far.
      On a positive definite ``A`` the ``A``-norm of the error never increases, so the
      residual can exceed its best by at most :math:`\sqrt{\kappa}`: the rule never fires
      for :math:`\kappa \le 10^4`, and when it fires ``A`` is indefinite or very badly
      conditioned (then the residual can stay above ``‖b‖`` for many steps while the
      error still decreases: precondition or damp such a matrix). Residuals below rounding
      level, ``1e2·ε·‖b‖``, fluctuate without meaning: their growth is not counted (a
      ``tol`` below that level runs to ``maxiter``).

    In a batch only the affected system stops; the others go on. For a symmetric
    indefinite ``A`` use :class:`~implicitgrad.MINRES`.

    **Deferred checks.** Inside an ``on_failure="defer"`` call (``defers = True``), CG reads
    no value back to the host: it runs its ``maxiter`` iterations, the systems that
    converge or stop keep their iterate (their step size is 0), a direction of
    non-positive curvature is classified in the iteration it is met (two more inner
    products per iteration, no product with ``A``), the systems that met NaN/Inf return NaN,
    and the outcome is read later by :meth:`~implicitgrad.SolveInfo.verify`. That fixed
    amount of work is what a CUDA graph can capture.

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = ig.CG()(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> info.converged, torch.allclose(A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64))
        (True, True)

    References:
        Hestenes and Stiefel, Methods of Conjugate Gradients for Solving Linear Systems,
        1952.
    """

    #: CG steps between recomputations of the true residual ``b − A x`` (one product each,
    #: counted in ``iterations``); in between, the residual follows the recursion
    #: ``r ← r − α A p``, which drifts from the true one over long runs.
    RESIDUAL_EVERY = 50

    #: CG can run without reading a value back to the host (``on_failure="defer"``).
    defers = True
    #: Its first residual norm is that of ``b`` (of ``b − A x₀`` from a guess): NaN/Inf in
    #: ``b`` ends the solve "nonfinite" or with a non-finite residual, in every bookkeeping.
    _flags_nonfinite_rhs = True

    def __init__(
        self,
        maxiter: int = 100,
        tol: Optional[float] = None,
        damping: float = 0.0,
        preconditioner: Optional[Callable] = None,
        check_every: Optional[int] = None,
        compile: Union[bool, Dict[str, Any]] = False,
    ) -> None:
        super().__init__(maxiter, tol, damping, preconditioner, check_every)
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"CG: compile must be True, False or a dict of torch.compile arguments, got {compile!r}.")
        if compile is not False and preconditioner is not None:
            raise ValueError("CG: compile=... runs plain CG; a preconditioner is not supported with it.")
        self.compile = compile is not False
        self.compile_options: Dict[str, Any] = dict(compile) if isinstance(compile, dict) else {}

    def __repr__(self) -> str:
        text = super().__repr__()
        return text if not self.compile else f"{text[:-1]}, compile={self.compile_options or True})"

    #: When CG checks every iteration (``check_every=1``, the CPU default) and solves at
    #: most this many systems, the per-system scalars (step sizes, residuals, which systems
    #: are done) are read by the host each iteration and the decisions are taken there:
    #: an iteration is then its product plus six vector operations, as in a textbook CG.
    #: Otherwise the same decisions are tensor masks on the device, read every
    #: ``check_every`` iterations.
    HOST_SYSTEMS = 64
    #: One system on the CPU, checked every iteration: ``pᵀAp`` is read before each step so
    #: that the step sizes are Python numbers and each update one tensor operation. Two
    #: reads per iteration, which cost nothing on the CPU; elsewhere each would be a
    #: synchronisation, so the one-read bookkeeping above runs there.
    SCALAR_BOOKKEEPING = True

    def solve_leaves(
        self,
        matvec: Matvec,
        b: Vector,
        *,
        init: Optional[Vector] = None,
        batch_ndim: int = 0,
        layout: Optional[PytreeLayout] = None,
    ) -> Tuple[Vector, LinearSolveInfo]:
        # The leaves are packed into one (systems, unknowns) matrix: every update below is
        # one tensor operation whatever the number of leaves.
        tol, every = self._tolerances(b)
        pack, unpack = packing(b, batch_ndim)
        damped = self._damped(matvec)
        precond = None if self.preconditioner is None else self._flat_preconditioner(layout, b)

        def op(v: torch.Tensor) -> torch.Tensor:
            return pack(damped(unpack(v)))

        rhs = pack(b)

        def users(r: torch.Tensor) -> torch.Tensor:
            return pack(cast(Callable[[Vector], Vector], precond)(unpack(r)))

        # Directions recycled from earlier solves of a repeated system (ig.WarmStart(recycle=k))
        # precondition this one, around the user's preconditioner if any; this solve's are kept.
        recycler = current_recycler()
        deflate = None if recycler is None else recycler.preconditioner(rhs, None if precond is None else users)
        plain = precond is None and deflate is None

        def prec(r: torch.Tensor) -> torch.Tensor:
            if deflate is not None:
                return deflate(r)
            return r if precond is None else users(r)

        defer = deferring()
        host = not defer and every == 1 and rhs.shape[0] <= self.HOST_SYSTEMS
        # One system checked every iteration on the CPU: step sizes as Python numbers (see
        # SCALAR_BOOKKEEPING). A long system's inner products are matrix products in every
        # bookkeeping alike.
        scalar = host and rhs.shape[0] == 1 and self.SCALAR_BOOKKEEPING and rhs.device.type == "cpu"
        dot = _row_dot if rhs.shape[0] == 1 and rhs.shape[1] >= _ROW_DOT_SIZE else torch.linalg.vecdot
        bb = dot(rhs, rhs)
        if init is None:
            x, r = torch.zeros_like(rhs), rhs
        else:
            x = pack(init)
            r = rhs - op(x)
        z = prec(r)
        p = z
        rz = bb if z is rhs else dot(r, z)  # from x = 0 without a preconditioner: r = z = b
        rr = rz if plain else dot(r, r)  # squared residual norms, per system
        # Squared residual norms below this multiple of ‖b‖² are rounding noise.
        rounding2 = (ROUNDING_FACTOR * torch.finfo(working_dtype(rhs.dtype)).eps) ** 2
        book: Union[_HostBook, _DeviceBook] = (
            (_ScalarBook if scalar else _HostBook)(x, bb, rr, rz, tol**2, rounding2) if host
            else _DeviceBook(x, rr, rz, tol**2 * bb, rounding2 * bb, every == 1 and not defer, defer))
        status, used, step, p_index = None, 0, 0, 1  # p_index: the iteration whose direction p is
        ap = p
        finished = not defer and book.all_done()
        while not finished and used < self.maxiter:
            step += 1
            ap = op(p)
            used += 1
            pap = dot(p, ap)
            if recycler is not None:
                recycler.record(p, ap, pap)
            # A system leaves the batch when it converged, met a direction of non-positive
            # curvature (the step along it is not taken) or diverged; the others go on.
            alpha = book.step_size(step, pap)
            if isinstance(book, _DeviceBook) and defer:
                book.classify(p, ap)
            x_new = _axpy(x, alpha, p)
            if step % self.RESIDUAL_EVERY == 0 and used < self.maxiter:
                # The recursion r ← r − α A p drifts from b − A x over long runs.
                r_new = book.moving(rhs - op(x_new), r)
                used += 1
            else:
                r_new = _axpy(r, alpha, ap, -1.0)
            z_new = r_new if plain else prec(r_new)
            rz_new = dot(r_new, z_new)
            rr = rz_new if plain else dot(r_new, r_new)
            p_index = step
            check = not defer and (step % every == 0 or used >= self.maxiter)
            # The book may keep a system's previous x, r, z (a step it decided not to take).
            (x, r, z, rz_new), verdict = book.after_step(step, (x, r, z), (x_new, r_new, z_new), rr, rz_new, check)
            if verdict == "nonfinite":
                status = "nonfinite"
                break
            if book.giant_step:
                # A giant step along a direction of tiny positive curvature; checked in the
                # iteration it happened, that direction is still at hand.
                book.mark_null_steps(op, p, ap)
            if verdict == "finished":
                break
            # A system out of the batch keeps x, r, z, so β = 1 for it: p moves by z.
            p = _axpy(z, book.beta(rz_new), p)
            p_index = step + 1
        best_x, relative = book.best(bb)
        if isinstance(book, _DeviceBook) and defer:
            best_x, flags = book.deferred(best_x)
            # The device bookkeeping's relative residuals stay on the device.
            return unpack(best_x), LinearSolveInfo.deferred(cast(torch.Tensor, relative), tol, flags=flags,
                                                            iterations=used, solver=type(self).__name__)
        if status is None:
            status, products = book.status(op, p, z, p_index, ap)
            used += products
        if recycler is not None:
            recycler.finish()
        return unpack(best_x), self._finish(used, relative, tol, status)


def vecdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner product of each row (system) of two ``(systems, unknowns)`` matrices."""
    return torch.linalg.vecdot(a, b)


#: From this many unknowns on, one system's inner products are matrix products.
_ROW_DOT_SIZE = 2048


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`vecdot` of one system (``(1, unknowns)`` matrices) by a ``1 × 1`` matrix
    product, which makes no product vector: 20 µs against 32 µs for 84,000 float64
    unknowns on one CPU thread, 3.1 against 2.4 µs for 400 (hence :data:`_ROW_DOT_SIZE`)."""
    return torch.mm(a, b.mT).view(1)


def _axpy(y: torch.Tensor, a: Union[float, torch.Tensor], x: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """``y + sign·a·x``: ``a`` a Python number (one system) or a column of one per system."""
    if isinstance(a, float):
        return torch.add(y, x, alpha=sign * a)
    return torch.addcmul(y, a, x, value=sign)


def _null_directions(op: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor, ap: Optional[torch.Tensor],
                     z: torch.Tensor, lag: torch.Tensor, peak: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Tells a singular matrix from an indefinite one when CG met ``pᵀAp ≤ 0``.

    For positive semidefinite ``A``, ``‖Ap‖² ≤ ‖A‖ pᵀAp``: a direction of zero curvature
    is a null vector, ``Ap = 0``. So a direction with ``pᵀAp`` clearly below zero, or
    with ``pᵀAp ≈ 0`` but ``Ap`` far from zero, proves ``A`` indefinite
    (``"negative_curvature"``); one with ``‖Ap‖ ≈ 0`` relative to ``‖A‖ ‖p‖`` is a
    numerical null vector: ``A`` is singular (``"singular"``). ``‖A‖`` is estimated from
    below by ``peak``, the largest ``pᵀAp / ‖r‖²`` met.

    The direction itself is not kept: after a system stopped, its ``x``, ``r`` and ``z`` are
    frozen and ``β = 1``, so ``p`` has moved by ``z`` per iteration since; the direction
    ``lag`` iterations back is ``p − lag·z``, and one more product gives its ``A p``.
    Returns, per system, whether that direction is a null vector, and the products spent.
    """
    products = 0
    if ap is None or bool((lag != 0).any()):
        p = torch.addcmul(p, -lag.unsqueeze(-1), z)
        ap, products = op(p), 1
    return _null_vectors(p, ap, peak), products


def _null_vectors(p: torch.Tensor, ap: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Per system, whether the direction ``p`` of non-positive curvature is a numerical
    null vector of ``A`` (see :func:`_null_directions`)."""
    pp, pap, apap = vecdot(p, p), vecdot(p, ap), vecdot(ap, ap)
    scale = torch.maximum(peak, safe_div(apap, pp).sqrt())
    delta = 32 * torch.finfo(working_dtype(p.dtype)).eps
    clearly_negative = pap < -delta * scale * pp
    annihilated = apap <= delta * scale.square() * pp
    return annihilated & ~clearly_negative


def _ending(negative: bool, diverging: bool, stopped: bool) -> Optional[str]:
    """The status of a CG in which some systems left the batch early."""
    if not stopped:
        return None
    return "negative_curvature" if negative else "diverging" if diverging else "singular"


class _Book:
    """The per-system scalars of CG and the decisions taken on them (see ``HOST_SYSTEMS``).

    ``step_size`` gives ``α`` (0 for a system out of the batch, or one whose direction has
    non-positive curvature, which then leaves it); ``after_step`` records the residuals of
    the new iterate, keeps the best iterate per system and says whether to stop; ``beta``
    gives ``β``; ``status`` names how systems that left early ended; ``best`` returns the
    iterate of lowest residual per system (the initial guess included) and its residual
    relative to ``‖b‖``.
    """

    #: Whether the last iteration had a system diverge by a giant step (classified at once).
    giant_step = False


class _HostBook(_Book):
    """Per-system scalars as Python numbers, read by the host once per iteration.

    The step sizes are computed on the device from the previous iteration's ``rᵀz`` (all of
    them, or only the active systems' when some left the batch); the read after the update
    returns ``pᵀAp`` and the new ``rᵀr`` together, and a system whose direction had
    non-positive curvature gets its previous ``x``, ``r``, ``z`` back: the step is not taken.
    """

    def __init__(self, x, bb, rr, rz, tol2: float, rounding2: float):
        self.like = rr
        self._start(x, rz, *self._initial(bb, rr, rz, tol2, rounding2))

    @staticmethod
    def _initial(bb, rr, rz, tol2, rounding2):
        """``rᵀr``, ``rᵀz``, the convergence thresholds ``tol²‖b‖²`` and the rounding levels
        ``rounding2·‖b‖²`` per system, read at once."""
        return torch.stack([rr, rz, tol2 * bb, rounding2 * bb]).tolist()

    def _start(self, x, rz, rr_l, rz_l, thr_l, floor_l):
        self.rr, self.rz, self.threshold2, self.floor2 = rr_l, rz_l, thr_l, floor_l
        self.rz_t = rz
        n = len(rr_l)
        self.best_x, self.best_rr = x, list(rr_l)
        # A system whose values are not finite leaves the batch; the solve ends "nonfinite".
        self.nonfinite = not all(math.isfinite(v) for v in rr_l)
        self.done = [v <= t or not math.isfinite(v) for v, t in zip(rr_l, thr_l)]
        self.negative, self.diverged, self.null = [False] * n, [False] * n, [False] * n
        self.peak, self.flip = [0.0] * n, [0] * n
        self.current = [True] * n  # best_x's row is x's row
        self.grew = [False] * n
        self._active_mask()

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=self.like.dtype, device=self.like.device)

    def _active_mask(self) -> None:
        self.active = None if not any(self.done) else ~self._tensor(self.done).bool()

    def all_done(self) -> bool:
        return all(self.done)

    def step_size(self, step, pap):
        self.pap, self.step = pap, step
        alpha = self.rz_t / pap
        if self.active is not None:
            alpha = torch.where(self.active, alpha, 0.0)
        return alpha.unsqueeze(-1)

    def moving(self, fresh, old):
        return fresh if self.active is None else torch.where(self.active.unsqueeze(-1), fresh, old)

    def _read(self, rr, rz):
        """``pᵀAp``, ``rᵀr`` and ``rᵀz`` of the step, per system, read at once."""
        plain = rz is rr
        read = torch.stack([self.pap, rr] if plain else [self.pap, rr, rz]).tolist()
        return read[0], read[1], read[1] if plain else read[2]

    def after_step(self, step, old, new, rr, rz, check):
        pap_l, rr_l, rz_l = self._read(rr, rz)
        n = len(rr_l)
        improved, kept = [False] * n, [False] * n
        membership = False
        for i in range(n):
            self.grew[i] = False
            if self.done[i]:
                kept[i] = True
                continue
            curv, v = pap_l[i], rr_l[i]
            if curv <= 0:  # the step along a direction of non-positive curvature is not taken
                kept[i] = self.done[i] = self.negative[i] = membership = True
                self.flip[i] = self.step
                continue
            self.peak[i] = max(self.peak[i], curv / self.rr[i])
            if not (math.isfinite(v) and math.isfinite(rz_l[i])):
                self.done[i] = self.nonfinite = membership = True
                self.current[i] = False
                continue
            if v > DIVERGENCE_FACTOR**2 * self.best_rr[i] and v > self.floor2[i]:
                self.grew[i] = self.diverged[i] = self.done[i] = membership = True
            if v < self.best_rr[i]:
                self.best_rr[i], improved[i] = v, True
            self.current[i] = improved[i]
            if v <= self.threshold2[i]:
                self.done[i] = membership = True
        rz_t = rz
        if any(kept) and not all(kept):
            undo = self._tensor(kept).bool()
            new = tuple(torch.where(undo.unsqueeze(-1), o, t) for o, t in zip(old, new))
            rz_t = torch.where(undo, self.rz_t, rz)
        elif all(kept):
            new, rz_t = old, self.rz_t
        x = new[0]
        if all(self.current):
            self.best_x = x
        elif any(improved):
            self.best_x = torch.where(self._tensor(improved).bool().unsqueeze(-1), x, self.best_x)
        self.rz_new = [o if k else v for o, v, k in zip(self.rz, rz_l, kept)]
        self.rr = [o if k else v for o, v, k in zip(self.rr, rr_l, kept)]
        self.rz_t_new = rz_t
        if membership:
            self._active_mask()
        self.giant_step = any(self.grew)
        return (*new, rz_t), ("finished" if all(self.done) else None)

    def mark_null_steps(self, op, p, ap):
        null, _ = _null_directions(op, p, ap, p, torch.zeros_like(self.like), self._tensor(self.peak))
        self.null = [n or (g and bool(f)) for n, g, f in zip(self.null, self.grew, null.tolist())]

    def beta(self, rz):
        # β = 1 for a system out of the batch (its r and z are frozen: p moves by z).
        if self.active is None and all(v != 0 for v in self.rz):
            beta = rz / self.rz_t
        else:
            beta = self._tensor([1.0 if done else new / old if old != 0 else 0.0
                                 for new, old, done in zip(self.rz_new, self.rz, self.done)])
        self.rz, self.rz_t = self.rz_new, self.rz_t_new
        return beta.unsqueeze(-1)

    def status(self, op, p, z, p_index, ap):
        if self.nonfinite:
            return "nonfinite", 0
        stopped = [n or d for n, d in zip(self.negative, self.diverged)]
        if not any(stopped):
            return None, 0
        singular, products = [False] * len(stopped), 0
        if any(self.negative):
            lag = self._tensor([float(p_index - f) for f in self.flip])
            flags, products = _null_directions(op, p, ap, z, lag, self._tensor(self.peak))
            singular = flags.tolist()
        negative = any(n and not s for n, s in zip(self.negative, singular))
        diverging = any(d and not n and not u for d, n, u in zip(self.diverged, self.negative, self.null))
        return _ending(negative, diverging, True), products

    def best(self, bb):
        return self.best_x, safe_div(self._tensor(self.best_rr).clamp_min(0).sqrt(), bb.sqrt())


class _ScalarBook(_HostBook):
    """One system: ``pᵀAp`` is read before the step, so that ``α`` and ``β`` are Python
    numbers and each update is one ``torch.add`` (two reads per iteration, each a load on
    the CPU, instead of one read and four more tensor operations). The decisions are
    :class:`_HostBook`'s; a step that would not be taken (the system is done, or its
    direction has non-positive curvature) gets ``α = 0``, NaN goes through."""

    def _initial(self, bb, rr, rz, tol2, rounding2):
        # From x = 0 without a preconditioner r = z = b: one number to read.
        read = [bb.item()] * 3 if rr is bb and rz is bb else torch.stack([bb, rr, rz]).reshape(3).tolist()
        self.bb = read[0]  # ‖b‖², for the relative residual of best()
        return read[1:2], read[2:3], [tol2 * read[0]], [rounding2 * read[0]]

    def _active_mask(self) -> None:
        self.active = None  # one system: the decisions read self.done

    def moving(self, fresh, old):
        return old if self.done[0] else fresh

    def after_step(self, step, old, new, rr, rz, check):
        # _HostBook.after_step for one system, on Python numbers.
        curv = self.pap_l[0]
        v = rr.item()
        w = v if rz is rr else rz.item()
        self.grew[0] = grew = kept = improved = False
        if self.done[0]:
            kept = True
        elif curv <= 0:  # the step along a direction of non-positive curvature is not taken
            kept = self.done[0] = self.negative[0] = True
            self.flip[0] = self.step
        else:
            self.peak[0] = max(self.peak[0], curv / self.rr[0])
            if not (math.isfinite(v) and math.isfinite(w)):
                self.done[0] = self.nonfinite = True
                self.current[0] = False
            else:
                if v > DIVERGENCE_FACTOR**2 * self.best_rr[0] and v > self.floor2[0]:
                    grew = self.grew[0] = self.diverged[0] = self.done[0] = True
                if v < self.best_rr[0]:
                    self.best_rr[0], improved = v, True
                self.current[0] = improved
                if v <= self.threshold2[0]:
                    self.done[0] = True
        if kept:
            new, rz = old, self.rz_t
        if self.current[0]:
            self.best_x = new[0]
        self.rz_new = self.rz if kept else [w]
        if not kept:
            self.rr = [v]
        self.rz_t_new = rz
        self.giant_step = grew
        return (*new, rz), ("finished" if self.done[0] else None)

    def best(self, bb):
        rr = max(self.best_rr[0], 0.0)
        return self.best_x, math.sqrt(rr) / math.sqrt(self.bb) if self.bb != 0 else 0.0

    def step_size(self, step, pap):
        self.step = step
        curvature = pap.item()
        self.pap_l = [curvature]
        if self.done[0] or curvature <= 0:
            return 0.0
        return self.rz[0] / curvature if curvature != math.inf else 0.0

    def _read(self, rr, rz):
        rr_l = [rr.item()]
        return self.pap_l, rr_l, rr_l if rz is rr else [rz.item()]

    def beta(self, rz):
        new, old = self.rz_new[0], self.rz[0]
        self.rz, self.rz_t = self.rz_new, self.rz_t_new
        # β = 1 for a system out of the batch (its r and z are frozen: p moves by z).
        return 1.0 if self.done[0] else new / old if old != 0 else 0.0


class _DeviceBook(_Book):
    """Per-system scalars as tensors on the device, read every ``check_every`` iterations."""

    def __init__(self, x, rr, rz, threshold2, floor2, every_one: bool = False, defer: bool = False):
        self.every_one, self.defer = every_one, defer
        self.threshold2, self.floor2 = threshold2, floor2
        self.rr, self.rz = rr, rz
        self.best_x, self.best_rr = x, rr
        self.done = rr <= threshold2
        self.negative = self.diverged = self.null = torch.zeros_like(self.done)
        self.peak = torch.zeros_like(rr)
        self.flip = torch.zeros_like(rr)
        if defer:
            # The systems that met NaN/Inf, and those whose direction of non-positive
            # curvature was a null vector.
            self.nonfinite = ~torch.isfinite(rr)
            self.singular = torch.zeros_like(self.done)

    def all_done(self) -> bool:
        return bool(self.done.all())

    def step_size(self, step, pap):
        self.active = ~self.done
        bad = self.active & (pap <= 0)
        self.flipped = bad
        good = self.active & ~bad  # NaN moves on, and is caught at the next check
        self.done = self.done | bad
        self.negative = self.negative | bad
        self.flip = torch.where(bad, float(step), self.flip)
        self.peak = torch.maximum(self.peak, torch.where(good, pap / self.rr, 0.0))
        return torch.where(good, self.rz / pap, 0.0).unsqueeze(-1)

    def moving(self, fresh, old):
        return torch.where(self.active.unsqueeze(-1), fresh, old)

    def after_step(self, step, old, new, rr, rz, check):
        x = new[0]
        self.grew = self.active & (rr > DIVERGENCE_FACTOR**2 * self.best_rr) & (rr > self.floor2)
        self.diverged = self.diverged | self.grew
        improved = rr < self.best_rr
        self.best_rr = torch.where(improved, rr, self.best_rr)
        self.best_x = torch.where(improved.unsqueeze(-1), x, self.best_x)
        self.done = self.done | self.grew | (rr <= self.threshold2)
        self.rr, self.rz_new = rr, rz
        self.giant_step = False
        if self.defer:
            self.nonfinite = self.nonfinite | ~torch.isfinite(rr)
        if not check:
            return (*new, rz), None
        nonfinite, finished, giant = torch.stack([~torch.isfinite(rr).all(), self.done.all(), self.grew.any()]).tolist()
        if nonfinite:
            return (*new, rz), "nonfinite"
        # A giant step is classified only when checked in the iteration it happened.
        self.giant_step = bool(giant) and self.every_one
        return (*new, rz), ("finished" if finished else None)

    def mark_null_steps(self, op, p, ap):
        null, _ = _null_directions(op, p, ap, p, torch.zeros_like(self.peak), self.peak)
        self.null = self.null | (self.grew & null)

    def beta(self, rz):
        beta = torch.where(self.rz != 0, rz / self.rz, 0.0)
        self.rz = rz
        return beta.unsqueeze(-1)

    def status(self, op, p, z, p_index, ap):
        stopped = self.negative | self.diverged
        any_negative, any_stopped = torch.stack([self.negative.any(), stopped.any()]).tolist()
        if not any_stopped:
            return None, 0
        singular, products = torch.zeros_like(self.negative), 0
        if any_negative:
            singular, products = _null_directions(op, p, ap, z, float(p_index) - self.flip, self.peak)
        negative = bool((self.negative & ~singular).any())
        diverging = bool((self.diverged & ~self.negative & ~self.null).any())
        return _ending(negative, diverging, True), products

    def best(self, bb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.best_x, safe_div(self.best_rr.clamp_min(0).sqrt(), bb.sqrt())

    def classify(self, p, ap):
        """Deferred checks: whether each direction that just met ``pᵀAp ≤ 0`` is a null
        vector, decided while ``p`` and ``Ap`` are at hand (no product after the solve)."""
        self.singular = self.singular | (self.flipped & _null_vectors(p, ap, self.peak))

    def deferred(self, best_x):
        """Deferred checks: ``best_x`` with NaN for the systems that met NaN/Inf, and the
        flags of :meth:`LinearSolveInfo.deferred`, which name the statuses as :meth:`status`
        and :func:`_ending` would (without the null test of a giant step)."""
        x = torch.where(self.nonfinite.unsqueeze(-1), torch.full_like(best_x, math.nan), best_x)
        flags = [(Status.NONFINITE, self.nonfinite), (Status.NEGATIVE_CURVATURE, self.negative & ~self.singular),
                 (Status.DIVERGING, self.diverged & ~self.negative), (Status.SINGULAR, self.negative | self.diverged)]
        return x, flags
