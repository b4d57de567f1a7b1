"""Every linear solver of the registry × every transform × every dtype, on one problem.

The problem is ig.testing.problems.quadratic_problem: x* = H⁻¹(Bθ + c) with H of condition
number 10. The reference differentiates its closed form directly with autograd, in
float64 (independent of any linear solver); each cell holds the implicit result to the
registry's tolerance for its dtype, scaled by the condition number.
"""

from __future__ import annotations

import pytest
import torch
from registry import DTYPES, RTOL, TRANSFORMS, linear_solvers, rel_err

import implicitgrad as ig
from implicitgrad.testing.problems import quadratic_problem

COND = 10.0
PROBLEM = quadratic_problem(x_layout=(6,), params_layout=((3,),), cond=COND, seed=3)
THETA = PROBLEM.params[0].detach()
DIRECTION = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)


def _implicit_loss(linear_solver, dtype):
    """θ ↦ L(x*(θ)) through implicit_solve, computed in ``dtype``."""
    def objective(x, theta):  # the float64 problem, evaluated from ``dtype`` variables
        return PROBLEM.objective(x.double(), theta.double()).to(dtype)

    def solver(_f, x0, theta):
        return PROBLEM.solver(PROBLEM.objective, x0.double(), theta.double()).to(dtype)

    def loss(theta):
        x = ig.implicit_solve(objective, PROBLEM.x0.to(dtype), theta, solver=solver,
                              linear_solver=linear_solver, on_failure="raise")
        return PROBLEM.outer(x.double()).to(dtype)

    return loss


def _reference_loss(theta):
    return PROBLEM.outer(PROBLEM.solver(PROBLEM.objective, PROBLEM.x0, theta))


def _run(transform, loss, theta, direction):
    """The quantity each transform computes, for L and a direction in θ."""
    if transform == "backward":
        theta = theta.clone().requires_grad_(True)
        loss(theta).backward()
        return theta.grad
    if transform == "double_backward":
        theta = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * direction).sum(), theta)
        return hvp
    if transform == "jvp":
        return torch.func.jvp(loss, (theta,), (direction,))[1]
    if transform == "vmap":
        thetas = torch.stack([theta, theta + direction, theta - 0.5 * direction])
        return torch.func.vmap(torch.func.grad(loss))(thetas)
    raise ValueError(transform)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).replace("torch.", "") for d in DTYPES])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name,linear_solver", linear_solvers(lipschitz=COND))
def test_every_solver_under_every_transform(name, linear_solver, transform, dtype):
    got = _run(transform, _implicit_loss(linear_solver, dtype), THETA.to(dtype), DIRECTION.to(dtype))
    assert got.dtype == dtype
    expected = _run(transform, _reference_loss, THETA, DIRECTION)
    assert rel_err(got, expected) <= COND * RTOL[dtype], (name, transform)


def test_the_reference_is_the_closed_form():
    torch.testing.assert_close(_run("backward", _reference_loss, THETA, DIRECTION), PROBLEM.exact_hypergradient[0])
