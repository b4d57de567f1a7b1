"""Small bilevel problems with independent references, used across the test suites."""

from __future__ import annotations

import torch

DT = torch.float64


def ridge_data(n=40, d=6, n_val=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.randn(d, generator=g, dtype=DT)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n_val, d, generator=g, dtype=DT)
    yv = Xv @ w_true + 0.5 * torch.randn(n_val, generator=g, dtype=DT)
    return X, y, Xv, yv


def ridge_objective(w, log_lam, X, y):
    """0.5‖Xw − y‖² + 0.5 Σ exp(log λ) w² (log λ scalar or per feature)."""
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (torch.exp(log_lam) * w**2).sum()


def ridge_closed_form(log_lam, X, y):
    d = X.shape[1]
    lam = torch.exp(log_lam) * torch.ones(d, dtype=X.dtype)
    return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)


def ridge_solver(fn, w0, log_lam, X, y):
    return ridge_closed_form(log_lam, X, y)


def val_loss(w, Xv, yv):
    return 0.5 * ((Xv @ w - yv) ** 2).mean()


def logistic_data(n=60, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = (torch.sigmoid(X @ w + 0.3) > torch.rand(n, generator=g, dtype=DT)).to(DT)
    return X, y


def logistic_objective(params, log_lam, X, y):
    """Mean logistic loss of ``{"w", "b"}`` plus per-feature L2 on w and a small L2 on b."""
    z = X @ params["w"] + params["b"]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
    return loss + 0.5 * (torch.exp(log_lam) * params["w"] ** 2).sum() + 0.5e-2 * params["b"] ** 2


def newton_solver(fn, x0, *params, iters=50):
    """Newton's method on the concatenated variable (a solver independent of the library)."""
    leaves = [x0["w"], x0["b"]]
    sizes = [t.numel() for t in leaves]
    v = torch.cat([t.reshape(-1) for t in leaves]).detach()

    def unflat(v):
        return {"w": v[: sizes[0]].reshape(x0["w"].shape), "b": v[sizes[0]:].reshape(x0["b"].shape)}

    def flat_fn(v):
        return fn(unflat(v), *params)

    with torch.enable_grad():
        for _ in range(iters):
            g = torch.func.grad(flat_fn)(v)
            if g.norm() < 1e-14:
                break
            H = torch.func.hessian(flat_fn)(v)
            v = v - torch.linalg.solve(H, g)
    return unflat(v.detach())
