"""Linear solvers on their own: accuracy against dense solves, pytrees, batches, statuses."""

from __future__ import annotations

import pytest
import torch
from registry import EXACT_RTOL, linear_solvers, rel_err, spd_matrix

import implicitgrad as ig

DT = torch.float64


@pytest.mark.parametrize("cond", [10.0, 1e3])
@pytest.mark.parametrize("name,solver", linear_solvers(lipschitz=1.0))
def test_spd_against_dense_solve(name, solver, cond):
    A = spd_matrix(20, cond)
    A = A / torch.linalg.eigvalsh(A).max()  # λ_max = 1 so Neumann(alpha=1) converges
    b = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(1))
    x, info = solver(lambda v: A @ v, b)
    ref = torch.linalg.solve(A, b)
    assert info.converged, info
    # A relative residual r bounds the relative error by κ·r.
    tol = EXACT_RTOL[DT] * cond if name == "Exact" else 1e-10 * cond * 10
    assert rel_err(x, ref) <= tol


@pytest.mark.parametrize("name,solver", linear_solvers(symmetric=False))
def test_nonsymmetric_against_dense_solve(name, solver):
    g = torch.Generator().manual_seed(2)
    A = torch.randn(15, 15, generator=g, dtype=DT) + 6 * torch.eye(15, dtype=DT)
    b = torch.randn(15, generator=g, dtype=DT)
    x, info = solver(lambda v: A @ v, b)
    assert info.converged, info
    assert rel_err(x, torch.linalg.solve(A, b)) <= 1e-9


@pytest.mark.parametrize("name,solver", linear_solvers(lipschitz=1.0))
def test_pytree_with_coupled_blocks(name, solver):
    """b = {"a": (3,), "b": (2, 2)} with a matrix that couples the two leaves."""
    A = spd_matrix(7, 20.0, seed=3)
    A = A / torch.linalg.eigvalsh(A).max()

    def matvec(v):
        flat = torch.cat([v["a"], v["b"].reshape(-1)])
        out = A @ flat
        return {"a": out[:3], "b": out[3:].reshape(2, 2)}

    b = {"a": torch.ones(3, dtype=DT), "b": torch.arange(4, dtype=DT).reshape(2, 2)}
    x, info = solver(matvec, b)
    ref = torch.linalg.solve(A, torch.cat([b["a"], b["b"].reshape(-1)]))
    assert rel_err(torch.cat([x["a"], x["b"].reshape(-1)]), ref) <= 1e-8


@pytest.mark.parametrize("name,solver", linear_solvers(lipschitz=1.0))
def test_batch_of_independent_systems_equals_one_by_one(name, solver):
    mats = torch.stack([spd_matrix(6, c, seed=i) for i, c in enumerate([2.0, 50.0, 500.0])])
    mats = mats / torch.linalg.eigvalsh(mats).amax(-1)[:, None, None]
    b = torch.randn(3, 6, dtype=DT, generator=torch.Generator().manual_seed(4))
    x, info = solver(lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1), b, batch_ndim=1)
    assert info.converged, info
    for i in range(3):
        assert rel_err(x[i], torch.linalg.solve(mats[i], b[i])) <= 1e-7


def test_float32():
    A = spd_matrix(10, 10.0, dtype=torch.float32)
    b = torch.ones(10)
    for _, solver in linear_solvers(lipschitz=float(torch.linalg.eigvalsh(A).max())):
        x, info = solver(lambda v: A @ v, b)
        assert x.dtype == torch.float32
        assert rel_err(x, torch.linalg.solve(A.double(), b.double())) <= 1e-4


def test_cg_check_interval_does_not_change_the_solution():
    A = spd_matrix(30, 100.0)
    b = torch.ones(30, dtype=DT)
    x1, i1 = ig.CG(check_every=1)(lambda v: A @ v, b)
    x5, i5 = ig.CG(check_every=5)(lambda v: A @ v, b)
    assert i5.iterations % 5 == 0 and i5.iterations >= i1.iterations
    assert rel_err(x5, x1) <= 1e-9


def test_cg_damping_and_preconditioner():
    A = spd_matrix(12, 1e4)
    b = torch.ones(12, dtype=DT)
    x, info = ig.CG(damping=0.5)(lambda v: A @ v, b)
    assert rel_err(x, torch.linalg.solve(A + 0.5 * torch.eye(12, dtype=DT), b)) <= 1e-8
    exact_inverse = torch.linalg.inv(A)
    x, info = ig.CG(preconditioner=lambda r: exact_inverse @ r)(lambda v: A @ v, b)
    assert info.iterations <= 2 and rel_err(x, torch.linalg.solve(A, b)) <= 1e-8


def test_statuses_and_messages():
    A = spd_matrix(30, 1e4)
    b = torch.ones(30, dtype=DT)
    _, info = ig.CG(maxiter=3)(lambda v: A @ v, b)
    assert info.status == "max_iterations" and not info.converged and "maxiter" in info.message
    indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    _, info = ig.CG()(lambda v: indefinite @ v, torch.ones(2, dtype=DT))
    assert info.status == "negative_curvature" and "damping" in info.message
    _, info = ig.Neumann(alpha=3.0)(lambda v: A / 1e4 @ v * 1e4, b)
    assert info.status == "diverged" and "alpha" in info.message
    _, info = ig.Exact()(lambda v: torch.diag(torch.tensor([1.0, 0.0], dtype=DT)) @ v, torch.ones(2, dtype=DT))
    assert info.status == "singular"
    _, info = ig.GMRES()(lambda v: v * float("nan"), torch.ones(3, dtype=DT))
    assert info.status == "nonfinite"


def test_neumann_residual_is_the_next_series_term():
    A = spd_matrix(8, 4.0)
    A = A / torch.linalg.eigvalsh(A).max()
    b = torch.ones(8, dtype=DT)
    x, info = ig.Neumann(maxiter=7, alpha=0.9, tol=1e-300)(lambda v: A @ v, b)
    assert info.iterations == 7
    assert info.residual == pytest.approx(float((b - A @ x).norm() / b.norm()), rel=1e-10)


def test_zero_right_hand_side():
    A = spd_matrix(5, 3.0)
    for _, solver in linear_solvers(lipschitz=3.0):
        x, info = solver(lambda v: A @ v, torch.zeros(5, dtype=DT))
        assert info.converged and float(x.abs().max()) == 0.0


def test_exact_refuses_huge_systems():
    with pytest.raises(ValueError, match="max_size"):
        ig.Exact(max_size=10)(lambda v: v, torch.ones(11, dtype=DT))


def test_negative_curvature_keeps_last_iterate_and_spares_other_systems():
    A = torch.stack([torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)),
                     torch.diag(torch.tensor([1.0, -1.0, 2.0, 3.0], dtype=DT))])
    b = torch.ones(2, 4, dtype=DT)
    x, info = ig.CG(maxiter=50)(lambda v: torch.einsum("bij,bj->bi", A, v), b, batch_ndim=1)
    assert info.status == "negative_curvature"
    assert rel_err(x[0], torch.linalg.solve(A[0], b[0])) <= 1e-12  # the healthy system converges
    # The indefinite one stops before the step along its negative direction: the first
    # CG iterate, (bᵀb / bᵀAb) b = 0.8 b.
    assert torch.allclose(x[1], 0.8 * b[1])
    x_single, info = ig.CG(maxiter=50)(lambda v: A[1] @ v, b[1])
    assert info.status == "negative_curvature" and torch.allclose(x_single, 0.8 * b[1])
