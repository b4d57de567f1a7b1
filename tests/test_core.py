"""implicit_solve / root_solve / fixed_point_solve against independent references (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from problems import DT, logistic_data, logistic_objective, newton_solver, ridge_data, ridge_solver
from registry import linear_solvers, rel_err

import implicitgrad as ig
from implicitgrad.testing.problems import ridge_objective
from implicitgrad.testing.problems import ridge_solution as ridge_closed_form
from implicitgrad.testing.problems import squared_loss as val_loss

X, Y, XV, YV = ridge_data()
H_RIDGE_MAX = float(torch.linalg.eigvalsh(X.T @ X).max()) + math.exp(0.5)


def ridge_hypergradient(log_lam, linear_solver, X=X, y=Y):
    w = ig.implicit_solve(
        ridge_objective, torch.zeros(X.shape[1], dtype=DT), log_lam, X, y,
        solver=ridge_solver, linear_solver=linear_solver,
    )
    return val_loss(w, XV, YV)


def ridge_reference(log_lam, X=X, y=Y):
    return val_loss(ridge_closed_form(log_lam, X, y), XV, YV)


@pytest.mark.parametrize("name,solver", linear_solvers(H_RIDGE_MAX))
@pytest.mark.parametrize("per_feature", [False, True])
def test_ridge_hypergradient_matches_closed_form(name, solver, per_feature):
    log_lam = torch.full((X.shape[1],) if per_feature else (), 0.5, dtype=DT, requires_grad=True)
    g, = torch.autograd.grad(ridge_hypergradient(log_lam, solver), log_lam)
    g_ref, = torch.autograd.grad(ridge_reference(log_lam), log_lam)
    tol = 1e-10 if name == "Exact" else 1e-8
    assert rel_err(g, g_ref) <= tol


def test_neumann_error_is_exactly_the_truncated_series_remainder():
    """After K terms u_K = u − (I − αH)^K u, so g_K − g = Bᵀ (I − αH)^K u: the rate is ρ(I − αH)."""
    log_lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    g_ref, = torch.autograd.grad(ridge_reference(log_lam), log_lam)
    lam = math.exp(0.5)
    H = X.T @ X + lam * torch.eye(X.shape[1], dtype=DT)
    alpha = 0.5 / float(torch.linalg.eigvalsh(H).max())
    w = ridge_closed_form(log_lam.detach(), X, Y)
    u = torch.linalg.solve(H, torch.func.grad(val_loss)(w, XV, YV))
    B = lam * w  # ∂/∂log λ of ∇_w f
    M = torch.eye(X.shape[1], dtype=DT) - alpha * H
    for k in (5, 20, 60):
        solver = ig.Neumann(maxiter=k, alpha=alpha, tol=1e-300)
        with pytest.warns(ig.ImplicitGradWarning, match="Neumann series did not reach"):
            g, = torch.autograd.grad(ridge_hypergradient(log_lam, solver), log_lam)
        predicted = B @ torch.linalg.matrix_power(M, k) @ u
        assert float(g - g_ref) == pytest.approx(float(predicted), rel=1e-6, abs=1e-14)


def test_gradient_with_respect_to_training_data():
    Xg = X.clone().requires_grad_(True)
    yg = Y.clone().requires_grad_(True)
    log_lam = torch.tensor(0.1, dtype=DT)
    w = ig.implicit_solve(ridge_objective, torch.zeros(6, dtype=DT), log_lam, Xg, yg, solver=ridge_solver,
                          linear_solver=ig.CG())
    gX, gy = torch.autograd.grad(val_loss(w, XV, YV), (Xg, yg))
    Xr = X.clone().requires_grad_(True)
    yr = Y.clone().requires_grad_(True)
    gXr, gyr = torch.autograd.grad(val_loss(ridge_closed_form(log_lam, Xr, yr), XV, YV), (Xr, yr))
    assert rel_err(gX, gXr) <= 1e-8
    assert rel_err(gy, gyr) <= 1e-8


def _logistic_setting():
    X, y = logistic_data()
    Xv, yv = logistic_data(seed=1)
    x0 = {"w": torch.zeros(X.shape[1], dtype=DT), "b": torch.zeros((), dtype=DT)}
    log_lam = torch.linspace(-3, -1, X.shape[1], dtype=DT)

    def outer(p):
        return torch.nn.functional.binary_cross_entropy_with_logits(Xv @ p["w"] + p["b"], yv)

    return X, y, x0, log_lam, outer


def _dense_logistic_reference(X, y, x_star, log_lam, outer, drop_cross_blocks=False):
    d = X.shape[1]

    def f(v, ll):
        return logistic_objective({"w": v[:d], "b": v[d]}, ll, X, y)

    v = torch.cat([x_star["w"], x_star["b"].reshape(1)])
    H = torch.func.hessian(f)(v, log_lam)
    if drop_cross_blocks:
        H = torch.block_diag(H[:d, :d], H[d:, d:])
    B = torch.func.jacrev(torch.func.grad(f), argnums=1)(v, log_lam)
    dL = torch.func.grad(lambda v: outer({"w": v[:d], "b": v[d]}))(v)
    return -B.T @ torch.linalg.solve(H, dL)


@pytest.mark.parametrize("name,solver", linear_solvers(1.0))
def test_coupled_pytree_solution_uses_cross_blocks(name, solver):
    X, y, x0, log_lam, outer = _logistic_setting()
    log_lam = log_lam.clone().requires_grad_(True)
    x = ig.implicit_solve(logistic_objective, x0, log_lam, X, y, solver=newton_solver, linear_solver=solver)
    g, = torch.autograd.grad(outer(x), log_lam)
    x_star = {k: v.detach() for k, v in x.items()}
    ref = _dense_logistic_reference(X, y, x_star, log_lam.detach(), outer)
    assert rel_err(g, ref) <= (1e-10 if name == "Exact" else 1e-8)
    # A per-tensor dense solve that drops the w–b blocks is measurably wrong here.
    wrong = _dense_logistic_reference(X, y, x_star, log_lam.detach(), outer, drop_cross_blocks=True)
    assert rel_err(wrong, ref) > 1e-3


def test_matches_central_finite_differences_with_gradient_descent():
    X, y, x0, log_lam, outer = _logistic_setting()
    solver = ig.solvers.GradientDescent(lr=2.0, maxiter=20000, tol=1e-12)

    def hyper(ll):
        return outer(ig.implicit_solve(logistic_objective, x0, ll, X, y, solver=solver))

    ll = log_lam.clone().requires_grad_(True)
    g, = torch.autograd.grad(hyper(ll), ll)
    eps = 1e-5
    fd = torch.zeros_like(log_lam)
    with torch.no_grad():
        for i in range(log_lam.numel()):
            e = torch.zeros_like(log_lam)
            e[i] = eps
            fd[i] = (outer(newton_solver(logistic_objective, x0, log_lam + e, X, y))
                     - outer(newton_solver(logistic_objective, x0, log_lam - e, X, y))) / (2 * eps)
    assert rel_err(g, fd) <= 1e-7


def test_scalar_solution_and_dict_params():
    def objective(x, p):
        return (x - p["a"]) ** 4 / 4 + p["c"] * x**2 / 2

    p = {"a": torch.tensor(1.5, dtype=DT, requires_grad=True), "c": torch.tensor(2.0, dtype=DT, requires_grad=True),
         "name": "quartic", "n": 3}
    solver = ig.solvers.GradientDescent(lr=0.1, maxiter=20000, tol=1e-13)
    x = ig.implicit_solve(objective, torch.tensor(0.0, dtype=DT), p, solver=solver)
    ga, gc = torch.autograd.grad(x, (p["a"], p["c"]))
    # F = (x − a)³ + c x = 0: dx/da = 3(x−a)² / (3(x−a)² + c), dx/dc = −x / (3(x−a)² + c)
    xs, a, c = x.detach(), p["a"].detach(), p["c"].detach()
    denom = 3 * (xs - a) ** 2 + c
    assert float(ga) == pytest.approx(float(3 * (xs - a) ** 2 / denom), rel=1e-9)
    assert float(gc) == pytest.approx(float(-xs / denom), rel=1e-9)


def _hand_unrolled(objective, x0, params, lr, steps):
    x = x0
    for _ in range(steps):
        g, = torch.autograd.grad(objective(x, *params), x, create_graph=True)
        x = x - lr * g
    return x


def test_unrolled_mode_equals_hand_unrolled_autograd():
    log_lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    lr, steps = 1.0 / H_RIDGE_MAX, 50
    solver = ig.solvers.GradientDescent(lr=lr, maxiter=steps, tol=0)
    x = ig.implicit_solve(ridge_objective, torch.zeros(6, dtype=DT), log_lam, X, Y, solver=solver,
                          mode="unrolled")
    g, = torch.autograd.grad(val_loss(x, XV, YV), log_lam)
    x0 = torch.zeros(6, dtype=DT, requires_grad=True)
    xr = _hand_unrolled(ridge_objective, x0, (log_lam, X, Y), lr, steps)
    gr, = torch.autograd.grad(val_loss(xr, XV, YV), log_lam)
    assert rel_err(x.detach(), xr.detach()) <= 1e-12
    assert rel_err(g, gr) <= 1e-10


def test_long_unrolled_run_converges_to_implicit_gradient():
    log_lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    solver = ig.solvers.GradientDescent(lr=1.0 / H_RIDGE_MAX, maxiter=3000, tol=0)
    x = ig.implicit_solve(ridge_objective, torch.zeros(6, dtype=DT), log_lam, X, Y, solver=solver,
                          mode="unrolled")
    g_unrolled, = torch.autograd.grad(val_loss(x, XV, YV), log_lam)
    g_implicit, = torch.autograd.grad(ridge_hypergradient(log_lam, ig.Exact()), log_lam)
    assert rel_err(g_unrolled, g_implicit) <= 1e-8


def _nonsymmetric_setting(seed=0, n=5, m=3):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=DT) + 3 * torch.eye(n, dtype=DT)
    C = torch.randn(n, m, generator=g, dtype=DT)
    theta = torch.randn(m, generator=g, dtype=DT)
    return A, C, theta


@pytest.mark.parametrize("name,solver", linear_solvers(symmetric=False))
def test_root_solve_nonsymmetric_against_dense_jacobians(name, solver):
    A, C, theta = _nonsymmetric_setting()

    def residual(x, theta):
        return A @ x + 0.3 * torch.tanh(x) - C @ theta

    def newton(F, x0, theta):
        x = x0
        for _ in range(50):
            J = torch.func.jacrev(F)(x, theta)
            x = x - torch.linalg.solve(J, F(x, theta))
        return x

    th = theta.clone().requires_grad_(True)
    x = ig.root_solve(residual, torch.zeros(5, dtype=DT), th, solver=newton, linear_solver=solver)
    weights = torch.arange(1.0, 6.0, dtype=DT)
    g, = torch.autograd.grad((weights * x**2).sum(), th)
    xs = x.detach()
    Jx = torch.func.jacrev(residual, argnums=0)(xs, theta)
    Jt = torch.func.jacrev(residual, argnums=1)(xs, theta)
    ref = -(torch.linalg.solve(Jx, Jt)).T @ (2 * weights * xs)
    assert rel_err(g, ref) <= (1e-10 if name == "Exact" else 1e-8)


@pytest.mark.parametrize("name,solver", linear_solvers(symmetric=False))
def test_fixed_point_solve_default_solver_against_dense_reference(name, solver):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 4, generator=g, dtype=DT)
    W = 0.6 * W / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(4, 2, generator=g, dtype=DT)
    theta = torch.randn(2, generator=g, dtype=DT, requires_grad=True)

    def mapping(x, theta):
        return W @ torch.tanh(x) + U @ theta

    x, info = ig.fixed_point_solve(mapping, torch.zeros(4, dtype=DT), theta, linear_solver=solver, return_info=True)
    assert info.forward_status == "converged"
    g_, = torch.autograd.grad(x.sum(), theta)
    xs = x.detach()
    Jx = torch.eye(4, dtype=DT) - torch.func.jacrev(mapping, argnums=0)(xs, theta.detach())
    Jt = -torch.func.jacrev(mapping, argnums=1)(xs, theta.detach())
    ref = -(torch.linalg.solve(Jx, Jt)).T @ torch.ones(4, dtype=DT)
    assert rel_err(g_, ref) <= (1e-10 if name == "Exact" else 1e-8)


def test_decorator_wraps_an_existing_fit_function():
    @ig.implicit(objective=ridge_objective, linear_solver=ig.Exact())
    def fit(w0, log_lam, X, y):
        return ridge_closed_form(log_lam, X, y)

    log_lam = torch.tensor(0.2, dtype=DT, requires_grad=True)
    w, info = fit(torch.zeros(6, dtype=DT), log_lam, X, Y, return_info=True)
    g, = torch.autograd.grad(val_loss(w, XV, YV), log_lam)
    g_ref, = torch.autograd.grad(ridge_reference(log_lam), log_lam)
    assert rel_err(g, g_ref) <= 1e-10
    assert info.backward.converged and info.backward.solver == "Exact"


def test_decorator_needs_exactly_one_condition():
    with pytest.raises(TypeError, match="exactly one"):
        ig.implicit(objective=ridge_objective, residual=ridge_objective)
    with pytest.raises(TypeError, match="exactly one"):
        ig.implicit()


def test_solve_info_reports_forward_and_backward():
    log_lam = torch.tensor(0.2, dtype=DT, requires_grad=True)
    solver = ig.solvers.GradientDescent(lr=1.0 / H_RIDGE_MAX, maxiter=5000, tol=1e-12)
    w, info = ig.implicit_solve(ridge_objective, torch.zeros(6, dtype=DT), log_lam, X, Y, solver=solver,
                                linear_solver=ig.CG(), return_info=True)
    assert info.forward_status == "converged"
    assert info.forward_residual <= 1e-12 * max(1.0, info.initial_residual)
    assert 0 < info.forward_iterations < 5000
    assert info.backward is None
    val_loss(w, XV, YV).backward()
    assert info.backward.converged and info.backward.status == "converged"
    assert 0 < info.backward.iterations <= 6 + 1
    assert info.backward.residual <= 1e-10
    assert "converged" in str(info)


def test_x0_gets_no_gradient_and_params_without_grad_are_fine():
    x0 = torch.zeros(6, dtype=DT, requires_grad=True)
    log_lam = torch.tensor(0.2, dtype=DT)
    w = ig.implicit_solve(ridge_objective, x0, log_lam, X, Y, solver=ridge_solver)
    assert w.requires_grad
    w.sum().backward()
    assert x0.grad is None


def test_float32_matches_float64_reference():
    log_lam = torch.tensor(0.5, dtype=torch.float32, requires_grad=True)
    w = ig.implicit_solve(ridge_objective, torch.zeros(6), log_lam, X.float(), Y.float(), solver=ridge_solver)
    g, = torch.autograd.grad(val_loss(w, XV.float(), YV.float()), log_lam)
    ll = torch.tensor(0.5, dtype=DT, requires_grad=True)
    g_ref, = torch.autograd.grad(ridge_reference(ll), ll)
    assert rel_err(g, g_ref) <= 1e-4
