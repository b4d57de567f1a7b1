"""Computations that tests/test_cuda.py runs on a GPU and tests/test_gpu_check.py on the CPU.

Each function builds its data on the CPU in float64 from a fixed seed, then moves it to
the requested device and dtype, so that two devices receive the same numbers.

* host synchronisations: :func:`backward_syncs` and :func:`forward_syncs` count, with a
  given source (torch's sync debug mode on CUDA, the host-read stand-in elsewhere), the
  synchronisations of a backward linear solve (CG, MINRES, GMRES) and of a forward solve
  with its checks; the bound is ``⌈iterations / check_every⌉ + PER_CALL``.
* the same result on two devices: :func:`imaml_meta_step`, :func:`deq_layer`,
  :func:`qp_layer` return named tensors to compare across devices.
"""

from __future__ import annotations

import math
from typing import Callable, ContextManager, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import implicitgrad as ig
from implicitgrad.testing.syncs import SyncCount, assert_sync_budget, count_syncs

#: Iterations of every counted solve: the problems are built so that no solve converges
#: before (condition number 1e6), and every solve runs all of them.
ITERATIONS = 200
#: Synchronisations allowed per call beyond one per check: the first convergence test, the
#: final status, the forward residual and the finiteness checks of inputs and outputs. On
#: the CPU the host-read stand-in counts 3 (CG backward) to 9 (gradient-descent forward);
#: the rest is a margin for synchronisations inside torch's operators, which only the
#: CUDA count sees. A check at every iteration would exceed the bound by ~180.
PER_CALL = 16
#: Host reads GMRES makes at each restart beyond its periodic checks (the cycle's
#: stopping test and the residual scale of its estimates).
PER_RESTART = 2

SYNC_SOLVERS = ("CG", "MINRES", "GMRES", "GMRES-restart")
CHECK_INTERVALS = (1, 10)
FORWARD_SOLVERS = ("GradientDescent", "FixedPointIteration")

DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: Largest relative difference between two devices, per dtype.
DEVICE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def system(device, dtype=torch.float64, n: int = 400, seed: int = 0) -> Dict[str, torch.Tensor]:
    """An SPD matrix ``A`` with eigenvalues 1e-6 … 1 (so λ_max = 1), a non-symmetric ``M``
    with the same singular values, and a right-hand side ``b``."""
    g = _generator(seed)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(-6, 0, n, dtype=torch.float64)
    data = {"A": (q1 * s) @ q1.T, "M": (q1 * s) @ q2.T, "b": torch.randn(n, generator=g, dtype=torch.float64)}
    return {k: v.to(device=device, dtype=dtype) for k, v in data.items()}


def linear_solver(name: str, check_every: int) -> ig.LinearSolver:
    """The counted backward solver; its tolerance is out of reach in ``ITERATIONS``."""
    if name == "CG":
        return ig.CG(maxiter=ITERATIONS, tol=1e-12, check_every=check_every)
    if name == "MINRES":
        return ig.MINRES(maxiter=ITERATIONS, tol=1e-12, check_every=check_every)
    if name == "GMRES":
        return ig.GMRES(maxiter=ITERATIONS, restart=ITERATIONS, tol=1e-12, check_every=check_every)
    if name == "GMRES-restart":
        return ig.GMRES(maxiter=ITERATIONS, restart=20, tol=1e-12, check_every=check_every)
    raise ValueError(f"unknown solver {name!r}; choose from {SYNC_SOLVERS}")


def sync_allowance(name: str, iterations: int) -> int:
    """The constant per call for ``name``: :data:`PER_CALL`, plus the restarts of GMRES."""
    restart = {"GMRES-restart": 20}.get(name)
    return PER_CALL + (PER_RESTART * math.ceil(iterations / restart) if restart else 0)


def backward_syncs(name: str, check_every: int, device, source: Callable[[], ContextManager]) -> Tuple[SyncCount, int]:
    """Synchronisations of one backward pass whose linear solve is ``name``, and its iterations.

    CG and MINRES solve the Hessian system of ``½ xᵀAx − tᵀx``; GMRES the transposed
    Jacobian system of the root problem ``Mx − t``. The forward solve (a dense solve) and
    the outer loss run outside the count.
    """
    d = system(device)
    t = d["b"].clone().requires_grad_(True)
    x0 = torch.zeros_like(t)
    lin = linear_solver(name, check_every)
    if torch.device(device).type == "cpu":
        # On the CPU, GMRES keeps one system's scalars on the host and CG reads pᵀAp before
        # each step (reads there are loads from memory); the stand-in counts the
        # bookkeeping a GPU runs.
        if isinstance(lin, ig.GMRES):
            lin.HOST_BOOKKEEPING = False
        if isinstance(lin, ig.CG):
            lin.SCALAR_BOOKKEEPING = False
    if name in ("CG", "MINRES"):
        A = d["A"]
        x, info = ig.implicit_solve(lambda x, t: 0.5 * x @ (A @ x) - t @ x, x0, t,
                                    solver=lambda f, x0, t: torch.linalg.solve(A, t),
                                    linear_solver=lin, on_failure="ignore", return_info=True)
    else:
        M = d["M"]
        x, info = ig.root_solve(lambda x, t: M @ x - t, x0, t, solver=lambda f, x0, t: torch.linalg.solve(M, t),
                                linear_solver=lin, on_failure="ignore", return_info=True)
    loss = x.square().sum()
    with count_syncs(source) as syncs:
        loss.backward()
    return syncs, info.backward.iterations


def forward_syncs(name: str, check_every: int, device, source: Callable[[], ContextManager]) -> Tuple[SyncCount, int]:
    """Synchronisations of one forward solve (inner iterations and the forward checks).

    Gradient descent on ``½ xᵀAx − tᵀx`` (``implicit_solve``) or the fixed-point iteration
    of ``x − (Ax − t)`` (``fixed_point_solve``), step 1 = 1/λ_max, ``ITERATIONS`` steps.
    """
    d = system(device)
    A = d["A"]
    t = d["b"].clone().requires_grad_(True)
    x0 = torch.zeros_like(t)
    with count_syncs(source) as syncs:
        if name == "GradientDescent":
            solver = ig.solvers.GradientDescent(lr=1.0, maxiter=ITERATIONS, tol=1e-12, check_every=check_every)
            x, info = ig.implicit_solve(lambda x, t: 0.5 * x @ (A @ x) - t @ x, x0, t, solver=solver,
                                        on_failure="ignore", return_info=True)
        elif name == "FixedPointIteration":
            solver = ig.solvers.FixedPointIteration(maxiter=ITERATIONS, tol=1e-12, check_every=check_every)
            x, info = ig.fixed_point_solve(lambda x, t: x - (A @ x - t), x0, t, solver=solver,
                                           on_failure="ignore", return_info=True)
        else:
            raise ValueError(f"unknown solver {name!r}; choose from {FORWARD_SOLVERS}")
    return syncs, info.forward_iterations


SYNC_CASES = [("backward", name) for name in SYNC_SOLVERS] + [("forward", name) for name in FORWARD_SOLVERS]


def counted(kind: str, name: str, check_every: int, device,
            source: Callable[[], ContextManager]) -> Tuple[SyncCount, int, int]:
    """One case of :data:`SYNC_CASES`: its synchronisations, iterations and allowance per call."""
    run = {"backward": backward_syncs, "forward": forward_syncs}[kind]
    syncs, iterations = run(name, check_every, device, source)
    return syncs, iterations, sync_allowance(name, iterations)


def check_syncs(syncs: SyncCount, iterations: int, every: int, per_call: int, what: str) -> None:
    """The count saw the solve (at least the final status; every check when there is one
    per iteration) and stays within ``⌈iterations / every⌉ + per_call``."""
    assert syncs.count >= 1, f"{what}: no synchronisation counted, not even the final status"
    if every == 1:
        assert syncs.count >= iterations, f"{what}: {syncs.count} counted, fewer than its {iterations} checks"
    assert_sync_budget(syncs, iterations=iterations, check_every=every, per_call=per_call, what=what)


# ------------------------------------------------------------------ the same result on two devices
def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b| / max|b|`` computed in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _mlp(sizes, dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(m, n, dtype=torch.float64))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def _tasks(n_tasks: int, shots: int, d_in: int, device, dtype, seed: int):
    g = _generator(seed)
    tasks = []
    for _ in range(n_tasks):
        w = torch.randn(d_in, 1, generator=g, dtype=torch.float64)
        xs, xq = (torch.randn(shots, d_in, generator=g, dtype=torch.float64) for _ in range(2))
        tasks.append(tuple(t.to(device=device, dtype=dtype) for t in (xs, torch.sin(xs @ w), xq, torch.sin(xq @ w))))
    return tasks


def imaml_meta_step(device, dtype, inner_steps: int = 50) -> Dict[str, torch.Tensor]:
    """One ``IMAML.meta_step`` on 4 regression tasks (an 8-32-1 tanh MLP), fixed inner steps
    and CG iterations: the query loss and every meta-gradient."""
    model = _mlp((8, 32, 1), dtype, seed=0).to(device)
    imaml = ig.meta.IMAML(model, F.mse_loss, lam=2.0,
                          inner_solver=ig.solvers.GradientDescent(lr=0.1, maxiter=inner_steps, tol=0),
                          linear_solver=ig.CG(maxiter=20, tol=1e-30, check_every=1),
                          forward_tol=1.0, on_failure="ignore")
    loss = imaml.meta_step(_tasks(4, 10, 8, device, dtype, seed=1))
    out = {"loss": loss.detach()}
    out.update({f"grad/{name}": p.grad for name, p in model.named_parameters()})
    return out


class _Cell(nn.Module):
    """``f(z, x) = tanh(W z + U x + c)`` with ``‖W‖ = 0.5``: a contraction in ``z``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        g = _generator(2)
        w = torch.randn(width, width, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(width, width, generator=g, dtype=torch.float64) / width**0.5)
        self.c = nn.Parameter(0.1 * torch.randn(width, generator=g, dtype=torch.float64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.c)


def deq_layer(device, dtype, batch: int = 16, width: int = 12) -> Dict[str, torch.Tensor]:
    """A DEQ layer's output and the gradients of a loss in its parameters and input.

    The forward runs 80 fixed-point iterations (contraction 0.5: converged to rounding in
    either dtype); the backward solves each sample's system exactly (``ig.Exact``), so
    the two devices run the same algorithm step for step.
    """
    cell = _Cell(width).to(device=device, dtype=dtype)
    deq = ig.nn.DEQ(cell, solver=ig.solvers.FixedPointIteration(maxiter=80, tol=0),
                    linear_solver=ig.Exact(), on_failure="ignore")
    g = _generator(3)
    x = torch.randn(batch, width, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    target = torch.randn(batch, width, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    z = deq(x)
    (z - target).square().sum().backward()
    out = {"z": z.detach(), "grad/x": x.grad}
    out.update({f"grad/{name}": p.grad for name, p in cell.named_parameters()})
    return out


#: The interior point stops within ``tol`` of the solution: well below the tolerance of the
#: comparison (float32 at 1e-7 agrees with float64 to 6e-7 on the CPU; at its default 1e-5,
#: only to 3e-3).
QP_TOL = {torch.float64: 1e-12, torch.float32: 1e-7}


def qp_layer(device, dtype, batch: int = 8, n: int = 6, n_ineq: int = 8, n_eq: int = 2) -> Dict[str, torch.Tensor]:
    """``ig.qp_solve`` on a batch of strictly convex QPs with active and inactive
    inequalities and equalities: the solution and the gradient of a loss in every term."""
    g = _generator(4)
    kw = {"generator": g, "dtype": torch.float64}
    L = torch.randn(batch, n, n, **kw)
    Q = L @ L.transpose(1, 2) / n + torch.eye(n, dtype=torch.float64)
    G = torch.randn(batch, n_ineq, n, **kw)
    z_feasible = torch.randn(batch, n, **kw)
    # Half of the inequalities pass through the feasible point (likely active), half with slack 1.
    slack = torch.cat([torch.zeros(batch, n_ineq // 2, dtype=torch.float64),
                       torch.ones(batch, n_ineq - n_ineq // 2, dtype=torch.float64)], dim=1)
    h = torch.einsum("bij,bj->bi", G, z_feasible) + slack
    A = torch.randn(batch, n_eq, n, **kw)
    b = torch.einsum("bij,bj->bi", A, z_feasible)
    p = 3 * torch.randn(batch, n, **kw)
    weights = torch.randn(batch, n, **kw).to(device=device, dtype=dtype)
    terms = {k: v.to(device=device, dtype=dtype).requires_grad_(True)
             for k, v in {"Q": Q, "p": p, "G": G, "h": h, "A": A, "b": b}.items()}
    z = ig.qp_solve(terms["Q"], terms["p"], terms["G"], terms["h"], terms["A"], terms["b"], tol=QP_TOL[dtype])
    (z * weights).sum().backward()
    out = {"z": z.detach()}
    out.update({f"grad/{k}": v.grad for k, v in terms.items()})
    return out


DEVICE_CASES = {"imaml": imaml_meta_step, "deq": deq_layer, "qp": qp_layer}


# ------------------------------------------------------------------ many problems, one graph, memory
def _logistic(w, log_lam, X, y):
    return F.softplus(-y * (X @ w)).mean() + 0.5 * (log_lam.exp() * w * w).sum()


class ManyProblems:
    """``batch`` ridge-regularised logistic regressions, one log-λ each: the gradient of
    every validation loss in its log-λ, by ``torch.func.vmap`` (one call) or a Python loop."""

    def __init__(self, batch: int, device, dtype=torch.float64, n: int = 20, d: int = 5) -> None:
        g = _generator(5)
        kw = {"generator": g, "dtype": torch.float64}
        w_true = torch.randn(batch, d, **kw)
        X, X_val = torch.randn(batch, n, d, **kw), torch.randn(batch, n, d, **kw)
        y = torch.sign(torch.einsum("bnd,bd->bn", X, w_true) + torch.randn(batch, n, **kw))
        y_val = torch.sign(torch.einsum("bnd,bd->bn", X_val, w_true) + torch.randn(batch, n, **kw))
        log_lam = torch.log(torch.rand(batch, **kw) + 0.5)
        self.data = [t.to(device=device, dtype=dtype) for t in (log_lam, X, y, X_val, y_val)]
        self.solver = ig.solvers.GradientDescent(lr=0.5, maxiter=100, tol=0)
        self.linear_solver = ig.CG(maxiter=50)

    def validation_loss(self, log_lam, X, y, X_val, y_val):
        w = ig.implicit_solve(_logistic, torch.zeros(X.shape[-1], dtype=X.dtype, device=X.device), log_lam, X, y,
                              solver=self.solver, linear_solver=self.linear_solver)
        return F.softplus(-y_val * (X_val @ w)).mean()

    def vmapped(self) -> torch.Tensor:
        log_lam, *rest = self.data
        log_lam = log_lam.clone().requires_grad_(True)
        return torch.autograd.grad(torch.func.vmap(self.validation_loss)(log_lam, *rest).sum(), log_lam)[0]

    def loop(self) -> torch.Tensor:
        log_lam, X, y, X_val, y_val = self.data
        grads = []
        for i in range(len(log_lam)):
            lam_i = log_lam[i].clone().requires_grad_(True)
            grads.append(torch.autograd.grad(self.validation_loss(lam_i, X[i], y[i], X_val[i], y_val[i]), lam_i)[0])
        return torch.stack(grads)


def fixed_iteration_problem(device, dtype=torch.float64, n: int = 50, d: int = 10, compile=False):
    """A hypergradient with a fixed amount of work: 20 gradient-descent steps forward, 10 CG
    iterations backward, its checks deferred (``on_failure="defer"``: no host read in the
    step). Returns ``step(log_lam) -> (gradient, info)`` and a starting ``log_lam``
    (per-feature, ``d`` entries); ``info.verify()`` reads the checks. ``compile``: as
    ``ig.CG``'s."""
    g = _generator(6)
    X = torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.sign(torch.randn(n, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    solver = ig.solvers.GradientDescent(lr=0.5, maxiter=20, tol=0)
    linear_solver = ig.CG(maxiter=10, tol=1e-30, check_every=10, compile=compile)

    def step(log_lam: torch.Tensor) -> Tuple[torch.Tensor, ig.SolveInfo]:
        w, info = ig.implicit_solve(_logistic, torch.zeros(d, dtype=dtype, device=device), log_lam, X, y,
                                    solver=solver, linear_solver=linear_solver, on_failure="defer",
                                    return_info=True)
        return torch.autograd.grad(F.softplus(-y * (X @ w)).mean(), log_lam)[0], info

    return step, torch.full((d,), -1.0, dtype=dtype, device=device)


def meta_learner(method: str, inner_steps: int, device):
    """iMAML (implicit) or MAML (unrolled) on a 64-256-256-5 MLP and one 5-way 5-shot task,
    ``inner_steps`` gradient steps: ``(learner, tasks)``."""
    model = _mlp((64, 256, 256, 5), torch.float32, seed=7).to(device)
    if method == "imaml":
        learner = ig.meta.IMAML(model, F.cross_entropy, lam=1.0,
                                inner_solver=ig.solvers.GradientDescent(lr=0.1, maxiter=inner_steps, tol=0),
                                linear_solver=ig.CG(maxiter=10), forward_tol=1.0, on_failure="ignore")
    elif method == "maml":
        learner = ig.meta.MAML(model, F.cross_entropy, inner_lr=0.1, inner_steps=inner_steps)
    else:
        raise ValueError(f"unknown method {method!r}; choose 'imaml' or 'maml'")
    g = _generator(8)
    xs, xq = (torch.randn(25, 64, generator=g) for _ in range(2))
    ys, yq = (torch.arange(5).repeat(5) for _ in range(2))
    return learner, [tuple(t.to(device) for t in (xs, ys, xq, yq))]
