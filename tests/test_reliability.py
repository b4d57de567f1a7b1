"""Edges a user can hit: a correct result or a clear error, never a silent wrong number.

One section per failure class: low precision, complex tensors, meta / 0-d tensors, an
objective that ignores x, NaN under ``on_failure="ignore"``, meaningless settings,
Exact's diagnosis, status labels, the preconditioner's argument, vectorized autograd.
Checkpoints are tested in ``test_reliability_checkpoints.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from registry import rel_err, spd_matrix, symmetric_matrix

import implicitgrad as ig

DT = torch.float64


def quadratic(x, theta, A):
    """½ xᵀAx − θᵀx: x* = A⁻¹θ, dx*/dθ = A⁻¹."""
    return 0.5 * x @ (A @ x) - theta @ x


def closed_form(fn, x0, theta, A):
    return torch.linalg.solve(A.double(), theta.double()).to(theta.dtype)


def all_linear_solvers():
    return [ig.CG(maxiter=200), ig.MINRES(maxiter=200), ig.Neumann(maxiter=2000, alpha=0.2),
            ig.Exact(), ig.GMRES(maxiter=200)]


def ids(solvers):
    return [type(s).__name__ for s in solvers]


# --------------------------------------------------------------------------- 1. low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("solver", all_linear_solvers(), ids=ids(all_linear_solvers()))
def test_every_linear_solver_in_every_float_dtype(solver, dtype):
    A64 = spd_matrix(4, 5.0)  # eigenvalues in [1, 5]: Neumann's alpha = 0.2 converges
    c = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=DT)
    theta = torch.tensor([0.5, 1.0, -1.0, 2.0], dtype=dtype, requires_grad=True)
    A = A64.to(dtype)
    x = ig.implicit_solve(quadratic, torch.zeros(4, dtype=dtype), theta, A, solver=closed_form,
                          linear_solver=solver, on_failure="raise", forward_tol=0.5)
    (x * c.to(dtype)).sum().backward()
    assert theta.grad.dtype == dtype
    # d(cᵀx*)/dθ = A⁻¹c, for the matrix and vector as rounded to the dtype.
    expected = torch.linalg.solve(A.double(), c.to(dtype).double())
    tol = {torch.float16: 3e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4, torch.float64: 1e-8}[dtype]
    assert rel_err(theta.grad, expected) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_alone_factors_low_precision_in_float32(dtype):
    A = spd_matrix(5, 10.0)
    b = torch.ones(5, dtype=DT)
    x, info = ig.Exact()(lambda v: (A.to(dtype) @ v), b.to(dtype))
    assert x.dtype == dtype and info.converged, info
    assert rel_err(x, torch.linalg.solve(A, b)) <= 5e-2


# --------------------------------------------------------------------------- 2. complex


@pytest.mark.parametrize("where", ["x0", "params"])
def test_complex_tensors_are_refused_naming_the_argument(where):
    z = torch.ones(3, dtype=torch.complex128, requires_grad=True)
    r = torch.ones(3, dtype=DT, requires_grad=True)
    x0, theta = (z.detach(), r) if where == "x0" else (r.detach(), z)
    with pytest.raises(TypeError, match=rf"{where} has a complex leaf.*view_as_real"):
        ig.implicit_solve(lambda x, t: (x.abs() ** 2).sum() - (t.conj() * x).real.sum(), x0, theta,
                          solver=lambda f, x, t: t.detach())


def test_complex_leaf_inside_a_pytree_is_refused():
    with pytest.raises(TypeError, match="x0 has a complex leaf"):
        ig.implicit_solve(lambda x: (x["a"] ** 2).sum(), {"a": torch.zeros(2, dtype=DT),
                          "b": torch.zeros(2, dtype=torch.complex64)}, solver=lambda f, x: x)


# --------------------------------------------------------------------------- 3. meta, 0-d


def test_zero_dim_param_on_another_device_is_caught():
    lam = torch.tensor(1.0, dtype=DT, device="meta")
    with pytest.raises(ValueError, match="different devices.*0-d"):
        ig.implicit_solve(lambda x, t, l: ((x - t) ** 2).sum() * l, torch.zeros(3, dtype=DT),
                          torch.ones(3, dtype=DT), lam, solver=lambda f, x, t, l: t)


@pytest.mark.parametrize("shape", [(), (3,)])
def test_meta_tensors_get_a_clear_error_before_any_host_read(shape):
    x0 = torch.zeros(shape, dtype=DT, device="meta")
    t = torch.ones(shape, dtype=DT, device="meta")
    with pytest.raises(ValueError, match="meta tensors.*no values"):
        ig.implicit_solve(lambda x, t: ((x - t) ** 2).sum(), x0, t, solver=lambda f, x, t: t)


# --------------------------------------------------------------------------- 4. objective ignores x


@pytest.mark.parametrize(
    "objective",
    [
        lambda x, t: (t**2).sum(),                     # a constant in x
        lambda x, t: ((x.detach() - t) ** 2).sum(),   # x detached
        lambda x, t: torch.tensor(float(x.sum().item())) + 0 * t.sum(),  # through .item()
        lambda x, t: (x > 0).sum(),                    # an integer tensor
    ],
    ids=["constant", "detached", "item", "integer"],
)
def test_objective_that_ignores_x_says_so(objective):
    t = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="objective does not depend on x"):
        ig.implicit_solve(objective, torch.zeros(3, dtype=DT), t, solver=lambda f, x, t: t.detach())


def test_residual_that_ignores_x_says_so():
    t = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="residual does not depend on x"):
        ig.root_solve(lambda x, t: t * 2, torch.zeros(3, dtype=DT), t, solver=lambda f, x, t: t.detach())


def test_mapping_that_ignores_x_is_well_posed():
    t = torch.ones(3, dtype=DT, requires_grad=True)
    x = ig.fixed_point_solve(lambda x, t: 2 * t, torch.zeros(3, dtype=DT), t)  # x* = 2t
    x.sum().backward()
    assert torch.allclose(t.grad, torch.full((3,), 2.0, dtype=DT))


# --------------------------------------------------------------------------- 5. NaN under "ignore"

NAN = float("nan")


def _grad(objective, solver, linear_solver, outer=lambda x: x.sum(), x0=None):
    t = torch.ones(3, dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "ignore" means silent
        x = ig.implicit_solve(objective, torch.zeros(3, dtype=DT) if x0 is None else x0, t,
                              solver=solver, linear_solver=linear_solver, on_failure="ignore")
        outer(x).backward()
    return t.grad


def plain(x, t):
    return 0.5 * (x**2).sum() + 0.1 * (x**4).sum() - (t * x).sum()


def newton(f, x, t):
    x = t.detach().clone()
    for _ in range(50):
        x = x - (x + 0.4 * x**3 - t.detach()) / (1 + 1.2 * x**2)
    return x


@pytest.mark.parametrize("solver", all_linear_solvers(), ids=ids(all_linear_solvers()))
def test_nan_outer_loss_gives_nan(solver):
    grad = _grad(plain, newton, solver, outer=lambda x: (x * NAN).sum())
    assert torch.isnan(grad).all()


@pytest.mark.parametrize("solver", all_linear_solvers(), ids=ids(all_linear_solvers()))
def test_nan_hessian_gives_nan(solver):
    def nan_curvature(x, t):
        return plain(x, t) + NAN * (x**2).sum()

    grad = _grad(nan_curvature, newton, solver)
    assert torch.isnan(grad).all()


@pytest.mark.parametrize("solver", all_linear_solvers(), ids=ids(all_linear_solvers()))
def test_nan_solution_gives_nan(solver):
    def quad(x, t):  # the Hessian does not depend on x: only the solution is NaN
        return 0.5 * (x**2).sum() - (t * x).sum()

    grad = _grad(quad, lambda f, x, t: torch.full_like(x, NAN), solver)
    assert torch.isnan(grad).all()


def test_nan_in_one_problem_of_a_vmapped_batch_stays_in_that_problem():
    def hyper(t):
        x = ig.implicit_solve(lambda x, t: 0.5 * (x**2).sum() - (t * x).sum(), torch.zeros(2, dtype=DT), t,
                              solver=lambda f, x, t: t, on_failure="ignore")
        return (x * t).sum()

    thetas = torch.tensor([[1.0, 2.0], [NAN, 1.0]], dtype=DT)
    grads = torch.func.vmap(torch.func.grad(hyper))(thetas)
    assert torch.allclose(grads[0], 2 * thetas[0]) and torch.isnan(grads[1]).all()


@pytest.mark.parametrize("solver", all_linear_solvers(), ids=ids(all_linear_solvers()))
def test_linear_solvers_alone_return_nan_for_nan_data(solver):
    A = spd_matrix(3, 4.0)
    x, info = solver(lambda v: A @ v, torch.tensor([1.0, NAN, 0.0], dtype=DT))
    assert info.status == "nonfinite" and torch.isnan(x).all()
    x, info = solver(lambda v: NAN * v, torch.ones(3, dtype=DT))
    assert not info.converged and torch.isnan(x).all()


# --------------------------------------------------------------------------- 6. settings

BAD_SETTINGS = [
    (lambda: ig.CG(tol=2.0), "tol"),
    (lambda: ig.CG(tol=1.0), "tol"),
    (lambda: ig.CG(tol=float("inf")), "tol"),
    (lambda: ig.CG(tol=float("nan")), "tol"),
    (lambda: ig.CG(tol="1e-6"), "tol"),
    (lambda: ig.CG(maxiter=2.5), "maxiter"),
    (lambda: ig.CG(maxiter=10.0), "maxiter"),
    (lambda: ig.CG(maxiter="10"), "maxiter"),
    (lambda: ig.CG(maxiter=True), "maxiter"),
    (lambda: ig.CG(damping=float("inf")), "damping"),
    (lambda: ig.CG(damping=float("nan")), "damping"),
    (lambda: ig.CG(check_every=2.5), "check_every"),
    (lambda: ig.MINRES(tol=5.0), "tol"),
    (lambda: ig.MINRES(maxiter=0.5), "maxiter"),
    (lambda: ig.Neumann(alpha=float("inf")), "alpha"),
    (lambda: ig.Neumann(alpha="0.1"), "alpha"),
    (lambda: ig.Neumann(tol=1.5), "tol"),
    (lambda: ig.Exact(max_size=100.5), "max_size"),
    (lambda: ig.solvers.GradientDescent(lr=float("inf")), "lr"),
    (lambda: ig.solvers.GradientDescent(tol=1.0), "tol"),
    (lambda: ig.solvers.GradientDescent(maxiter=True), "maxiter"),
    (lambda: ig.solvers.GradientDescent(check_every=0), "check_every"),
    (lambda: ig.solvers.FixedPointIteration(check_every="3"), "check_every"),
    (lambda: ig.solvers.FixedPointIteration(damping=float("nan")), "damping"),
    (lambda: ig.solvers.AcceleratedGradient(maxiter=3.0), "maxiter"),
    (lambda: ig.solvers.TorchOptimizer(torch.optim.Adam, tol=float("inf")), "tol"),
]


@pytest.mark.parametrize("make,name", BAD_SETTINGS)
def test_meaningless_settings_are_refused_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name) as caught:
        make()
    assert isinstance(caught.value, TypeError)  # either except clause catches it


def test_gmres_settings_come_from_the_shared_base():
    for kwargs in ({"tol": 2.0}, {"maxiter": 2.5}, {"maxiter": "10"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ig.GMRES(**kwargs)


@pytest.mark.parametrize("forward_tol", [0.0, -1.0, float("nan"), float("inf"), "1e-3"])
def test_forward_tol_is_validated(forward_tol):
    with pytest.raises(ValueError, match="forward_tol"):
        ig.implicit_solve(lambda x: (x**2).sum(), torch.zeros(2, dtype=DT), solver=lambda f, x: x,
                          forward_tol=forward_tol)


def test_valid_edge_settings_are_accepted():
    assert ig.CG(tol=0.999, maxiter=1, damping=0).maxiter == 1
    assert ig.solvers.GradientDescent(tol=0).tol == 0  # 0: run exactly maxiter steps
    import numpy as np

    assert ig.CG(maxiter=np.int64(5)).maxiter == 5


# --------------------------------------------------------------------------- 7. Exact


@pytest.mark.parametrize("n", [2, 10, 50])
def test_exact_solves_a_well_conditioned_spd_system_with_kappa_1_6e7(n):
    A = spd_matrix(n, 1.6e7)
    _, vectors = torch.linalg.eigh(A)
    b = vectors[:, 0] + 1e-3 * vectors[:, -1]  # along the smallest eigenvalue: largest error
    x, info = ig.Exact()(lambda v: A @ v, b)
    assert info.status == "converged" and "minimum-norm" not in info.message, info
    assert rel_err(x, torch.linalg.solve(A, b)) <= 1e-7  # κ·ε ≈ 3.6e-9


def test_exact_in_implicit_solve_with_kappa_1_6e7_is_converged():
    A = spd_matrix(20, 1.6e7)
    theta = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x, info = ig.implicit_solve(quadratic, torch.zeros(20, dtype=DT), theta, A, solver=closed_form,
                                linear_solver=ig.Exact(), return_info=True, on_failure="raise")
    c = torch.linalg.eigh(A)[1][:, 0]
    (x @ c).backward()
    assert info.backward.status == "converged"
    assert rel_err(theta.grad, torch.linalg.solve(A, c)) <= 1e-6


def test_exact_singular_matrix_is_singular_with_the_minimum_norm_solution():
    A = torch.diag(torch.tensor([2.0, 1e-20, 1.0], dtype=DT))
    b = torch.ones(3, dtype=DT)
    x, info = ig.Exact()(lambda v: A @ v, b)
    assert info.status == "singular" and "minimum-norm" in info.message
    assert torch.allclose(x, torch.tensor([0.5, 0.0, 1.0], dtype=DT))


def test_exact_on_many_scalar_leaves_equals_one_flat_tensor():
    n = 200
    g = torch.Generator().manual_seed(3)
    A = spd_matrix(n, 50.0)
    b = torch.randn(n, generator=g, dtype=DT)

    def matvec(v):
        out = A @ torch.stack(list(v))
        return list(out.unbind())

    x, info = ig.Exact()(matvec, list(b.unbind()))
    assert info.converged and rel_err(torch.stack(x), torch.linalg.solve(A, b)) <= 1e-10


def test_exact_matrix_from_a_matvec_that_cannot_be_vmapped():
    A = spd_matrix(4, 3.0)

    def matvec(v):  # .item() has no batching rule: the columns are formed one by one
        return A @ v * (1.0 + 0.0 * float(v.sum().item()))

    x, info = ig.Exact()(matvec, torch.ones(4, dtype=DT))
    assert info.converged and rel_err(x, torch.linalg.solve(A, torch.ones(4, dtype=DT))) <= 1e-12


# --------------------------------------------------------------------------- 8. status labels


@pytest.mark.parametrize("b", [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
def test_cg_on_a_singular_psd_matrix_is_not_negative_curvature(b):
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    _, info = ig.CG()(lambda v: A @ v, torch.tensor(b, dtype=DT))
    assert info.status == "singular" and "singular" in info.message, info


def test_cg_on_a_rotated_singular_psd_matrix_is_singular():
    A = symmetric_matrix([3.0, 1.0, 0.5, 0.0, 0.0], seed=4)
    _, info = ig.CG()(lambda v: A @ v, torch.ones(5, dtype=DT))
    assert info.status == "singular", info


def test_cg_on_an_indefinite_matrix_is_negative_curvature():
    A = symmetric_matrix([3.0, 1.0, -0.5, 2.0], seed=5)
    _, info = ig.CG()(lambda v: A @ v, torch.ones(4, dtype=DT))
    assert info.status == "negative_curvature", info


def test_implicit_solve_with_a_flat_direction_reports_singular():
    def objective(x, t):  # x[2] is a flat direction of the objective
        return 0.5 * (x[:2] ** 2).sum() - (t * x[:2]).sum() + 0.0 * x[2]

    t = torch.ones(2, dtype=DT, requires_grad=True)
    x = ig.implicit_solve(objective, torch.zeros(3, dtype=DT), t,
                          solver=lambda f, x, t: torch.cat([t, torch.zeros(1, dtype=DT)]))
    with pytest.warns(ig.ImplicitGradWarning, match="CG: singular") as record:
        x.sum().backward()
    assert not any("negative_curvature" in str(w.message) for w in record)


def test_batched_cg_labels_each_system():
    mats = torch.stack([torch.diag(torch.tensor([1.0, 0.0], dtype=DT)), torch.eye(2, dtype=DT)])
    _, info = ig.CG()(lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1), torch.ones(2, 2, dtype=DT), batch_ndim=1)
    assert info.status == "singular", info


# --------------------------------------------------------------------------- 9. preconditioner


def _recording_preconditioner(seen, diag):
    def precondition(r):
        seen.append(r)
        return {"a": r["a"] / diag, "n": r["n"]}

    return precondition


def test_preconditioner_gets_the_pytree_with_a_non_tensor_leaf():
    seen, diag = [], torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    t = torch.ones(3, dtype=DT, requires_grad=True)
    x = ig.implicit_solve(
        lambda x, t: 0.5 * (diag * x["a"] ** 2).sum() - (t * x["a"]).sum(),
        {"a": torch.zeros(3, dtype=DT), "n": 3}, t, solver=lambda f, x, t: {"a": t / diag, "n": 3},
        linear_solver=ig.CG(preconditioner=_recording_preconditioner(seen, diag)), on_failure="raise",
    )
    x["a"].sum().backward()
    assert seen and all(isinstance(r, dict) and r["n"] == 3 and r["a"].shape == (3,) for r in seen)
    assert torch.allclose(t.grad, 1 / diag)


@pytest.mark.parametrize("solver_cls", [ig.CG, ig.MINRES])
def test_preconditioner_under_vmap_gets_one_problems_pytree(solver_cls):
    seen = []
    diag = torch.tensor([1.0, 2.0, 4.0], dtype=DT)

    def precondition(r):
        seen.append(r)
        assert isinstance(r, dict) and r["a"].shape == (3,)
        return {"a": r["a"] / diag}

    def hyper(t):
        x = ig.implicit_solve(lambda x, t: 0.5 * (diag * x["a"] ** 2).sum() - (t * x["a"]).sum(),
                              {"a": torch.zeros(3, dtype=DT)}, t, solver=lambda f, x, t: {"a": t / diag},
                              linear_solver=solver_cls(preconditioner=precondition), on_failure="raise")
        return x["a"].sum()

    grads = torch.func.vmap(torch.func.grad(hyper))(torch.ones(4, 3, dtype=DT))
    assert seen and torch.allclose(grads, (1 / diag).expand(4, 3))


# --------------------------------------------------------------------------- 10. vectorized autograd


def _solution(t):
    return ig.implicit_solve(lambda x, t: 0.5 * (x**2).sum() + 0.1 * (x**4).sum() - (t * x).sum(),
                             torch.zeros(3, dtype=DT), t, solver=newton, on_failure="raise")


def _reference_jacobian(t):
    x = newton(None, None, t)
    return torch.diag(1 / (1 + 1.2 * x**2))


@pytest.mark.parametrize("strategy", ["reverse-mode", "forward-mode"])
def test_jacobian_vectorize_true(strategy):
    t = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    jac = torch.autograd.functional.jacobian(_solution, t, vectorize=True, strategy=strategy)
    assert torch.allclose(jac, _reference_jacobian(t), atol=1e-10)


def test_hessian_vectorize_true_of_an_outer_loss():
    t = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    h = torch.autograd.functional.hessian(lambda t: _solution(t).pow(2).sum(), t, vectorize=True)
    h_loop = torch.autograd.functional.hessian(lambda t: _solution(t).pow(2).sum(), t)
    assert torch.allclose(h, h_loop, atol=1e-10)


def test_gradcheck_with_batched_grad():
    t = torch.tensor([0.5, -1.0, 2.0], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(_solution, (t,), check_batched_grad=True)


def test_is_grads_batched():
    t = torch.tensor([0.5, -1.0, 2.0], dtype=DT, requires_grad=True)
    x = _solution(t)
    (rows,) = torch.autograd.grad(x, t, torch.eye(3, dtype=DT), is_grads_batched=True)
    assert torch.allclose(rows, _reference_jacobian(t.detach()), atol=1e-10)


def test_finite_checks_still_run_on_plain_tensors():
    t = torch.ones(3, dtype=DT, requires_grad=True)
    x = _solution(t)
    with pytest.raises(ig.ConvergenceError, match="NaN/Inf"):
        (x * NAN).sum().backward()
