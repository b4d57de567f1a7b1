"""Krylov solvers at the cost of their products: solve time against the bare matvec.

Each case builds one linear system from an autograd graph, as the backward pass of an
implicit solve does, and times, interleaved in one process, every solver that fits it
against a loop of the same number of bare ``matvec`` calls (on distinct inputs). The
ratio ``solve / matvecs alone`` is the solver's bookkeeping overhead; the iterations are
the products needed for a relative residual of 1e-8 (restart residuals and final
measurements included).

Cases:

* ``symmetric`` — Hessian-vector products of a ridge-regularised logistic regression
  (CG, MINRES);
* ``deq`` — the backward system of a deep-equilibrium layer ``z = tanh(W z + U x)``
  (width 64, batch 32, float64): ``u ↦ u − (∂T/∂z)ᵀ u``, one system of 2,048 unknowns
  (GMRES, BiCGStab);
* ``deq_batched`` — the same layer, each sample its own system (``batch_ndim = 1``, as
  under ``torch.func.vmap``), with per-system tolerances (GMRES, BiCGStab);
* ``root`` — the transposed Jacobian of ``F(x) = x + ½ tanh(W x) − θ`` with 2,000
  unknowns and a dense ``W`` (GMRES, BiCGStab).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from _timing import Impl, agreement, interleaved, summarize

import implicitgrad as ig

TOL = 1e-8
#: GMRES wall time over the time of its products alone.
TARGET_GMRES = 1.3
DT = torch.float64


def _vjp_matvec(output: torch.Tensor, inputs: torch.Tensor, identity: bool) -> Callable:
    """``u ↦ u − Jᵀu`` (``identity``) or ``u ↦ Jᵀu`` with ``J = ∂output/∂inputs``, on a retained graph."""

    def matvec(u: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(output, inputs, u, retain_graph=True)
        return u - g if identity else g

    return matvec


def symmetric_case(quick: bool, device) -> Dict[str, Any]:
    n, d = (300, 100) if quick else (1000, 400)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=gen, dtype=DT).to(device)
    y = torch.sign(torch.randn(n, generator=gen, dtype=DT)).to(device)
    w = (0.1 * torch.randn(d, generator=gen, dtype=DT)).to(device).requires_grad_(True)
    loss = torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5e-2 * (w * w).sum()
    (grad,) = torch.autograd.grad(loss, w, create_graph=True)
    solvers = {"CG": ig.CG(maxiter=2000, tol=TOL), "MINRES": ig.MINRES(maxiter=2000, tol=TOL)}
    return {"description": f"logistic Hessian (d = {d}, n = {n})", "unknowns": d,
            "matvec": _vjp_matvec(grad, w, identity=False), "rhs": torch.randn(d, generator=gen, dtype=DT).to(device),
            "batch_ndim": 0, "solvers": solvers}


def deq_layer(device, width: int = 64, batch: int = 32, contraction: float = 0.9):
    """A tanh layer at its fixed point: returns ``(z*, T(z*))`` with a graph in ``z``."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(width, width, generator=gen, dtype=DT)
    W = (contraction * W / torch.linalg.matrix_norm(W, ord=2)).to(device)
    U = (torch.randn(width, width, generator=gen, dtype=DT) / width**0.5).to(device)
    inputs = torch.randn(batch, width, generator=gen, dtype=DT).to(device)
    z = torch.zeros(batch, width, dtype=DT, device=device)
    for _ in range(500):
        z = torch.tanh(z @ W.T + inputs @ U.T)
    z = z.detach().requires_grad_(True)
    return z, torch.tanh(z @ W.T + inputs @ U.T)


def deq_case(device, batched: bool) -> Dict[str, Any]:
    z, out = deq_layer(device)
    rhs = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=DT).to(device)
    kind = "one system per sample (batch_ndim = 1)" if batched else "one system of 2,048 unknowns"
    return {"description": f"DEQ backward, width 64, batch 32: {kind}", "unknowns": z.numel(),
            "matvec": _vjp_matvec(out, z, identity=True), "rhs": rhs, "batch_ndim": int(batched),
            "solvers": _nonsymmetric()}


def root_case(quick: bool, device) -> Dict[str, Any]:
    n = 500 if quick else 2000
    gen = torch.Generator().manual_seed(3)
    W = (torch.randn(n, n, generator=gen, dtype=DT) / n**0.5).to(device)
    x = torch.randn(n, generator=gen, dtype=DT).to(device).requires_grad_(True)
    F = x + 0.5 * torch.tanh(W @ x)
    return {"description": f"root_solve backward, F(x) = x + ½ tanh(W x) − θ, {n} unknowns", "unknowns": n,
            "matvec": _vjp_matvec(F, x, identity=False), "rhs": torch.randn(n, generator=gen, dtype=DT).to(device),
            "batch_ndim": 0, "solvers": _nonsymmetric()}


def _nonsymmetric() -> Dict[str, ig.LinearSolver]:
    return {"GMRES": ig.GMRES(maxiter=2000, tol=TOL), "BiCGStab": ig.BiCGStab(maxiter=2000, tol=TOL)}


def measure(case: Dict[str, Any], reps: int, warmup: int, device) -> Dict[str, Any]:
    """Iterations, solutions and interleaved timings of every solver of ``case``."""
    matvec, rhs, batch_ndim = case["matvec"], case["rhs"], case["batch_ndim"]
    solutions, iterations, statuses = {}, {}, {}
    for name, solver in case["solvers"].items():
        x, info = solver(matvec, rhs, batch_ndim=batch_ndim)
        solutions[name], iterations[name], statuses[name] = [x], info.iterations, info.status
    # Distinct inputs for the bare loop, so that it does not run on a cached vector.
    inputs = [torch.randn(rhs.shape, generator=torch.Generator().manual_seed(i), dtype=DT).to(device)
              for i in range(max(iterations.values()))]

    def bare(k: int) -> None:
        for v in inputs[:k]:
            matvec(v)

    impls: List[Impl] = []
    for name, solver in case["solvers"].items():
        impls.append(Impl(name, lambda: None, lambda _s, solver=solver: solver(matvec, rhs, batch_ndim=batch_ndim)))
        impls.append(Impl(f"{name} matvecs", lambda: None, lambda _s, k=iterations[name]: bare(k)))
    times = interleaved(impls, reps=reps, warmup=warmup, device=device)
    summary = summarize(times, [(name, f"{name} matvecs") for name in case["solvers"]])
    # Solutions to 1e-8 agree to about the condition number times that.
    check = agreement(solutions, 1e-5)
    check["statuses"] = statuses
    check["ok"] = check["ok"] and all(s == "converged" for s in statuses.values())
    per_iteration = {name: summary["median_s"][name] / iterations[name] for name in case["solvers"]}
    per_matvec = {name: summary["median_s"][f"{name} matvecs"] / iterations[name] for name in case["solvers"]}
    return {
        "description": case["description"], "unknowns": case["unknowns"], "batch_ndim": batch_ndim,
        "iterations": iterations, "per_iteration_s": per_iteration, "per_matvec_s": per_matvec,
        "overhead": {name: summary["ratios"][f"{name}/{name} matvecs"] for name in case["solvers"]},
        "check": check, "times_s": times, **summary,
    }


def run(device, quick: bool, reps: int, warmup: int, progress: Optional[Callable] = None) -> Dict[str, Any]:
    builders = {
        "symmetric": lambda: symmetric_case(quick, device),
        "deq": lambda: deq_case(device, batched=False),
        "deq_batched": lambda: deq_case(device, batched=True),
        "root": lambda: root_case(quick, device),
    }
    cases = {}
    for key, build in builders.items():
        if progress:
            progress(f"krylov: {key}")
        cases[key] = measure(build(), reps, warmup, device)
    return {"tol": TOL, "dtype": str(DT), "cases": cases}


# ---------------------------------------------------------------------------- GMRES of another revision


def gmres_at(revision: str) -> type:
    """The ``GMRES`` class of ``implicitgrad/linalg/gmres.py`` at a git revision."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{revision}:implicitgrad/linalg/gmres.py"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    namespace: Dict[str, Any] = {"__name__": "implicitgrad.linalg.gmres_at_revision",
                                 "__package__": "implicitgrad.linalg"}
    exec(compile(source, f"{revision}:gmres.py", "exec"), namespace)
    return namespace["GMRES"]


def end_to_end(old: type, quick: bool, reps: int, warmup: int, device) -> Dict[str, Any]:
    """The backward pass (forward untimed) of a DEQ layer and of a root problem, with the
    default ``GMRES()`` of this revision against ``old()``."""
    width, batch = 64, 32
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(width, width, generator=gen, dtype=DT)
    W = (0.9 * W / torch.linalg.matrix_norm(W, ord=2)).to(device)
    U = (torch.randn(width, width, generator=gen, dtype=DT) / width**0.5).to(device)
    inputs = torch.randn(batch, width, generator=gen, dtype=DT).to(device)
    forward = ig.solvers.FixedPointIteration(maxiter=2000, tol=1e-12)

    def deq(linear_solver):
        u = U.clone().requires_grad_(True)
        z = ig.fixed_point_solve(lambda z, u: torch.tanh(z @ W.T + inputs @ u.T), torch.zeros_like(inputs), u,
                                 solver=forward, linear_solver=linear_solver)
        return (z**2).sum(), u

    n = 500 if quick else 2000
    A = (0.9 * torch.randn(n, n, generator=gen, dtype=DT) / n**0.5).to(device)
    theta = torch.randn(n, generator=gen, dtype=DT).to(device)

    def iterate(F, x0, th):
        x = x0
        for _ in range(200):
            x = th - 0.5 * torch.tanh(A @ x)
        return x

    def root(linear_solver):
        th = theta.clone().requires_grad_(True)
        x = ig.root_solve(lambda x, th: x + 0.5 * torch.tanh(A @ x) - th, torch.zeros_like(theta), th,
                          solver=iterate, linear_solver=linear_solver)
        return (x**3).sum(), th

    out = {}
    for key, problem in (("deq", deq), ("root", root)):
        grads = {}
        for name, solver in (("before", old()), ("after", ig.GMRES())):
            loss, leaf = problem(solver)
            grads[name] = [torch.autograd.grad(loss, leaf)[0]]
        impls = [Impl(name, lambda problem=problem, s=solver: problem(s),
                      lambda state: torch.autograd.grad(state[0], state[1]))
                 for name, solver in (("before", old()), ("after", ig.GMRES()))]
        times = interleaved(impls, reps=reps, warmup=warmup, device=device)
        out[key] = {"check": agreement(grads, 1e-7), **summarize(times, [("before", "after")])}
    return out


def main(argv: Optional[List[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="GMRES of this tree against the GMRES of a git revision.")
    parser.add_argument("--compare-gmres", metavar="REV", required=True, help="e.g. HEAD~3")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    old = gmres_at(args.compare_gmres)
    results = end_to_end(old, args.quick, args.reps, args.warmup, device)
    for key, res in results.items():
        med = res["median_s"]
        print(f"{key}: backward with GMRES() at {args.compare_gmres}: {1e3 * med['before']:.2f} ms, "
              f"now: {1e3 * med['after']:.2f} ms (median ratio {res['ratios']['before/after']:.2f}x, "
              f"best-of-rounds {res['best_ratios']['before/after']:.2f}x); gradients agree to "
              f"{res['check']['max_rel_diff']:.1e}")
    solver_level = {}
    for key, case in (("deq", deq_case(device, batched=False)), ("root", root_case(args.quick, device))):
        case["solvers"] = {"before": old(maxiter=2000, tol=TOL), "after": ig.GMRES(maxiter=2000, tol=TOL)}
        solver_level[key] = measure(case, args.reps, args.warmup, device)
        c = solver_level[key]
        print(f"{key}: solve / its matvecs alone: before {c['overhead']['before']:.2f} "
              f"({c['iterations']['before']} products), after {c['overhead']['after']:.2f} "
              f"({c['iterations']['after']} products)")


if __name__ == "__main__":
    main()
