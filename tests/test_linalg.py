"""Linear solvers on their own: accuracy against dense solves, pytrees, batches, statuses."""

from __future__ import annotations

import re

import pytest
import torch
from registry import EXACT_RTOL, linear_solvers, rel_err, spd_matrix, symmetric_matrix

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


A32 = spd_matrix(10, 10.0, dtype=torch.float32)


@pytest.mark.parametrize("name,solver", linear_solvers(lipschitz=float(torch.linalg.eigvalsh(A32).max())))
def test_float32(name, solver):
    b = torch.ones(10)
    x, info = solver(lambda v: A32 @ v, b)
    assert x.dtype == torch.float32
    assert rel_err(x, torch.linalg.solve(A32.double(), b.double())) <= 1e-4


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


@pytest.mark.parametrize("name,solver", linear_solvers(lipschitz=3.0))
def test_zero_right_hand_side(name, solver):
    A = spd_matrix(5, 3.0)
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
    # The indefinite one stops before the step along its negative direction. Its only
    # iterate, (bᵀb / bᵀAb) b = 0.8 b, has relative residual √5.6 / 2 ≈ 1.18: worse than
    # the initial guess 0, which CG returns as the best iterate met.
    assert float((b[1] - A[1] @ (0.8 * b[1])).norm() / b[1].norm()) == pytest.approx(5.6**0.5 / 2)
    assert torch.equal(x[1], torch.zeros(4, dtype=DT)) and info.residual == 1.0
    x_single, info = ig.CG(maxiter=50)(lambda v: A[1] @ v, b[1])
    assert info.status == "negative_curvature" and torch.equal(x_single, torch.zeros(4, dtype=DT))
    assert info.residual == 1.0 and "MINRES" in info.message


# --------------------------------------------------------------------------- CG on indefinite matrices

#: 4 negative eigenvalues in [−5, −1], 36 positive in [1, 55].
MIXED_EIGS = torch.cat([torch.linspace(-5.0, -1.0, 4, dtype=DT), torch.linspace(1.0, 55.0, 36, dtype=DT)])


def _raw_cg_residuals(A, b, maxiter):
    """Relative residuals of plain CG iterates, up to the first pᵀAp ≤ 0."""
    x, r = torch.zeros_like(b), b.clone()
    p, out = r.clone(), []
    for _ in range(maxiter):
        ap = A @ p
        pap = p @ ap
        if pap <= 0:
            break
        alpha = (r @ r) / pap
        x = x + alpha * p
        r_new = r - alpha * ap
        out.append(float((b - A @ x).norm() / b.norm()))
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return out


def test_cg_returns_its_best_iterate():
    A = symmetric_matrix(MIXED_EIGS, seed=0)
    b = torch.randn(40, dtype=DT, generator=torch.Generator().manual_seed(10))
    raw = _raw_cg_residuals(A, b, 60)
    # pᵀAp stays positive for four steps while the residual grows past that of x = 0.
    assert len(raw) == 4 and raw[-1] > 10 and min(raw) < 1
    x, info = ig.CG(maxiter=60)(lambda v: A @ v, b)
    assert info.status == "negative_curvature" and "MINRES" in info.message
    measured = float((b - A @ x).norm() / b.norm())
    assert info.residual == pytest.approx(measured, rel=1e-10)
    assert measured == pytest.approx(min(raw), rel=1e-10) and measured <= 1
    # Stopping after k iterations never gives a better solution than the full run.
    for k in range(1, 8):
        xk, ik = ig.CG(maxiter=k)(lambda v: A @ v, b)
        assert ik.residual == pytest.approx(float((b - A @ xk).norm() / b.norm()), rel=1e-10)
        assert measured <= ik.residual * (1 + 1e-12) and ik.residual <= 1


def test_cg_batch_returns_the_best_iterate_of_each_system():
    mats = torch.stack([symmetric_matrix(MIXED_EIGS, seed=s) for s in range(4)] + [spd_matrix(40, 30.0)])
    b = torch.randn(5, 40, dtype=DT, generator=torch.Generator().manual_seed(11))
    x, info = ig.CG(maxiter=60)(lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1), b, batch_ndim=1)
    assert info.status == "negative_curvature"
    for i in range(5):
        xi, ii = ig.CG(maxiter=60)(lambda v, i=i: mats[i] @ v, b[i])
        assert rel_err(x[i], xi) <= 1e-9
    raws = [_raw_cg_residuals(mats[i], b[i], 60) for i in range(4)]
    # In these indefinite systems the last iterate is never the best (one even jumps 400-fold).
    assert all(raw[-1] > 1.1 * min(raw) for raw in raws)
    for i, raw in enumerate(raws):
        res = float((b[i] - mats[i] @ x[i]).norm() / b[i].norm())
        assert res == pytest.approx(min(raw), rel=1e-10) and res <= 1
    assert rel_err(x[4], torch.linalg.solve(mats[4], b[4])) <= 1e-9  # the SPD system converges


def test_cg_stops_a_diverging_residual():
    """diag(1, −1) with b = (1, 1 − δ): pᵀAp ≈ 2δ > 0 but tiny, so the first step is
    huge and the residual jumps ~1000-fold; CG stops and returns x = 0."""
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=DT))
    b = torch.tensor([1.0, 1.0 - 1e-3, 0.0], dtype=DT)
    x, info = ig.CG()(lambda v: A @ v, b)
    assert info.status == "diverging" and not info.converged
    assert torch.equal(x, torch.zeros(3, dtype=DT)) and info.residual == 1.0
    assert "1e2" in info.message and "MINRES" in info.message and "1.00e+00" in info.message
    # In a batch only that system stops; an SPD neighbour converges.
    spd = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    mats, bs = torch.stack([A, spd]), torch.stack([b, torch.ones(3, dtype=DT)])
    x, info = ig.CG()(lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1), bs, batch_ndim=1)
    assert info.status == "diverging"
    assert torch.equal(x[0], torch.zeros(3, dtype=DT))
    assert rel_err(x[1], torch.linalg.solve(spd, bs[1])) <= 1e-12
    # MINRES solves the same system.
    x, info = ig.MINRES()(lambda v: A @ v, b)
    assert info.converged and rel_err(x, torch.linalg.solve(A, b)) <= 1e-12


def test_cg_never_flags_divergence_on_a_moderately_conditioned_spd_matrix():
    """On SPD A the residual exceeds its best by at most √κ = 100 here."""
    A = spd_matrix(60, 1e4, seed=12)
    for seed in range(5):
        b = torch.randn(60, dtype=DT, generator=torch.Generator().manual_seed(seed))
        _, info = ig.CG(maxiter=1000)(lambda v: A @ v, b)
        assert info.status == "converged", info


# --------------------------------------------------------------------------- reporting in the core


class _WorseThanZero(ig.LinearSolver):
    """Claims convergence but returns −2 b for A = I: relative residual 3."""

    def __init__(self, converged: bool = True) -> None:
        self.claims = converged

    def solve(self, matvec, b, *, x0=None, batch_ndim=0, spec=None):
        x = [-2.0 * t for t in b]
        r = [bi - ai for bi, ai in zip(b, matvec(x))]
        res = float(torch.cat([t.reshape(-1) for t in r]).norm() / torch.cat([t.reshape(-1) for t in b]).norm())
        status = "converged" if self.claims else "max_iterations"
        return x, ig.LinearSolveInfo(1, res, self.claims, status, "", "WorseThanZero")


def _identity_hessian_solve(theta, linear_solver, on_failure):
    return ig.implicit_solve(lambda x, t: 0.5 * ((x - t) ** 2).sum(), torch.zeros(3, dtype=DT), theta,
                             solver=lambda f, x0, t: t.detach().clone(), linear_solver=linear_solver,
                             on_failure=on_failure)


def test_solution_worse_than_zero_is_reported_whatever_the_status():
    theta = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.warns(ig.ImplicitGradWarning, match=r"worse than zero.*3\.000e\+00 > 1.*ig\.MINRES") as record:
        _identity_hessian_solve(theta, _WorseThanZero(), "warn").sum().backward()
    assert len([w for w in record if "linear solve" in str(w.message)]) == 1
    with pytest.raises(ig.ConvergenceError, match="worse than zero"):
        _identity_hessian_solve(theta, _WorseThanZero(), "raise").sum().backward()
    _identity_hessian_solve(theta, _WorseThanZero(), "ignore").sum().backward()
    # Not converged and worse than zero: one report naming both.
    with pytest.warns(ig.ImplicitGradWarning) as record:
        _identity_hessian_solve(theta, _WorseThanZero(converged=False), "warn").sum().backward()
    reports = [str(w.message) for w in record if "linear solve" in str(w.message)]
    assert len(reports) == 1 and re.search("did not converge and returned a solution worse than zero", reports[0])
