"""One linear-solver contract: ``solve(matvec, b, *, init=None, batch_ndim=0) -> (x, info)``,
a str-valued Status with one message table, and plain callables accepted by the core."""

from __future__ import annotations

import pytest
import torch
from registry import linear_solvers, rel_err, spd_matrix

import implicitgrad as ig
from implicitgrad._status import MESSAGES
from implicitgrad.linalg import Status

DT = torch.float64
A = spd_matrix(6, 20.0, seed=3)
A = A / torch.linalg.eigvalsh(A).max()


def _tree_matvec(v):
    flat = A @ torch.cat([v["a"], v["b"].reshape(-1)])
    return {"a": flat[:2], "b": flat[2:].reshape(2, 2)}


def _tree_b():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(2, dtype=DT, generator=g), "b": torch.randn(2, 2, dtype=DT, generator=g)}


def test_status_is_a_str_enum_with_a_message_for_every_value():
    assert Status.CONVERGED == "converged" and f"{Status.MAX_ITERATIONS}" == "max_iterations"
    assert Status("breakdown") is Status.BREAKDOWN
    assert repr(Status.CONVERGED) == "'converged'"  # printed as the plain strings were
    for status in Status:
        assert status in MESSAGES
        assert (MESSAGES[status] == "") is (status is Status.CONVERGED)


@pytest.mark.parametrize("name,solver", linear_solvers(lipschitz=1.0))
def test_solve_on_pytrees_with_init(name, solver):
    b = _tree_b()
    ref = torch.linalg.solve(A, torch.cat([b["a"], b["b"].reshape(-1)]))
    x, info = solver.solve(_tree_matvec, b)
    assert isinstance(info.status, Status) and info.converged, info
    assert rel_err(torch.cat([x["a"], x["b"].reshape(-1)]), ref) <= 1e-8
    # Started at the solution, an iterative solver has nothing left to do.
    start = {"a": ref[:2].clone(), "b": ref[2:].reshape(2, 2).clone()}
    warm, warm_info = solver.solve(_tree_matvec, b, init=start)
    assert warm_info.converged and rel_err(warm["a"], ref[:2]) <= 1e-8
    if name != "Exact":
        assert warm_info.iterations <= 2


def test_x0_is_a_deprecated_name_of_init_and_the_warning_names_this_line():
    b = _tree_b()
    start = {"a": torch.ones(2, dtype=DT), "b": torch.ones(2, 2, dtype=DT)}
    x_init, _ = ig.GMRES()(_tree_matvec, b, init=start)
    with pytest.warns(DeprecationWarning, match="init") as record:
        x_old, _ = ig.GMRES()(_tree_matvec, b, x0=start)
    assert record[0].filename == __file__
    torch.testing.assert_close(x_old, x_init)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ig.GMRES()(_tree_matvec, b, tol=1e-3)


@pytest.mark.parametrize("solver_cls", [ig.CG, ig.MINRES, ig.BiCGStab])
@pytest.mark.parametrize("batch_ndim", [0, 1])
def test_preconditioner_receives_the_structure_of_b(solver_cls, batch_ndim):
    seen = []
    diag = torch.diagonal(A)

    def precondition(r):
        seen.append(r)
        flat = torch.cat([r["a"], r["b"].reshape(*r["b"].shape[:batch_ndim], -1)], -1) / diag
        return {"a": flat[..., :2], "b": flat[..., 2:].reshape(r["b"].shape)}

    b = _tree_b()
    matvec = _tree_matvec
    if batch_ndim:
        b = {k: torch.stack([v, 2 * v]) for k, v in b.items()}
        matvec = torch.func.vmap(_tree_matvec)
    x, info = solver_cls(preconditioner=precondition).solve(matvec, b, batch_ndim=batch_ndim)
    assert info.converged, info
    assert seen and all(isinstance(r, dict) and set(r) == {"a", "b"} for r in seen)
    assert seen[0]["b"].shape == b["b"].shape


def test_solve_leaves_without_layout_gives_the_preconditioner_a_list():
    seen = []
    b = [torch.ones(3, dtype=DT)]
    ig.CG(preconditioner=lambda r: seen.append(r) or r).solve_leaves(lambda v: [2 * v[0]], b)
    assert seen and isinstance(seen[0], list)


def test_from_residual_builds_status_and_message():
    info = ig.LinearSolveInfo.from_residual(torch.tensor([1e-12, 3e-4]), 1e-8, iterations=7, solver="Mine")
    assert info.status is Status.MAX_ITERATIONS and not info.converged and info.iterations == 7
    assert "Mine did not reach tol=1.0e-08" in info.message and "3.00e-04" in info.message
    assert ig.LinearSolveInfo.from_residual(1e-9, 1e-8).status is Status.CONVERGED
    assert ig.LinearSolveInfo.from_residual(float("nan"), 1e-8).status is Status.NONFINITE
    cg = ig.LinearSolveInfo.from_residual(0.5, 1e-8, status="negative_curvature", solver="CG")
    assert "MINRES" in cg.message and "damping" in cg.message  # the CG-specific entry
    with pytest.raises(ValueError, match="unknown status 'bad'"):
        ig.LinearSolveInfo(1, 0.0, True, "bad")


# --------------------------------------------------------------------------- plain callables in the core

M = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]], dtype=DT)


def _quadratic(x, theta):
    return 0.5 * x @ M @ x - theta @ x


def _closed_form(f, x0, theta):
    return torch.linalg.solve(M, theta)


def _expected_grad(theta):
    """d/dθ of sum(x*²) with x* = M⁻¹θ: 2 M⁻¹ x*."""
    return torch.linalg.solve(M, 2 * torch.linalg.solve(M, theta.detach()))


def _dense_callable(matvec, b):
    """A user's solver: forms the matrix column by column and solves it densely."""
    cols = torch.stack([matvec(e) for e in torch.eye(b.numel(), dtype=b.dtype)], -1)
    return torch.linalg.solve(cols, b)


def test_plain_callable_returning_x_is_accepted():
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    x, info = ig.implicit_solve(_quadratic, torch.zeros(3, dtype=DT), theta, solver=_closed_form,
                                linear_solver=_dense_callable, return_info=True)
    (x ** 2).sum().backward()
    torch.testing.assert_close(theta.grad, _expected_grad(theta))
    assert info.backward.converged and info.backward.solver == "_dense_callable"
    assert info.backward.residual <= 1e-12


def test_plain_callable_returning_info_is_reported():
    def lazy(matvec, b):
        return b, ig.LinearSolveInfo.from_residual(0.3, 1e-8, iterations=1, solver="lazy")

    theta = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    x = ig.implicit_solve(_quadratic, torch.zeros(3, dtype=DT), theta, solver=_closed_form,
                          linear_solver=lazy)
    with pytest.warns(ig.ImplicitGradWarning, match="lazy did not reach tol"):
        (x ** 2).sum().backward()


def test_plain_callable_under_vmap_solves_each_system():
    def hyper(theta):
        x = ig.implicit_solve(_quadratic, torch.zeros(3, dtype=DT), theta, solver=_closed_form,
                              linear_solver=_dense_callable, on_failure="raise")
        return (x ** 2).sum()

    thetas = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]], dtype=DT)
    grads = torch.func.vmap(torch.func.grad(hyper))(thetas)
    for g, t in zip(grads, thetas):
        torch.testing.assert_close(g, _expected_grad(t))


def test_a_class_instead_of_an_instance_is_refused():
    with pytest.raises(TypeError, match="an instance"):
        ig.implicit_solve(_quadratic, torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT),
                          solver=_closed_form, linear_solver=ig.CG)


# --------------------------------------------------------------------------- CG: one loop, true residual


def test_cg_labels_a_system_alike_alone_and_in_a_batch():
    """diag(1, 2, 0) with b = 1: a giant step along the null vector; singular in both."""
    singular = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    spd = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    _, alone = ig.CG()(lambda v: singular @ v, torch.ones(3, dtype=DT))
    mats = torch.stack([singular, spd])
    x, batch = ig.CG()(lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1), torch.ones(2, 3, dtype=DT), batch_ndim=1)
    assert alone.status == batch.status == "singular"
    assert rel_err(x[1], torch.linalg.solve(spd, torch.ones(3, dtype=DT))) <= 1e-12


def test_cg_recomputes_the_true_residual_and_counts_the_products(monkeypatch):
    monkeypatch.setattr(ig.CG, "RESIDUAL_EVERY", 4)
    M40 = spd_matrix(40, 1e3, seed=7)
    b = torch.randn(40, dtype=DT, generator=torch.Generator().manual_seed(8))
    args = []

    def matvec(v):
        args.append(v.clone())
        return M40 @ v

    x, info = ig.CG(maxiter=400)(matvec, b)
    assert info.converged and rel_err(x, torch.linalg.solve(M40, b)) <= 1e-7
    assert len(args) == info.iterations
    assert info.residual == pytest.approx(float((b - M40 @ x).norm() / b.norm()), rel=1e-2)
    # The fifth product is b − A x₄: x₄ lies in the span of the four search directions
    # before it, which a fifth search direction would not.
    directions = torch.stack(args[:4], -1)
    fit = directions @ torch.linalg.lstsq(directions, args[4]).solution
    assert rel_err(fit, args[4]) <= 1e-10
    fit_next = directions @ torch.linalg.lstsq(directions, args[5]).solution
    assert rel_err(fit_next, args[5]) > 1e-3
    # The budget bounds every product, the recomputations included.
    args.clear()
    _, short = ig.CG(maxiter=10)(matvec, b)
    assert short.iterations == len(args) == 10 and short.status == "max_iterations"
