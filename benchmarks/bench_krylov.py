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

On the three non-symmetric cases, GMRES is also timed against the least any Arnoldi
process costs in eager PyTorch (key ``arnoldi_floor`` of the case): a loop of the same
products, each followed only by the two Gram-Schmidt passes, the normalisation and the
store into the basis (no rotations, no checks, no packing).

``--profile`` splits one GMRES solve of the ``deq`` case into its products (on prepared
inputs, on fresh ones, through the wrapping of a solve), the work of a step measured
alone and in one loop, and the rest of the solve (:func:`step_profile`).

Beside the cases, the key ``normal_equations`` of the section's results holds the
backward pass of ``root_solve`` / ``fixed_point_solve`` with ``ig.CGNR`` against GMRES and
BiCGStab, on a Jacobian close to an orthogonal matrix (``F(x) = Q x + 0.3 tanh(W x) − θ``:
eigenvalues around the unit circle, singular values near 1) and on the DEQ and root
problems (well-conditioned, eigenvalues near 1).
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
    pairs = [(name, f"{name} matvecs") for name in case["solvers"]]
    if "GMRES" in case["solvers"]:
        arnoldi = arnoldi_floor(case, iterations["GMRES"])
        impls.append(Impl("Arnoldi floor", lambda: None, lambda _s: arnoldi()))
        pairs += [("Arnoldi floor", "GMRES matvecs"), ("GMRES", "Arnoldi floor")]
    times = interleaved(impls, reps=reps, warmup=warmup, device=device)
    summary = summarize(times, pairs)
    # Solutions to 1e-8 agree to about the condition number times that.
    check = agreement(solutions, 1e-5)
    check["statuses"] = statuses
    check["ok"] = check["ok"] and all(s == "converged" for s in statuses.values())
    per_iteration = {name: summary["median_s"][name] / iterations[name] for name in case["solvers"]}
    per_matvec = {name: summary["median_s"][f"{name} matvecs"] / iterations[name] for name in case["solvers"]}
    out = {
        "description": case["description"], "unknowns": case["unknowns"], "batch_ndim": batch_ndim,
        "iterations": iterations, "per_iteration_s": per_iteration, "per_matvec_s": per_matvec,
        "overhead": {name: summary["ratios"][f"{name}/{name} matvecs"] for name in case["solvers"]},
        "check": check, "times_s": times, **summary,
    }
    if "GMRES" in case["solvers"]:
        out["arnoldi_floor"] = {"products": iterations["GMRES"],
                                "over_matvecs": summary["ratios"]["Arnoldi floor/GMRES matvecs"],
                                "gmres_over_floor": summary["ratios"]["GMRES/Arnoldi floor"]}
    return out


def arnoldi_floor(case: Dict[str, Any], steps: int) -> Callable[[], None]:
    """The least an Arnoldi process of ``steps`` products costs in eager PyTorch: each
    product followed by two classical Gram-Schmidt passes (two block products with the
    basis each), the normalisation and the store into the basis, then one product for the
    final residual (``steps`` products in all, as GMRES counts them). No rotations, no
    convergence checks, no packing."""
    matvec, rhs = case["matvec"], case["rhs"]
    systems = rhs.shape[0] if case["batch_ndim"] else 1
    flat = rhs.reshape(systems, -1)

    def run() -> None:
        basis = flat.new_empty(systems, steps, flat.shape[1])
        vector = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True)
        basis[:, 0] = vector
        for j in range(steps - 1):
            w = matvec(vector.reshape(rhs.shape)).reshape(systems, 1, -1)
            known = basis[:, : j + 1]
            h = torch.bmm(w, known.mT)
            w = torch.baddbmm(w, h, known, alpha=-1)
            h = torch.bmm(w, known.mT)
            w = torch.baddbmm(w, h, known, alpha=-1)
            vector = w.squeeze(1) / torch.linalg.vector_norm(w, dim=2)
            basis[:, j + 1] = vector
        matvec(vector.reshape(rhs.shape))

    return run


def rotation_problem(quick: bool, device):
    """``F(x) = Q x + 0.3 tanh(W x) − θ`` with ``Q`` orthogonal: a Jacobian whose eigenvalues
    lie around the unit circle and whose singular values are all near 1."""
    n = 500 if quick else 2000
    gen = torch.Generator().manual_seed(5)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT)).Q.to(device)
    W = (torch.randn(n, n, generator=gen, dtype=DT) / n**0.5).to(device)
    theta = torch.randn(n, generator=gen, dtype=DT).to(device)

    def iterate(F, x0, th):
        # x = Qᵀ(θ − 0.3 tanh(W x)) contracts by 0.3 ‖W‖ ≈ 0.6 per step.
        x = x0
        for _ in range(100):
            x = Q.T @ (th - 0.3 * torch.tanh(W @ x))
        return x

    def problem(linear_solver):
        th = theta.clone().requires_grad_(True)
        x, info = ig.root_solve(lambda x, th: Q @ x + 0.3 * torch.tanh(W @ x) - th, torch.zeros_like(theta), th,
                                solver=iterate, linear_solver=linear_solver, on_failure="ignore", return_info=True)
        return (x**3).sum(), th, info

    return f"root_solve backward, Jacobian near an orthogonal matrix, F(x) = Q x + 0.3 tanh(W x) − θ, {n} unknowns", \
        problem


def deq_problem(device):
    """The backward pass of a DEQ layer ``z = tanh(W z + U x)`` (width 64, batch 32)."""
    width, batch = 64, 32
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(width, width, generator=gen, dtype=DT)
    W = (0.9 * W / torch.linalg.matrix_norm(W, ord=2)).to(device)
    U = (torch.randn(width, width, generator=gen, dtype=DT) / width**0.5).to(device)
    inputs = torch.randn(batch, width, generator=gen, dtype=DT).to(device)
    forward = ig.solvers.FixedPointIteration(maxiter=2000, tol=1e-12)

    def problem(linear_solver):
        u = U.clone().requires_grad_(True)
        z, info = ig.fixed_point_solve(lambda z, u: torch.tanh(z @ W.T + inputs @ u.T), torch.zeros_like(inputs), u,
                                       solver=forward, linear_solver=linear_solver, on_failure="ignore",
                                       return_info=True)
        return (z**2).sum(), u, info

    return "fixed_point_solve backward, DEQ z = tanh(W z + U x), width 64, batch 32", problem


def root_problem(quick: bool, device):
    """The backward pass of ``F(x) = x + ½ tanh(A x) − θ``."""
    n = 500 if quick else 2000
    gen = torch.Generator().manual_seed(4)
    A = (0.9 * torch.randn(n, n, generator=gen, dtype=DT) / n**0.5).to(device)
    theta = torch.randn(n, generator=gen, dtype=DT).to(device)

    def iterate(F, x0, th):
        x = x0
        for _ in range(200):
            x = th - 0.5 * torch.tanh(A @ x)
        return x

    def problem(linear_solver):
        th = theta.clone().requires_grad_(True)
        x, info = ig.root_solve(lambda x, th: x + 0.5 * torch.tanh(A @ x) - th, torch.zeros_like(theta), th,
                                solver=iterate, linear_solver=linear_solver, on_failure="ignore", return_info=True)
        return (x**3).sum(), th, info

    return f"root_solve backward, F(x) = x + ½ tanh(A x) − θ, {n} unknowns", problem


def backward_race(problem: Callable, solvers: Dict[str, Any], reps: int, warmup: int, device,
                  tol: float, reference: Optional[Any] = None) -> Dict[str, Any]:
    """Backward passes (forward untimed) of ``problem`` with each linear solver, interleaved;
    the gradients of the solvers that converged are compared with each other and with the
    untimed ``reference`` solver's."""
    grads, statuses, products, forward = {}, {}, {}, 0.0
    for name, solver in {**solvers, **({"reference": reference} if reference is not None else {})}.items():
        loss, leaf, info = problem(solver)
        grads[name] = [torch.autograd.grad(loss, leaf)[0]]
        statuses[name] = str(info.backward.status)
        products[name] = info.backward.iterations
        forward = max(forward, float(info.forward_residual))
    impls = [Impl(name, lambda solver=solver: problem(solver)[:2],
                  lambda state: torch.autograd.grad(state[0], state[1])) for name, solver in solvers.items()]
    times = interleaved(impls, reps=reps, warmup=warmup, device=device)
    names = list(solvers)
    summary = summarize(times, [(a, b) for a in names for b in names if a != b])
    check = agreement({name: g for name, g in grads.items() if statuses[name] == "converged"}, tol)
    statuses.pop("reference", None)
    products.pop("reference", None)
    return {"statuses": statuses, "products": products, "forward_residual": forward, "check": check,
            "times_s": times, **summary}


def normal_equations(quick: bool, reps: int, warmup: int, device) -> Dict[str, Any]:
    """``ig.CGNR`` against GMRES and BiCGStab in backward passes, where it wins and where it loses."""
    def solvers() -> Dict[str, Any]:
        # 500 products: ten times what CGNR needs on the rotation, where the others fail.
        return {"GMRES": ig.GMRES(maxiter=500, tol=TOL), "BiCGStab": ig.BiCGStab(maxiter=500, tol=TOL),
                "CGNR": ig.CGNR(maxiter=500, tol=TOL)}

    out = {}
    for key, (description, problem) in (("rotation", rotation_problem(quick, device)),
                                        ("deq", deq_problem(device)), ("root", root_problem(quick, device))):
        out[key] = {"description": description,
                    **backward_race(problem, solvers(), reps, warmup, device, 1e-5, reference=ig.Exact())}
    return out


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
    if progress:
        progress("krylov: normal equations (CGNR)")
    return {"tol": TOL, "dtype": str(DT), "cases": cases,
            "normal_equations": normal_equations(quick, reps, warmup, device)}


# ---------------------------------------------------------------------------- where a GMRES step goes


def step_profile(case: Dict[str, Any], rounds: int = 200) -> Dict[str, float]:
    """Where a one-system GMRES solve (host bookkeeping) spends its time, in seconds: the
    solve, its products alone (on prepared inputs, on fresh inputs, and through the pytree
    wrapping and packing a solve puts around them), the bookkeeping of one step timed
    alone — the store of the shifted product and the Gram-Schmidt pass(es) as the solver
    runs them on a basis of the same size, and the rotation on Python numbers — and all of
    these in one loop of the solve's steps. Medians of ``rounds`` interleaved rounds."""
    import math
    import statistics
    import time

    from implicitgrad._tree import tree_flatten
    from implicitgrad.linalg import gmres
    from implicitgrad.linalg._base import PytreeLayout, packing

    matvec, rhs = case["matvec"], case["rhs"]
    n = rhs.numel()

    solver = ig.GMRES(maxiter=2000, tol=TOL)
    products = solver(matvec, rhs)[1].iterations
    steps = products - 1
    inputs = [torch.randn(rhs.shape, generator=torch.Generator().manual_seed(i), dtype=DT) for i in range(products)]
    flat_inputs = [v.reshape(1, n) for v in inputs]
    wrapped = PytreeLayout(tree_flatten(rhs)[1]).wrap(matvec, "matvec's output")
    pack, unpack = packing([rhs], 0)
    rows = gmres._Rows.borrow(flat_inputs[0], min(solver.restart, solver.maxiter))
    try:
        rows.basis.copy_(torch.linalg.qr(torch.randn(n, rows.basis.shape[0], dtype=DT)).Q.T)

        def orthogonalise() -> None:
            for j in range(steps):
                row, known_t, known, both, coefficients = rows.views(j % solver.restart)
                torch.sub(flat_inputs[j], flat_inputs[j + 1], alpha=1.0, out=row)
                gmres._orthogonalise(row, known_t, known, both, coefficients, 1e-300)

        columns = [[0.1] * (j % solver.restart + 1) for j in range(steps)]

        def rotate() -> None:
            rotations: List[Any] = []
            g, scale = [1.0], 0.0
            for j, column in enumerate(columns):
                if j % solver.restart == 0:
                    rotations, g = [], [1.0]
                column = list(column)
                scale = max(scale, math.sqrt(sum(v * v for v in column) + 0.09))
                gmres._rotate(column, rotations, 0.3)
                g.append(rotations[-1][1] * g[-1])

        def steps_alone() -> None:
            # The steps of the solve back to back, on the same basis: no setup, no restart.
            vector, rotations = flat_inputs[0], []
            for j in range(steps):
                row, known_t, known, both, coefficients = rows.views(j % solver.restart)
                torch.sub(pack(wrapped(unpack(vector))), vector, alpha=1.0, out=row)
                vector, column, below = gmres._orthogonalise(row, known_t, known, both, coefficients, 1e-300)
                gmres._rotate(column, rotations, below)
            pack(wrapped(unpack(vector)))

        parts = {"solve": (lambda: solver(matvec, rhs), 1),
                 "steps": (steps_alone, 1),
                 "bare": (lambda: [matvec(v) for v in inputs], products),
                 "fresh": (lambda: [matvec((v * 1.0).reshape(rhs.shape)) for v in flat_inputs], products),
                 "wrapped": (lambda: [pack(wrapped(unpack(v * 1.0))) for v in flat_inputs], products),
                 "gram_schmidt": (orthogonalise, steps),
                 "rotation": (rotate, steps)}
        times: Dict[str, List[float]] = {name: [] for name in parts}
        # Interleaved rounds (a change of load hits every part alike), the first ten dropped.
        for round_index in range(rounds + 10):
            for name, (fn, count) in parts.items():
                start = time.perf_counter()
                fn()
                if round_index >= 10:
                    times[name].append((time.perf_counter() - start) / count)
    finally:
        rows.give_back()
    out: Dict[str, float] = {name: statistics.median(values) for name, values in times.items()}
    out["products"] = products
    out["together"] = out["steps"] - products * out["wrapped"] - steps * (out["gram_schmidt"] + out["rotation"])
    out["rest"] = out["solve"] - out["steps"]
    return out


def _print_profile(key: str, prof: Dict[str, float]) -> None:
    us = 1e6
    print(f"{key}: GMRES solve {1e3 * prof['solve']:.2f} ms for {prof['products']} products "
          f"({prof['solve'] / (prof['products'] * prof['bare']):.2f}x its products on prepared inputs)")
    print(f"  product on a prepared input        {us * prof['bare']:7.1f} us")
    print(f"  + on a fresh input                 {us * (prof['fresh'] - prof['bare']):7.1f} us")
    print(f"  + pytree wrapping and packing      {us * (prof['wrapped'] - prof['fresh']):7.1f} us")
    print(f"  store and Gram-Schmidt, per step   {us * prof['gram_schmidt']:7.1f} us (alone)")
    print(f"  rotation on the host, per step     {us * prof['rotation']:7.1f} us (alone)")
    print(f"  the same, interleaved in one loop  {us * prof['together'] / prof['products']:7.1f} us per product more "
          "(each operation runs after a product, on colder caches)")
    print(f"  rest of the solve                  {us * prof['rest']:7.1f} us per solve "
          f"({us * prof['rest'] / prof['products']:.1f} us per product: the call, packing and norms, the "
          "unshifted first step, the solution update, the final residual's norm, the info)")


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
    out = {}
    for key, (_, problem) in (("deq", deq_problem(device)), ("root", root_problem(quick, device))):
        race = backward_race(problem, {"before": old(), "after": ig.GMRES()}, reps, warmup, device, 1e-7)
        out[key] = race
    return out


def _print_races(results: Dict[str, Any]) -> None:
    for key, res in results.items():
        names = list(res["products"])
        print(f"{key}: {res['description']} (forward residual {res['forward_residual']:.1e})")
        for name in names:
            print(f"  {name:9s} {res['statuses'][name]:15s} {res['products'][name]:5d} products  "
                  f"backward {1e3 * res['median_s'][name]:8.2f} ms  "
                  + "  ".join(f"/{other} {res['ratios'][f'{name}/{other}']:.2f}" for other in names if other != name))
        print(f"  gradients of the converged solvers agree to {res['check']['max_rel_diff']:.1e} "
              f"({', '.join(res['check']['pairs'])})")


def main(argv: Optional[List[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="GMRES against another revision's, its Arnoldi floor, and CGNR.")
    parser.add_argument("--compare-gmres", metavar="REV", help="time GMRES against the GMRES of a git revision")
    parser.add_argument("--floor", action="store_true", help="GMRES against the Arnoldi floor and the bare products")
    parser.add_argument("--cgnr", action="store_true", help="CGNR against GMRES and BiCGStab in backward passes")
    parser.add_argument("--profile", action="store_true", help="where a one-system GMRES solve spends its time")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if args.compare_gmres:
        old = gmres_at(args.compare_gmres)
        for key, res in end_to_end(old, args.quick, args.reps, args.warmup, device).items():
            med = res["median_s"]
            print(f"{key}: backward with GMRES() at {args.compare_gmres}: {1e3 * med['before']:.2f} ms, "
                  f"now: {1e3 * med['after']:.2f} ms (median ratio {res['ratios']['before/after']:.2f}x, "
                  f"best-of-rounds {res['best_ratios']['before/after']:.2f}x); gradients agree to "
                  f"{res['check']['max_rel_diff']:.1e}")
        for key, case in (("deq", deq_case(device, batched=False)), ("deq_batched", deq_case(device, batched=True)),
                          ("root", root_case(args.quick, device))):
            case["solvers"] = {"before": old(maxiter=2000, tol=TOL), "after": ig.GMRES(maxiter=2000, tol=TOL)}
            c = measure(case, args.reps, args.warmup, device)
            print(f"{key}: solve / its matvecs alone: before {c['overhead']['before']:.2f} "
                  f"({c['iterations']['before']} products), after {c['overhead']['after']:.2f} "
                  f"({c['iterations']['after']} products); solve time after / before "
                  f"{c['median_s']['after'] / c['median_s']['before']:.2f}")
    if args.floor:
        for key, case in (("deq", deq_case(device, batched=False)), ("deq_batched", deq_case(device, batched=True)),
                          ("root", root_case(args.quick, device))):
            case["solvers"] = {"GMRES": ig.GMRES(maxiter=2000, tol=TOL)}
            c = measure(case, args.reps, args.warmup, device)
            fl, med = c["arnoldi_floor"], c["median_s"]
            print(f"{key} ({fl['products']} products): GMRES / matvecs {c['overhead']['GMRES']:.2f}, "
                  f"Arnoldi floor / matvecs {fl['over_matvecs']:.2f}, GMRES / floor {fl['gmres_over_floor']:.2f} "
                  f"(medians: GMRES {1e3 * med['GMRES']:.2f} ms, floor {1e3 * med['Arnoldi floor']:.2f} ms, "
                  f"matvecs {1e3 * med['GMRES matvecs']:.2f} ms)")
    if args.cgnr:
        _print_races(normal_equations(args.quick, args.reps, args.warmup, device))
    if args.profile:
        _print_profile("deq", step_profile(deq_case(device, batched=False)))


if __name__ == "__main__":
    main()
