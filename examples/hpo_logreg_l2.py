r"""Learn one L2 penalty per feature of a logistic regression, with L-BFGS inside and CG or Neumann outside.

Logistic regression on scikit-learn's breast-cancer data (569 tumours, 30 features, bundled with
scikit-learn). The inner problem, for penalties :math:`\lambda_j = e^{\theta_j}`, is

.. math::

    (w^\star, b^\star)(\theta) = \arg\min_{w, b} \; \operatorname{mean}_i \ell(y_i, x_i^\top w + b)
    + \tfrac12 \textstyle\sum_j e^{\theta_j} w_j^2 ,

with :math:`\ell` the binary cross-entropy, solved by L-BFGS
(``ig.solvers.TorchOptimizer(torch.optim.LBFGS)``) and warm-started from the previous outer
step's solution. The outer problem minimises the validation cross-entropy over the 30
:math:`\theta_j`. The hypergradient needs :math:`H^{-1} v` with :math:`H` the Hessian of the inner
objective; the script compares two ways of computing it:

* conjugate gradient (``ig.CG``), run to convergence: exact up to a tolerance;
* the truncated Neumann series (``ig.Neumann``) of Lorraine et al. (2020) with a fixed number
  of terms: cheap and simple, but biased when :math:`H` is ill-conditioned.

It reports the accuracy of both against a dense solve as a function of the number of
Hessian-vector products, and runs hypergradient descent with each.

Run from the repository root: ``python examples/hpo_logreg_l2.py --quick``.

References:
    Lorraine, Vicol and Duvenaud, Optimizing Millions of Hyperparameters by Implicit
    Differentiation, 2020.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


def load_data(n_train: int, n_val: int, seed: int, device: torch.device) -> Dict[str, object]:
    """Breast-cancer data split at random into train / validation / test, standardised on train."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    train, val, test = split_indices(len(bunch.target), [n_train, n_val, -1], seed)
    X_train, X_val, X_test = standardize(bunch.data[train], bunch.data[val], bunch.data[test])

    def pair(X: np.ndarray, idx: np.ndarray):
        return (torch.as_tensor(X, dtype=DTYPE, device=device),
                torch.as_tensor(bunch.target[idx], dtype=DTYPE, device=device))

    return {"train": pair(X_train, train), "val": pair(X_val, val), "test": pair(X_test, test),
            "features": list(bunch.feature_names)}


def logits(model: Dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    return X @ model["w"] + model["b"]


def inner_objective(model: Dict[str, torch.Tensor], theta: torch.Tensor, X: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy plus ``½ Σ_j exp(θ_j) w_j²``; the bias is not penalised.

    Strictly convex: the penalty makes the Hessian positive definite in ``w`` and the
    cross-entropy's curvature ``Σ p_i(1−p_i) > 0`` covers the bias.
    """
    return (F.binary_cross_entropy_with_logits(logits(model, X), y)
            + 0.5 * (theta.exp() * model["w"] ** 2).sum())


def cross_entropy(model: Dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits(model, X), y)


def accuracy(model: Dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((logits(model, X) > 0).to(y.dtype) == y).to(DTYPE).mean())


def lipschitz_bound(X: torch.Tensor, theta: torch.Tensor) -> float:
    """An upper bound on the largest Hessian eigenvalue: ``¼‖[X 1]‖²/n + max_j λ_j``.

    The Neumann series ``α Σ_k (I − αH)^k`` converges for ``0 < α < 2/λ_max(H)``; ``α`` is
    set to the reciprocal of this bound.
    """
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], dim=1)
    return float(0.25 * torch.linalg.matrix_norm(Xb, ord=2) ** 2 / len(X) + theta.exp().max())


# A history as long as the 31 unknowns makes L-BFGS a full-memory quasi-Newton method; shorter
# histories need many more iterations once small penalties make the Hessian ill-conditioned.
LBFGS = ig.solvers.TorchOptimizer(torch.optim.LBFGS, history_size=100, max_iter=100)


def fit(theta: torch.Tensor, data, x0: Dict[str, torch.Tensor], linear_solver: ig.LinearSolver,
        on_failure: str = "warn", warm_start: Optional[ig.WarmStart] = None):
    """``(w*, b*)(θ)`` by L-BFGS from ``x0``, differentiable in ``θ``; also returns the ``SolveInfo``.

    ``on_failure`` applies to the backward solve: a truncated Neumann series is unconverged by
    design. The forward solve is checked here whatever ``on_failure`` says.
    """
    X, y = data["train"]
    model, info = ig.implicit_solve(inner_objective, x0, theta, X, y, solver=LBFGS, linear_solver=linear_solver,
                                    on_failure=on_failure, return_info=True, warm_start=warm_start)
    if info.forward_status != "converged":
        raise RuntimeError(f"the inner L-BFGS solve did not converge:\n{info}")
    return model, info


def zero_model(X: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The all-zero model, the cold start of the inner solve."""
    return {"w": torch.zeros(X.shape[1], dtype=DTYPE, device=X.device), "b": torch.zeros((), dtype=DTYPE,
                                                                                         device=X.device)}


class Tuner:
    """Hypergradient descent (Adam) on ``θ``; the inner solve starts from the previous solution.

    Args:
        data: splits from :func:`load_data`.
        theta0: initial log-penalties, shape ``(d,)``.
        lr: Adam step size on ``θ``.
        linear: ``"cg"`` (CG to convergence) or ``"neumann"`` (a fixed number of terms).
        neumann_terms: terms of the Neumann series per hypergradient.
        warm_start: CG starts each backward solve from the line through the last two outer
            steps' solutions, preconditioned by their last 30 CG directions
            (``ig.WarmStart(recycle=30, extrapolate=True)``).
    """

    def __init__(self, data, theta0: torch.Tensor, lr: float, linear: str, neumann_terms: int,
                 warm_start: bool = False) -> None:
        if linear not in ("cg", "neumann"):
            raise ValueError(f"linear must be 'cg' or 'neumann', got {linear!r}.")
        self.data, self.linear, self.neumann_terms = data, linear, neumann_terms
        self.warm = ig.WarmStart(recycle=30, extrapolate=True) if warm_start and linear == "cg" else None
        self.theta = theta0.detach().clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.theta], lr=lr)
        self.model = zero_model(data["train"][0])
        self.history: Dict[str, List[float]] = {"val": [], "inner_iterations": [], "matvecs": [],
                                                "inner_initial_gradient": [], "cold_steps": [],
                                                "cold_iterations": [], "cold_initial_gradient": [],
                                                "cold_matvecs": []}

    def step(self, measure_cold: bool = False) -> float:
        """One outer step; with ``measure_cold`` also count L-BFGS iterations from zero, for comparison."""
        if measure_cold:
            with torch.no_grad():
                _, cold = fit(self.theta.detach(), self.data, zero_model(self.data["train"][0]), ig.CG())
            self.history["cold_steps"].append(len(self.history["val"]))
            self.history["cold_iterations"].append(cold.forward_iterations)
            self.history["cold_initial_gradient"].append(cold.initial_residual)
            if self.linear == "cg":  # the same backward solve from 0, at this θ
                t = self.theta.detach().clone().requires_grad_(True)
                model, info = fit(t, self.data, self.model, ig.CG(maxiter=2000, tol=1e-10))
                cross_entropy(model, *self.data["val"]).backward()
                self.history["cold_matvecs"].append(info.backward.iterations)
        if self.linear == "cg":
            linear_solver, on_failure = ig.CG(maxiter=2000, tol=1e-10), "warn"
        else:
            alpha = 1.0 / lipschitz_bound(self.data["train"][0], self.theta.detach())
            linear_solver, on_failure = ig.Neumann(maxiter=self.neumann_terms, alpha=alpha), "ignore"
        self.optimizer.zero_grad()
        model, info = fit(self.theta, self.data, self.model, linear_solver, on_failure, self.warm)
        loss = cross_entropy(model, *self.data["val"])
        loss.backward()
        self.optimizer.step()
        self.model = {k: v.detach() for k, v in model.items()}
        self.history["val"].append(loss.item())
        self.history["inner_iterations"].append(info.forward_iterations)
        self.history["inner_initial_gradient"].append(info.initial_residual)
        self.history["matvecs"].append(info.backward.iterations)
        return loss.item()

    def final(self) -> Dict[str, float]:
        """Validation and test cross-entropy and test accuracy at the current ``θ``."""
        with torch.no_grad():
            model, _ = fit(self.theta.detach(), self.data, self.model, ig.CG())
        return {"val_loss": cross_entropy(model, *self.data["val"]).item(),
                "test_loss": cross_entropy(model, *self.data["test"]).item(),
                "test_accuracy": accuracy(model, *self.data["test"])}


def hypergradient_errors(data, theta: torch.Tensor, budgets: Sequence[int]) -> Dict[str, List[float]]:
    """Relative error of the CG and Neumann hypergradients against a dense solve, per budget.

    The budget is the number of Hessian-vector products (CG iterations or Neumann terms);
    small budgets stop short of convergence on purpose.
    """
    X = data["train"][0]
    with torch.no_grad():
        solution, _ = fit(theta, data, zero_model(X), ig.CG())

    def hypergradient(linear_solver, on_failure):
        # Started at the solution, L-BFGS returns at once: only the backward solve differs.
        t = theta.detach().clone().requires_grad_(True)
        model, _ = fit(t, data, solution, linear_solver, on_failure)
        (grad,) = torch.autograd.grad(cross_entropy(model, *data["val"]), t)
        return grad

    reference = hypergradient(ig.Exact(), "warn")
    alpha = 1.0 / lipschitz_bound(X, theta)
    errors: Dict[str, List[float]] = {"budgets": list(budgets), "cg": [], "neumann": []}
    for k in budgets:
        for name, solver in (("cg", ig.CG(maxiter=k, tol=1e-14)), ("neumann", ig.Neumann(maxiter=k, alpha=alpha))):
            grad = hypergradient(solver, "ignore")
            errors[name].append(float((grad - reference).norm() / reference.norm()))
    return errors


def plot(cg: Tuner, neumann: Tuner, errors_start, errors_end, features, out):
    plt = pyplot()
    # 2 × 2 panels, 11 inches wide: legible when the page shrinks the figure to its width.
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    axes = axes.ravel()

    ax = axes[0]
    ax.plot(cg.history["val"], label="CG (to convergence)")
    ax.plot(neumann.history["val"], label=f"Neumann ({neumann.neumann_terms} terms)")
    ax.set(xlabel="outer step", ylabel="validation cross-entropy", title="hypergradient descent")
    ax.legend()

    ax = axes[1]
    for errors, style, where in ((errors_start, "-", "start"), (errors_end, "--", "end")):
        ax.loglog(errors["budgets"], errors["cg"], style + "o", color="C0", ms=3, label=f"CG, θ at {where}")
        ax.loglog(errors["budgets"], errors["neumann"], style + "s", color="C1", ms=3,
                  label=f"Neumann, θ at {where}")
    ax.set(xlabel="Hessian-vector products", ylabel="relative error of the hypergradient",
           title="accuracy vs cost (reference: dense solve)")
    ax.legend(fontsize=8, loc="lower left")

    ax = axes[2]
    ax.plot(cg.history["inner_iterations"], label="warm start (previous solution)")
    ax.plot(cg.history["cold_steps"], cg.history["cold_iterations"], "o", color="k", ms=4,
            label="cold start (from 0)")
    ax.set(xlabel="outer step", ylabel="L-BFGS iterations", title="inner solve (CG run)")
    ax.legend(loc="upper left")

    ax = axes[3]
    order = np.argsort(-cg.theta.detach().cpu().numpy())
    lam = np.exp(cg.theta.detach().cpu().numpy()[order])
    ax.bar(range(len(lam)), lam, color="C0")
    ax.set_xticks(range(len(lam)), [features[i] for i in order], rotation=90, fontsize=7)
    ax.set(yscale="log", ylabel=r"$\lambda_j$", title=r"learned penalties $\lambda_j$ (CG run)")
    fig.tight_layout()
    return save_figure(fig, out, "hpo_logreg_l2.png")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = example_parser(__file__, "Learn per-feature L2 penalties of a logistic regression; CG vs Neumann.",
                            quick_time="about 35 s on one CPU core")
    parser.add_argument("--steps", type=int, default=None, help="outer steps (default 30 quick, 50 full)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam step size on log λ")
    parser.add_argument("--n-train", type=int, default=100, help="training examples")
    parser.add_argument("--theta0", type=float, default=0.0, help="initial log λ_j (0: λ_j = 1, too strong)")
    parser.add_argument("--neumann-terms", type=int, default=50, help="Neumann terms per hypergradient")
    parser.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                        help="start every CG backward solve from 0, unpreconditioned (default: "
                             "ig.WarmStart(recycle=30, extrapolate=True), from the last two solutions)")
    parser.set_defaults(threads=1)
    args = parse_args(parser, argv)
    steps = args.steps or (30 if args.quick else 50)

    data = load_data(args.n_train, 200, args.seed, args.device)
    d = data["train"][0].shape[1]
    theta0 = torch.full((d,), args.theta0, dtype=DTYPE, device=args.device)

    cg = Tuner(data, theta0, args.lr, "cg", args.neumann_terms, warm_start=args.warm_start)
    neumann = Tuner(data, theta0, args.lr, "neumann", args.neumann_terms)
    before = cg.final()
    every = max(1, steps // 10)
    for tuner, desc in ((cg, "CG hypergradients"), (neumann, f"Neumann ({args.neumann_terms} terms)")):
        bar = progress(range(steps), desc=desc)
        for k in bar:
            loss = tuner.step(measure_cold=tuner is cg and k % every == every - 1)
            bar.set_postfix(val_loss=f"{loss:.4f}", refresh=False)
    after, after_neumann = cg.final(), neumann.final()
    budgets = [1, 2, 5, 10, 20, 50, 100, 200, 500] if args.quick else [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    errors_start = hypergradient_errors(data, theta0, budgets)
    errors_end = hypergradient_errors(data, cg.theta.detach(), budgets)
    figure = plot(cg, neumann, errors_start, errors_end, data["features"], args.out)

    warm = float(np.mean([cg.history["inner_iterations"][k] for k in cg.history["cold_steps"]]))
    cold = float(np.mean(cg.history["cold_iterations"]))
    warm_gradient = float(np.mean([cg.history["inner_initial_gradient"][k] for k in cg.history["cold_steps"]]))
    cold_gradient = float(np.mean(cg.history["cold_initial_gradient"]))
    at = budgets.index(args.neumann_terms) if args.neumann_terms in budgets else None
    metrics = {
        "val_loss_before": before["val_loss"],
        "val_loss_after": after["val_loss"],
        "test_accuracy_before": before["test_accuracy"],
        "test_accuracy_after": after["test_accuracy"],
        "test_loss_before": before["test_loss"],
        "test_loss_after": after["test_loss"],
        "neumann_val_loss_after": after_neumann["val_loss"],
        "neumann_test_accuracy_after": after_neumann["test_accuracy"],
        "neumann_terms": args.neumann_terms,
        "cg_mean_iterations": float(np.mean(cg.history["matvecs"])),
        "cg_warm_start": args.warm_start,
        "cg_matvecs_at_measured_steps": float(np.mean([cg.history["matvecs"][k] for k in cg.history["cold_steps"]])),
        "cg_matvecs_cold_at_measured_steps": float(np.mean(cg.history["cold_matvecs"])),
        "inner_iterations_warm_mean": warm,
        "inner_iterations_cold_mean": cold,
        "inner_initial_gradient_warm_mean": warm_gradient,
        "inner_initial_gradient_cold_mean": cold_gradient,
        "hypergradient_errors_start": errors_start,
        "hypergradient_errors_end": errors_end,
        "lambda_per_feature": dict(zip(data["features"], cg.theta.detach().exp().cpu().tolist())),
        "outer_steps": steps,
    }
    write_json(args.json, metrics)

    def error_at(errors, name):
        return f"{errors[name][at]:.1e}" if at is not None else "n/a"

    print_summary(
        f"Per-feature L2 penalties for logistic regression on breast cancer ({len(data['train'][1])} train, "
        f"{len(data['val'][1])} validation, {len(data['test'][1])} test; {d} penalties, {steps} outer steps)",
        [
            ("validation cross-entropy before", before["val_loss"]),
            ("validation cross-entropy after (CG)", after["val_loss"]),
            (f"validation cross-entropy after (Neumann, {args.neumann_terms} terms)", after_neumann["val_loss"]),
            ("test cross-entropy before / after (CG)", f"{before['test_loss']:.4f} / {after['test_loss']:.4f}"),
            ("test accuracy before", before["test_accuracy"]),
            ("test accuracy after (CG)", after["test_accuracy"]),
            (f"test accuracy after (Neumann, {args.neumann_terms} terms)", after_neumann["test_accuracy"]),
            ("CG iterations per hypergradient (mean)", metrics["cg_mean_iterations"]),
            (f"CG iterations per hypergradient, {'warm' if args.warm_start else 'cold'} / cold start (same steps)",
             f"{metrics['cg_matvecs_at_measured_steps']:.1f} / {metrics['cg_matvecs_cold_at_measured_steps']:.1f}"),
            (f"hypergradient error of Neumann ({args.neumann_terms} terms), start / end",
             f"{error_at(errors_start, 'neumann')} / {error_at(errors_end, 'neumann')}"),
            (f"hypergradient error of CG ({args.neumann_terms} iterations), start / end",
             f"{error_at(errors_start, 'cg')} / {error_at(errors_end, 'cg')}"),
            ("L-BFGS iterations per inner solve, warm / cold start (mean)", f"{warm:.1f} / {cold:.1f}"),
            ("‖∇f‖ where the inner solve starts, warm / cold (mean)", f"{warm_gradient:.1e} / {cold_gradient:.1e}"),
        ],
        notes=[
            "The penalties start at λ_j = 1 (too strong); hypergradient descent lowers the ones that hurt the",
            "validation loss. Errors are relative to a dense solve of the Hessian system.",
            "Warm starts save no L-BFGS iterations here although they start much closer to w*: each solve",
            "starts torch.optim.LBFGS with an empty curvature history, and rebuilding its model of the 31×31",
            "Hessian, not the distance to w*, sets the number of iterations (superlinear convergence begins",
            "only once the model is good); measured at the same θ and the same absolute tolerance, warm",
            "starts needed as many iterations or more.",
            f"Figure: {figure}",
        ],
    )
    return metrics


if __name__ == "__main__":
    main()
