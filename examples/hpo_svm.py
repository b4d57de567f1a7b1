r"""Tune a multiclass SVM's regularisation through its dual, a problem on simplices.

Handwritten digits from scikit-learn (8×8 images, 10 classes, bundled). The inner problem
is the dual of a multiclass (Crammer-Singer) SVM with a smoothed hinge: one variable per
(sample, class), each sample's row on the probability simplex,

.. math::

    \beta^\star(\lambda) = \arg\min_{\beta_i \in \Delta} \; \frac{1}{2\lambda}\|X^\top(Y - \beta)\|^2
    - \langle \beta, 1 - Y\rangle + \frac{\mu}{2}\|\beta\|^2,
    \qquad W = X^\top (Y - \beta^\star)/\lambda ,

(:math:`\mu > 0` smooths the hinge and makes the solution unique). It is one call of
``ig.implicit_solve`` with ``ig.solvers.ProjectedGradient(ig.projections.simplex)``; the
validation cross-entropy of the scores :math:`X_{val} W` is minimised over
:math:`\log\lambda`. The script checks the hypergradient against central finite
differences, tunes λ, and compares inner solvers on the dual: accelerated projected
gradient (the default), plain fixed-point iteration and Anderson acceleration on the
projected-gradient map.

Run from the repository root: ``python examples/hpo_svm.py --quick``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from _common import example_parser, parse_args, print_summary, progress, pyplot, save_figure, split_indices, write_json
from hpo_lasso import compare_solvers, fixed_point_runs, solver_run

import implicitgrad as ig

DTYPE = torch.float64
MU = 1.0  # smoothing of the hinge
TOL = 1e-10


def load_data(n_train: int, seed: int, device: torch.device) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Digits: ``n_train`` training images, 300 validation, the rest for test; pixels scaled to [0, 1]
    with a constant feature appended (the bias)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    parts = split_indices(len(bunch.target), [n_train, 300, -1], seed)
    out = {}
    for name, idx in zip(("train", "val", "test"), parts):
        X = torch.as_tensor(bunch.data[idx] / 16.0, dtype=DTYPE, device=device)
        X = torch.cat([X, torch.ones(len(idx), 1, dtype=DTYPE, device=device)], 1)
        out[name] = (X, torch.as_tensor(bunch.target[idx], device=device))
    return out


# ---------------------------------------------------------------- the inner problem (4 lines)
def dual(beta: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    W = X.T @ (Y - beta) / lam
    return 0.5 * lam * (W**2).sum() - (beta * (1 - Y)).sum() + 0.5 * MU * (beta**2).sum()


SOLVER = ig.solvers.ProjectedGradient(ig.projections.simplex, tol=TOL, maxiter=5000)
INNER_PROBLEM_LINES = 4  # dual (3 lines with its def) + the implicit_solve call


def weights(lam: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, beta0: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    beta = ig.implicit_solve(dual, beta0, lam, X, Y, solver=SOLVER)
    return X.T @ (Y - beta) / lam, beta


def validation_loss(W: torch.Tensor, X: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(X @ W, labels)


def accuracy(W: torch.Tensor, X: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((X @ W).argmax(1) == labels).to(DTYPE).mean())


def solver_runs(X: torch.Tensor, Y: torch.Tensor, lam: float, tol: float = 1e-12):
    """The dual at ``lam`` solved by each solver to the same relative fixed-point residual ``tol``."""
    lam_t = torch.tensor(lam, dtype=DTYPE, device=X.device)
    beta0 = torch.full_like(Y, 1.0 / Y.shape[1])
    step = 1.0 / float(torch.linalg.eigvalsh(X @ X.T).max() / lam + MU)

    def projected_gradient_map(beta: torch.Tensor) -> torch.Tensor:  # step 1/L, gradient by hand
        return ig.projections.simplex(beta - step * (X @ (X.T @ (beta - Y)) / lam_t - (1 - Y) + MU * beta))

    return {
        "ProjectedGradient (FISTA)": solver_run(
            ig.solvers.ProjectedGradient(ig.projections.simplex, tol=tol, maxiter=100000), dual, beta0, lam_t, X, Y),
        **fixed_point_runs(projected_gradient_map, beta0, tol),
    }


def main(argv=None):
    parser = example_parser(__file__, "A multiclass SVM's regularisation tuned through its dual on simplices.",
                            quick_time="about 50 s on one CPU core")
    parser.set_defaults(threads=1)
    args = parse_args(parser, argv)
    data = load_data(60 if args.quick else 400, args.seed, args.device)
    X, labels = data["train"]
    Y = torch.nn.functional.one_hot(labels, 10).to(DTYPE)
    beta0 = torch.full_like(Y, 0.1)

    def outer(log_lam: float, grad: bool = False):
        p = torch.tensor(log_lam, dtype=DTYPE, device=X.device, requires_grad=grad)
        loss = validation_loss(weights(p.exp(), X, Y, beta0)[0], *data["val"])
        return torch.autograd.grad(loss, p)[0] if grad else float(loss)

    start, h = float(np.log(30.0)), 1e-5
    implicit = float(outer(start, grad=True))
    finite = (outer(start + h) - outer(start - h)) / (2 * h)

    grid = np.linspace(np.log(0.3), np.log(300.0), 8 if args.quick else 25)
    grid_loss = [outer(v) for v in progress(grid, desc="grid over λ")]

    log_lam = torch.tensor(start, dtype=DTYPE, device=X.device, requires_grad=True)
    optimizer = torch.optim.Adam([log_lam], lr=0.3)
    beta, history = beta0, []
    for _ in progress(range(10 if args.quick else 40), desc="tuning λ"):
        W, beta = weights(log_lam.exp(), X, Y, beta.detach())
        loss = validation_loss(W, *data["val"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    W_start = weights(torch.tensor(np.exp(start), dtype=DTYPE, device=X.device), X, Y, beta0)[0]
    W_tuned, beta = weights(log_lam.detach().exp(), X, Y, beta0)
    comparison = compare_solvers(solver_runs(X, Y, float(log_lam.detach().exp())), repeats=1 if args.quick else 3)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(np.exp(grid), grid_loss, marker="o", label="validation cross-entropy")
    axes[0].axvline(float(log_lam.detach().exp()), color="k", ls="--", label="tuned λ")
    axes[0].set(xscale="log", xlabel="λ", title="SVM dual on simplices")
    axes[0].legend()
    axes[1].plot(history)
    axes[1].set(xlabel="hypergradient step", ylabel="validation cross-entropy", title="tuning log λ")
    save_figure(fig, args.out, "hpo_svm.png")

    support: List[int] = (beta.detach() > 0).sum(1).tolist()
    metrics = {
        "hypergradient": implicit,
        "hypergradient_finite_difference": finite,
        "hypergradient_rel_error": abs(implicit - finite) / abs(finite),
        "val_loss_before": history[0],
        "val_loss_after": history[-1],
        "grid_best_val_loss": min(grid_loss),
        "lambda_tuned": float(log_lam.detach().exp()),
        "test_accuracy_before": accuracy(W_start, *data["test"]),
        "test_accuracy_after": accuracy(W_tuned, *data["test"]),
        "mean_support_per_sample": float(np.mean(support)),
        "unknowns": int(Y.numel()),
        "solvers": comparison,
        "inner_problem_lines": INNER_PROBLEM_LINES,
    }
    print_summary("Multiclass SVM dual on digits", [
        ("unknowns (samples × classes)", metrics["unknowns"]),
        ("hypergradient vs central FD", f"{metrics['hypergradient_rel_error']:.1e}"),
        ("validation cross-entropy", f"{history[0]:.4f} → {history[-1]:.4f} (grid best {min(grid_loss):.4f})"),
        ("test accuracy", f"{metrics['test_accuracy_before']:.3f} → {metrics['test_accuracy_after']:.3f}"),
        *[(name, f"{r['iterations']} iterations, {1e3 * r['seconds']:.1f} ms") for name, r in comparison.items()],
    ])
    write_json(args.json, metrics)
    return metrics


if __name__ == "__main__":
    main()
