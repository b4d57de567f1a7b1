"""Data of the small bilevel problems shared by the core suites; the problems themselves
(objectives, closed forms, losses, Newton's method) come from ``ig.testing.problems``."""

from __future__ import annotations

import torch

from implicitgrad.testing.problems import Newton, ridge_solution

DT = torch.float64

#: Newton's method on the whole pytree: a solver independent of the library's own.
newton_solver = Newton()


def ridge_data(n=40, d=6, n_val=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.randn(d, generator=g, dtype=DT)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n_val, d, generator=g, dtype=DT)
    yv = Xv @ w_true + 0.5 * torch.randn(n_val, generator=g, dtype=DT)
    return X, y, Xv, yv


def ridge_solver(fn, w0, log_lam, X, y):
    """``ig.testing.problems.ridge_solution`` as an inner solver ``solver(fn, x0, *params)``."""
    return ridge_solution(log_lam, X, y)


def logistic_data(n=60, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = (torch.sigmoid(X @ w + 0.3) > torch.rand(n, generator=g, dtype=DT)).to(DT)
    return X, y


def logistic_objective(params, log_lam, X, y):
    """Mean logistic loss of the pytree ``{"w", "b"}`` (labels in {0, 1}) plus per-feature L2
    on w and a small L2 on b: a variable of two coupled leaves."""
    z = X @ params["w"] + params["b"]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
    return loss + 0.5 * (torch.exp(log_lam) * params["w"] ** 2).sum() + 0.5e-2 * params["b"] ** 2
