"""Hypergradient accuracy against the number of linear-solver iterations.

* Logistic regression with per-feature L2 hyperparameters, once well and once badly
  conditioned (the condition number of the Hessian at ``w*`` is reported): relative error
  ``‖g_k − g‖ / ‖g‖`` of the hypergradient after ``k`` iterations of ``ig.CG``,
  ``ig.Neumann`` (``α = 1/λ_max``) and ``ig.GMRES`` (no restart), against ``ig.Exact``.
  The inner solution is exact (Newton in float64), so all error comes from the linear
  solve.
* The iMAML meta-gradient of a synthetic linear-regression task, where it has a closed
  form ``g = λ (H + λI)⁻¹ ∇L_query(φ*)``: error after ``k`` CG steps (exact inner
  solution), and, as MAML would compute it, after differentiating through ``k`` steps of
  gradient descent on the same proximal problem started at ``θ``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch

import implicitgrad as ig
from implicitgrad.testing import relative_error
from implicitgrad.testing.problems import logistic_loss, logistic_objective, logistic_solution

ITERS_FULL = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200)
ITERS_QUICK = (1, 2, 5, 10, 20, 50)
TINY_TOL = 1e-30
FLOOR = 1e-12  # relative error at float64 rounding level


def _given(solution):
    return lambda _fn, _x0, *_p: solution


def logistic_problem(conditioning: str, n: int = 400, d: int = 100, seed: int = 0):
    """Data whose feature scales (and ridge) set the Hessian's condition number."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"dtype": torch.float64, "generator": gen}
    if conditioning == "well":
        scales, log_lam = torch.ones(d, dtype=torch.float64), -2.0
    else:
        scales, log_lam = torch.logspace(0, -2, d, dtype=torch.float64), -9.0
    w_true = torch.randn(d, **kw) / scales
    X = torch.randn(n, d, **kw) * scales
    X_val = torch.randn(n, d, **kw) * scales
    y = torch.sign(X @ w_true + torch.randn(n, **kw))
    y_val = torch.sign(X_val @ w_true + torch.randn(n, **kw))
    theta = torch.full((d,), log_lam, dtype=torch.float64)
    w_star = logistic_solution(theta, X, y, maxiter=100, tol=1e-13)
    s = torch.sigmoid(y * (X @ w_star))
    hess = (X.T * (s * (1 - s))) @ X / n + torch.diag(theta.exp())
    eig = torch.linalg.eigvalsh(hess)
    return {"X": X, "y": y, "X_val": X_val, "y_val": y_val, "theta": theta, "w_star": w_star,
            "lambda_max": float(eig[-1]), "condition": float(eig[-1] / eig[0])}


def logistic_hypergradient(prob, linear_solver) -> torch.Tensor:
    theta = prob["theta"].clone().requires_grad_(True)
    w = ig.implicit_solve(
        logistic_objective, torch.zeros_like(prob["w_star"]), theta, prob["X"], prob["y"],
        solver=_given(prob["w_star"]), linear_solver=linear_solver, on_failure="ignore",
    )
    return torch.autograd.grad(logistic_loss(w, prob["X_val"], prob["y_val"]), theta)[0]


def logistic_curves(conditioning: str, iters) -> Dict[str, Any]:
    prob = logistic_problem(conditioning)
    exact = logistic_hypergradient(prob, ig.Exact())
    solvers: Dict[str, Callable[[int], ig.LinearSolver]] = {
        "CG": lambda k: ig.CG(maxiter=k, tol=TINY_TOL),
        "Neumann": lambda k: ig.Neumann(maxiter=k, alpha=1.0 / prob["lambda_max"], tol=TINY_TOL),
        "GMRES": lambda k: ig.GMRES(maxiter=k, restart=k, tol=TINY_TOL),
    }
    errors = {name: _curve(lambda k, make=make: relative_error(logistic_hypergradient(prob, make(k)), exact), iters)
              for name, make in solvers.items()}
    return {"condition": prob["condition"], "iterations": list(iters), "rel_error": errors}


def _curve(error_at: Callable[[int], float], iters) -> List[float]:
    """Errors at each iteration count, stopping once the error has reached ``FLOOR``.

    Past that point the error stays at rounding level while the cost of GMRES (quadratic
    in its Krylov dimension) keeps growing, so the curve simply ends there.
    """
    errors = []
    for k in iters:
        errors.append(error_at(k))
        if errors[-1] < FLOOR:
            break
    return errors


def imaml_curves(iters, d: int = 50, n_support: int = 20, lam: float = 0.5, seed: int = 1) -> Dict[str, Any]:
    """iMAML meta-gradient error vs CG steps, and MAML-style unrolled error vs inner steps."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"dtype": torch.float64, "generator": gen}
    w_task = torch.randn(d, **kw)
    X_s, X_q = torch.randn(n_support, d, **kw), torch.randn(3 * n_support, d, **kw)
    y_s = X_s @ w_task + 0.1 * torch.randn(n_support, **kw)
    y_q = X_q @ w_task + 0.1 * torch.randn(3 * n_support, **kw)
    theta0 = torch.randn(d, **kw)
    H = X_s.T @ X_s / n_support
    A = H + lam * torch.eye(d, dtype=torch.float64)

    def proximal(phi, theta, X, y):
        return 0.5 * ((X @ phi - y) ** 2).mean() + 0.5 * lam * ((phi - theta) ** 2).sum()

    def query(phi):
        return 0.5 * ((X_q @ phi - y_q) ** 2).mean()

    def closed_form(_fn, _x0, theta, X, y):
        return torch.linalg.solve(A, X.T @ y / n_support + lam * theta)

    phi_star = closed_form(None, None, theta0, X_s, y_s)
    exact = lam * torch.linalg.solve(A, X_q.T @ (X_q @ phi_star - y_q) / len(y_q))
    eig = torch.linalg.eigvalsh(A)
    lr = 1.0 / float(eig[-1])

    def meta_gradient(solver, linear_solver=None, mode="implicit"):
        theta = theta0.clone().requires_grad_(True)
        kwargs = {} if linear_solver is None else {"linear_solver": linear_solver}
        phi = ig.implicit_solve(proximal, theta, theta, X_s, y_s, solver=solver, mode=mode,
                                on_failure="ignore", **kwargs)
        return torch.autograd.grad(query(phi), theta)[0]

    cg = _curve(lambda k: relative_error(meta_gradient(closed_form, ig.CG(maxiter=k, tol=TINY_TOL)), exact), iters)
    def unrolled_error(k: int) -> float:
        solver = ig.solvers.GradientDescent(lr=lr, maxiter=k, tol=0)
        return relative_error(meta_gradient(solver, mode="unrolled"), exact)

    unrolled = _curve(unrolled_error, iters)
    return {"iterations": list(iters), "condition": float(eig[-1] / eig[0]), "lambda": lam, "inner_lr": lr,
            "rel_error": {"iMAML (CG steps)": cg, "unrolled GD (inner steps)": unrolled}}


def run(quick: bool, progress: Optional[Callable] = None) -> Dict[str, Any]:
    iters = ITERS_QUICK if quick else ITERS_FULL
    out: Dict[str, Any] = {}
    for conditioning in ("well", "ill"):
        if progress:
            progress(f"accuracy: {conditioning}-conditioned logistic regression")
        out[f"logistic_{conditioning}"] = logistic_curves(conditioning, iters)
    if progress:
        progress("accuracy: iMAML synthetic regression")
    out["imaml_synthetic"] = imaml_curves(iters)
    return out


def errors_at(curves: Dict[str, Any], k: int) -> Dict[str, Optional[float]]:
    """Each method's error after ``k`` iterations (the last value if its curve ended before)."""
    iters = curves["iterations"]
    index = iters.index(k) if k in iters else len(iters) - 1
    return {name: errs[min(index, len(errs) - 1)] for name, errs in curves["rel_error"].items()}
