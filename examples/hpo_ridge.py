r"""Tune the ridge penalty of a linear model by gradient descent on the validation loss.

Ridge regression on scikit-learn's diabetes data (442 patients, 10 clinical features,
bundled with scikit-learn). For penalties :math:`\lambda` the inner problem is

.. math::

    w^\star(\lambda) = \arg\min_w \; \tfrac12 \operatorname{mean}_i (x_i^\top w - y_i)^2
    + \tfrac12 \textstyle\sum_j \lambda_j w_j^2 ,

and the outer problem minimises the validation mean squared error of :math:`w^\star(\lambda)`
over :math:`\log\lambda` (the log keeps :math:`\lambda` positive). ``ig.implicit_solve`` gives
the hypergradient from the stationarity condition at :math:`w^\star` alone. The script

1. checks that hypergradient against autograd through the closed form
   :math:`w^\star = (X^\top X / n + \operatorname{diag}\lambda)^{-1} X^\top y / n`, for one
   :math:`\lambda` and for one :math:`\lambda_j` per feature;
2. runs hypergradient descent (Adam on :math:`\log\lambda`) for one :math:`\lambda` and compares
   it with a grid search over :math:`\lambda`;
3. runs it again with one :math:`\lambda_j` per feature, which a grid cannot search.

Run from the repository root: ``python examples/hpo_ridge.py --quick``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from _common import (
    example_parser,
    parse_args,
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
    """The diabetes data split at random into train / validation / test, standardised on train.

    Targets are centred and scaled by the training targets, so a mean squared error of 1 is
    what predicting the training mean scores; the model needs no intercept.
    """
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    train, val, test = split_indices(len(bunch.target), [n_train, n_val, -1], seed)
    X_train, X_val, X_test = standardize(bunch.data[train], bunch.data[val], bunch.data[test])
    y_train, y_val, y_test = standardize(bunch.target[train], bunch.target[val], bunch.target[test])

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=DTYPE, device=device)

    return {
        "train": (tensor(X_train), tensor(y_train)),
        "val": (tensor(X_val), tensor(y_val)),
        "test": (tensor(X_test), tensor(y_test)),
        "features": list(bunch.feature_names),
    }


def ridge_objective(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The inner objective; ``log_lam`` has shape ``()`` (one λ) or ``(d,)`` (one per feature)."""
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (log_lam.exp() * w**2).sum()


def newton_cg(objective, w0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """One Newton step from ``w0``, the Newton system solved by ``ig.CG``: exact for a quadratic.

    The solver sees the objective only through its gradient and Hessian-vector products (by
    double backward), as any black-box solver would; it does not use the closed form that the
    check below differentiates. The core calls it under ``torch.no_grad()``, hence
    ``enable_grad`` around the derivatives.
    """
    with torch.enable_grad():
        w = w0.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(w, *params), w, create_graph=True)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(g, w, v, retain_graph=True)[0]

        step, info = ig.CG(maxiter=10 * w0.numel(), tol=1e-13)(hvp, g.detach())
    if not info.converged:
        raise RuntimeError(f"Newton-CG inner solve failed: {info}")
    return w0 - step


def fit(log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """``w*(λ)``, differentiable in ``log_lam`` by the implicit function theorem."""
    return ig.implicit_solve(ridge_objective, w0, log_lam, X, y, solver=newton_cg, linear_solver=ig.CG(tol=1e-13))


def closed_form(log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``w*(λ) = (XᵀX/n + diag λ)⁻¹ Xᵀy/n``, differentiated by ordinary autograd (the reference)."""
    n, d = X.shape
    lam = log_lam.exp() * torch.ones(d, dtype=X.dtype, device=X.device)
    return torch.linalg.solve(X.T @ X / n + torch.diag(lam), X.T @ y / n)


def mse(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((X @ w - y) ** 2).mean()


def hypergradient_check(log_lam: torch.Tensor, data: Dict[str, object]) -> float:
    """Relative error ``‖g_implicit − g_closed‖ / ‖g_closed‖`` of ``∂ val-MSE / ∂ log λ``."""
    (X, y), (X_val, y_val) = data["train"], data["val"]
    grads = []
    for solution in (lambda p: fit(p, X, y, torch.zeros(X.shape[1], dtype=DTYPE, device=X.device)),
                     lambda p: closed_form(p, X, y)):
        p = log_lam.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(mse(solution(p), X_val, y_val), p)
        grads.append(grad)
    implicit, reference = grads
    return float((implicit - reference).norm() / reference.norm())


def hypergradient_descent(
    log_lam0: torch.Tensor, data: Dict[str, object], steps: int, lr: float, desc: str
) -> Dict[str, list]:
    """Adam on ``log λ`` with the implicit hypergradient; the inner solve is warm-started."""
    (X, y), (X_val, y_val) = data["train"], data["val"]
    log_lam = log_lam0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([log_lam], lr=lr)
    # A decaying step lets Adam settle in the minimum instead of hovering around it.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    w = torch.zeros(X.shape[1], dtype=DTYPE, device=X.device)
    history = {"val": [], "log_lam": []}
    bar = progress(range(steps), desc=desc)
    for _ in bar:
        optimizer.zero_grad()
        w = fit(log_lam, X, y, w.detach())
        loss = mse(w, X_val, y_val)
        loss.backward()
        history["val"].append(loss.item())
        history["log_lam"].append(log_lam.detach().cpu().numpy().copy())
        optimizer.step()
        schedule.step()
        bar.set_postfix(val_mse=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        w = closed_form(log_lam, X, y)
        history["val"].append(mse(w, X_val, y_val).item())
        history["log_lam"].append(log_lam.detach().cpu().numpy().copy())
    history["w"] = w
    return history


def grid_search(log_grid: torch.Tensor, data: Dict[str, object]) -> Dict[str, np.ndarray]:
    """Validation and test MSE of the closed-form solution at each ``log λ`` of the grid."""
    (X, y), (X_val, y_val), (X_test, y_test) = data["train"], data["val"], data["test"]
    val, test = [], []
    with torch.no_grad():
        for log_lam in log_grid:
            w = closed_form(log_lam, X, y)
            val.append(mse(w, X_val, y_val).item())
            test.append(mse(w, X_test, y_test).item())
    return {"log_lam": log_grid.cpu().numpy(), "val": np.array(val), "test": np.array(test)}


def plot(grid, single, per_feature, features, log_lam0, path_out):
    plt = pyplot()
    # Two panels above one wide one, 10 inches wide: legible at page width.
    fig, axes = plt.subplot_mosaic([["grid", "descent"], ["features", "features"]], figsize=(10, 8))

    ax = axes["grid"]
    ax.plot(np.exp(grid["log_lam"]), grid["val"], label="validation MSE (grid)")
    ax.plot(np.exp(grid["log_lam"]), grid["test"], "--", color="gray", label="test MSE (grid)")
    trajectory = np.exp(np.array(single["log_lam"]).ravel())
    ax.plot(trajectory, single["val"], ".", color="C3", ms=4, label="hypergradient descent")
    ax.plot(trajectory[-1], single["val"][-1], "*", color="C3", ms=14)
    ax.set(xscale="log", xlabel=r"$\lambda$", ylabel="mean squared error", title=r"one $\lambda$: descent vs grid")
    ax.legend(fontsize=8)

    ax = axes["descent"]
    best = grid["val"].min()
    ax.plot(single["val"], label=r"one $\lambda$")
    ax.plot(per_feature["val"], label=r"one $\lambda_j$ per feature")
    ax.axhline(best, color="k", ls=":", label=f"grid best ({best:.4f})")
    ax.set(xlabel="outer step", ylabel="validation MSE", title="hypergradient descent")
    ax.legend(fontsize=8)

    ax = axes["features"]
    lam = np.exp(per_feature["log_lam"][-1])
    ax.bar(features, lam, color="C1", label=r"learned $\lambda_j$")
    ax.axhline(np.exp(single["log_lam"][-1]).item(), color="C0", ls="--", label=r"learned single $\lambda$")
    ax.axhline(np.exp(float(log_lam0)), color="gray", ls=":", label=r"initial $\lambda$")
    ax.set(yscale="log", ylabel=r"$\lambda$",
           title=r"one $\lambda_j$ per feature (large $\lambda_j$: feature shrunk away)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_figure(fig, path_out, "hpo_ridge.png")


def summary(metrics: Dict[str, object], rows, sizes, figure) -> str:
    """The end-of-run report, written for someone who has never seen the method."""
    n_train, n_val, n_test, d = sizes
    best, single, per_feature = (metrics["grid_best_val_loss"], metrics["val_loss_after_single"],
                                 metrics["val_loss_after"])
    width = max(len(name) for name, *_ in rows)
    lines = [
        "",
        "Tuning the ridge penalty λ of a linear regression by gradient descent on the validation loss.",
        f"Data: scikit-learn's diabetes set, {n_train} training / {n_val} validation / {n_test} test patients, "
        f"{d} features.",
        "  inner problem: w*(λ) = argmin_w ½·mean((x·w − y)²) + ½·Σ_j λ_j·w_j²   (solved by Newton's method + CG)",
        "  outer problem: find the λ whose w*(λ) has the smallest validation mean squared error (MSE)",
        "  MSE is in units of the target's variance: 1.0 = always predicting the mean.",
        "",
        "1. The hypergradient d(validation MSE)/d(log λ), from the implicit function theorem at w*,",
        "   compared with autograd through the closed form w* = (XᵀX/n + diag λ)⁻¹ Xᵀy/n:",
        f"     one λ:              relative error {metrics['hypergradient_rel_error_single']:.1e}",
        f"     one λ per feature:  relative error {metrics['hypergradient_rel_error_per_feature']:.1e}",
        "",
        "2. Hypergradient descent (Adam on log λ) against a grid search:",
        f"     {'':{width}s}  {'penalty':22s} {'val MSE':>8s} {'test MSE':>9s}",
    ]
    lines += [f"     {name:{width}s}  {lam:22s} {v:8.4f} {t:9.4f}" for name, lam, v, t in rows]
    single_verdict = ("matches the grid's best" if single <= best * (1 + 1e-3)
                      else "stays above the grid's best")
    per_feature_verdict = "below" if per_feature < best else "not below"
    largest = sorted(metrics["lambda_per_feature"].items(), key=lambda kv: -kv[1])[:3]
    lines += [
        "",
        f"With one λ, hypergradient descent {single_verdict} ({single:.4f} vs {best:.4f}) without trying a grid.",
        f"With one λ per feature ({d} hyperparameters, too many for a grid) the validation MSE goes "
        f"{per_feature_verdict}",
        f"the best single λ ({per_feature:.4f}); the test column shows how much of the gain carries over.",
        "Largest learned penalties (features shrunk most): " + ", ".join(f"{k} ({v:.2g})" for k, v in largest),
        f"Figure: {figure}",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = example_parser(__file__, "Tune ridge penalties on the diabetes data by implicit hypergradients.",
                            quick_time="about 25 s on one CPU core")
    parser.add_argument("--steps", type=int, default=None, help="outer steps (default 100 quick, 300 full)")
    parser.add_argument("--lr", type=float, default=0.3, help="initial Adam step size on log λ (cosine decay)")
    parser.add_argument("--n-train", type=int, default=50, help="training patients (few: the penalty matters)")
    parser.add_argument("--log-lam0", type=float, default=-6.0, help="initial log λ (weak regularisation)")
    parser.set_defaults(threads=1)
    args = parse_args(parser, argv)
    steps = args.steps or (100 if args.quick else 300)

    data = load_data(args.n_train, 150, args.seed, args.device)
    X, y = data["train"]
    d = X.shape[1]
    log_lam0 = torch.tensor(args.log_lam0, dtype=DTYPE, device=args.device)
    log_lam0_vec = torch.full((d,), args.log_lam0, dtype=DTYPE, device=args.device)

    # Check the implicit hypergradient where the descent starts, near the optimum (λ = 1), and at
    # random per-feature penalties between e⁻⁶ and e².
    generator = torch.Generator().manual_seed(args.seed)
    random_vec = (torch.rand(d, generator=generator, dtype=DTYPE) * 8 - 6).to(args.device)
    one = torch.zeros((), dtype=DTYPE, device=args.device)
    error_single = max(hypergradient_check(p, data) for p in (log_lam0, one))
    error_vector = max(hypergradient_check(p, data) for p in (log_lam0_vec, random_vec))

    log_grid = torch.linspace(-8, 4, 49 if args.quick else 121, dtype=DTYPE, device=args.device)
    grid = grid_search(log_grid, data)
    single = hypergradient_descent(log_lam0, data, steps, args.lr, "one λ")
    per_feature = hypergradient_descent(log_lam0_vec, data, steps, args.lr, "one λ per feature")

    (X_val, y_val), (X_test, y_test) = data["val"], data["test"]
    with torch.no_grad():
        w0 = closed_form(log_lam0, X, y)
        before = {"val": mse(w0, X_val, y_val).item(), "test": mse(w0, X_test, y_test).item()}
    best = int(np.argmin(grid["val"]))
    test_single = mse(single["w"], X_test, y_test).item()
    test_per_feature = mse(per_feature["w"], X_test, y_test).item()
    figure = plot(grid, single, per_feature, data["features"], args.log_lam0, args.out)

    lam_single = float(np.exp(single["log_lam"][-1]))
    lam_per_feature = dict(zip(data["features"], np.exp(per_feature["log_lam"][-1]).tolist()))
    metrics = {
        "hypergradient_rel_error": max(error_single, error_vector),
        "hypergradient_rel_error_single": error_single,
        "hypergradient_rel_error_per_feature": error_vector,
        "val_loss_before": before["val"],
        "val_loss_after": per_feature["val"][-1],
        "val_loss_after_single": single["val"][-1],
        "grid_best_val_loss": float(grid["val"][best]),
        "grid_best_lambda": float(np.exp(grid["log_lam"][best])),
        "lambda_single": lam_single,
        "lambda_per_feature": lam_per_feature,
        "test_loss_before": before["test"],
        "test_loss_grid": float(grid["test"][best]),
        "test_loss_after_single": test_single,
        "test_loss_after": test_per_feature,
        "outer_steps": steps,
    }
    write_json(args.json, metrics)

    print(summary(metrics, rows=[
        ("start", f"λ = {np.exp(args.log_lam0):.2g}", before["val"], before["test"]),
        (f"grid search over one λ ({len(grid['val'])} values)", f"λ = {metrics['grid_best_lambda']:.3g}",
         metrics["grid_best_val_loss"], metrics["test_loss_grid"]),
        (f"hypergradient descent, one λ ({steps} steps)", f"λ = {lam_single:.3g}",
         metrics["val_loss_after_single"], test_single),
        (f"hypergradient descent, one λ per feature ({steps} steps)", f"{d} values, see figure",
         metrics["val_loss_after"], test_per_feature),
    ], sizes=(len(y), len(y_val), len(y_test), d), figure=figure), flush=True)
    return metrics


if __name__ == "__main__":
    main()
