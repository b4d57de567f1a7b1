r"""Batched convex quadratic programs, solved by an interior-point method and differentiated
through their KKT conditions.

:func:`qp_solve` solves, for every problem of a batch,

.. math::

    z^\star = \arg\min_z \; \tfrac12 z^\top Q z + p^\top z
    \quad\text{s.t.}\quad G z \le h, \quad A z = b ,

with a primal-dual interior-point method (Mehrotra's predictor-corrector) written in batched
tensor operations, so the same code runs on any device. Its derivative comes from the KKT
conditions at the solution (Amos and Kolter, OptNet, 2017), not from the iterations.
:class:`implicitgrad.nn.QP` wraps it as a layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Literal, Optional, Tuple, Union, overload

import torch

from ._diagnostics import check_on_failure, report
from ._validation import check_count, check_tol

__all__ = ["QPInfo", "qp_solve"]

#: Per-problem outcomes, each with what to change.
STATUS_MESSAGES: Dict[str, str] = {
    "solved": "",
    "max_iterations": "the interior-point method did not reach tol within maxiter iterations: raise maxiter, "
                      "loosen tol, or rescale Q, p, G, h (badly scaled data slow it down)",
    "infeasible": "the constraints G z ≤ h, A z = b admit no z (a certificate λ ≥ 0, ν with Gᵀλ + Aᵀν ≈ 0 and "
                  "hᵀλ + bᵀν < 0 was found): check h and b, or relax the constraints",
    "unbounded": "the objective decreases without bound on the feasible set (a direction d with Q d ≈ 0, "
                 "G d ≤ 0, A d = 0 and pᵀd < 0 was found): make Q positive definite or bound z",
    "nonconvex": "Q is not positive semidefinite (a negative eigenvalue), so the problem is not convex and "
                 "its KKT point need not be a minimiser: parametrise Q as L Lᵀ + εI",
    "singular": "the KKT matrix is singular: Q is singular on directions that no constraint bounds (the "
                "minimiser is not unique, or does not exist), or A has linearly dependent rows; add a small "
                "ε I to Q, or remove the dependent equalities",
}


@dataclasses.dataclass
class QPInfo:
    """What :func:`qp_solve` reports, per problem of the batch.

    Attributes:
        status: one of ``"solved"``, ``"max_iterations"``, ``"infeasible"``, ``"unbounded"``,
            ``"nonconvex"``, ``"singular"`` per problem (a list of the batch size; one
            entry for an unbatched call).
        iterations: interior-point iterations per problem (int64 tensor).
        primal_residual: ``‖(Gz + s − h, Az − b)‖ / max(1, ‖(h, b)‖)`` per problem.
        dual_residual: ``‖Qz + p + Gᵀλ + Aᵀν‖ / max(1, ‖p‖)`` per problem.
        gap: the complementarity gap ``sᵀλ / max(1, |½zᵀQz + pᵀz|)`` per problem.
        tol: the tolerance every one of the three measures met for ``"solved"``.
        multipliers: ``(λ, ν)``, the multipliers of the inequalities and equalities at the
            solution (detached).
        polished: per problem, whether the active-set refinement of the interior-point
            solution was kept (bool tensor; see :func:`qp_solve`).
    """

    status: List[str]
    iterations: torch.Tensor
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor
    gap: torch.Tensor
    tol: float
    multipliers: Tuple[torch.Tensor, torch.Tensor]
    polished: Optional[torch.Tensor] = None

    @property
    def converged(self) -> bool:
        """Whether every problem of the batch was solved to ``tol``."""
        return all(s == "solved" for s in self.status)

    def __str__(self) -> str:
        counts = {s: self.status.count(s) for s in dict.fromkeys(self.status)}
        worst = max(float(self.primal_residual.max()), float(self.dual_residual.max()), float(self.gap.max()))
        return (f"qp_solve: {', '.join(f'{n} {s}' for s, n in counts.items())} of {len(self.status)}; "
                f"{int(self.iterations.max())} iterations, largest residual {worst:.1e} (tol {self.tol:.0e})")


@overload
def qp_solve(Q: torch.Tensor, p: torch.Tensor, G: Optional[torch.Tensor] = ..., h: Optional[torch.Tensor] = ...,
             A: Optional[torch.Tensor] = ..., b: Optional[torch.Tensor] = ..., *, tol: Optional[float] = ...,
             maxiter: int = ..., on_failure: str = ..., return_info: Literal[False] = ...) -> torch.Tensor: ...
@overload
def qp_solve(Q: torch.Tensor, p: torch.Tensor, G: Optional[torch.Tensor] = ..., h: Optional[torch.Tensor] = ...,
             A: Optional[torch.Tensor] = ..., b: Optional[torch.Tensor] = ..., *, tol: Optional[float] = ...,
             maxiter: int = ..., on_failure: str = ..., return_info: Literal[True]) -> Tuple[torch.Tensor, QPInfo]: ...
def qp_solve(
    Q: torch.Tensor,
    p: torch.Tensor,
    G: Optional[torch.Tensor] = None,
    h: Optional[torch.Tensor] = None,
    A: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    tol: Optional[float] = None,
    maxiter: int = 50,
    on_failure: str = "warn",
    return_info: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, QPInfo]]:
    r"""Solve a batch of convex QPs, differentiably in every argument.

    For each problem of the batch,

    .. math::

        z^\star = \arg\min_z \; \tfrac12 z^\top Q z + p^\top z
        \quad\text{s.t.}\quad G z \le h, \quad A z = b .

    **Forward.** A primal-dual interior-point method with slacks :math:`s = h - Gz \ge 0`,
    multipliers :math:`\lambda \ge 0` (inequalities) and :math:`\nu` (equalities), and
    Mehrotra's predictor-corrector steps. Each iteration factors, for the whole batch at
    once, :math:`K = \begin{bmatrix} Q + G^\top D G & A^\top \\ A & 0\end{bmatrix}` with
    :math:`D = \operatorname{diag}(\lambda / s)` (one batched LU) and solves it twice.
    Every problem has its own step length and stopping rule: it stops moving once its
    primal residual, dual residual and gap (see :class:`QPInfo`) are all below ``tol``; the
    loop ends when every problem has stopped.

    **Active-set refinement.** An interior point leaves every product :math:`s_i\lambda_i`
    small but not zero, which blurs a weakly active constraint (slack and multiplier both
    small) by about :math:`\mu/\text{margin}` in the solution and :math:`\mu/\text{margin}^2`
    in the derivative. Each solved problem therefore takes the rows with
    :math:`\lambda_i > s_i` as its active set :math:`\mathcal A` and solves the KKT system
    of the equality-constrained problem on it exactly (one batched LU):
    :math:`Qz + G_{\mathcal A}^\top\lambda_{\mathcal A} + A^\top\nu = -p`,
    :math:`G_{\mathcal A} z = h_{\mathcal A}`, :math:`Az = b`, :math:`\lambda_i = 0` off
    :math:`\mathcal A`. The refined point is kept only if it is a strictly complementary KKT
    point (every active multiplier and inactive slack above :math:`\sqrt\varepsilon` of its
    scale, residuals within ``tol``); otherwise — a degenerate constraint, where the
    derivative is not defined — the interior point stays. :attr:`QPInfo.polished` says
    which problems were refined.

    **Backward** (Amos and Kolter, 2017). Differentiating the KKT conditions
    :math:`Qz + p + G^\top\lambda + A^\top\nu = 0`, :math:`\lambda \circ (Gz - h) = 0`,
    :math:`Az = b` at the solution and eliminating the multiplier block gives, for the
    incoming gradient :math:`v = \partial L / \partial z^\star`, one solve with the same
    matrix :math:`K` at the solution,

    .. math::

        K \begin{bmatrix} w \\ w_\nu \end{bmatrix} = \begin{bmatrix} v \\ 0 \end{bmatrix},
        \quad t = D\, G w ,

    and then :math:`\bar p = -w`, :math:`\bar Q = -\tfrac12 (w z^\top + z w^\top)`,
    :math:`\bar G = -(\lambda w^\top + t z^\top)`, :math:`\bar h = t`,
    :math:`\bar A = -(\nu w^\top + w_\nu z^\top)`, :math:`\bar b = w_\nu`. The LU of
    :math:`K` at the solution is computed once by the forward pass (when a gradient is
    needed) and reused by the backward pass. The problems of the batch are independent
    systems (block-diagonal).

    **Second derivatives.** Under ``create_graph=True`` the backward is built from
    differentiable operations — the matrix at the solution assembled from the data and
    from :math:`z^\star, \lambda^\star, \nu^\star`, which carry their own implicit
    derivatives, and a dense ``torch.linalg.solve`` — so the gradient can be differentiated
    again (Hessian-vector products, gradient penalties). Where the active set is fixed
    (strict complementarity) this is the exact second derivative of the solution map.

    **Shapes.** ``Q`` ``(B, n, n)``, ``p`` ``(B, n)``, ``G`` ``(B, m, n)``, ``h`` ``(B, m)``,
    ``A`` ``(B, k, n)``, ``b`` ``(B, k)``; any argument may omit the batch dimension and is
    then shared by the whole batch. If none has one, the result is ``(n,)``. Only the
    symmetric part of ``Q`` enters the objective, and so the gradient of ``Q`` is symmetric.

    **Failures.** Each problem gets a status (:class:`QPInfo`): a non-PSD ``Q``
    (``"nonconvex"``, checked by an eigenvalue decomposition), infeasible constraints,
    an unbounded objective (both detected by approximate certificates of infeasibility),
    a singular KKT matrix, or ``maxiter`` reached. Any status other than ``"solved"`` is
    reported per ``on_failure`` (:class:`~implicitgrad.ImplicitGradWarning`,
    :class:`~implicitgrad.ConvergenceError` or nothing), naming the problems concerned. The
    solution of an infeasible, unbounded, non-convex or singular problem is NaN (so is its
    gradient); after ``maxiter`` the last iterate is returned.

    Args:
        Q: the quadratic term, positive semidefinite.
        p: the linear term.
        G, h: the inequalities ``G z ≤ h``; both or neither.
        A, b: the equalities ``A z = b``; both or neither.
        tol: the accuracy of the three measures of :class:`QPInfo`; ``None``: 1e-10 in
            float64, 1e-5 in float32.
        maxiter: largest number of interior-point iterations.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
        return_info: also return a :class:`QPInfo`.

    Returns:
        ``z`` of shape ``(B, n)`` (or ``(n,)``), and the :class:`QPInfo` if ``return_info``.

    Raises:
        TypeError: a non-tensor, integer, complex or half-precision argument.
        ValueError: shapes that do not fit together (the message names the arguments and
            their shapes), batch sizes that differ, ``G`` without ``h`` (or ``A`` without
            ``b``), non-finite data, tensors on different devices.
        ConvergenceError: a problem not solved under ``on_failure="raise"``.

    Example:
        >>> import torch, implicitgrad as ig
        >>> Q = torch.eye(2, dtype=torch.float64)
        >>> p = torch.tensor([-1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> G = torch.tensor([[1.0, 1.0]], dtype=torch.float64); h = torch.tensor([1.0], dtype=torch.float64)
        >>> z = ig.qp_solve(Q, p, G, h)          # projection of (1, 1) onto z1 + z2 <= 1
        >>> z.detach()
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> z[0].backward(); p.grad              # dz1/dp = -(I - ggᵀ/2) with g = (1, 1)
        tensor([-0.5000,  0.5000], dtype=torch.float64)

    References:
        Amos and Kolter, OptNet: Differentiable Optimization as a Layer in Neural
        Networks, 2017. Mehrotra, On the Implementation of a Primal-Dual Interior Point
        Method, 1992. Nocedal and Wright, Numerical Optimization, 2006, ch. 16.
    """
    check_on_failure(on_failure)
    maxiter = check_count("maxiter", maxiter, "qp_solve")
    args, batched = _prepare(Q, p, G, h, A, b)
    dtype = args[0].dtype
    tol = check_tol("tol", tol, "qp_solve", allow_zero=False) if tol is not None else _default_tol(dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    settings = _Settings(tol=tol, maxiter=maxiter, on_failure=on_failure, needs_grad=needs_grad)
    z = QPFunction.apply(settings, *args)[0]
    if not batched:
        z = z[0]
    if settings.report:
        report(settings.report, on_failure)
    return (z, settings.info) if return_info else z


@dataclasses.dataclass
class _Settings:
    """Options of one call, and what its forward pass leaves for the caller and backward."""

    tol: float
    maxiter: int
    on_failure: str
    needs_grad: bool = False
    info: Any = None
    report: str = ""
    saved: Any = None


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


# ------------------------------------------------------------------------------ validation
_NAMES = ("Q", "p", "G", "h", "A", "b")


def _prepare(Q, p, G, h, A, b) -> Tuple[List[torch.Tensor], bool]:
    """Checked arguments with a common leading batch dimension and empty ``G``/``A`` blocks."""
    given = dict(zip(_NAMES, (Q, p, G, h, A, b)))
    for first, second in (("G", "h"), ("A", "b")):
        if (given[first] is None) != (given[second] is None):
            missing = first if given[first] is None else second
            raise ValueError(f"qp_solve: {first} and {second} go together; {missing} is missing.")
    for name, t in given.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"qp_solve: {name} must be a Tensor, got {type(t).__name__}.")
        if t.is_complex() or not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(f"qp_solve: {name} has dtype {t.dtype}; use float32 or float64 tensors "
                            "(the interior-point method needs at least single precision).")
    present = {k: v for k, v in given.items() if v is not None}
    dtypes = sorted({str(t.dtype) for t in present.values()})
    if len(dtypes) > 1:
        raise ValueError(f"qp_solve: the arguments mix dtypes {dtypes}; cast them to one (e.g. .double()).")
    devices = sorted({str(t.device) for t in present.values()})
    if len(devices) > 1:
        raise ValueError(f"qp_solve: the arguments live on different devices {devices}; move them to one.")
    matrix_rank = {"Q": 2, "p": 1, "G": 2, "h": 1, "A": 2, "b": 1}
    for name, t in present.items():
        if t.ndim not in (matrix_rank[name], matrix_rank[name] + 1):
            raise ValueError(
                f"qp_solve: {name} must have {matrix_rank[name]} dimensions (shared by the batch) or "
                f"{matrix_rank[name] + 1} (leading batch dimension), got shape {tuple(t.shape)}.")
    sizes = {name: t.shape[0] for name, t in present.items() if t.ndim == matrix_rank[name] + 1}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k} {tuple(present[k].shape)}" for k in sizes)
        raise ValueError(f"qp_solve: the batch sizes differ ({listed}); every batched argument must have the "
                         "same leading dimension (or none, to be shared by the batch).")
    batch = next(iter(sizes.values()), 1)
    core = {name: t.shape[1:] if name in sizes else t.shape for name, t in present.items()}
    n = core["p"][-1]
    _check_shape("Q", core["Q"], (n, n), "(n, n) with n = p's length")
    m = 0
    if "G" in core:
        m = core["h"][-1]
        _check_shape("G", core["G"], (m, n), "(m, n) with m = h's length and n = p's length")
    k = 0
    if "A" in core:
        k = core["b"][-1]
        _check_shape("A", core["A"], (k, n), "(k, n) with k = b's length and n = p's length")
        if k > n:
            raise ValueError(f"qp_solve: {k} equality constraints on {n} variables; A must have at most n rows "
                             "(independent ones).")
    ref = present["p"]
    out = []
    for name, dims in zip(_NAMES, ((n, n), (n,), (m, n), (m,), (k, n), (k,))):
        t = given[name]
        if t is None:
            t = ref.new_zeros(dims)
        out.append(t.unsqueeze(0).expand(batch, *dims) if t.ndim == len(dims) else t)
    for name, t in zip(_NAMES, out):
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"qp_solve: {name} contains NaN or Inf.")
    return out, bool(sizes)


def _check_shape(name: str, got: torch.Size, expected: Tuple[int, int], what: str) -> None:
    if tuple(got) != expected:
        raise ValueError(f"qp_solve: {name} must be {what}, i.e. {expected}, got {tuple(got)} "
                         "(without the batch dimension).")


# ------------------------------------------------------------------------------ the solver
class _KKT:
    """The Jacobian of the KKT conditions in ``(z, λ, ν)`` for a batch, factored once (LU).

    ``J = [[Q, Gᵀ, Aᵀ], [diag(λ) G, −diag(s), 0], [A, 0, 0]]`` is both the interior-point
    Newton matrix (with the slack step eliminated) and, at the solution, the matrix of the
    backward pass (transposed). Unlike the reduced matrix ``Q + Gᵀ diag(λ/s) G`` it stays
    well conditioned as ``s`` and ``λ`` reach zero under strict complementarity.
    """

    def __init__(self, Q: torch.Tensor, G: torch.Tensor, A: torch.Tensor, lam: torch.Tensor,
                 s: torch.Tensor) -> None:
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(_kkt_matrix(Q, G, A, lam, s))
        self.singular = info != 0
        self.sizes = (Q.shape[-1], G.shape[-2], A.shape[-2])

    def solve(self, r1: torch.Tensor, r2: torch.Tensor, r3: torch.Tensor,
              adjoint: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``J (x, y, w) = (r1, r2, r3)`` (or ``Jᵀ`` with ``adjoint``), blockwise."""
        rhs = torch.cat([r1, r2, r3], -1).unsqueeze(-1)
        sol = torch.linalg.lu_solve(self.lu, self.pivots, rhs, adjoint=adjoint).squeeze(-1)
        n, m, _ = self.sizes
        return sol[..., :n], sol[..., n : n + m], sol[..., n + m :]


def _kkt_matrix(Q: torch.Tensor, G: torch.Tensor, A: torch.Tensor, lam: torch.Tensor,
                s: torch.Tensor) -> torch.Tensor:
    """``J = [[Q, Gᵀ, Aᵀ], [diag(λ) G, −diag(s), 0], [A, 0, 0]]`` per problem (differentiable)."""
    B, n, m, k = Q.shape[0], Q.shape[-1], G.shape[-2], A.shape[-2]
    J = Q.new_zeros(B, n + m + k, n + m + k)
    J[:, :n, :n] = Q
    J[:, :n, n : n + m] = G.transpose(-1, -2)
    J[:, :n, n + m :] = A.transpose(-1, -2)
    J[:, n : n + m, :n] = lam.unsqueeze(-1) * G
    J[:, n : n + m, n : n + m] = torch.diag_embed(-s)
    J[:, n + m :, :n] = A
    return J


def _mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def _mtv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (M.transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1)


def _max_step(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Largest ``α ≤ 1`` with ``x + α dx ≥ 0`` per problem (``x > 0``)."""
    if not x.shape[-1]:
        return x.new_ones(x.shape[:-1])
    ratio = torch.where(dx < 0, -x / dx.clamp_max(-torch.finfo(x.dtype).tiny), torch.full_like(x, float("inf")))
    return ratio.amin(-1).clamp_max(1.0)


_CODES = ("max_iterations", "solved", "infeasible", "unbounded", "singular")  # labels 0..4


def _start(Q, p, G, h, A, b):
    """The starting point of CVXOPT's ``coneqp``: the Newton system at ``s = λ = 1``, then slacks
    and multipliers shifted into the positive orthant."""
    ones = torch.ones_like(h)
    z, y, nu = _KKT(Q, G, A, ones, ones).solve(-p, h, b)  # y = Gz − h
    s, lam = -y, y.clone()
    if h.shape[-1]:
        s = s + (1 - s.amin(-1, keepdim=True)) * (s.amin(-1, keepdim=True) <= 0)
        lam = lam + (1 - lam.amin(-1, keepdim=True)) * (lam.amin(-1, keepdim=True) <= 0)
    return z, s, lam, nu


def _certificates(Q, p, G, h, A, b, z, lam, nu, tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per problem: whether ``(λ, ν)`` certifies infeasibility and ``z`` unboundedness, up to ``tol``.

    Both tests are invariant to scaling and sound up to scale: a feasible point of norm below
    ``1/tol`` rules out the first, multipliers of norm below ``1/tol`` the second.
    """
    ray = -(h * lam).sum(-1) - (b * nu).sum(-1)
    infeasible = (ray > 0) & (torch.linalg.vector_norm(_mtv(G, lam) + _mtv(A, nu), dim=-1) <= tol * ray)
    descent = -(p * z).sum(-1)
    unbounded = (descent > 0) & (torch.linalg.vector_norm(_mv(Q, z), dim=-1) <= tol * descent)
    unbounded &= torch.linalg.vector_norm(_mv(A, z), dim=-1) <= tol * descent
    if h.shape[-1]:
        unbounded &= _mv(G, z).amax(-1) <= tol * descent
    return infeasible, unbounded & ~infeasible


def _newton(kkt: _KKT, G, s, lam, rd, rpi, rpe, rc):
    """The step ``(dz, ds, dλ, dν)`` with ``λ∘ds + s∘dλ = rc`` and the linearised residuals at zero."""
    dz, dlam, dnu = kkt.solve(-rd, -rc - lam * rpi, -rpe)
    return dz, -rpi - _mv(G, dz), dlam, dnu


def _step(Q, G, A, s, lam, rd, rpi, rpe):
    """Mehrotra's step for a batch: ``(α dz, α ds, α dλ, α dν)`` (zero where it failed) and where it is finite."""
    m = s.shape[-1]
    kkt = _KKT(Q, G, A, lam, s)
    mu = (s * lam).sum(-1, keepdim=True) / max(m, 1)
    dz, ds, dlam, dnu = _newton(kkt, G, s, lam, rd, rpi, rpe, -s * lam)
    if m:  # the corrector, centred by σ = (μ_aff / μ)³
        alpha = torch.minimum(_max_step(s, ds), _max_step(lam, dlam)).unsqueeze(-1)
        mu_aff = ((s + alpha * ds) * (lam + alpha * dlam)).sum(-1, keepdim=True) / m
        sigma = (mu_aff / mu.clamp_min(torch.finfo(s.dtype).tiny)).clamp(0, 1) ** 3
        dz, ds, dlam, dnu = _newton(kkt, G, s, lam, rd, rpi, rpe, -s * lam - ds * dlam + sigma * mu)
    alpha = (0.99 * torch.minimum(_max_step(s, ds), _max_step(lam, dlam))).clamp_max(1.0).unsqueeze(-1)
    ok = torch.isfinite(torch.cat([dz, ds, dlam, dnu], -1)).all(-1) & ~kkt.singular
    alpha = torch.where(ok.unsqueeze(-1), alpha, torch.zeros_like(alpha))
    return tuple(alpha * torch.nan_to_num(d) for d in (dz, ds, dlam, dnu)), ok


def _residuals(Q, p, G, h, A, b, z, s, lam, nu):
    """The KKT residuals ``(r_d, r_pi, r_pe)`` of a batch and the three measures of :class:`QPInfo`."""
    rd = _mv(Q, z) + p + _mtv(G, lam) + _mtv(A, nu)
    rpi = _mv(G, z) + s - h
    rpe = _mv(A, z) - b
    objective = 0.5 * (z * _mv(Q, z)).sum(-1) + (p * z).sum(-1)
    dres = torch.linalg.vector_norm(rd, dim=-1) / torch.linalg.vector_norm(p, dim=-1).clamp_min(1.0)
    norm_hb = torch.linalg.vector_norm(torch.cat([h, b], -1), dim=-1).clamp_min(1.0)
    pres = torch.linalg.vector_norm(torch.cat([rpi, rpe], -1), dim=-1) / norm_hb
    gap = (s * lam).sum(-1) / objective.abs().clamp_min(1.0)
    return (rd, rpi, rpe), (pres, dres, gap)


def _polish(Q, p, G, h, A, b, z, s, lam, nu, solved: torch.Tensor, tol: float):
    """Active-set refinement of interior-point solutions; returns the refined iterate and where it was kept.

    An interior point stops with every product ``s_i λ_i`` small but not zero, so a constraint
    that is only weakly active (its slack and multiplier both small) is blurred by ``μ / margin``
    in the solution and by ``μ / margin²`` in the derivative. Here the rows with ``λ_i > s_i``
    are taken as active and the equality-constrained KKT system on them is solved exactly,
    ``Q z + G_𝒜ᵀ λ_𝒜 + Aᵀ ν = −p``, ``G_𝒜 z = h_𝒜``, ``A z = b``, with ``λ = 0`` and
    ``s = h − G z`` off the active set (``s = 0`` on it). The refined point is kept for a solved
    problem only if it is a strictly complementary KKT point — every active multiplier and
    every inactive slack above ``√ε`` relative to its scale — with residuals within ``tol``;
    otherwise (a degenerate or nearly degenerate constraint) the interior point stays.
    """
    m = h.shape[-1]
    if not m or not bool(solved.any()):
        return z, s, lam, nu, solved & False
    active = lam > s
    on = active.to(h.dtype)
    kkt = _KKT(Q, G, A, on, 1 - on)  # rows: G_i z = h_i (active), −λ_i = 0 (inactive)
    z_p, lam_p, nu_p = kkt.solve(-p, on * h, b)
    lam_p = torch.where(active, lam_p, torch.zeros_like(lam_p))
    s_p = torch.where(active, torch.zeros_like(h), h - _mv(G, z_p))
    root_eps = torch.finfo(h.dtype).eps ** 0.5
    scale_lam = lam.abs().amax(-1, keepdim=True).clamp_min(1.0)
    scale_s = h.abs().amax(-1, keepdim=True).clamp_min(1.0)
    margin = torch.where(active, lam_p / scale_lam, s_p / scale_s).amin(-1)
    _, (pres, dres, _) = _residuals(Q, p, G, h, A, b, z_p, s_p, lam_p, nu_p)
    keep = solved & ~kkt.singular & (margin > root_eps) & (pres <= tol) & (dres <= tol)
    keep &= torch.isfinite(torch.cat([z_p, lam_p, nu_p], -1)).all(-1)
    k = keep.unsqueeze(-1)
    return (torch.where(k, z_p, z), torch.where(k, s_p, s), torch.where(k, lam_p, lam), torch.where(k, nu_p, nu),
            keep)


def _interior_point(Q, p, G, h, A, b, tol: float, maxiter: int):
    """Mehrotra's predictor-corrector method on a batch; returns the iterate, statuses and measures."""
    B = p.shape[0]
    eps = torch.finfo(p.dtype).eps
    eig = torch.linalg.eigvalsh(Q)
    nonconvex = eig[:, 0] < -(eps**0.5) * eig.abs().amax(-1).clamp_min(1.0)
    z, s, lam, nu = _start(Q, p, G, h, A, b)
    iterations = torch.zeros(B, dtype=torch.int64, device=p.device)
    labels = torch.zeros(B, dtype=torch.int64, device=p.device)  # an index into _CODES
    for it in range(maxiter + 1):
        (rd, rpi, rpe), (pres, dres, gap) = _residuals(Q, p, G, h, A, b, z, s, lam, nu)
        running = ~nonconvex & (labels == 0)
        infeasible, unbounded = _certificates(Q, p, G, h, A, b, z, lam, nu, eps**0.5)
        labels = torch.where(running & (dres <= tol) & (pres <= tol) & (gap <= tol), 1, labels)
        labels = torch.where(running & infeasible & (labels == 0), 2, labels)
        labels = torch.where(running & unbounded & (labels == 0), 3, labels)
        running = running & (labels == 0)
        if it == maxiter or not bool(running.any()):
            break
        # Only the problems still running are factored and stepped.
        idx = running.nonzero().squeeze(-1)
        sub = [t.index_select(0, idx) for t in (Q, G, A, s, lam, rd, rpi, rpe)]
        step, ok = _step(*sub)
        labels = labels.index_fill(0, idx[~ok], 4)
        z, s, lam, nu = (x.index_add(0, idx, dx) for x, dx in zip((z, s, lam, nu), step))
        iterations = iterations.index_add(0, idx, ok.to(iterations.dtype))
    status = ["nonconvex" if bool(nonconvex[i]) else _CODES[int(labels[i])] for i in range(B)]
    z, s, lam, nu, polished = _polish(Q, p, G, h, A, b, z, s, lam, nu, ~nonconvex & (labels == 1), tol)
    if bool(polished.any()):
        _, refined = _residuals(Q, p, G, h, A, b, z, s, lam, nu)
        pres, dres, gap = (torch.where(polished, r, old) for r, old in zip(refined, (pres, dres, gap)))
    return z, s, lam, nu, status, iterations, (pres, dres, gap), polished


class QPFunction(torch.autograd.Function):
    """``(z*, λ*, ν*) = qp(Q, p, G, h, A, b)`` with the KKT backward of :func:`qp_solve`.

    The multipliers are outputs too, so that the backward — written in differentiable
    operations on ``z*``, ``λ*``, ``ν*`` and the data — can itself be differentiated: the
    matrix of its solve depends on them.
    """

    @staticmethod
    def forward(settings: _Settings, Q, p, G, h, A, b):
        Q = 0.5 * (Q + Q.transpose(-1, -2))
        z, s, lam, nu, status, iterations, (pres, dres, gap), polished = _interior_point(
            Q, p, G, h, A, b, settings.tol, settings.maxiter)
        failed = torch.tensor([st not in ("solved", "max_iterations") for st in status], device=z.device)
        z, lam, nu = (torch.where(failed.unsqueeze(-1), torch.full_like(t, float("nan")), t) for t in (z, lam, nu))
        settings.info = QPInfo(status=status, iterations=iterations, primal_residual=pres, dual_residual=dres,
                               gap=gap, tol=settings.tol, multipliers=(lam, nu), polished=polished)
        settings.report = _failure_message(settings.info)
        if settings.needs_grad:
            # The Newton matrix at the solution is the backward's matrix: factored here, once.
            settings.saved = (s, _KKT(Q, G, A, lam, s))
        return z, lam, nu

    @staticmethod
    def setup_context(ctx, inputs, output):
        settings = inputs[0]
        if settings.saved is None:
            return
        s, ctx.kkt = settings.saved
        settings.saved = None
        _, Q, _, G, h, A, _ = inputs
        ctx.save_for_backward(Q, G, h, A, *output, s)

    @staticmethod
    def backward(ctx, v, v_lam, v_nu):
        Q, G, h, A, z, lam, nu, s = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Under create_graph the adjoint solve is rebuilt from differentiable pieces: J at the
            # solution, with the slacks' value from the forward and the derivative of h − Gz.
            y = h - _mv(G, z)
            J = _kkt_matrix(0.5 * (Q + Q.transpose(-1, -2)), G, A, lam, s + (y - y.detach()))
            u = torch.linalg.solve(J.transpose(-1, -2), torch.cat([v, v_lam, v_nu], -1))
            n, m = z.shape[-1], lam.shape[-1]
            w, w_lam, w_nu = u[..., :n], u[..., n : n + m], u[..., n + m :]
        else:
            w, w_lam, w_nu = ctx.kkt.solve(v, v_lam, v_nu, adjoint=True)
        t = lam * w_lam
        grads = {
            "Q": -0.5 * (w.unsqueeze(-1) * z.unsqueeze(-2) + z.unsqueeze(-1) * w.unsqueeze(-2)),
            "p": -w,
            "G": -(lam.unsqueeze(-1) * w.unsqueeze(-2) + t.unsqueeze(-1) * z.unsqueeze(-2)),
            "h": t,
            "A": -(nu.unsqueeze(-1) * w.unsqueeze(-2) + w_nu.unsqueeze(-1) * z.unsqueeze(-2)),
            "b": w_nu,
        }
        needs = ctx.needs_input_grad[1:]
        return (None,) + tuple(grads[name] if need else None for name, need in zip(_NAMES, needs))


def _failure_message(info: QPInfo) -> str:
    bad = [(i, s) for i, s in enumerate(info.status) if s != "solved"]
    if not bad:
        return ""
    parts = []
    for kind in dict.fromkeys(s for _, s in bad):
        which = [i for i, s in bad if s == kind]
        shown = ", ".join(map(str, which[:8])) + (", ..." if len(which) > 8 else "")
        parts.append(f"{len(which)} {kind} (problem {shown}): {STATUS_MESSAGES[kind]}")
    return (f"qp_solve: {len(bad)} of {len(info.status)} problems not solved — " + "; ".join(parts)
            + ". Their solution (and gradient) is NaN, except after max_iterations (the last iterate).")
