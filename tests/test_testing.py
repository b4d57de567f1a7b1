"""Tests of implicitgrad.testing: the hypergradient checker, the problem builders, the strategies."""

import contextlib
import io
import pathlib
import re
import warnings

import pytest
import torch
from torch.utils import _pytree as pytree

import implicitgrad as ig
from implicitgrad.solvers import GradientDescent
from implicitgrad.testing import (
    HypergradientCheckError,
    HypergradientReport,
    assert_hypergradient,
    check_hypergradient,
    outer_takes_params,
    problems,
    relative_error,
)

D = torch.float64
ROOT = pathlib.Path(__file__).resolve().parents[1]


def quadratic():
    """f(x, b) = ½ xᵀAx − bᵀx, L = ½‖x − t‖²: dL/db = A⁻¹(A⁻¹b − t)."""
    a = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]], dtype=D)
    t = torch.tensor([1.0, -1.0, 0.5], dtype=D)

    def objective(x, b):
        return 0.5 * x @ a @ x - b @ x

    def solver(objective, x0, b):
        return torch.linalg.solve(a, b)

    def outer(x):
        return 0.5 * ((x - t) ** 2).sum()

    b = torch.tensor([0.5, 1.0, -2.0], dtype=D, requires_grad=True)
    exact = torch.linalg.solve(a, torch.linalg.solve(a, b.detach()) - t)
    return objective, solver, outer, b, exact, a


# --------------------------------------------------------------------------- the report


def test_report_on_a_correct_problem():
    objective, solver, outer, b, exact, _ = quadratic()
    report = check_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=solver, outer=outer)
    assert isinstance(report, HypergradientReport)
    assert report.ok
    torch.testing.assert_close(report.gradient["params[0]"], exact, rtol=1e-12, atol=0)
    assert set(report.errors) == {"exact", "finite_differences"}
    assert report.errors["exact"] < 1e-12 and report.errors["finite_differences"] < 1e-8
    assert "unrollable" in report.skipped["unrolled"]
    assert report.forward_status == "converged" and report.forward_residual < 1e-12
    assert report.backward.converged and report.causes == [] and report.warnings == []
    text = str(report)
    assert text.startswith("Hypergradient check passed") and "finite_differences" in text


def test_errors_follow_the_documented_definition():
    objective, solver, outer, b, exact, _ = quadratic()
    # One CG step leaves a visible error; a large atol turns the denominator absolute.
    for atol in (1e-5, 100.0):
        report = check_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=solver, outer=outer,
                                     linear_solver=ig.CG(maxiter=1), atol=atol)
        g = report.gradient["params[0]"]
        for ref in ("exact", "finite_differences"):
            r = report.references[ref]["params[0]"]
            expected = float((g - r).norm()) / max(float(r.norm()), atol)
            assert report.errors[ref] == pytest.approx(expected, rel=1e-9)
            assert report.parameter_errors[ref]["params[0]"] == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(report.references["exact"]["params[0]"], exact, rtol=1e-10, atol=0)


def test_zero_gradient_parameter_is_judged_absolutely():
    objective, solver, outer, b, _, a = quadratic()
    unused = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    report = check_hypergradient(lambda x, b, c: objective(x, b), torch.zeros(3, dtype=D), b, unused,
                                 solver=lambda f, x0, b, c: solver(f, x0, b), outer=outer)
    assert report.ok, str(report)
    assert float(report.gradient["params[1]"].abs().max()) == 0.0
    assert report.parameter_errors["finite_differences"]["params[1]"] == 0.0


def test_pytree_variable_and_params_with_per_parameter_names():
    x_data = torch.tensor([[1.0, 0.5], [0.2, -1.0], [1.5, 0.3], [-0.7, 0.8]], dtype=D)
    y = torch.tensor([1.0, -0.5, 2.0, 0.1], dtype=D)

    def objective(x, hyper):
        pred = x_data @ x["w"] + x["b"]
        return 0.5 * ((pred - y) ** 2).mean() + 0.5 * (hyper["log_lam"].exp() * x["w"] ** 2).sum() \
            + 0.5 * (x["b"] - hyper["shift"]) ** 2

    solver = problems.Newton()
    x0 = {"w": torch.zeros(2, dtype=D), "b": torch.zeros((), dtype=D)}
    hyper = {"log_lam": torch.tensor([0.1, -0.3], dtype=D, requires_grad=True),
             "shift": torch.tensor(0.7, dtype=D, requires_grad=True)}
    report = check_hypergradient(objective, x0, hyper, solver=solver,
                                 outer=lambda x: (x["w"].sum() - 1.0) ** 2 + x["b"] ** 2)
    assert report.ok, str(report)
    assert list(report.gradient) == ["params[0]['log_lam']", "params[0]['shift']"]
    assert report.gradient["params[0]['shift']"].shape == ()
    assert set(report.parameter_errors["finite_differences"]) == set(report.gradient)
    assert "params[0]['log_lam']" in str(report)


def test_outer_that_takes_the_params_includes_the_direct_term():
    objective, solver, outer, b, exact, _ = quadratic()

    def regularised(x, b):
        return outer(x) + 0.25 * (b ** 2).sum()

    report = check_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=solver, outer=regularised)
    assert report.ok and report.settings["outer_call"] == "outer(x, *params)"
    torch.testing.assert_close(report.gradient["params[0]"], exact + 0.5 * b.detach(), rtol=1e-12, atol=0)


def test_outer_takes_params_follows_the_signature():
    def two(x, a, b):
        return x

    def with_default(x, scale=1.0):
        return x

    assert not outer_takes_params(lambda x: x, 2)
    assert outer_takes_params(two, 2)
    assert outer_takes_params(lambda x, *params: x, 1)
    assert not outer_takes_params(with_default, 1)
    assert not outer_takes_params(two, 0)
    assert not outer_takes_params(torch.sum, 1)  # builtins without a signature get outer(x)
    with pytest.raises(TypeError, match="outer"):
        outer_takes_params(two, 1)


def test_only_parameters_that_require_grad_are_checked():
    objective, solver, outer, b, exact, _ = quadratic()
    data = torch.ones(2, dtype=D)  # a tensor param without grad: data, not a hyperparameter
    report = check_hypergradient(lambda x, b, d: objective(x, b), torch.zeros(3, dtype=D), b, data,
                                 solver=lambda f, x0, b, d: solver(f, x0, b), outer=outer)
    assert list(report.gradient) == ["params[0]"] and report.ok


def test_unrolled_reference_for_an_unrollable_solver():
    objective, _, outer, b, exact, _ = quadratic()
    solver = GradientDescent(lr=0.5, maxiter=2000, tol=1e-13)
    report = check_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=solver, outer=outer)
    assert report.ok, str(report)
    assert report.errors["unrolled"] < 1e-9 and report.forward_iterations > 10
    only = check_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=solver, outer=outer,
                               references=("unrolled",))
    assert set(only.errors) == {"unrolled"}


def test_float32_inputs_are_checked_in_float64_by_default():
    scale = torch.tensor([3.0, 2.0, 1.5])  # float32 data: elementwise ops promote to float64

    def objective(x, b):
        return 0.5 * (scale * x ** 2).sum() - (b * x).sum()

    b32 = torch.tensor([0.5, 1.0, -2.0], requires_grad=True)
    report = check_hypergradient(objective, torch.zeros(3), b32, solver=lambda f, x0, b: b / scale,
                                 outer=lambda x: (x ** 2).sum())
    assert report.settings["dtype"] == "float64" and report.gradient["params[0]"].dtype == D
    assert report.ok, str(report)
    torch.testing.assert_close(report.gradient["params[0]"], 2 * b32.detach().double() / scale.double() ** 2)
    kept = check_hypergradient(objective, torch.zeros(3), b32, solver=lambda f, x0, b: b / scale,
                               outer=lambda x: (x ** 2).sum(), dtype=None)
    assert kept.settings["dtype"] == "float32" and kept.tolerances["exact"] == 1e-3
    assert kept.gradient["params[0]"].dtype == torch.float32 and kept.ok, str(kept)


def test_captured_float32_matrix_gets_a_hint():
    a32 = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    b32 = torch.tensor([1.0, -1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="dtype=None"):
        check_hypergradient(lambda x, b: 0.5 * x @ a32 @ x - b @ x, torch.zeros(2), b32,
                            solver=lambda f, x0, b: torch.linalg.solve(a32, b), outer=lambda x: x.sum())


def test_directional_finite_differences_for_large_parameters():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(20, 6, generator=gen, dtype=D) / 4
    theta = torch.randn(20, generator=gen, dtype=D, requires_grad=True)

    def objective(x, theta):
        return 0.5 * (x ** 2).sum() + 0.25 * (x ** 4).sum() - (m.T @ theta) @ x

    report = check_hypergradient(objective, torch.zeros(6, dtype=D), theta, solver=problems.Newton(),
                                 outer=lambda x: x.sum(), fd_directions=3)
    assert report.ok, str(report)
    directional = report.references["finite_differences"]["params[0]"]
    assert directional.shape == (3,)
    assert report.references["exact"]["params[0]"].shape == (20,)


def test_root_and_fixed_point_forms():
    a = torch.tensor(3.0, dtype=D, requires_grad=True)
    report = check_hypergradient(lambda x, a: x ** 3 - a, torch.tensor(1.0, dtype=D), a,
                                 solver=lambda f, x0, a: a ** (1 / 3), outer=lambda x: x ** 2, kind="residual")
    assert report.ok, str(report)
    torch.testing.assert_close(report.gradient["params[0]"], torch.tensor(2 / 3 * 3.0 ** (-1 / 3), dtype=D))
    c = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    mapping = check_hypergradient(lambda x, c: 0.5 * torch.tanh(x) + c, torch.zeros(2, dtype=D), c,
                                  solver=None, outer=lambda x: (x ** 2).sum(), kind="mapping")
    assert mapping.ok, str(mapping)
    assert "unrolled" in mapping.errors  # the default FixedPointIteration unrolls


# --------------------------------------------------------------------------- planted mistakes


def test_solver_stopped_early_is_diagnosed_and_warnings_are_captured():
    objective, _, outer, b, _, _ = quadratic()
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        report = check_hypergradient(objective, torch.zeros(3, dtype=D), b,
                                     solver=GradientDescent(lr=0.1, maxiter=5, tol=0), outer=outer)
    assert escaped == []
    assert not report.ok and report.forward_status == "not_converged"
    assert report.causes[0].startswith("The inner solve did not converge")
    assert any(w.startswith("[implicit] ImplicitGradWarning: The inner solution is not stationary")
               for w in report.warnings)
    assert "Probable causes" in str(report) and "Warnings raised during the check" in str(report)


def test_solver_ignoring_a_parameter_is_diagnosed():
    objective, solver, outer, b, _, _ = quadratic()
    scale = torch.tensor(2.0, dtype=D, requires_grad=True)
    frozen = scale.detach().clone()

    def scaled_objective(x, b, s):
        return s * objective(x, b / s)

    def stale(f, x0, b, s):
        return solver(f, x0, b / frozen)  # reads a stale copy of s

    report = check_hypergradient(scaled_objective, torch.zeros(3, dtype=D), b, scale, solver=stale, outer=outer)
    assert not report.ok and report.forward_status == "converged"
    assert report.parameter_errors["finite_differences"]["params[0]"] < 1e-8
    assert any(c.startswith("The solver ignores params[1]:") for c in report.causes), str(report)


def test_solver_barely_following_a_parameter_is_diagnosed():
    objective, solver, outer, b, _, _ = quadratic()
    b0 = b.detach().clone()

    def sluggish(f, x0, b):  # moves, but a million times too little
        return solver(f, x0, b0 + 1e-6 * (b - b0))

    report = check_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=sluggish, outer=outer)
    assert not report.ok
    assert any(c.startswith("Finite differences through the solver barely respond to params[0]")
               for c in report.causes), str(report)


def test_unconverged_linear_solve_is_diagnosed():
    objective, solver, outer, b, _, _ = quadratic()
    report = check_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=solver, outer=outer,
                                 linear_solver=ig.CG(maxiter=1))
    assert not report.ok and not report.backward.converged
    assert any(c.startswith("The backward linear solve did not converge") for c in report.causes)


def test_solver_of_a_different_problem_is_diagnosed():
    objective, solver, outer, b, _, _ = quadratic()
    b0 = b.detach().clone()

    def wrong(f, x0, b):  # right at b0, but moves twice as fast as the true solution
        return solver(f, x0, b0 + 2 * (b - b0))

    report = check_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=wrong, outer=outer)
    assert not report.ok and report.errors["exact"] < 1e-12
    assert any(c.startswith("Finite differences through re-solving disagree for params[0]") for c in report.causes)


def test_captured_tensor_warning_is_recorded():
    objective, solver, outer, b, _, _ = quadratic()
    captured = torch.tensor(1.0, dtype=D, requires_grad=True)
    report = check_hypergradient(lambda x, b: captured * objective(x, b), torch.zeros(3, dtype=D), b,
                                 solver=solver, outer=outer)
    assert any("not among params" in w for w in report.warnings)


def test_assert_hypergradient_raises_with_the_report():
    objective, solver, outer, b, _, _ = quadratic()
    passed = assert_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=solver, outer=outer)
    assert passed.ok
    with pytest.raises(AssertionError) as caught:
        assert_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=solver, outer=outer,
                             linear_solver=ig.CG(maxiter=1))
    assert isinstance(caught.value, HypergradientCheckError)
    assert not caught.value.report.ok and str(caught.value) == str(caught.value.report)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"kind": "loss"}, ValueError, "kind"),
        ({"references": ("dense",)}, ValueError, "references"),
        ({"references": "exact"}, ValueError, "references"),
        ({"references": ()}, ValueError, "references"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"rtol": -1.0}, ValueError, "rtol"),
        ({"fd_directions": 0}, ValueError, "fd_directions"),
        ({"solver": None}, TypeError, "solver"),
        ({"solver": 3}, TypeError, "solver"),
        ({"outer": "loss"}, TypeError, "outer"),
        ({"outer": lambda x: x}, ValueError, "scalar"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, match):
    objective, solver, outer, b, _, _ = quadratic()
    arguments = {"solver": solver, "outer": outer, **kwargs}
    with pytest.raises(error, match=match):
        check_hypergradient(objective, torch.zeros(3, dtype=D), b, **arguments)


def test_params_without_floating_tensors_are_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        check_hypergradient(lambda x, k: (x ** 2).sum(), torch.zeros(2, dtype=D), 3,
                            solver=lambda f, x0, k: x0, outer=lambda x: x.sum())


@pytest.mark.cuda
def test_check_on_cuda():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=D, device="cuda")
    b = torch.tensor([1.0, -1.0], dtype=D, device="cuda", requires_grad=True)
    report = check_hypergradient(lambda x, b: 0.5 * x @ a @ x - b @ x, torch.zeros(2, dtype=D, device="cuda"), b,
                                 solver=lambda f, x0, b: torch.linalg.solve(a, b), outer=lambda x: (x ** 2).sum())
    assert report.ok, str(report)
    assert report.gradient["params[0]"].device.type == "cuda"


# --------------------------------------------------------------------------- problems


BUILT = [
    problems.quadratic_problem(),
    problems.quadratic_problem(x_layout={"w": (2,), "b": ()}, params_layout=[(2, 2), [(), (1,)]], cond=10,
                               seed=5, solver="gradient_descent", outer_uses_params=True),
    problems.ridge_problem(per_feature=True, seed=3),
    problems.ridge_problem(n_samples=2, n_features=4, log_lam=-1.0, seed=1),
    problems.logistic_problem(seed=2),
    problems.mlp_proximal_problem(seed=1),
]


@pytest.mark.parametrize("problem", BUILT, ids=lambda p: repr(p).split("(")[0])
def test_repr_rebuilds_the_problem(problem):
    rebuilt = eval(repr(problem), vars(problems))
    for a, b in zip(pytree.tree_leaves((problem.x0, problem.params)), pytree.tree_leaves((rebuilt.x0, rebuilt.params))):
        assert torch.equal(a, b)
    assert rebuilt.spectrum == problem.spectrum


@pytest.mark.parametrize("problem", [p for p in BUILT if p.exact_hypergradient is not None],
                         ids=lambda p: repr(p).split("(")[0])
def test_closed_forms_agree_with_finite_differences(problem):
    # The closed forms are the references of the property tests: check them independently.
    report = problem.check(references=("finite_differences",))
    assert report.ok, str(report)
    names = list(report.gradient)
    for name, g in zip(names, pytree.tree_leaves(problem.exact_hypergradient)):
        fd = report.references["finite_differences"][name]
        assert float((fd - g).norm()) <= 1e-7 * max(1.0, float(g.norm())), name


@pytest.mark.parametrize("problem", BUILT, ids=lambda p: repr(p).split("(")[0])
def test_spectrum_is_that_of_the_hessian_at_the_solution(problem):
    params = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, problem.params)
    x_star = problem.solver(problem.objective, problem.x0, *params)
    leaves, spec = pytree.tree_flatten(x_star)
    sizes = [t.numel() for t in leaves]

    def f(v):
        parts = [p.reshape(t.shape) for p, t in zip(torch.split(v, sizes), leaves)]
        return problem.objective(pytree.tree_unflatten(parts, spec), *params)

    eig = torch.linalg.eigvalsh(torch.func.hessian(f)(torch.cat([t.reshape(-1) for t in leaves])))
    assert eig[0] > 0
    assert problem.spectrum == pytest.approx((float(eig[0]), float(eig[-1])), rel=1e-6)


def test_quadratic_condition_number_is_exact():
    problem = problems.quadratic_problem(x_layout=(5,), cond=300, seed=2)
    assert problem.condition_number == 300
    assert problem.outer_uses_params is False


def test_newton_reaches_round_off_from_an_indefinite_start():
    # f has a maximum at 0: the Hessian there is negative and Newton must still descend.
    def f(x, a):
        return 0.25 * (x ** 4).sum() - 0.5 * (x ** 2).sum() - a @ x

    a = torch.tensor([0.3, -0.2], dtype=D)
    x = problems.Newton()(f, torch.zeros(2, dtype=D), a)
    gradient = x ** 3 - x - a
    assert float(gradient.abs().max()) < 1e-14
    assert bool((3 * x ** 2 - 1 > 0).all())  # a minimum, not the maximum at the start


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: problems.quadratic_problem(cond=0.5), "cond"),
        (lambda: problems.quadratic_problem(x_layout=(1,), cond=10), "cond=1"),
        (lambda: problems.quadratic_problem(solver="lbfgs"), "solver"),
        (lambda: problems.ridge_problem(n_samples=0), "n_samples"),
        (lambda: problems.mlp_proximal_problem(lam=0.0), "lam"),
        (lambda: problems.Newton(maxiter=0), "maxiter"),
    ],
)
def test_builders_validate_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_layout_is_rejected():
    with pytest.raises(TypeError, match="layout"):
        problems.quadratic_problem(x_layout=("a",))


def test_hypergradient_helper_matches_closed_form():
    problem = problems.quadratic_problem(x_layout={"a": (2,), "b": [(), (1,)]}, params_layout=[(3,)], cond=10)
    gradient = problem.hypergradient(ig.Exact())
    torch.testing.assert_close(gradient[0], problem.exact_hypergradient[0], rtol=1e-12, atol=1e-14)


def test_default_solvers_are_named_in_the_report_and_used_by_every_reference():
    objective, solver, outer, b, _, _ = quadratic()
    report = check_hypergradient(objective, torch.zeros(3, dtype=D), b, solver=solver, outer=outer)
    assert report.settings["linear_solver"].startswith("CG(") and report.settings["linear_solver"].endswith(
        "(default)")
    assert report.backward.solver == "CG"
    root = check_hypergradient(lambda x, b: x - b, torch.zeros(3, dtype=D), b, solver=lambda f, x0, b: b.clone(),
                               outer=outer, kind="residual")
    assert root.ok and root.settings["linear_solver"].startswith("GMRES(") and root.backward.solver == "GMRES"
    # solver=None for a mapping is FixedPointIteration for the implicit gradient, the finite
    # differences and the unrolled reference alike: its iterations are those it reports.
    c = torch.tensor([0.3, -0.4], dtype=D, requires_grad=True)
    mapping = check_hypergradient(lambda x, c: 0.5 * torch.tanh(x) + c, torch.zeros(2, dtype=D), c,
                                  solver=None, outer=lambda x: (x ** 2).sum(), kind="mapping")
    default = ig.solvers.FixedPointIteration()
    _, stats = default.run(lambda x, c: 0.5 * torch.tanh(x) + c, torch.zeros(2, dtype=D), c.detach())
    assert mapping.ok and mapping.settings["solver"] == repr(default)
    assert mapping.forward_iterations == stats.iterations


@pytest.mark.parametrize(
    "actual, expected, atol, want",
    [
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), 0.0, 0.5 / 7.25 ** 0.5),
        ({"w": torch.ones(2), "b": [torch.tensor(3.0)]}, {"w": torch.zeros(2), "b": [torch.tensor(4.0)]}, 0.0,
         3 ** 0.5 / 4),
        (1.5, 2.0, 0.0, 0.25),
        (torch.tensor([1e-8]), torch.tensor([0.0]), 1e-3, 1e-5),
        (torch.zeros(2), torch.zeros(2), 0.0, 0.0),
        (torch.ones(2), torch.zeros(2), 0.0, float("inf")),
        (torch.tensor([float("nan")]), torch.ones(1), 0.0, float("inf")),
    ],
)
def test_relative_error_follows_its_definition(actual, expected, atol, want):
    got = relative_error(actual, expected, atol)
    assert got == want if want in (0.0, float("inf")) else got == pytest.approx(want, rel=1e-12)


def test_relative_error_is_float64_and_rejects_mismatched_structures():
    a, b = torch.tensor([1.0 + 2 ** -20], dtype=torch.float32), torch.tensor([1.0], dtype=torch.float32)
    assert relative_error(a, b) == pytest.approx(2 ** -20, rel=1e-12)
    with pytest.raises(ValueError, match="leaves"):
        relative_error([torch.ones(1)], [torch.ones(1), torch.ones(1)])
    with pytest.raises(ValueError, match="None"):
        relative_error([None, torch.ones(1)], [torch.ones(1), None])
    with pytest.raises(ValueError, match="atol"):
        relative_error(torch.ones(1), torch.ones(1), atol=-1.0)


def _data(n=30, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    y = torch.sign(X @ torch.randn(d, generator=g, dtype=D) + torch.randn(n, generator=g, dtype=D))
    return X, y, torch.linspace(-2.0, 0.5, d, dtype=D)


@pytest.mark.parametrize("per_feature", [True, False])
def test_ridge_solution_minimises_ridge_objective(per_feature):
    X, y, log_lam = _data()
    log_lam = log_lam if per_feature else log_lam[0]
    w = problems.ridge_solution(log_lam, X, y)
    assert float(torch.func.grad(problems.ridge_objective)(w, log_lam, X, y).norm()) < 1e-12
    lam = log_lam.exp() * torch.ones(4, dtype=D)
    expected = 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w * w).sum()
    assert float(problems.ridge_objective(w, log_lam, X, y)) == pytest.approx(float(expected), rel=1e-14)
    assert float(problems.squared_loss(w, X, y)) == pytest.approx(float(((X @ w - y) ** 2).sum() / 60), rel=1e-14)


def test_logistic_solution_is_the_minimiser_newton_finds():
    X, y, log_lam = _data()
    w = problems.logistic_solution(log_lam, X, y)
    assert float(torch.func.grad(problems.logistic_objective)(w, log_lam, X, y).norm()) < 1e-12
    reference = problems.Newton()(problems.logistic_objective, torch.zeros(4, dtype=D), log_lam, X, y)
    assert relative_error(w, reference) < 1e-12
    loss = torch.log1p(torch.exp(-y * (X @ w))).mean()
    assert float(problems.logistic_loss(w, X, y)) == pytest.approx(float(loss), rel=1e-13)


def test_logistic_problem_is_built_from_the_public_pieces():
    problem = problems.logistic_problem(n_samples=12, n_features=3, seed=2)
    rho = problem.params[0].detach()
    w = problem.solver(problem.objective, problem.x0, rho)
    g = torch.func.grad(problem.objective)(w, rho)
    assert float(g.norm()) < 1e-12
    ridge = problems.ridge_problem(n_samples=5, n_features=3, per_feature=True)
    assert ridge.check().ok


# --------------------------------------------------------------------------- strategies


def test_strategies_shrink_to_small_readable_problems():
    hypothesis = pytest.importorskip("hypothesis")
    from implicitgrad.testing import strategies

    settings = hypothesis.settings(database=None, max_examples=200)
    smallest = hypothesis.find(strategies.quadratic_problems(), lambda p: True, settings=settings)
    assert repr(smallest) == ("quadratic_problem(x_layout=(1,), params_layout=[(1,)], cond=1, seed=0, "
                              "solver='closed_form', outer_uses_params=False)")
    conditioned = hypothesis.find(strategies.quadratic_problems(), lambda p: p.condition_number >= 100,
                                  settings=settings)
    assert re.fullmatch(r"quadratic_problem\(x_layout=\(2,\), params_layout=\[\(1,\)\], cond=100, seed=0, "
                        r"solver='closed_form', outer_uses_params=False\)", repr(conditioned))
    nested = hypothesis.find(strategies.pytree_problems(), lambda p: isinstance(p.x0, dict), settings=settings)
    assert repr(nested).startswith("quadratic_problem(x_layout={'a': ()}")


# --------------------------------------------------------------------------- docs


def test_docs_page_code_runs_and_prints_what_it_shows():
    page = ROOT / "docs" / "howto" / "testing.rst"
    if not page.exists():
        pytest.skip(f"{page} is not present in this checkout")
    # The Sphinx doctest build runs these blocks too; this keeps the page honest in the suite.
    blocks = re.findall(r"^\.\. (testcode|testoutput)::\n\n((?:(?: {3}.*)?\n)+)", page.read_text(), re.M)
    assert [kind for kind, _ in blocks].count("testcode") >= 5
    namespace = {"__name__": "docs_testing"}
    printed = ""
    for kind, body in blocks:
        text = "\n".join(line[3:] for line in body.splitlines()).strip()
        if kind == "testoutput":
            assert printed.strip() == text
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(text, str(page), "exec"), namespace)
        printed = buffer.getvalue()
