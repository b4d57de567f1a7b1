"""Batched QP layers: ``ig.qp_solve`` against qpth and cvxpylayers.

64 random strictly convex QPs with 20 variables and 30 inequalities (``Q = LLᵀ/n + 0.1 I``,
``h`` chosen so that a random point is strictly feasible), float64. The peers solve to a
tolerance of 1e-10 (qpth ``eps``, cvxpylayers' solver ``eps``), implicitgrad to ``tol=1e-12``
(its relative residuals and gap at 1e-10 left solutions ~1e-7 apart from the peers'), and
the gradient of ``⟨v, z*⟩`` with respect to ``p``, ``G`` and ``h`` is compared between them and
with central finite differences along random directions (``Q`` is left out of the
comparison with cvxpylayers, which takes a factor of ``Q``; its derivative is computed with
diffcp's ``mode="dense"``). Every parameter is passed with
its batch dimension: qpth averages, instead of summing, the gradient of a parameter shared
by the batch. Timed, interleaved: the forward pass (autograd on) and the backward pass alone.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from _timing import Impl, agreement, interleaved, summarize

import implicitgrad as ig

DT = torch.float64
TOL = 1e-10  # the peers' tolerance
# implicitgrad's tol bounds relative residuals and gap, a weaker test than the peers' at equal
# value; 1e-12 (one more iteration) makes its solutions as accurate as theirs.
OURS_TOL = 1e-12
# diffcp's default derivative (mode "lsqr") is an iterative least-squares solve whose error was
# about 1e-2 here; "dense" factors the derivative's system. One thread, as the other libraries.
CVXPY_ARGS = {"eps": TOL, "max_iters": 100000, "mode": "dense", "n_jobs_forward": 1, "n_jobs_backward": 1}


def problems(batch: int, n: int, m: int, device, seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(batch, n, n, generator=g, dtype=DT)
    Q = L @ L.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=DT)
    p = torch.randn(batch, n, generator=g, dtype=DT)
    G = torch.randn(batch, m, n, generator=g, dtype=DT)
    z0 = torch.randn(batch, n, generator=g, dtype=DT)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(batch, m, generator=g, dtype=DT)
    return [t.to(device).requires_grad_(True) for t in (Q, p, G, h)]


def solvers(n: int, m: int, say: Callable) -> Dict[str, Callable]:
    """``name -> fn(Q, p, G, h) -> z`` for implicitgrad and the installed peers."""
    out: Dict[str, Callable] = {"implicitgrad": lambda Q, p, G, h: ig.qp_solve(Q, p, G, h, tol=OURS_TOL)}
    try:
        from qpth.qp import QPFunction

        def qpth(Q, p, G, h):
            e = torch.empty(0, dtype=DT, device=p.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return QPFunction(verbose=-1, eps=TOL, maxIter=100)(Q, p, G, h, e, e)

        out["qpth"] = qpth
    except ImportError:
        say("qpth not installed: skipped (pip install implicitgrad[peers])")
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        F, pp, GG, hh, x = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F @ x) + pp @ x), [GG @ x <= hh])
        layer = CvxpyLayer(problem, parameters=[F, pp, GG, hh], variables=[x])

        def cvxpylayers(Q, p, G, h):
            factor = torch.linalg.cholesky(Q).transpose(-1, -2)  # Q = factorᵀ factor
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return layer(factor, p, G, h, solver_args=CVXPY_ARGS)[0]

        out["cvxpylayers"] = cvxpylayers
    except ImportError:
        say("cvxpylayers not installed: skipped (pip install implicitgrad[peers])")
    return out


def finite_difference_check(fn: Callable, args: List[torch.Tensor], v: torch.Tensor, grads: List[torch.Tensor],
                            directions: int = 3, step: float = 1e-6) -> float:
    """Largest relative gap between ⟨∇, D⟩ and the central difference along random directions D."""
    g = torch.Generator().manual_seed(7)
    worst = 0.0
    for _ in range(directions):
        D = [torch.randn(t.shape, generator=g, dtype=DT).to(t.device) for t in args]
        with torch.no_grad():
            plus = (fn(*[t + step * d for t, d in zip(args, D)]) * v).sum()
            minus = (fn(*[t - step * d for t, d in zip(args, D)]) * v).sum()
        fd = float((plus - minus) / (2 * step))
        exact = float(sum((gr * d).sum() for gr, d in zip(grads, D)))
        worst = max(worst, abs(exact - fd) / max(abs(fd), 1e-12))
    return worst


def run(device, quick: bool, reps: int, warmup: int, progress: Optional[Callable] = None) -> Dict[str, Any]:
    say = progress or (lambda message: None)
    batch, n, m = (16, 10, 15) if quick else (64, 20, 30)
    args = problems(batch, n, m, device)
    v = torch.randn(batch, n, generator=torch.Generator().manual_seed(3), dtype=DT).to(device)
    fns = solvers(n, m, say)
    say(f"qp: checking solutions and gradients (batch {batch}, n {n}, m {m})")
    solutions, grads, fd_errors = {}, {}, {}  # central differences of ~1e-10-accurate solutions: ~1e-7 noise
    for name, fn in fns.items():
        z = fn(*args)
        solutions[name] = z.detach()
        grads[name] = list(torch.autograd.grad((z * v).sum(), args[1:]))  # p, G, h
        if name == "implicitgrad":
            full = torch.autograd.grad((fn(*args) * v).sum(), args)
            fd_errors[name] = finite_difference_check(fn, [t.detach() for t in args], v, list(full))
    _, info = ig.qp_solve(*[t.detach() for t in args], tol=OURS_TOL, return_info=True)
    # The gate is 1e-5; the table shows each pair against the 1e-6 target (a nearly degenerate
    # problem of the full batch, with a constraint whose slack and multiplier are both ~3e-4,
    # amplifies every solver's error in its gradient).
    check = agreement(grads, 1e-5)
    check["pairs"]["implicitgrad vs central differences"] = fd_errors["implicitgrad"]
    check["max_rel_diff"] = max(check["pairs"].values())
    check["solution_max_diff"] = max((float((a - solutions["implicitgrad"]).abs().max()) for a in solutions.values()),
                                     default=0.0)
    check["ok"] = bool(check["max_rel_diff"] <= check["tol"] and check["solution_max_diff"] <= 1e-6 and info.converged)

    say("qp: timing forward and backward")
    timed: List[Impl] = []
    for name, fn in fns.items():
        timed.append(Impl(f"{name} forward", lambda: None, lambda _s, f=fn: f(*args)))
        timed.append(Impl(f"{name} backward", lambda f=fn: (f(*args) * v).sum(),
                          lambda loss: torch.autograd.grad(loss, args[1:])))
    times = interleaved(timed, reps=reps, warmup=warmup, device=device)
    pairs = [(f"implicitgrad {k}", f"{peer} {k}") for peer in ("qpth", "cvxpylayers") for k in ("forward", "backward")]
    summary = summarize(times, pairs)
    return {"description": f"{batch} QPs, {n} variables, {m} inequalities, float64", "batch": batch, "n": n, "m": m,
            "tol": TOL, "ours_tol": OURS_TOL, "peers": [name for name in fns if name != "implicitgrad"],
            "iterations": int(info.iterations.max()), "check": check, "times_s": times, **summary}
