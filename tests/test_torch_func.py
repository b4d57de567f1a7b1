"""implicit_solve composed with torch.func and higher-order autograd (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from problems import DT, ridge_data, ridge_solver
from registry import rel_err

import implicitgrad as ig
from implicitgrad.testing.problems import ridge_objective
from implicitgrad.testing.problems import ridge_solution as ridge_closed_form
from implicitgrad.testing.problems import squared_loss as val_loss

X, Y, XV, YV = ridge_data()
D = X.shape[1]
LR = 1.0 / (float(torch.linalg.eigvalsh(X.T @ X).max()) + math.exp(1.0))
GD = ig.solvers.GradientDescent(lr=LR, maxiter=20000, tol=1e-13)


def hyper(log_lam, solver=ridge_solver, linear_solver=None):
    w = ig.implicit_solve(ridge_objective, torch.zeros(D, dtype=DT), log_lam, X, Y, solver=solver,
                          linear_solver=linear_solver or ig.CG())
    return val_loss(w, XV, YV)


def reference(log_lam):
    return val_loss(ridge_closed_form(log_lam, X, Y), XV, YV)


def closed_form_second_derivative(ll: float) -> float:
    """d²L/d(log λ)² for ridge, by hand: with A = XᵀX + λI, w = A⁻¹Xᵀy,
    w' = −λA⁻¹w, w'' = −λA⁻¹w − 2λA⁻¹w' ... written out: w'' = w' − 2λA⁻¹w'.
    L = ½ mean (Xv w − yv)², L'' = (Xv w')ᵀ(Xv w')/n + (Xv w − yv)ᵀ Xv w''/n."""
    lam = math.exp(ll)
    A = X.T @ X + lam * torch.eye(D, dtype=DT)
    w = torch.linalg.solve(A, X.T @ Y)
    w1 = -lam * torch.linalg.solve(A, w)
    w2 = w1 - 2 * lam * torch.linalg.solve(A, w1)
    n = XV.shape[0]
    r = XV @ w - YV
    return float(((XV @ w1) @ (XV @ w1) + r @ (XV @ w2)) / n)


@pytest.mark.parametrize("solver", [ridge_solver, GD], ids=["closed_form", "gradient_descent"])
def test_second_derivative_create_graph_matches_closed_form(solver):
    ll = torch.tensor(0.3, dtype=DT, requires_grad=True)
    g, = torch.autograd.grad(hyper(ll, solver), ll, create_graph=True)
    h, = torch.autograd.grad(g, ll)
    assert float(h) == pytest.approx(closed_form_second_derivative(0.3), rel=1e-8)


def test_second_derivative_matches_finite_differences_of_hypergradients():
    def grad_at(v):
        ll = torch.tensor(v, dtype=DT, requires_grad=True)
        return float(torch.autograd.grad(hyper(ll), ll)[0])

    eps = 1e-4
    fd = (grad_at(0.3 + eps) - grad_at(0.3 - eps)) / (2 * eps)
    assert fd == pytest.approx(closed_form_second_derivative(0.3), rel=1e-6)


@pytest.mark.parametrize("linear_solver", [ig.CG(), ig.GMRES(), ig.Exact()], ids=["CG", "GMRES", "Exact"])
def test_func_hessian_over_per_feature_hyperparameters(linear_solver):
    ll = torch.linspace(-1, 1, D, dtype=DT)
    H = torch.func.hessian(lambda v: hyper(v, linear_solver=linear_solver))(ll)
    Href = torch.autograd.functional.hessian(reference, ll)
    assert rel_err(H, Href) <= 1e-8
    assert rel_err(H, H.T) <= 1e-10


def test_func_grad_jacrev_jacfwd_agree_with_reference():
    ll = torch.linspace(-1, 1, D, dtype=DT)
    ref = torch.func.grad(reference)(ll)
    assert rel_err(torch.func.grad(hyper)(ll), ref) <= 1e-9
    assert rel_err(torch.func.jacrev(hyper)(ll), ref) <= 1e-9
    assert rel_err(torch.func.jacfwd(hyper)(ll), ref) <= 1e-9


def test_jvp_equals_closed_form_derivative_of_the_solution():
    """dw/d log λ = −λ A⁻¹ w (forward mode, by the implicit function theorem)."""
    ll = torch.tensor(0.3, dtype=DT)

    def solution(v):
        return ig.implicit_solve(ridge_objective, torch.zeros(D, dtype=DT), v, X, Y, solver=ridge_solver)

    w, w_dot = torch.func.jvp(solution, (ll,), (torch.ones((), dtype=DT),))
    lam = math.exp(0.3)
    A = X.T @ X + lam * torch.eye(D, dtype=DT)
    assert rel_err(w_dot, -lam * torch.linalg.solve(A, w)) <= 1e-9


def test_forward_mode_dual_tensors():
    import torch.autograd.forward_ad as fwAD

    ll = torch.tensor(0.3, dtype=DT)
    with fwAD.dual_level():
        dual = fwAD.make_dual(ll, torch.ones((), dtype=DT))
        w = ig.implicit_solve(ridge_objective, torch.zeros(D, dtype=DT), dual, X, Y, solver=ridge_solver)
        primal, w_dot = fwAD.unpack_dual(w)
    lam = math.exp(0.3)
    A = X.T @ X + lam * torch.eye(D, dtype=DT)
    assert rel_err(w_dot, -lam * torch.linalg.solve(A, primal)) <= 1e-9


@pytest.mark.parametrize("solver", [GD, ridge_solver], ids=["batched_gradient_descent", "looped_closed_form"])
def test_vmap_equals_loop(solver):
    lls = torch.linspace(-1.0, 1.0, 5, dtype=DT)
    batched = torch.func.vmap(torch.func.grad(lambda v: hyper(v, solver)))(lls)
    looped = torch.stack([torch.func.grad(lambda v: hyper(v, solver))(v) for v in lls])
    ref = torch.stack([torch.func.grad(reference)(v) for v in lls])
    assert rel_err(batched, looped) <= 1e-9
    assert rel_err(batched, ref) <= 1e-9


def test_vmap_over_data_solutions():
    """A batch of independent problems (different training sets), solved in one call."""
    Xs = torch.stack([ridge_data(seed=s)[0] for s in range(4)])
    Ys = torch.stack([ridge_data(seed=s)[1] for s in range(4)])
    ll = torch.tensor(0.2, dtype=DT)

    def solve(Xb, Yb):
        return ig.implicit_solve(ridge_objective, torch.zeros(D, dtype=DT), ll, Xb, Yb, solver=GD)

    W = torch.func.vmap(solve)(Xs, Ys)
    ref = torch.stack([ridge_closed_form(ll, Xs[i], Ys[i]) for i in range(4)])
    assert rel_err(W, ref) <= 1e-10


def test_vmap_of_hessian():
    lls = torch.linspace(-0.5, 0.5, 3, dtype=DT)
    H = torch.func.vmap(torch.func.hessian(hyper))(lls)
    ref = torch.tensor([closed_form_second_derivative(float(v)) for v in lls], dtype=DT)
    assert rel_err(H, ref) <= 1e-8


def test_third_derivative_matches_finite_differences_of_second():
    ll = torch.tensor(0.3, dtype=DT, requires_grad=True)
    g, = torch.autograd.grad(hyper(ll, linear_solver=ig.Exact()), ll, create_graph=True)
    h, = torch.autograd.grad(g, ll, create_graph=True)
    t, = torch.autograd.grad(h, ll)
    eps = 1e-4
    fd = (closed_form_second_derivative(0.3 + eps) - closed_form_second_derivative(0.3 - eps)) / (2 * eps)
    assert float(t) == pytest.approx(fd, rel=1e-6)
