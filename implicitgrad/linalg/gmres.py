"""Restarted GMRES for general (non-symmetric) systems."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .._compat import host_readable
from .._diagnostics import LinearSolveInfo
from ._base import IterativeSolver, Matvec, PytreeLayout, Vector, packing


class GMRES(IterativeSolver):
    r"""Restarted GMRES(m) for ``A x = b`` with any non-singular ``A``.

    Each cycle builds an orthonormal basis :math:`V_k` of the Krylov space
    :math:`\mathcal{K}_k(A, r_0)` by Arnoldi, :math:`A V_k = V_{k+1} \bar H_k` with
    :math:`\bar H_k` upper Hessenberg, and takes the vector of smallest residual in it,

    .. math::

        x = x_0 + V_k y, \qquad y = \arg\min_y \|\beta e_1 - \bar H_k y\|, \qquad
        \beta = \|r_0\| .

    The orthogonalisation is classical Gram-Schmidt with one re-orthogonalisation, as block
    products with the basis. Each new column of :math:`\bar H_k` is reduced by one Givens
    rotation as it arrives, :math:`\Omega_k \bar H_k = [R_k; 0]`, and the rotated
    right-hand side :math:`g = \beta\,\Omega_k e_1` gives the residual norm of the
    minimiser for free, :math:`\|b - A x_k\| = |g_{k+1}|`: a step costs one ``matvec``
    and :math:`O(k)` vector work, and :math:`R_k y = g_{1:k}` is solved once, when the
    cycle ends. Suited to the Jacobians of :func:`~implicitgrad.root_solve` and
    :func:`~implicitgrad.fixed_point_solve`, which are not symmetric.

    **Cost.** One system on the CPU checked every step (``check_every=1``, the CPU default)
    keeps its bookkeeping on the host (``HOST_BOOKKEEPING``): a step is its ``matvec``, the product
    shifted by :math:`\sigma = v_0^T A v_0` (same Krylov space) and stored in the basis,
    one product with the basis that gives the Gram-Schmidt coefficients and
    :math:`\|w\|^2`, read at once, and the new basis vector in one more operation; the
    second pass runs only when the first cancels more than half of :math:`\|w\|^2`
    (Daniel et al.), which the shift makes rare on matrices near a multiple of the
    identity, the Jacobians of contractive fixed points. The rotations and the triangular
    solve work on Python numbers. On a DEQ backward of 2,048 unknowns whose product takes
    0.04–0.07 ms on a CPU, the solve takes 2.3× the time of its products alone (3.8–4.0×
    with the bookkeeping on the device): the operations of a step cost about 20 µs
    measured alone, more when each runs after a product, so that 1.3× is out of reach in
    eager PyTorch for a product that small. With 2,000 unknowns and a 2 ms product it is
    1.1–1.2×. Several systems (``batch_ndim > 0``) or a check every few steps keep the
    bookkeeping on the device as batched tensors, about twenty small operations per step:
    4.5–4.7× the products on the same DEQ backward solved per sample. The basis and the
    Hessenberg matrix are allocated once per solve and written in place.

    **Budget.** ``maxiter`` bounds every ``matvec`` call of the solve: the Arnoldi steps
    of all cycles, the product that measures the true residual :math:`b - A x` after each
    cycle (which also starts the next cycle), and the initial residual when ``init`` is
    given. A cycle gets ``min(restart, remaining budget − 1)`` steps, so that its true
    residual can still be measured; ``info.iterations`` counts all products.

    **Per-system convergence.** With ``batch_ndim > 0`` each system of the batch has its
    own basis, rotations and stopping rule :math:`\|r_i\| \le \text{tol}\,\|b_i\|`: a
    system stops taking steps into its solution at the first step that meets it (the
    others go on), and a system whose measured residual meets it is not restarted. The
    reported residual is the largest measured :math:`\|b_i - A x_i\| / \|b_i\|`.

    **Gradients.** GMRES writes its basis in place, so autograd cannot follow its
    iterations: with grad mode on, a right-hand side, start or product that requires grad is
    refused with an error. The implicit solves differentiate their linear systems without
    unrolling; ``ig.BiCGStab`` and ``ig.CG`` can be unrolled by autograd. Half precision
    (float16, bfloat16) keeps its bookkeeping on the device path, with the small triangular
    solve of a cycle in float32.

    An exact breakdown of Arnoldi (the Krylov space is invariant) solves a non-singular
    system (a lucky breakdown: status ``"converged"``). Statuses: ``"converged"``,
    ``"max_iterations"``, ``"nonfinite"`` (the solution of that system is NaN) and
    ``"breakdown"`` (a cycle ended on an invariant subspace without reducing the measured
    residual: ``A`` is singular, or nearly, and ``b`` is not in its range).

    Args:
        maxiter: total number of ``matvec`` calls (see Budget).
        restart: Krylov dimension ``m`` of a cycle (memory: ``m + 1`` vectors).
        tol: relative residual to reach; ``None``: 1e-10 (float64), 1e-5 (float32).
        check_every: Arnoldi steps between host-synchronising checks (``None``: 1 on
            CPU, 10 elsewhere); a cycle always ends with a check. With 1, a single system
            keeps its bookkeeping on the host (see Cost).

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> x, info = ig.GMRES()(lambda v: A @ v, b)
        >>> info.converged, info.iterations, torch.allclose(A @ x, b)
        (True, 3, True)

    References:
        Saad and Schultz, GMRES: A Generalized Minimal Residual Algorithm for Solving
        Nonsymmetric Linear Systems, 1986. Daniel, Gragg, Kaufman and Stewart,
        Reorthogonalization and Stable Algorithms for Updating the Gram-Schmidt QR
        Factorization, 1976. Parlett, The Symmetric Eigenvalue Problem, 1980 (Kahan's
        "twice is enough"). Giraud, Langou and Rozložník, The loss of orthogonality in the
        Gram-Schmidt orthogonalization process, 2005.
    """

    def __init__(
        self,
        maxiter: int = 100,
        restart: int = 20,
        tol: Optional[float] = None,
        check_every: Optional[int] = None,
    ) -> None:
        if int(restart) < 1:
            raise ValueError(f"GMRES: restart must be a positive integer, got {restart!r}.")
        super().__init__(maxiter, tol, check_every)
        self.restart = int(restart)

    #: One system checked every step (``check_every=1``, the CPU default) keeps its
    #: bookkeeping on the host: the Gram-Schmidt coefficients are read each step and the
    #: rotations, the residual estimate and the small triangular solve are done on Python
    #: numbers (see Cost). Several systems, a check every few steps, or a device other
    #: than the CPU (where each read would be a synchronisation) keep it on the device as
    #: batched tensors read once per check.
    HOST_BOOKKEEPING = True

    def __repr__(self) -> str:
        return f"GMRES(maxiter={self.maxiter}, restart={self.restart}, tol={self.tol})"

    def solve_leaves(
        self,
        matvec: Matvec,
        b: Vector,
        *,
        init: Optional[Vector] = None,
        batch_ndim: int = 0,
        layout: Optional[PytreeLayout] = None,
    ) -> Tuple[Vector, LinearSolveInfo]:
        tol, every = self._tolerances(b)
        if torch.is_grad_enabled():
            matvec = _no_graph(matvec, b, init)
        system = Packed(matvec, b, init, batch_ndim, tol, flags=False)
        rhs = system.rhs
        # On the CPU a read is a load from memory; on a GPU it would be a synchronisation
        # per step (two when the second pass runs), so there the scalars stay on the device.
        # Half precision stays on the device path, whose products with the basis accumulate in
        # float32 (the host path's rounding of each step's coefficients loses a few digits).
        if (self.HOST_BOOKKEEPING and every == 1 and rhs.shape[0] == 1 and rhs.dtype.is_floating_point
                and rhs.element_size() >= 4 and rhs.device.type == "cpu" and host_readable(rhs)):
            return self._solve_host(system, tol)
        return self._solve_device(system, tol, every)

    def _solve_host(self, system: Packed, tol: float) -> Tuple[Vector, LinearSolveInfo]:
        """One system, its scalars on the host: the same decisions as :meth:`_solve_device`."""
        op, rhs, x, r, used = system.op, system.rhs, system.x, system.r, system.used
        b_norm, r_norm = system.host_norms()
        threshold = tol * b_norm
        tiny = torch.finfo(rhs.dtype).tiny
        nonfinite, broken, arnoldi = not math.isfinite(r_norm), False, None
        done = r_norm <= threshold
        try:
            while True:
                steps = min(self.restart, self.maxiter - used - 1)
                if steps < 1 or done or broken or nonfinite:
                    break
                if arnoldi is None:
                    arnoldi = _HostArnoldi(op, rhs, min(self.restart, self.maxiter))
                x, taken, invariant = arnoldi.cycle(r, r_norm, max(threshold, tiny), x, steps)
                used += taken + 1
                r = rhs - op(x)
                new_norm = float(torch.linalg.vector_norm(r))
                nonfinite = not math.isfinite(new_norm)
                broken = invariant and new_norm > threshold and new_norm >= r_norm
                done, r_norm = new_norm <= threshold, new_norm
        finally:
            if arnoldi is not None:
                arnoldi.rows.give_back()
        status = "nonfinite" if nonfinite else "breakdown" if broken else None
        if nonfinite:
            x = torch.full_like(x, math.nan)
        relative = r_norm / b_norm if b_norm != 0 else r_norm
        return system.unpack(x), self._finish(used, torch.tensor(relative, dtype=torch.float64), tol, status)

    def _solve_device(self, system: Packed, tol: float, every: int) -> Tuple[Vector, LinearSolveInfo]:
        """Any number of systems, their scalars as tensors read once per check."""
        system.device_state(tol)
        op, rhs, x, r, r_norm, used = system.op, system.rhs, system.x, system.r, system.r_norm, system.used
        threshold, nonfinite, done = system.threshold, system.nonfinite, system.done
        broken = torch.zeros_like(done)
        space = None
        tiny = torch.finfo(rhs.dtype).tiny
        while True:
            steps = min(self.restart, self.maxiter - used - 1)
            stopped = done | broken | nonfinite
            # One host read per cycle: the measured residuals decide.
            if steps < 1 or bool(stopped.all()):
                break
            if space is None:
                space = _Space(rhs, min(self.restart, self.maxiter))
            active = ~stopped
            # A finished system enters the cycle with a zero residual: it takes no step.
            beta = torch.where(active, r_norm, 0.0)
            limit = torch.where(active, threshold.clamp_min(tiny), 1.0)
            update, taken, invariant = _cycle(op, torch.where(active[:, None], r, 0.0), beta, limit, active,
                                              steps, every, space)
            used += taken + 1
            x = x + update
            r = rhs - op(x)
            new_norm = torch.linalg.vector_norm(r, dim=1)
            nonfinite = nonfinite | ~torch.isfinite(new_norm)
            # A cycle that ends on an invariant Krylov subspace without reducing the
            # residual at all: b has a component outside the range of A.
            broken = broken | (active & invariant & (new_norm > threshold) & (new_norm >= r_norm))
            done = done | (new_norm <= threshold)
            r_norm = new_norm
        x, status = system.outcome(x, nonfinite, broken)
        return system.unpack(x), self._finish(used, system.relative(r_norm), tol, status)


def _no_graph(matvec: Matvec, b: Vector, init: Optional[Vector]) -> Matvec:
    """``matvec``, refusing (with the ways out) what GMRES cannot differentiate: a right-hand
    side, start or product that requires grad while grad mode is on. GMRES writes its basis
    and Hessenberg matrix in place, so autograd cannot follow its iterations."""
    advice = ("GMRES writes its Krylov basis in place and does not backpropagate through its "
              "iterations. To differentiate x = A⁻¹b, solve implicitly (ig.implicit_solve, "
              "ig.root_solve and ig.fixed_point_solve differentiate their linear systems without "
              "unrolling), or call the solver under torch.no_grad() on detached inputs, or use "
              "ig.BiCGStab or ig.CG, whose iterations autograd follows.")
    for name, value in (("b", b), ("init", init)):
        if value is not None and any(t.requires_grad for t in value):
            raise RuntimeError(f"GMRES: {name} requires grad. {advice}")
    checked = False

    def product(v: Vector) -> Vector:
        nonlocal checked
        out = matvec(v)
        if not checked:
            if any(t.requires_grad for t in out):
                raise RuntimeError("GMRES: the matvec's output requires grad (it depends on tensors "
                                   f"that require grad, with grad mode on). {advice}")
            checked = True
        return out

    return product


class Packed:
    """A solve on one ``(systems, unknowns)`` matrix (see :func:`._base.packing`): the
    packed right-hand side, its norms and per-system thresholds ``tol ‖b_i‖``, and the
    start ``x`` (``init`` or 0) with its residual (one product when ``init`` is given,
    counted in ``used``)."""

    def __init__(self, matvec: Matvec, b: Vector, init: Optional[Vector], batch_ndim: int, tol: float,
                 flags: bool = True) -> None:
        self.matvec = matvec
        self.pack, self.unpack = packing(b, batch_ndim)
        self.rhs = self.pack(b)
        if init is None:
            self.x, self.r, self.used = torch.zeros_like(self.rhs), self.rhs, 0
        else:
            self.x = self.pack(init).clone()
            self.r, self.used = self.rhs - self.op(self.x), 1
        if flags:
            self.device_state(tol)

    def device_state(self, tol: float) -> None:
        """The norms ``‖b_i‖``, ``‖r_i‖``, thresholds and flags (``nonfinite``, ``done``) per
        system, as tensors (made at construction unless ``flags=False``)."""
        self.b_norm = torch.linalg.vector_norm(self.rhs, dim=1)
        self.threshold = tol * self.b_norm
        self.r_norm = torch.linalg.vector_norm(self.r, dim=1)
        self.nonfinite = ~torch.isfinite(self.r_norm)
        self.done = self.r_norm <= self.threshold

    def host_norms(self) -> Tuple[float, float]:
        """``‖b‖`` and ``‖r‖`` of a single system, read by the host."""
        if self.r is self.rhs:
            b_norm = float(torch.linalg.vector_norm(self.rhs))
            return b_norm, b_norm
        b_norm, r_norm = torch.linalg.vector_norm(torch.cat([self.rhs, self.r]), dim=1).tolist()
        return b_norm, r_norm

    def op(self, v: torch.Tensor) -> torch.Tensor:
        """The product on packed vectors."""
        return self.pack(self.matvec(self.unpack(v)))

    def relative(self, r_norm: torch.Tensor) -> torch.Tensor:
        """``‖r_i‖ / ‖b_i‖`` (``‖r_i‖`` where ``b_i = 0``)."""
        return r_norm / torch.where(self.b_norm == 0, torch.ones_like(self.b_norm), self.b_norm)

    @staticmethod
    def outcome(x: torch.Tensor, nonfinite: torch.Tensor, broken: torch.Tensor) -> Tuple[torch.Tensor, Optional[str]]:
        """``x`` with NaN in the systems that met NaN/Inf, and the status they call for
        (``None``: derived from the residual)."""
        any_nonfinite, any_broken = torch.stack([nonfinite.any(), broken.any()]).tolist()
        if any_nonfinite:
            return torch.where(nonfinite[:, None], torch.full_like(x, math.nan), x), "nonfinite"
        return x, "breakdown" if any_broken else None


def _cycle(op, r, beta, limit, active, steps: int, every: int, space: _Space):
    """One Arnoldi cycle from the residuals ``r`` (``(systems, n)``, norms ``beta``).

    A system stops taking steps into its correction at the first step whose residual
    estimate reaches ``limit`` (its tolerance × ‖b‖); the checks read only the ``active``
    systems. Returns the correction of ``x``, the number of steps (products) taken, and per
    system whether Arnoldi met a (numerically) invariant subspace.
    """
    dtype = r.dtype
    # ‖w‖ + tiny keeps every division finite: a zero vector (an exact breakdown, or a
    # system that entered the cycle solved) stays zero, and its rotation leaves the
    # residual estimate unchanged.
    tiny = torch.finfo(dtype).tiny
    # The products act on a fresh vector whose copy is in the basis: an in-place matvec
    # cannot corrupt the basis.
    vector = r / (beta + tiny)[:, None]
    space.basis[:, 0] = vector
    space.hess.zero_()
    # rows[j] is row j of the product of the rotations met before step j (zero beyond
    # entry j); its dot with column j of the Hessenberg matrix is the entry the next
    # rotation acts on. The residual after j steps is β |rows[j][0]| = β ∏ sines.
    rows = [space.first_row]
    subdiagonal, cosines, sines, estimates = [], [], [], []
    # ‖r‖ / (tol ‖b‖) for the active systems (1: converged), 0 for the others (β = 0): the
    # checks read only active systems (a finished one may carry NaN it no longer uses).
    estimate = (beta / limit).unsqueeze(1)
    for j in range(steps):
        known, known_t, column, hess_row, new_row, minus_unit = space.views(j)
        # Classical Gram-Schmidt twice: two block products with the basis per pass; the
        # coefficients accumulate in column j of the Hessenberg matrix (row j of hess).
        w = op(vector).unsqueeze(1)
        torch.bmm(w, known_t, out=column)
        w = torch.baddbmm(w, column, known, alpha=-1)
        again = torch.bmm(w, known_t)
        w = torch.baddbmm(w, again, known, alpha=-1)
        column.add_(again)
        w_norm = torch.linalg.vector_norm(w, dim=2).add_(tiny)
        vector = w.squeeze(1) / w_norm
        new_row.copy_(vector)
        # The reflection [[c, s], [s, −c]] maps (row · column, ‖w‖) to (‖·‖, 0); the
        # Hessenberg row is zero beyond the column's end, so the full-length dot is exact.
        row = rows[j]
        diagonal = torch.linalg.vecdot(row, hess_row).unsqueeze(1)
        radius = torch.hypot(diagonal, w_norm)
        cosine, sine = diagonal / radius, w_norm / radius
        rows.append(torch.addcmul(row * sine, cosine, minus_unit))
        subdiagonal.append(w_norm)
        cosines.append(cosine)
        sines.append(sine)
        estimate = estimate * sine
        estimates.append(estimate)
        if (j + 1) % every == 0:
            # NaN fails the comparison and ends the cycle: the measured residual reports it.
            if not float(estimate if space.single else estimate.max()) > 1.0:
                break
    k = len(sines)
    cosine, sine, below, reached = (torch.cat(parts, dim=1) for parts in (cosines, sines, subdiagonal, estimates))
    products = torch.stack(rows, dim=1)[:, :, : k + 1]
    # Row j of the product of all rotations is (c_j · rows[j], s_j) on its first j + 2
    # entries; times the Hessenberg matrix it gives the triangular factor R.
    omega = products[:, :k] * cosine.unsqueeze(2)
    omega.diagonal(offset=1, dim1=1, dim2=2).copy_(sine)
    hess_t = space.hess[:, :k, : k + 1]
    hess_t.diagonal(offset=1, dim1=1, dim2=2).copy_(below)
    upper = torch.bmm(omega, hess_t.mT)
    g = beta[:, None] * omega[:, :, 0]
    # Relative to ‖A v_j‖ (the norm of column j of the Hessenberg matrix): a new basis
    # vector that vanishes means the Krylov space is invariant; a pivot of R that
    # vanishes means A is singular on it, and the directions from there on are dropped
    # (they would only add a null-space component of any size).
    floor = 100 * torch.finfo(dtype).eps * torch.linalg.vector_norm(hess_t, dim=2) + 2 * tiny
    degenerate = upper.diagonal(dim1=1, dim2=2).abs() <= floor
    invariant = ((below <= floor) | degenerate).any(dim=1)
    # Each system keeps the steps up to the first that met its tolerance, and those before
    # the first degenerate pivot.
    stop = torch.nn.functional.pad(reached[:, :-1] <= 1.0, (1, 0)) | degenerate
    keep = stop.cumsum(dim=1) == 0
    upper = torch.where(keep[:, :, None] & keep[:, None, :], upper, space.identity[:k, :k])
    g = torch.where(keep, g, 0.0)
    if upper.element_size() < 4:
        # No triangular solve in half precision on every device: the small k × k system in
        # float32.
        y = torch.linalg.solve_triangular(upper.float(), g.float().unsqueeze(2), upper=True).to(dtype)
    else:
        y = torch.linalg.solve_triangular(upper, g.unsqueeze(2), upper=True)
    update = torch.bmm(y.mT, space.views(k - 1)[0]).squeeze(1)
    return update, k, invariant


class _Space:
    """What every cycle of one solve writes into: the Krylov basis ``(systems, m + 1, n)``
    and the Hessenberg matrix (row ``j`` holds column ``j``); the views step ``j`` works on
    are made at its first use and kept for the later cycles."""

    def __init__(self, rhs: torch.Tensor, size: int) -> None:
        systems, n = rhs.shape
        self.single = systems == 1
        self.basis = rhs.new_empty(systems, size + 1, n)
        self.hess = rhs.new_zeros(systems, size, size + 1)
        self.identity = torch.eye(size + 1, dtype=rhs.dtype, device=rhs.device)
        self.first_row = self.identity[0].expand(systems, -1)
        self.minus_identity = -self.identity
        self._views: List[Tuple[torch.Tensor, ...]] = []

    def views(self, j: int) -> Tuple[torch.Tensor, ...]:
        """Step ``j``'s basis so far, its transpose, its Hessenberg coefficients (as a
        ``(systems, 1, j + 1)`` view and as the full row), the basis vector it writes, and
        minus the unit vector ``e_{j+1}``."""
        if j == len(self._views):
            known = self.basis[:, : j + 1]
            self._views.append((known, known.mT, self.hess[:, j : j + 1, : j + 1], self.hess[:, j],
                                self.basis[:, j + 1], self.minus_identity[j + 1]))
        return self._views[j]


class _HostArnoldi:
    r"""Arnoldi cycles of a single system (``(1, n)`` vectors) whose scalars live on the host;
    the same decisions as :func:`_cycle`, one host read per step.

    Step ``j`` stores ``w = (A - σI) v_j`` as row ``j + 1`` of the basis, and one product with
    rows ``0 … j + 1`` gives the Gram-Schmidt coefficients :math:`h = V_j^T w` and
    :math:`\|w\|^2` together, read at once. With :math:`V_j` orthonormal,
    :math:`\|w - V_j h\|^2 = \|w\|^2 - \|h\|^2`; while that keeps at least half of
    :math:`\|w\|^2`, one pass is orthogonal to working precision and the new basis vector
    :math:`(w - V_j h) / \|w - V_j h\|` is one operation; otherwise the pass is repeated
    (the criterion of Daniel, Gragg, Kaufman and Stewart), and a vector that the second pass
    cancels as well lies in the span of the basis (Kahan and Parlett's "twice is enough").

    The shift :math:`σ = v_0^T A v_0` (zero for the first step of a solve) leaves the Krylov
    space unchanged, :math:`\bar H = \bar H_{A - σI} + σ I`, and removes the component of
    :math:`A v_j` along :math:`v_j`, which for a matrix close to a multiple of the identity
    (the Jacobians of contractive fixed points and of well-conditioned root problems) is
    most of it: without it the first pass would keep about a third of :math:`\|w\|` and
    the second pass would run at every step.

    Each new Hessenberg column is reduced by the earlier rotations and a new one on Python
    numbers, the residual estimate :math:`|g_{j+1}|` is a running product of the sines, and
    the triangular system is solved when the cycle ends. A cycle ends early at an invariant
    subspace, judged against the largest :math:`\|A v_j\|` met (a lower bound of
    :math:`\|A\|`): a remainder or a pivot below :math:`100\,ε` times it is rounding.
    """

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, size: int) -> None:
        self.op = op
        self.rows = _Rows.borrow(rhs, size)
        finfo = torch.finfo(rhs.dtype)
        self.tiny, self.eps = finfo.tiny, finfo.eps
        self.scale = 0.0
        self.shift: Optional[float] = None

    def cycle(self, r: torch.Tensor, beta: float, limit: float, x: torch.Tensor,
              steps: int) -> Tuple[torch.Tensor, int, bool]:
        """Up to ``steps`` steps from the residual ``r`` (norm ``beta``) until the estimate
        reaches ``limit``; returns ``x + V_k y``, the steps taken and whether Arnoldi met an
        invariant subspace."""
        tiny, rows, shift = self.tiny, self.rows, self.shift
        # The products act on a fresh vector whose copy is in the basis (see _cycle).
        vector = r * (1.0 / (beta + tiny))
        rows.first.copy_(vector)
        columns: List[List[float]] = []
        rotations: List[Tuple[float, float]] = []
        g = [beta]
        estimate = beta / limit
        invariant, kept = False, steps
        for j in range(steps):
            row, known_t, known, both, coefficients = rows.views(j)
            if shift is None:
                row.copy_(self.op(vector))
            else:
                torch.sub(self.op(vector), vector, alpha=shift, out=row)
            vector, column, w_norm = _orthogonalise(row, known_t, known, both, coefficients, tiny)
            if shift is None:
                shift = self.shift = column[0] if math.isfinite(column[0]) else 0.0
            else:
                column[j] += shift
            # ‖A v_j‖ = ‖(h, ‖w‖)‖; the product itself is exact only to about ε ‖A‖.
            self.scale = max(self.scale, math.sqrt(sum(v * v for v in column) + w_norm * w_norm))
            floor = 100 * self.eps * self.scale + 2 * tiny
            radius = _rotate(column, rotations, w_norm)
            columns.append(column)
            g.append(rotations[-1][1] * g[j])
            g[j] *= rotations[-1][0]
            if w_norm <= floor or radius <= floor:
                # An invariant subspace: further steps would be rounding. A vanishing pivot
                # (A singular on the space) drops this step, which would only add a
                # null-space component of any size.
                invariant, kept = True, j if radius <= floor else j + 1
                break
            estimate *= rotations[-1][1]
            # NaN fails the comparison and ends the cycle: the measured residual reports it.
            if not estimate > 1.0:
                break
        y = _back_substitution(columns, g, min(len(columns), kept))
        if y:
            x = torch.addmm(x, torch.tensor([y], dtype=x.dtype, device=x.device), rows.basis[: len(y)])
        return x, len(columns), invariant


def _rotate(column: List[float], rotations: List[Tuple[float, float]], below: float) -> float:
    """Reduces a new Hessenberg column (in place; ``below`` is its subdiagonal entry) by the
    earlier reflections and appends the one that zeroes ``below``; returns the new pivot."""
    # The reflection [[c, s], [s, −c]] of step i maps entries (i, i + 1) of the column.
    pending = column[0]
    for i, (cosine, sine) in enumerate(rotations):
        entry = column[i + 1]
        column[i] = cosine * pending + sine * entry
        pending = sine * pending - cosine * entry
    radius = math.hypot(pending, below)
    rotations.append((pending / radius, below / radius))
    column[-1] = radius
    return radius


def _back_substitution(columns: List[List[float]], g: List[float], k: int) -> List[float]:
    """``y`` with ``R y = g`` on the leading ``k × k`` block of the upper triangular ``R``
    given by its columns."""
    y = [0.0] * k
    for i in reversed(range(k)):
        y[i] = (g[i] - sum(columns[m][i] * y[m] for m in range(i + 1, k))) / columns[i][i]
    return y


#: One Gram-Schmidt pass is kept when it leaves at least this fraction of ``‖w‖²``.
_KEPT = 0.5


def _orthogonalise(row: torch.Tensor, known_t: torch.Tensor, known: torch.Tensor, both: torch.Tensor,
                   coefficients: torch.Tensor, tiny: float) -> Tuple[torch.Tensor, List[float], float]:
    """``w`` (in ``row``, the basis row after ``known``) orthogonalised against ``known`` by
    one or two classical Gram-Schmidt passes (see :class:`_HostArnoldi`) and normalised in
    place; returns a fresh copy of that new basis vector, the coefficients ``h`` and the
    norm ``‖w − V h‖ + tiny``. ``both`` receives ``[V, w]ᵀ w`` and ``coefficients`` is its
    view on ``Vᵀ w``."""
    torch.mm(row, known_t, out=both)
    *h, w2 = both.tolist()[0]
    left2 = w2 - sum(v * v for v in h)
    if not left2 >= _KEPT * w2:
        # Cancellation, or NaN (which the measured residual reports): a second pass, whose
        # ‖w‖² is measured by the same product.
        row.addmm_(coefficients, known, alpha=-1)
        torch.mm(row, known_t, out=both)
        *again, w2 = both.tolist()[0]
        h = [a + c for a, c in zip(h, again)]
        left2 = w2 - sum(v * v for v in again)
        if not left2 >= _KEPT * w2:
            # Twice is enough: what a second pass cancels too is rounding, and w lies in the
            # span of the basis (Kahan and Parlett). The new vector is zero: an invariant
            # subspace, like an exact zero of the device path.
            row.zero_()
            return row.clone(), h, tiny
    w_norm = math.sqrt(left2) + tiny
    vector = torch.addmm(row, coefficients, known, beta=1.0 / w_norm, alpha=-1.0 / w_norm)
    row.copy_(vector)
    return vector, h, w_norm


class _Rows:
    """The Krylov basis ``(m + 1, n)`` of a single system solved by :class:`_HostArnoldi`,
    and the views step ``j`` works on (made at its first use and kept for the later cycles).

    Making those views costs about half as much per step as the Gram-Schmidt work on a
    small system (2,048 unknowns), so a small basis (at most ``POOLED_ENTRIES`` entries, where products are cheap)
    is lent to one solve at a time and kept for the next solve of the same shape; the
    last ``POOLED_SHAPES`` shapes are kept.
    """

    POOLED_ENTRIES = 2**18
    POOLED_SHAPES = 4
    _pool: Dict[Tuple[Any, ...], List[_Rows]] = {}

    @classmethod
    def borrow(cls, rhs: torch.Tensor, size: int) -> _Rows:
        """A basis for ``rhs`` (``(1, n)``) of ``size + 1`` rows, from the pool if one is free."""
        key = (size, rhs.shape[1], rhs.dtype, rhs.device)
        try:
            return cls._pool[key].pop()
        except (KeyError, IndexError):
            return cls(rhs, size, key)

    def give_back(self) -> None:
        """Return this basis to the pool (a large one is dropped)."""
        if self.basis.numel() > self.POOLED_ENTRIES:
            return
        pool = type(self)._pool
        spares = pool.pop(self.key, [])
        pool[self.key] = spares  # the shape last used is the last to be dropped
        if not spares:
            spares.append(self)
        while len(pool) > self.POOLED_SHAPES:
            try:
                pool.pop(next(iter(pool)), None)
            except (RuntimeError, StopIteration):  # another thread changed the pool meanwhile
                break

    def __init__(self, rhs: torch.Tensor, size: int, key: Tuple[Any, ...] = ()) -> None:
        self.key = key
        self.basis = rhs.new_empty(size + 1, rhs.shape[1])
        self.first = self.basis[:1]
        self.products = rhs.new_empty(1, size + 1)
        self._views: List[Tuple[torch.Tensor, ...]] = []

    def views(self, j: int) -> Tuple[torch.Tensor, ...]:
        """Row ``j + 1`` as ``(1, n)``, rows ``0 … j + 1`` transposed, rows ``0 … j``, and the
        ``(1, j + 2)`` products of row ``j + 1`` with rows ``0 … j + 1`` with their first
        ``j + 1`` entries."""
        if j == len(self._views):
            self._views.append((self.basis[j + 1 : j + 2], self.basis[: j + 2].T, self.basis[: j + 1],
                                self.products[:, : j + 2], self.products[:, : j + 1]))
        return self._views[j]
