"""Batched QP layers: ``ig.qp_solve`` against qpth and cvxpylayers.

64 random strictly convex QPs with 20 variables and 30 inequalities (``Q = LLᵀ/n + 0.1 I``,
``h`` chosen so that a random point is strictly feasible), float64. All three solve to a
tolerance of 1e-10 (implicitgrad ``tol``, qpth ``eps``, cvxpylayers' solver ``eps``), and the
gradient of ``⟨v, z*⟩`` with respect to ``p``, ``G`` and ``h`` is compared between them and
with central finite differences (``Q`` is left out of the comparison with cvxpylayers, which
takes a factor of ``Q``; its derivative is computed with diffcp's ``mode="dense"``). Every
parameter is passed with its batch dimension: qpth averages, instead of summing, the
gradient of a parameter shared by the batch. Timed, interleaved: the forward pass (autograd
on) and the backward pass alone.

What the agreement rows mean (``check["pairs"]``):

* ``A vs B (all problems)``: ``max|∇A − ∇B| / max(|∇A|, |∇B|)`` over the whole batch, the
  number of the issue's target (1e-6);
* ``A vs B (N problems with margin ≥ 1e-3)``: the same over the problems whose every
  constraint is clearly active or clearly inactive, ``min_i max(s_i, λ_i) ≥ 1e-3`` at the
  solution; the others are nearly degenerate (strict complementarity nearly fails) and are
  listed one by one in ``check["near_degenerate"]`` with each library's error;
* ``A vs finite differences, worst problem``: per problem, the directional derivative
  ``⟨∇, D⟩`` of ``⟨v_i, z_i*⟩`` along 3 random directions against central differences of
  implicitgrad's forward (step 1e-6; the refined solutions are exact to ~1e-15, so the
  differences carry a rounding error of ~1e-15 / 1e-6, up to ~2e-7 relative on the problem
  with the smallest derivative), the largest relative error over problems;
* ``qpth vs the KKT gradient with λ, s clamped at 1e-8``: qpth's backward factors the KKT
  system with ``λ / s`` computed from multipliers and slacks clamped below at 1e-8 (qpth/qp.py,
  ``backward``), a bias of order 1e-6 on problems with active constraints whatever its
  ``eps``; this row is the exact KKT gradient with that same clamp, and its agreement with
  qpth shows that this rule, not qpth's forward, is what separates qpth from the others.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from _timing import Impl, agreement, interleaved, max_rel_diff, summarize

import implicitgrad as ig

DT = torch.float64
TOL = 1e-10  # every library's tolerance
MARGIN = 1e-3  # below it a problem counts as nearly degenerate
CLAMP = 1e-8  # qpth's floor on multipliers and slacks in its backward
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
    out: Dict[str, Callable] = {"implicitgrad": lambda Q, p, G, h: ig.qp_solve(Q, p, G, h, tol=TOL)}
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


def finite_difference_errors(fn: Callable, args: List[torch.Tensor], v: torch.Tensor,
                             grads: Dict[str, List[torch.Tensor]], directions: int = 3,
                             step: float = 1e-6) -> Dict[str, torch.Tensor]:
    """Per library and per problem, the largest relative gap between ``⟨∇_i, D_i⟩`` and the
    central difference of ``⟨v_i, z_i*⟩`` along random directions ``D`` of ``(p, G, h)``.

    The problems are independent, so one perturbation of the whole batch gives every
    problem's difference at once.
    """
    g = torch.Generator().manual_seed(7)
    worst = {name: torch.zeros(v.shape[0], dtype=DT) for name in grads}
    Q, rest = args[0], args[1:]
    for _ in range(directions):
        D = [torch.randn(t.shape, generator=g, dtype=DT).to(t.device) for t in rest]
        with torch.no_grad():
            plus = (fn(Q, *[t + step * d for t, d in zip(rest, D)]) * v).sum(-1)
            minus = (fn(Q, *[t - step * d for t, d in zip(rest, D)]) * v).sum(-1)
        fd = ((plus - minus) / (2 * step)).cpu()
        for name, gr in grads.items():
            exact = sum((a * d).flatten(1).sum(-1) for a, d in zip(gr, D)).cpu()
            worst[name] = torch.maximum(worst[name], (exact - fd).abs() / fd.abs().clamp_min(1e-12))
    return worst


def clamped_kkt_gradient(args: List[torch.Tensor], v: torch.Tensor, clamp: float) -> List[torch.Tensor]:
    """The KKT gradient of ``⟨v, z*⟩`` in ``(p, G, h)`` with ``λ`` and ``s`` floored at ``clamp``
    in the matrix (qpth's rule): ``[[Q, Gᵀ], [diag(λ̃) G, −diag(s̃)]]ᵀ (w, w_λ) = (v, 0)``."""
    Q, p, G, h = [t.detach() for t in args]
    z, info = ig.qp_solve(Q, p, G, h, tol=TOL, return_info=True)
    lam = info.multipliers[0]
    s = h - (G @ z.unsqueeze(-1)).squeeze(-1)
    lam_c, s_c = lam.clamp_min(clamp), s.clamp_min(clamp)
    K = torch.cat([torch.cat([0.5 * (Q + Q.transpose(-1, -2)), G.transpose(-1, -2)], -1),
                   torch.cat([lam_c.unsqueeze(-1) * G, torch.diag_embed(-s_c)], -1)], -2)
    u = torch.linalg.solve(K.transpose(-1, -2), torch.cat([v, torch.zeros_like(h)], -1))
    w, t = u[..., : p.shape[-1]], lam_c * u[..., p.shape[-1] :]
    return [-w, -(lam.unsqueeze(-1) * w.unsqueeze(-2) + t.unsqueeze(-1) * z.unsqueeze(-2)), t]


def gradient_check(fns: Dict[str, Callable], args: List[torch.Tensor], v: torch.Tensor) -> Dict[str, Any]:
    """Solutions and gradients of every library against each other, central differences and
    qpth's clamped KKT rule, over the whole batch and per problem (see the module docstring)."""
    solutions, grads = {}, {}
    for name, fn in fns.items():
        z = fn(*args)
        solutions[name] = z.detach()
        grads[name] = list(torch.autograd.grad((z * v).sum(), args[1:]))  # p, G, h
    Q, p, G, h = [t.detach() for t in args]
    z, info = ig.qp_solve(Q, p, G, h, tol=TOL, return_info=True)
    slack = h - (G @ z.unsqueeze(-1)).squeeze(-1)
    margin = torch.maximum(slack, info.multipliers[0]).amin(-1).cpu()
    clear = margin >= MARGIN
    fd = finite_difference_errors(fns["implicitgrad"], [Q, p, G, h], v, grads)
    check = agreement({k: [t.detach() for t in g] for k, g in grads.items()}, 1e-6)
    pairs = {f"{k} (all problems)": value for k, value in check["pairs"].items()}
    names = list(grads)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs[f"{a} vs {b} ({int(clear.sum())} problems with margin ≥ {MARGIN:.0e})"] = max_rel_diff(
                [t[clear] for t in grads[a]], [t[clear] for t in grads[b]])
    for name in names:
        pairs[f"{name} vs finite differences, worst problem"] = float(fd[name].max())
    pairs["implicitgrad vs central differences"] = float(fd["implicitgrad"].max())
    if "qpth" in grads:
        pairs[f"qpth vs the KKT gradient with λ, s clamped at {CLAMP:.0e}"] = max_rel_diff(
            grads["qpth"], clamped_kkt_gradient(args, v, CLAMP))
    near = [{"problem": int(i), "margin": float(margin[i]),
             "finite_difference_errors": {name: float(fd[name][i]) for name in names}}
            for i in (~clear).nonzero().flatten().tolist()]
    ours_ok = pairs["implicitgrad vs central differences"] <= 1e-6 and all(
        value <= 1e-6 for key, value in pairs.items() if key.startswith("implicitgrad vs ") and "qpth" not in key)
    # qpth's distance is its clamp: met when the clamped KKT gradient explains it.
    qpth_ok = "qpth" not in grads or pairs[f"qpth vs the KKT gradient with λ, s clamped at {CLAMP:.0e}"] <= 1e-8
    solution_diff = max(float((a - solutions["implicitgrad"]).abs().max()) for a in solutions.values())
    return {"pairs": pairs, "tol": 1e-6, "max_rel_diff": check["max_rel_diff"], "near_degenerate": near,
            "margin_threshold": MARGIN, "solution_max_diff": solution_diff, "polished": int(info.polished.sum()),
            "ok": bool(ours_ok and qpth_ok and solution_diff <= 1e-6 and info.converged)}, info


def run(device, quick: bool, reps: int, warmup: int, progress: Optional[Callable] = None) -> Dict[str, Any]:
    say = progress or (lambda message: None)
    batch, n, m = (16, 10, 15) if quick else (64, 20, 30)
    args = problems(batch, n, m, device)
    v = torch.randn(batch, n, generator=torch.Generator().manual_seed(3), dtype=DT).to(device)
    fns = solvers(n, m, say)
    say(f"qp: checking solutions and gradients (batch {batch}, n {n}, m {m})")
    check, info = gradient_check(fns, args, v)

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
            "tol": TOL, "peers": [name for name in fns if name != "implicitgrad"],
            "iterations": int(info.iterations.max()), "check": check, "times_s": times, **summary}
