"""Property tests of the hypergradient machinery on generated bilevel problems.

Problems come from :mod:`implicitgrad.testing.strategies` (well-posed, chosen condition
numbers, solvers converged to round-off). The number of examples follows the Hypothesis
profile set in conftest.py: ``IMPLICITGRAD_HYPOTHESIS_PROFILE=thorough`` runs 1000 per
property.
"""

import math

import pytest
import torch
from torch.utils import _pytree as pytree

import implicitgrad as ig

pytest.importorskip("hypothesis")
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from implicitgrad.solvers import GradientDescent  # noqa: E402
from implicitgrad.testing import check_hypergradient, strategies  # noqa: E402

# Default relative residual of the iterative linear solvers in float64.
LINEAR_TOL = 1e-10


def flat(tree) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in pytree.tree_leaves(tree)])


def neumann_for(problem) -> ig.Neumann:
    """Neumann with the optimal step 2/(λmin + λmax) and enough terms for ρ^K ≤ 1e-11."""
    low, high = problem.spectrum
    rate = (high - low) / (high + low)
    terms = 10 if rate == 0 else math.ceil(math.log(1e-11) / math.log(rate)) + 10
    return ig.Neumann(alpha=2.0 / (low + high), maxiter=terms)


def backward_scale(problem) -> float:
    """``‖B‖₂ ‖u‖`` with ``H u = ∂L/∂x*`` and ``B = ∂θ ∇ₓf``, from dense matrices.

    A linear solve stopped at relative residual ``tol`` perturbs ``u`` by at most
    ``κ · tol · ‖u‖``, so the hypergradient ``−Bᵀu`` moves by at most ``κ · tol · ‖B‖₂ ‖u‖``
    — a bound that holds even when ``Bᵀu`` itself is small by cancellation.
    """
    params = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, problem.params)
    x_leaves, x_spec = pytree.tree_flatten(problem.solver(problem.objective, problem.x0, *params))
    p_leaves, p_spec = pytree.tree_flatten(params)

    def unflatten(vector, leaves, spec):
        sizes = [t.numel() for t in leaves]
        return pytree.tree_unflatten([v.reshape(t.shape) for v, t in zip(vector.split(sizes), leaves)], spec)

    def grad_x(xv, pv):
        return torch.func.grad(lambda v: problem.objective(unflatten(v, x_leaves, x_spec),
                                                           *unflatten(pv, p_leaves, p_spec)))(xv)

    xv, pv = flat(x_leaves), flat(p_leaves)
    hessian, coupling = torch.func.jacfwd(grad_x, argnums=(0, 1))(xv, pv)
    v = torch.func.grad(lambda w: problem.outer_value(unflatten(w, x_leaves, x_spec),
                                                      unflatten(pv, p_leaves, p_spec)))(xv)
    u = torch.linalg.solve(hessian, v)
    return float(torch.linalg.matrix_norm(coupling, ord=2) * u.norm())


def assert_within_linear_solve_bound(problem, linear_solver):
    error = flat(problem.hypergradient(linear_solver)) - flat(problem.hypergradient(ig.Exact()))
    # 2x for the CG's recursive residual drifting from the true one, plus Exact's round-off.
    bound = 2 * problem.condition_number * (LINEAR_TOL + 1e-13) * backward_scale(problem)
    assert float(error.norm()) <= bound, (linear_solver, float(error.norm()), bound)


@given(strategies.bilevel_problems(max_cond=1000), st.sampled_from(["CG", "GMRES"]))
def test_krylov_solvers_agree_with_exact(problem, name):
    assert_within_linear_solve_bound(problem, ig.CG() if name == "CG" else ig.GMRES())


@given(strategies.bilevel_problems(max_cond=300))
def test_neumann_with_safe_step_agrees_with_exact(problem):
    assert_within_linear_solve_bound(problem, neumann_for(problem))


@given(st.one_of(strategies.quadratic_problems(solvers=("closed_form",)),
                 strategies.pytree_problems(solvers=("closed_form",)), strategies.ridge_problems()))
def test_exact_matches_closed_form(problem):
    # Only round-off separates them: a dense factorisation loses about κ · n · eps, relative
    # to the gradient's size or, under cancellation in Bᵀu, to ‖B‖ ‖u‖.
    exact = flat(problem.exact_hypergradient)
    error = float((flat(problem.hypergradient(ig.Exact())) - exact).norm())
    assert error <= 1e-13 * problem.condition_number * max(float(exact.norm()), backward_scale(problem)), error


@given(strategies.bilevel_problems())
def test_check_hypergradient_passes_on_generated_problems(problem):
    report = problem.check()
    assert report.ok, str(report)
    assert set(report.errors) >= {"exact", "finite_differences"}


@given(strategies.bilevel_problems(max_cond=100), st.integers(1, 3))
def test_check_flags_solver_stopped_early(problem, steps):
    low, high = problem.spectrum
    # Each step shrinks every eigen-component of the gradient by a factor in [1/2, 1): after
    # a few steps the residual is still at least 1/8 of where it started.
    early = GradientDescent(lr=0.5 / high, maxiter=steps, tol=0)
    report = check_hypergradient(problem.objective, problem.x0, *problem.params, solver=early,
                                 outer=problem.outer)
    assume(report.initial_residual > 1e-4)
    assert not report.ok, str(report)
    assert report.forward_status == "not_converged"
    assert any("did not converge" in cause for cause in report.causes), str(report)
    assert any("ImplicitGradWarning" in w for w in report.warnings)


@given(st.one_of(strategies.quadratic_problems(outer_uses_params=False),
                 strategies.pytree_problems(outer_uses_params=False),
                 strategies.ridge_problems(), strategies.logistic_problems(), strategies.mlp_proximal_problems()),
       st.data())
def test_check_flags_solver_ignoring_a_parameter(problem, data):
    leaves, spec = pytree.tree_flatten(problem.params)
    paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(problem.params)[0]]
    exact = pytree.tree_leaves(problem.hypergradient(ig.Exact()))
    index = data.draw(st.integers(0, len(leaves) - 1), label="ignored leaf")
    # A parameter the outer loss is flat in cannot reveal that the solver ignores it.
    assume(float(exact[index].norm()) > 1e-3)
    frozen = leaves[index].detach().clone()

    def ignoring(objective, x0, *params):
        params_leaves = pytree.tree_leaves(params)
        params_leaves[index] = frozen
        return problem.solver(objective, x0, *pytree.tree_unflatten(params_leaves, spec))

    report = check_hypergradient(problem.objective, problem.x0, *problem.params, solver=ignoring,
                                 outer=problem.outer)
    assert not report.ok, str(report)
    assert report.forward_status == "converged"  # right answer at θ, wrong derivative
    name = f"params{paths[index]}"
    assert any(cause.startswith(f"The solver ignores {name}:") for cause in report.causes), str(report)
