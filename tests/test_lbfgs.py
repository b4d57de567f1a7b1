"""LBFGS: closed forms, badly scaled and non-convex objectives, per-problem batches, unrolling (float64)."""

from __future__ import annotations

import pytest
import torch
from test_accelerated import quadratic  # the same random-eigenbasis quadratics

import implicitgrad as ig
from implicitgrad.solvers import LBFGS

DT = torch.float64


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4])
def test_quadratic_against_solve(cond):
    n = 12
    A = quadratic(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n).tolist())
    b = torch.ones(n, dtype=DT)
    x, stats = LBFGS(maxiter=2000, tol=1e-11).run(lambda x: 0.5 * x @ A @ x - b @ x, torch.zeros(n, dtype=DT))
    ref = torch.linalg.solve(A, b)
    assert stats.converged, stats
    assert torch.linalg.norm(x - ref) <= 1e-10 * cond * torch.linalg.norm(ref)


def test_badly_scaled_blocks_fewer_gradients_than_accelerated_gradient():
    """Curvature 1 on one block and 1e4 on another (a network's biases against its last layer)."""
    A = torch.block_diag(quadratic([1.0, 2.0, 3.0], seed=1), quadratic([1e3, 5e3, 1e4], seed=2))
    b = torch.ones(6, dtype=DT)
    calls = {"lbfgs": 0, "agd": 0}

    def counted(name):
        def f(x):
            calls[name] += 1
            return 0.5 * x @ A @ x - b @ x
        return f

    x, stats = LBFGS(maxiter=200, tol=1e-10).run(counted("lbfgs"), torch.zeros(6, dtype=DT))
    assert stats.converged and torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-12)
    agd = ig.solvers.AcceleratedGradient(maxiter=5000, tol=1e-10).run(counted("agd"), torch.zeros(6, dtype=DT))[1]
    assert agd.converged
    assert calls["lbfgs"] < calls["agd"] / 5, calls


def test_rosenbrock_over_a_pytree():
    def f(x, a):
        return (a - x["u"]) ** 2 + 100 * (x["v"] - x["u"] ** 2) ** 2

    a = torch.tensor(1.0, dtype=DT)
    x, stats = LBFGS(maxiter=500, tol=1e-10).run(f, {"u": torch.tensor(-1.2, dtype=DT),
                                                     "v": torch.tensor(1.0, dtype=DT)}, a)
    assert stats.converged, stats
    assert abs(float(x["u"]) - 1) < 1e-8 and abs(float(x["v"]) - 1) < 1e-8


def test_a_trial_step_into_a_nonfinite_region_is_shortened():
    """f = 50 x² − log x from x = 1: the first trial lands on x = 0 (f = inf), the search backs off."""

    def f(x):
        return (50 * x**2 - torch.log(x)).sum()

    x, stats = LBFGS(maxiter=100, tol=1e-12).run(f, torch.ones(3, dtype=DT))
    assert stats.converged, stats
    assert torch.allclose(x, torch.full((3,), 0.1, dtype=DT), rtol=1e-10)


def test_each_problem_of_a_batch_gets_its_own_steps_and_stopping_rule():
    """batch_ndim=1 with curvatures 1 and 1e6: each problem meets tol on its own gradient."""
    A = torch.stack([torch.eye(4, dtype=DT), quadratic([1.0, 1e2, 1e4, 1e6], seed=3)])
    b = torch.ones(2, 4, dtype=DT)

    def f(x):
        return (0.5 * torch.einsum("bi,bij,bj->b", x, A, x) - (b * x).sum(-1)).sum()

    x, stats = LBFGS(maxiter=200, tol=1e-11).run(f, torch.zeros(2, 4, dtype=DT), batch_ndim=1)
    assert stats.converged, stats
    for i in range(2):
        g = A[i] @ x[i] - b[i]
        assert torch.linalg.norm(g) <= 1e-11 * max(1.0, float(torch.linalg.norm(b[i]))), i


def test_batch_reports_the_problems_that_did_not_converge():
    A = torch.stack([torch.eye(3, dtype=DT), quadratic([1.0, 1e3, 1e8], seed=1)])

    def f(x):
        return (0.5 * torch.einsum("bi,bij,bj->b", x, A, x) - x.sum(-1)).sum()

    x, stats = LBFGS(maxiter=2, tol=1e-13).run(f, torch.zeros(2, 3, dtype=DT), batch_ndim=1)
    assert not stats.converged
    assert "in 1 of 2 problems" in stats.message
    assert torch.allclose(x[0], torch.ones(3, dtype=DT))


def test_vmapped_implicit_solve_per_problem_and_hypergradient():
    """Under vmap each problem is solved as accurately as alone; the hypergradient matches A⁻¹."""
    scales = torch.tensor([1.0, 1e2, 1e4], dtype=DT)
    base = quadratic([1.0, 2.0, 3.0, 4.0])
    b = torch.ones(3, 4, dtype=DT, requires_grad=True)
    solver = LBFGS(maxiter=100, tol=1e-12)

    def objective(x, s, rhs):
        return 0.5 * s * x @ base @ x - rhs @ x

    def one(s, rhs):
        return ig.implicit_solve(objective, torch.zeros(4, dtype=DT), s, rhs, solver=solver,
                                 linear_solver=ig.Exact())

    x = torch.func.vmap(one)(scales, b)
    (grad,) = torch.autograd.grad(x.sum(), b)
    for i in range(3):
        A = scales[i] * base
        assert torch.linalg.norm(x[i] - torch.linalg.solve(A, b[i].detach())) <= 1e-9 / float(scales[i]) * 10
        assert torch.allclose(grad[i], torch.linalg.solve(A, torch.ones(4, dtype=DT)), rtol=1e-8)


@pytest.mark.parametrize("maxiter", [25, 200])
def test_unrolled_mode_holds_steps_and_curvature_and_converges_to_the_implicit_derivative(maxiter):
    """mode='unrolled' differentiates x_{k+1} = x_k − α_k H_k ∇f(x_k, θ) with α_k, H_k held: it tends
    to the implicit derivative as the iterates converge, and stays finite when they reach rounding
    (tol=0 runs on past convergence, where sᵀy → 0 and differentiating H_k would blow up)."""
    A = quadratic([1.0, 4.0, 50.0])

    def objective(x, c):
        return 0.5 * x @ A @ x - c @ x + 0.1 * (x**4).sum()

    theta = torch.tensor([0.5, -1.0, 2.0], dtype=DT, requires_grad=True)
    x = ig.implicit_solve(objective, torch.zeros(3, dtype=DT), theta, solver=LBFGS(maxiter=maxiter, tol=0),
                          mode="unrolled")
    (unrolled,) = torch.autograd.grad((x**2).sum(), theta)
    x_star = ig.implicit_solve(objective, torch.zeros(3, dtype=DT), theta, solver=LBFGS(tol=1e-13))
    (implicit,) = torch.autograd.grad((x_star**2).sum(), theta)
    assert torch.isfinite(unrolled).all()
    assert torch.allclose(unrolled, implicit, rtol=1e-8, atol=1e-12), (unrolled, implicit)


def test_unrolled_mode_after_few_iterations_differs_from_the_implicit_derivative():
    A = quadratic([1.0, 4.0, 50.0])

    def objective(x, c):
        return 0.5 * x @ A @ x - c @ x

    theta = torch.tensor([0.5, -1.0, 2.0], dtype=DT, requires_grad=True)
    x = ig.implicit_solve(objective, torch.zeros(3, dtype=DT), theta, solver=LBFGS(maxiter=2, tol=0),
                          mode="unrolled")
    (unrolled,) = torch.autograd.grad(x.sum(), theta)
    assert not torch.allclose(unrolled, torch.linalg.solve(A, torch.ones(3, dtype=DT)), rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [{"maxiter": 0}, {"maxiter": 2.5}, {"history": 0}, {"line_search_steps": 0}, {"tol": -1.0},
     {"check_every": 0}],
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError, match="LBFGS"):
        LBFGS(**kwargs)


def test_imaml_default_inner_solver_is_lbfgs():
    model = torch.nn.Linear(3, 1).double()
    imaml = ig.meta.IMAML(model, torch.nn.functional.mse_loss)
    solver = imaml._inner_solver(DT)
    assert isinstance(solver, LBFGS) and solver.tol == pytest.approx(0.5e-6)
