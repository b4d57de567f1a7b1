r"""Tune lasso and elastic-net penalties by gradient descent on the validation loss.

Sparse linear regression on scikit-learn's diabetes data (442 patients, 10 features,
bundled with scikit-learn). The inner problem is nonsmooth,

.. math::

    w^\star(\lambda) = \arg\min_w \; \tfrac{1}{2n}\|Xw - y\|^2 + \lambda_1 \|w\|_1
    + \tfrac{\lambda_2}{2}\|w\|^2 \qquad (\lambda_2 = 0: \text{lasso}),

and it is handed to ``ig.implicit_solve`` in one call: the smooth part as the objective,
the penalty as ``ig.prox.lasso`` / ``ig.prox.elastic_net`` inside
``ig.solvers.ProximalGradient``. The solver states the optimality condition
:math:`w = \operatorname{prox}_{\eta g}(w - \eta\nabla f(w))` and the core differentiates
it (GMRES, picked automatically). The script

1. traces the regularisation path and checks it against scikit-learn's ``lasso_path``;
2. checks the hypergradient of the validation loss against central finite differences;
3. runs hypergradient descent (Adam on :math:`\log\lambda`) for the lasso and for the
   elastic net, and reports validation / test errors;
4. compares inner solvers on the problem at the tuned penalty: FISTA (the default),
   ISTA, plain fixed-point iteration and Anderson acceleration on the same prox map.

Run from the repository root: ``python examples/hpo_lasso.py --quick``.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from _common import (
    example_parser,
    parse_args,
    print_summary,
    progress,
    pyplot,
    save_figure,
    split_indices,
    standardize,
    write_json,
)

import implicitgrad as ig

DTYPE = torch.float64
TOL = 1e-12


def load_data(seed: int, device: torch.device) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Diabetes split 200 / 120 / rest, standardised on the training part."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    parts = split_indices(len(bunch.target), [200, 120, -1], seed)
    Xs = standardize(*(bunch.data[i] for i in parts))
    ys = standardize(*(bunch.target[i] for i in parts))
    return {name: (torch.as_tensor(X, dtype=DTYPE, device=device), torch.as_tensor(y, dtype=DTYPE, device=device))
            for name, X, y in zip(("train", "val", "test"), Xs, ys)}


# ---------------------------------------------------------------- the inner problem (5 lines)
def data_fit(w: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    X, y = params[-2:]  # the penalties come first in params; only the prox uses them
    return 0.5 * ((X @ w - y) ** 2).mean()


LASSO = ig.solvers.ProximalGradient(ig.prox.lasso, tol=TOL)
ELASTIC_NET = ig.solvers.ProximalGradient(ig.prox.elastic_net, reg=(0, 1), tol=TOL)
INNER_PROBLEM_LINES = 5  # data_fit (3 lines with its def) + one solver line + the implicit_solve call


def fit(penalties: Sequence[torch.Tensor], X: torch.Tensor, y: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    solver = LASSO if len(penalties) == 1 else ELASTIC_NET
    return ig.implicit_solve(data_fit, w0, *penalties, X, y, solver=solver)


def mse(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((X @ w - y) ** 2).mean()


# ---------------------------------------------------------------- checks
def regularisation_path(data, lambdas: np.ndarray) -> Tuple[np.ndarray, float, List[float]]:
    """Coefficients along ``lambdas`` (warm starts), their largest gap to scikit-learn, val errors."""
    from sklearn.linear_model import lasso_path

    X, y = data["train"]
    w = torch.zeros(X.shape[1], dtype=DTYPE, device=X.device)
    path, val = [], []
    for lam in progress(lambdas, desc="regularisation path"):
        w = fit([torch.tensor(lam, dtype=DTYPE, device=X.device)], X, y, w)
        path.append(w.cpu().numpy())
        val.append(float(mse(w, *data["val"])))
    _, reference, _ = lasso_path(X.cpu().numpy(), y.cpu().numpy(), alphas=lambdas, tol=1e-14, max_iter=200000)
    return np.array(path), float(np.abs(np.array(path) - reference.T).max()), val


def hypergradient_check(data, log_penalties: Sequence[float], h: float = 1e-5) -> Tuple[List[float], List[float]]:
    """d(validation MSE)/d(log λ) by implicit differentiation and by central differences."""
    X, y = data["train"]
    w0 = torch.zeros(X.shape[1], dtype=DTYPE, device=X.device)

    def val_loss(logs: Sequence[float], grad: bool = False):
        params = [torch.tensor(v, dtype=DTYPE, device=X.device, requires_grad=grad) for v in logs]
        loss = mse(fit([p.exp() for p in params], X, y, w0), *data["val"])
        return torch.autograd.grad(loss, params) if grad else float(loss)

    implicit = [float(g) for g in val_loss(log_penalties, grad=True)]
    finite = []
    for i in range(len(log_penalties)):
        up, down = list(log_penalties), list(log_penalties)
        up[i] += h
        down[i] -= h
        finite.append((val_loss(up) - val_loss(down)) / (2 * h))
    return implicit, finite


def tune(data, log_init: Sequence[float], steps: int, lr: float) -> Tuple[List[float], List[float]]:
    """Adam on the log penalties; returns them and the validation loss along the way."""
    X, y = data["train"]
    logs = torch.tensor(log_init, dtype=DTYPE, device=X.device, requires_grad=True)
    optimizer = torch.optim.Adam([logs], lr=lr)
    w = torch.zeros(X.shape[1], dtype=DTYPE, device=X.device)
    history = []
    for _ in progress(range(steps), desc=f"tuning {len(log_init)} penalt{'y' if len(log_init) == 1 else 'ies'}"):
        w = fit(list(logs.exp().unbind()), X, y, w.detach())
        loss = mse(w, *data["val"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return logs.detach().tolist(), history


def compare_solvers(runs: Dict[str, Callable[[], Tuple[torch.Tensor, int]]], repeats: int = 3) -> Dict[str, Dict]:
    """Iterations, median time and distance to the first run's solution, repetitions interleaved."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    results: Dict[str, Tuple[torch.Tensor, int]] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    reference = next(iter(results.values()))[0]
    return {name: {"iterations": int(it), "seconds": float(np.median(times[name])),
                   "relative_difference": float((x - reference).norm() / reference.norm())}
            for name, (x, it) in results.items()}


def lasso_solver_runs(data, lam: float) -> Dict[str, Callable[[], Tuple[torch.Tensor, int]]]:
    X, y = data["train"]
    lam_t = torch.tensor(lam, dtype=DTYPE, device=X.device)
    w0 = torch.zeros(X.shape[1], dtype=DTYPE, device=X.device)
    step = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / X.shape[0]).max())

    def prox_map(w: torch.Tensor) -> torch.Tensor:  # the prox-gradient map with the step 1/L
        return ig.prox.lasso(w - step * X.T @ (X @ w - y) / X.shape[0], lam_t, step)

    return {
        "ProximalGradient (FISTA)": solver_run(ig.solvers.ProximalGradient(ig.prox.lasso, tol=TOL, maxiter=100000),
                                               data_fit, w0, lam_t, X, y),
        "ProximalGradient (ISTA)": solver_run(ig.solvers.ProximalGradient(ig.prox.lasso, acceleration=False, tol=TOL,
                                                                          maxiter=100000), data_fit, w0, lam_t, X, y),
        **fixed_point_runs(prox_map, w0, TOL),
    }


def solver_run(solver, fn: Callable, x0: torch.Tensor, *params) -> Callable[[], Tuple[torch.Tensor, int]]:
    """A run of ``solver`` for :func:`compare_solvers`, returning (solution, iterations)."""

    def run() -> Tuple[torch.Tensor, int]:
        x, stats = solver.run(fn, x0, *params)
        return x, stats.iterations

    return run


def fixed_point_runs(mapping: Callable, x0: torch.Tensor, tol: float) -> Dict[str, Callable]:
    """Plain iteration and Anderson acceleration on the same fixed-point map."""
    return {
        "FixedPointIteration": solver_run(ig.solvers.FixedPointIteration(tol=tol, maxiter=100000), mapping, x0),
        "AndersonAcceleration": solver_run(ig.solvers.AndersonAcceleration(tol=tol, maxiter=100000), mapping, x0),
    }


def main(argv=None):
    parser = example_parser(__file__, "Lasso and elastic-net penalties tuned by implicit hypergradients.",
                            quick_time="about 20 s on one CPU core")
    parser.set_defaults(threads=1)
    args = parse_args(parser, argv)
    data = load_data(args.seed, args.device)
    X, y = data["train"]
    lam_max = float((X.T @ y).abs().max() / X.shape[0])
    lambdas = lam_max * np.logspace(0, -3, 12 if args.quick else 40)
    path, path_gap, path_val = regularisation_path(data, lambdas)

    checks = {"lasso": [float(np.log(0.05 * lam_max))], "elastic_net": [float(np.log(0.05 * lam_max)), np.log(0.1)]}
    errors = {}
    for name, logs in checks.items():
        implicit, finite = hypergradient_check(data, logs)
        errors[name] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(implicit, finite))

    steps = 15 if args.quick else 80
    start_logs = float(np.log(0.5 * lam_max))
    lasso_logs, lasso_hist = tune(data, [start_logs], steps, lr=0.2)
    enet_logs, enet_hist = tune(data, [start_logs, float(np.log(0.5))], steps, lr=0.2)

    def test_mse(logs: Sequence[float]) -> float:
        w = fit([torch.tensor(np.exp(v), dtype=DTYPE, device=X.device) for v in logs], X, y, torch.zeros_like(X[0]))
        return float(mse(w, *data["test"]))

    comparison = compare_solvers(lasso_solver_runs(data, float(np.exp(lasso_logs[0]))), repeats=1 if args.quick else 3)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].semilogx(lambdas, path)
    axes[0].set(xlabel="λ", ylabel="coefficient", title="lasso regularisation path")
    axes[1].semilogx(lambdas, path_val, label="validation MSE")
    axes[1].axvline(np.exp(lasso_logs[0]), color="k", ls="--", label="tuned λ")
    axes[1].set(xlabel="λ", title="validation error along the path")
    axes[1].legend()
    axes[2].plot(lasso_hist, label="lasso")
    axes[2].plot(enet_hist, label="elastic net")
    axes[2].set(xlabel="hypergradient step", ylabel="validation MSE", title="tuning")
    axes[2].legend()
    save_figure(fig, args.out, "hpo_lasso.png")

    metrics = {
        "path_max_gap_to_sklearn": path_gap,
        "hypergradient_rel_error_lasso": errors["lasso"],
        "hypergradient_rel_error_elastic_net": errors["elastic_net"],
        "val_loss_before": lasso_hist[0],
        "val_loss_after_lasso": lasso_hist[-1],
        "val_loss_after_elastic_net": enet_hist[-1],
        "grid_best_val_loss": min(path_val),
        "test_mse_lasso": test_mse(lasso_logs),
        "test_mse_elastic_net": test_mse(enet_logs),
        "lambda_lasso": float(np.exp(lasso_logs[0])),
        "nonzeros_lasso": int((path[int(np.argmin(path_val))] != 0).sum()),
        "solvers": comparison,
        "inner_problem_lines": INNER_PROBLEM_LINES,
    }
    print_summary("Lasso / elastic net on diabetes", [
        ("path: max |w − sklearn|", f"{path_gap:.1e}"),
        ("hypergradient vs central FD (lasso)", f"{errors['lasso']:.1e}"),
        ("hypergradient vs central FD (elastic net)", f"{errors['elastic_net']:.1e}"),
        ("validation MSE: start → lasso / elastic net",
         f"{lasso_hist[0]:.4f} → {lasso_hist[-1]:.4f} / {enet_hist[-1]:.4f} (grid best {min(path_val):.4f})"),
        *[(f"{name}", f"{r['iterations']} iterations, {1e3 * r['seconds']:.1f} ms") for name, r in comparison.items()],
    ])
    write_json(args.json, metrics)
    return metrics


if __name__ == "__main__":
    main()
