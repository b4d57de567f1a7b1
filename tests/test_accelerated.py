"""AcceleratedGradient: closed forms, per-problem batches under vmap, unrolling, bad settings (float64)."""

from __future__ import annotations

import pytest
import torch

import implicitgrad as ig
from implicitgrad.solvers import AcceleratedGradient

DT = torch.float64


def quadratic(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=DT))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=DT)) @ q.T


@pytest.mark.parametrize("cond", [1.0, 30.0, 1e3])
def test_quadratic_against_solve_and_fewer_steps_than_gradient_descent(cond):
    A = quadratic(torch.linspace(1.0, cond, 12).tolist())
    b = torch.ones(12, dtype=DT)

    def f(x):
        return 0.5 * x @ A @ x - b @ x

    x, stats = AcceleratedGradient(maxiter=5000, tol=1e-10).run(f, torch.zeros(12, dtype=DT))
    assert stats.converged, stats
    assert torch.linalg.norm(x - torch.linalg.solve(A, b)) <= 1e-9 * cond * torch.linalg.norm(torch.linalg.solve(A, b))
    if cond >= 30:
        gd = ig.solvers.GradientDescent(lr=1.0 / cond, maxiter=100_000, tol=1e-10).run(f, torch.zeros(12, dtype=DT))[1]
        # The accelerated rate needs about sqrt(κ) times fewer steps.
        assert stats.iterations < gd.iterations / 3, (stats.iterations, gd.iterations)


def test_curvature_estimate_sets_a_stable_step_on_a_badly_scaled_problem():
    """A fixed step that suits one scale diverges on another; the estimated one does not."""
    A = quadratic([1.0, 5.0, 400.0])
    b = torch.ones(3, dtype=DT)

    def f(x):
        return 0.5 * x @ A @ x - b @ x

    x, stats = AcceleratedGradient(maxiter=2000, tol=1e-10).run(f, torch.zeros(3, dtype=DT))
    assert stats.converged and torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-8)
    diverged = ig.solvers.GradientDescent(lr=0.1, maxiter=50, tol=0).run(f, torch.zeros(3, dtype=DT))[0]
    assert not torch.isfinite(diverged).all() or diverged.norm() > 1e6


def test_nonconvex_start_and_pytree():
    """A smooth non-convex objective (Rosenbrock-like) over a dict: converges to the minimiser."""

    def f(x, a):
        return (a - x["u"]) ** 2 + 10 * (x["v"] - x["u"] ** 2) ** 2

    a = torch.tensor(1.0, dtype=DT)
    x, stats = AcceleratedGradient(maxiter=20_000, tol=1e-10).run(
        f, {"u": torch.tensor(-1.0, dtype=DT), "v": torch.tensor(1.5, dtype=DT)}, a)
    assert stats.converged, stats
    assert abs(float(x["u"]) - 1) < 1e-8 and abs(float(x["v"]) - 1) < 1e-8


def test_each_problem_of_a_vmapped_batch_gets_its_own_step_and_stopping_rule():
    """Problems with curvature 1 and 1e4 in one vmapped call: each solution as accurate as alone."""
    scales = torch.tensor([1.0, 1e2, 1e4], dtype=DT)
    b = torch.ones(3, 4, dtype=DT)
    base = quadratic([1.0, 2.0, 3.0, 4.0])
    solver = AcceleratedGradient(maxiter=3000, tol=1e-10)

    def objective(x, s, rhs):
        return 0.5 * s * x @ base @ x - rhs @ x

    def one(s, rhs):
        return ig.implicit_solve(objective, torch.zeros(4, dtype=DT), s, rhs, solver=solver, linear_solver=ig.CG())

    batched = torch.func.vmap(one)(scales, b)
    for i in range(3):
        alone = one(scales[i], b[i])
        ref = torch.linalg.solve(scales[i] * base, b[i])
        assert torch.linalg.norm(batched[i] - ref) <= 1e-8 * torch.linalg.norm(ref)
        assert torch.linalg.norm(alone - ref) <= 1e-8 * torch.linalg.norm(ref)


def test_batched_run_reports_per_problem_convergence():
    """batch_ndim=1: the message counts the problems that did not converge."""
    A = torch.stack([torch.eye(3, dtype=DT), quadratic([1.0, 10.0, 1e6], seed=1)])

    def f(x):
        return (0.5 * torch.einsum("bi,bij,bj->b", x, A, x) - x.sum(-1)).sum()

    x, stats = AcceleratedGradient(maxiter=30, tol=1e-12).run(f, torch.zeros(2, 3, dtype=DT), batch_ndim=1)
    assert not stats.converged
    assert "in 1 of 2 problems" in stats.message
    assert torch.allclose(x[0], torch.ones(3, dtype=DT))  # the easy problem converged and stopped moving


def test_unrolled_mode_differentiates_through_the_steps():
    """mode='unrolled' equals autograd through the same steps written by hand (fixed step, no restart)."""
    A = quadratic([1.0, 3.0, 9.0])
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=DT, requires_grad=True)
    lr, steps = 0.05, 7
    solver = AcceleratedGradient(lr=lr, maxiter=steps, tol=0, restart=False)

    def objective(x, c):
        return 0.5 * x @ A @ x - c @ x

    x = ig.implicit_solve(objective, torch.zeros(3, dtype=DT), theta, solver=solver, mode="unrolled")
    (g,) = torch.autograd.grad(x.sum(), theta)

    xk = xprev = torch.zeros(3, dtype=DT)
    y, t = xk, 1.0
    for _ in range(steps):
        xk = y - lr * (A @ y - theta)
        t_new = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
        y = xk + (t - 1) / t_new * (xk - xprev)
        xprev, t = xk, t_new
    (ref,) = torch.autograd.grad(xk.sum(), theta)
    assert torch.allclose(g, ref, rtol=1e-12, atol=1e-14)


def test_implicit_hypergradient_against_closed_form():
    A = quadratic([0.5, 2.0, 8.0])
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)

    def objective(x, c):
        return 0.5 * x @ A @ x - c @ x

    x = ig.implicit_solve(objective, torch.zeros(3, dtype=DT), theta,
                          solver=AcceleratedGradient(maxiter=2000, tol=1e-12))
    (g,) = torch.autograd.grad((x ** 2).sum(), theta)
    ref = torch.linalg.solve(A, 2 * torch.linalg.solve(A, theta.detach()))
    assert torch.allclose(g, ref, rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0.0}, {"lr": -1.0}, {"maxiter": 0}, {"maxiter": 2.5}, {"power_iterations": 0}, {"safety": 0.5},
     {"safety": float("nan")}, {"tol": -1.0}, {"check_every": 0}],
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError, match="AcceleratedGradient"):
        AcceleratedGradient(**kwargs)


def test_linear_objective_has_no_curvature_to_estimate():
    with pytest.raises(ValueError, match="curvature estimate"):
        AcceleratedGradient(maxiter=5).run(lambda x: x.sum(), torch.zeros(3, dtype=DT))
