"""Bad input gets a clear error or an ImplicitGradWarning naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from problems import DT, ridge_data, ridge_solver

import implicitgrad as ig
from implicitgrad.testing.problems import ridge_objective
from implicitgrad.testing.problems import squared_loss as val_loss

X, Y, XV, YV = ridge_data()
W0 = torch.zeros(6, dtype=DT)


def lam(value=0.1):
    return torch.tensor(value, dtype=DT, requires_grad=True)


def test_non_scalar_objective():
    with pytest.raises(ValueError, match="scalar"):
        ig.implicit_solve(lambda w, l: (w - l) ** 2, W0, lam(), solver=lambda f, w, l: w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_params(bad):
    with pytest.raises(ValueError, match="NaN/Inf"):
        ig.implicit_solve(ridge_objective, W0, lam(bad), X, Y, solver=ridge_solver)


def test_non_finite_solution_warns_or_raises():
    def broken(fn, w0, *params):
        return torch.full_like(w0, float("nan"))

    with pytest.warns(ig.ImplicitGradWarning, match="NaN/Inf"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=broken)
    with pytest.raises(ig.ConvergenceError, match="NaN/Inf"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=broken, on_failure="raise")


def test_solver_output_structure_and_shape_are_checked():
    with pytest.raises(ValueError, match="structure"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=lambda f, w, *p: {"w": w})
    with pytest.raises(ValueError, match="shape"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=lambda f, w, *p: w[:3])


def test_singular_matrix_under_exact():
    def flat(w, l):  # depends on w[0] only: the Hessian is singular
        return (w[0] - l) ** 2

    solver = lambda f, w, l: torch.stack([l.detach(), torch.zeros((), dtype=DT)])  # noqa: E731
    w = ig.implicit_solve(flat, torch.zeros(2, dtype=DT), lam(), solver=solver, linear_solver=ig.Exact(),
                          on_failure="raise")
    with pytest.raises(ig.ConvergenceError, match="singular"):
        w.sum().backward()


def test_mixed_dtypes():
    with pytest.raises(ValueError, match="mix floating dtypes"):
        ig.implicit_solve(ridge_objective, W0.float(), lam(), X, Y, solver=ridge_solver)


@pytest.mark.cuda
def test_mixed_devices():
    with pytest.raises(ValueError, match="different devices"):
        ig.implicit_solve(ridge_objective, W0.cuda(), lam(), X, Y, solver=ridge_solver)


def test_mixed_devices_meta_tensor():
    with pytest.raises(ValueError, match="different devices"):
        ig.implicit_solve(ridge_objective, W0, lam(), X.to("meta"), Y, solver=ridge_solver)


def test_captured_tensor_requiring_grad_warns():
    scale = torch.tensor(2.0, dtype=DT, requires_grad=True)

    def objective(w, log_lam):
        return scale * ridge_objective(w, log_lam, X, Y)

    with pytest.warns(ig.ImplicitGradWarning, match="captured"):
        ig.implicit_solve(objective, W0, lam(), solver=lambda f, w, l: ridge_solver(f, w, l, X, Y))


def test_unconverged_linear_solve_warn_raise_ignore():
    def hyper(on_failure):
        w = ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=ridge_solver,
                              linear_solver=ig.CG(maxiter=2), on_failure=on_failure)
        return val_loss(w, XV, YV)

    with pytest.warns(ig.ImplicitGradWarning, match=r"CG: max_iterations after 2 iterations.*Increase maxiter"):
        hyper("warn").backward()
    with pytest.raises(ig.ConvergenceError, match="max_iterations"):
        hyper("raise").backward()
    hyper("ignore").backward()


def test_negative_curvature_names_damping():
    def saddle(x, t):
        return 0.5 * (x[0] ** 2 - x[1] ** 2) - t @ x

    t = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    x = ig.implicit_solve(saddle, torch.zeros(2, dtype=DT), t, solver=lambda f, x, t: torch.stack([t[0], -t[1]]))
    with pytest.warns(ig.ImplicitGradWarning, match="negative curvature.*damping"):
        x.sum().backward()


@pytest.mark.parametrize("solver", [ig.GMRES(), ig.Exact()], ids=["GMRES", "Exact"])
def test_indefinite_hessian_is_solved_exactly_by_gmres_and_exact(solver):
    def saddle(x, t):
        return 0.5 * (x[0] ** 2 - x[1] ** 2) - t @ x

    t = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    x = ig.implicit_solve(saddle, torch.zeros(2, dtype=DT), t, linear_solver=solver,
                          solver=lambda f, x, t: torch.stack([t[0], -t[1]]))
    x.sum().backward()
    assert torch.allclose(t.grad, torch.tensor([1.0, -1.0], dtype=DT))


def test_large_forward_residual_warns_with_numbers():
    early = ig.solvers.GradientDescent(lr=1e-3, maxiter=3, tol=0)
    with pytest.warns(ig.ImplicitGradWarning, match=r"not stationary.*after 3 iterations"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=early)
    ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=early, forward_tol=1.0)


def test_nonfinite_incoming_gradient_warns():
    w = ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=ridge_solver)
    with pytest.warns(ig.ImplicitGradWarning, match="NaN/Inf"):
        (w * torch.tensor(float("nan"), dtype=DT)).sum().backward()


def test_argument_validation():
    with pytest.raises(TypeError, match="solver must be"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=None)
    with pytest.raises(TypeError, match="linear_solver"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=ridge_solver, linear_solver="cg")
    with pytest.raises(ValueError, match="mode"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=ridge_solver, mode="fast")
    with pytest.raises(ValueError, match="on_failure"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=ridge_solver, on_failure="maybe")
    with pytest.raises(TypeError, match="floating point"):
        ig.implicit_solve(ridge_objective, torch.zeros(6, dtype=torch.long), lam(), X, Y, solver=ridge_solver)
    with pytest.raises(TypeError, match="callable"):
        ig.implicit_solve("f", W0, lam(), solver=ridge_solver)
    with pytest.raises(ValueError, match="cannot be unrolled"):
        ig.implicit_solve(ridge_objective, W0, lam(), X, Y, solver=ridge_solver, mode="unrolled")


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: ig.CG(maxiter=0), "maxiter"),
        (lambda: ig.CG(damping=-1.0), "damping"),
        (lambda: ig.CG(tol=0.0), "tol"),
        (lambda: ig.Neumann(alpha=0.0), "alpha"),
        (lambda: ig.GMRES(restart=0), "restart"),
        (lambda: ig.Exact(max_size=0), "max_size"),
        (lambda: ig.solvers.GradientDescent(lr=-1.0), "lr"),
        (lambda: ig.solvers.FixedPointIteration(damping=1.5), "damping"),
    ],
)
def test_solver_argument_validation(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
