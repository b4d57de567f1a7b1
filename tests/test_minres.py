"""MINRES on symmetric indefinite and singular systems, alone and inside implicit solves."""

from __future__ import annotations

import re

import pytest
import torch
from registry import rel_err, spd_matrix, symmetric_matrix

import implicitgrad as ig

DT = torch.float64
#: Eigenvalues in [−5, 55]: 8 negative, 32 positive, none closer to 0 than 0.5 (κ = 110).
INDEFINITE_EIGS = torch.cat([torch.linspace(-5.0, -0.5, 8, dtype=DT), torch.linspace(0.5, 55.0, 32, dtype=DT)])


def rhs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed))


def true_rel_residual(A, x, b) -> float:
    return float((b - A @ x).norm() / b.norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_indefinite_against_dense_solve(seed):
    A = symmetric_matrix(INDEFINITE_EIGS, seed=seed)
    b = rhs(40, seed)
    x, info = ig.MINRES(maxiter=200)(lambda v: A @ v, b)
    assert info.status == "converged" and info.converged, info
    assert info.residual <= 1e-10
    assert true_rel_residual(A, x, b) == pytest.approx(info.residual, rel=1e-8)
    # κ = 110 bounds the relative error by κ times the relative residual.
    assert rel_err(x, torch.linalg.solve(A, b)) <= 110 * 1e-10
    # CG cannot solve it: it stops on negative curvature, far from the solution.
    _, cg = ig.CG(maxiter=200)(lambda v: A @ v, b)
    assert cg.status == "negative_curvature" and cg.residual > 1e-2


def test_damping_solves_the_shifted_system():
    A = symmetric_matrix(INDEFINITE_EIGS, seed=3)
    b = rhs(40)
    # A shift of 0.25 leaves A + 0.25 I indefinite (eigenvalues down to −4.75).
    x, info = ig.MINRES(maxiter=200, damping=0.25)(lambda v: A @ v, b)
    shifted = A + 0.25 * torch.eye(40, dtype=DT)
    assert info.converged, info
    assert rel_err(x, torch.linalg.solve(shifted, b)) <= 1e-8
    assert true_rel_residual(shifted, x, b) <= 1e-10


def test_spd_diagonal_preconditioner_reports_the_true_residual():
    # A badly scaled indefinite matrix D^½ S D^½, D spanning 1..1e4: the inverse of |diag A|
    # is an SPD preconditioner that undoes the scaling.
    S = symmetric_matrix(INDEFINITE_EIGS, seed=4)
    scaling = torch.logspace(0, 4, 40, dtype=DT).sqrt()
    A = scaling[:, None] * S * scaling[None, :]
    b = rhs(40)
    diag = A.diagonal().abs()
    seen = []

    def jacobi(r):
        seen.append(type(r))
        return r / diag

    x, info = ig.MINRES(maxiter=400, preconditioner=jacobi)(lambda v: A @ v, b)
    assert seen and all(t is torch.Tensor for t in seen)  # the pytree shaped like b
    assert info.converged, info
    assert rel_err(x, torch.linalg.solve(A, b)) <= 1e-6
    # The reported residual is measured, ‖b − A x‖ / ‖b‖, not the M-norm estimate.
    assert info.residual == pytest.approx(true_rel_residual(A, x, b), rel=1e-6)
    _, plain = ig.MINRES(maxiter=400)(lambda v: A @ v, b)
    assert info.iterations < plain.iterations


def test_pytree_with_coupled_blocks():
    A = symmetric_matrix(INDEFINITE_EIGS[::4], seed=5)  # 10 unknowns: 2 negative eigenvalues

    def matvec(v):
        out = A @ torch.cat([v["a"], v["b"].reshape(-1)])
        return {"a": out[:2], "b": out[2:].reshape(2, 4)}

    b = {"a": torch.ones(2, dtype=DT), "b": torch.arange(8, dtype=DT).reshape(2, 4)}
    received = []

    def precond(r):
        received.append(sorted(r))
        return {"a": 0.5 * r["a"], "b": 0.5 * r["b"]}

    for solver in (ig.MINRES(), ig.MINRES(preconditioner=precond)):
        x, info = solver(matvec, b)
        assert info.converged, info
        ref = torch.linalg.solve(A, torch.cat([b["a"], b["b"].reshape(-1)]))
        assert rel_err(torch.cat([x["a"], x["b"].reshape(-1)]), ref) <= 1e-9
    assert received and all(keys == ["a", "b"] for keys in received)


def test_batch_stops_each_system_on_its_own():
    """An easy system freezes when it converges: the batch gives the one-by-one solutions."""
    mats = torch.stack([
        symmetric_matrix(torch.cat([torch.linspace(-2, -1, 5), torch.linspace(1, 3, 25)]), seed=0),
        symmetric_matrix(torch.cat([torch.linspace(-5, -0.02, 10), torch.linspace(0.02, 55, 20)]), seed=1),
        symmetric_matrix(torch.linspace(1, 2, 30), seed=2),
    ])
    b = torch.randn(3, 30, dtype=DT, generator=torch.Generator().manual_seed(3))

    def batched(v):
        return (mats @ v.unsqueeze(-1)).squeeze(-1)

    # A loose tol: iterating further would still move the easy solutions measurably.
    solver = ig.MINRES(maxiter=500, tol=1e-6)
    x, info = solver(batched, b, batch_ndim=1)
    assert info.converged, info
    singles = [solver(lambda v, i=i: mats[i] @ v, b[i]) for i in range(3)]
    counts = [s[1].iterations for s in singles]
    assert counts[2] < counts[0] < counts[1]
    # The batch runs as long as its hardest system (up to rounding in that system).
    assert abs(info.iterations - counts[1]) <= 2
    for i in (0, 2):
        assert rel_err(x[i], singles[i][0]) <= 1e-12
        # Not frozen, the easy system would have gone on to a different iterate.
        longer, _ = ig.MINRES(maxiter=counts[1], tol=1e-300)(lambda v, i=i: mats[i] @ v, b[i])
        assert rel_err(longer, singles[i][0]) > 1e-9
    # The hard system (eigenvalues down to ±0.02, κ = 2750) is rounding-sensitive.
    assert rel_err(x[1], singles[1][0]) <= 1e-6
    for i in range(3):
        assert true_rel_residual(mats[i], x[i], b[i]) <= 1e-6 * 1.01


def test_batch_with_a_broken_down_system_leaks_no_nan():
    """Lanczos breaks down exactly (β = 0) on a matrix with two eigenvalues: that system is
    solved and frozen while the other goes on, for any check interval."""
    two_eigs = torch.diag(torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0, -2.0], dtype=DT))
    other = symmetric_matrix(torch.tensor([-5.0, -1.0, 1.0, 7.0, 20.0, 55.0]), seed=6)
    mats = torch.stack([two_eigs, other])
    b = torch.stack([torch.ones(6, dtype=DT), torch.arange(6, dtype=DT)])
    for check_every in (1, 7):
        x, info = ig.MINRES(maxiter=50, check_every=check_every)(
            lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1), b, batch_ndim=1
        )
        assert bool(torch.isfinite(x).all()) and info.converged, info
        assert rel_err(x, torch.linalg.solve(mats, b)) <= 1e-12
    x, info = ig.MINRES()(lambda v: two_eigs @ v, b[0])
    # Two Lanczos steps and the measurement of the residual.
    assert info.iterations == 3 and rel_err(x, torch.linalg.solve(two_eigs, b[0])) <= 1e-14


def test_singular_consistent_system_gives_the_minimum_norm_solution():
    eigs = INDEFINITE_EIGS.clone()
    eigs[[3, 20, 30]] = 0.0  # a 3-dimensional null space
    A = symmetric_matrix(eigs, seed=7)
    b = A @ rhs(40)  # in the range of A
    x, info = ig.MINRES(maxiter=300)(lambda v: A @ v, b)
    assert info.converged, info
    assert true_rel_residual(A, x, b) <= 1e-9
    # From x0 = 0 the Krylov space lies in range(A): the minimum-norm solution.
    ref = torch.linalg.lstsq(A, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    assert rel_err(x, ref) <= 1e-8


def test_initial_guess_and_check_interval():
    A = symmetric_matrix(INDEFINITE_EIGS, seed=8)
    b = rhs(40)
    ref = torch.linalg.solve(A, b)
    x1, i1 = ig.MINRES(maxiter=300, check_every=1)(lambda v: A @ v, b)
    x5, i5 = ig.MINRES(maxiter=300, check_every=5)(lambda v: A @ v, b)
    # Lanczos steps stop at a check; one more product measures the residual.
    assert (i5.iterations - 1) % 5 == 0 and i5.iterations >= i1.iterations
    assert rel_err(x5, ref) <= 1e-8 and rel_err(x1, ref) <= 1e-8
    warm, iw = ig.MINRES(maxiter=300)(lambda v: A @ v, b, init=ref + 1e-6 * rhs(40, 9))
    assert iw.converged and iw.iterations < i1.iterations and rel_err(warm, ref) <= 1e-8


def test_zero_right_hand_side_and_float32():
    A = symmetric_matrix(INDEFINITE_EIGS, seed=9)
    x, info = ig.MINRES()(lambda v: A @ v, torch.zeros(40, dtype=DT))
    assert info.converged and info.iterations == 0 and float(x.abs().max()) == 0.0
    A32, b32 = A.float(), rhs(40).float()
    x, info = ig.MINRES(maxiter=300)(lambda v: A32 @ v, b32)
    assert info.converged and x.dtype == torch.float32
    assert rel_err(x, torch.linalg.solve(A, b32.double())) <= 1e-3


def test_max_iterations_names_the_measured_residual_and_the_fix():
    A = symmetric_matrix(INDEFINITE_EIGS, seed=10)
    b = rhs(40)
    x, info = ig.MINRES(maxiter=5)(lambda v: A @ v, b)
    assert info.status == "max_iterations" and not info.converged and info.iterations == 6
    assert info.residual == pytest.approx(true_rel_residual(A, x, b), rel=1e-8)
    assert f"relative residual {info.residual:.2e}" in info.message
    assert re.search("maxiter.*preconditioner", info.message)
    # The residual never increases: more iterations never give a worse solution.
    residuals = [ig.MINRES(maxiter=k)(lambda v: A @ v, b)[1].residual for k in range(1, 30)]
    assert all(b_ <= a + 1e-15 for a, b_ in zip(residuals, residuals[1:])) and residuals[0] < 1


def test_nonfinite_and_preconditioner_not_spd():
    A = symmetric_matrix(INDEFINITE_EIGS, seed=11)
    b = rhs(40)
    _, info = ig.MINRES()(lambda v: A @ v * float("nan"), b)
    assert info.status == "nonfinite" and "NaN/Inf" in info.message
    _, info = ig.MINRES()(lambda v: A @ v, b * float("inf"))
    assert info.status == "nonfinite"
    x, info = ig.MINRES(preconditioner=lambda r: -r)(lambda v: A @ v, b)
    assert info.status == "preconditioner_not_spd" and float(x.abs().max()) == 0.0
    assert "positive definite" in info.message
    # Mixed signs: rᵀ M r turns negative mid-solve; x stays the last valid iterate.
    signs = torch.ones(40, dtype=DT)
    signs[:20] = -1.0
    x, info = ig.MINRES(preconditioner=lambda r: signs * r)(lambda v: A @ v, b)
    assert info.status == "preconditioner_not_spd" and bool(torch.isfinite(x).all())
    assert info.residual == pytest.approx(true_rel_residual(A, x, b), rel=1e-8)


def test_inconsistent_singular_system_is_a_breakdown_not_a_convergence():
    A = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=DT))
    # b in the null space: Lanczos ends at once (γ = 0); x stays 0.
    x, info = ig.MINRES()(lambda v: A @ v, torch.tensor([0.0, 1.0, 0.0], dtype=DT))
    assert info.status == "breakdown" and info.residual == 1.0 and torch.equal(x, torch.zeros(3, dtype=DT))
    assert "singular" in info.message and "damping" in info.message
    # b partly outside the range: the recurrence estimate falls below tol while x runs off
    # along the null space. The measured residual exposes it, and as it is above that of
    # the initial guess, MINRES keeps x = 0.
    b = torch.ones(3, dtype=DT)
    x, info = ig.MINRES()(lambda v: A @ v, b)
    assert info.status == "breakdown" and not info.converged
    assert info.residual == 1.0 and torch.equal(x, torch.zeros(3, dtype=DT))
    # Damping makes it a regular system.
    x, info = ig.MINRES(damping=1e-3)(lambda v: A @ v, b)
    assert info.converged and rel_err(x, torch.linalg.solve(A + 1e-3 * torch.eye(3, dtype=DT), b)) <= 1e-12


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"maxiter": 0}, ValueError, "maxiter"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"damping": -0.1}, ValueError, "damping"),
        ({"preconditioner": "jacobi"}, TypeError, "preconditioner"),
        ({"check_every": 0}, ValueError, "check_every"),
    ],
)
def test_argument_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        ig.MINRES(**kwargs)


# --------------------------------------------------------------------------- inside solves

A_ROOT = symmetric_matrix(INDEFINITE_EIGS[::4], seed=12)  # 10 unknowns, eigenvalues of both signs
A_INV = torch.linalg.inv(A_ROOT)
C = torch.linspace(-1.0, 1.0, 10, dtype=DT)


def linear_root(theta, linear_solver=None, **kwargs):
    """x*(θ) = A⁻¹θ, the root of F(x, θ) = A x − θ with A symmetric indefinite."""
    return ig.root_solve(
        lambda x, t: A_ROOT @ x - t, torch.zeros(10, dtype=DT), theta,
        solver=lambda F, x0, t: torch.linalg.solve(A_ROOT, t),
        linear_solver=linear_solver or ig.MINRES(), on_failure="raise", **kwargs,
    )


def outer_loss(x):
    return 0.5 * (x**2).sum() + C @ x


def test_root_solve_backward_matches_closed_form():
    theta = rhs(10, 13).requires_grad_(True)
    x, info = linear_root(theta, return_info=True)
    g, = torch.autograd.grad(outer_loss(x), theta)
    # dL/dθ = A⁻ᵀ (x* + c) with A symmetric.
    assert rel_err(g, A_INV @ (A_INV @ theta.detach() + C)) <= 1e-9
    assert info.backward.solver == "MINRES" and info.backward.converged
    # CG meets the negative curvature and, asked to raise, raises.
    with pytest.raises(ig.ConvergenceError, match="negative_curvature"):
        torch.autograd.grad(outer_loss(linear_root(theta, ig.CG())), theta)


def test_root_solve_jvp_vmap_and_double_backward():
    theta = rhs(10, 14)
    tangent = rhs(10, 15)
    x, x_dot = torch.func.jvp(linear_root, (theta,), (tangent,))
    assert rel_err(x, A_INV @ theta) <= 1e-12
    assert rel_err(x_dot, A_INV @ tangent) <= 1e-9

    thetas = torch.stack([rhs(10, s) for s in range(20, 24)])
    grads = torch.func.vmap(torch.func.grad(lambda t: outer_loss(linear_root(t))))(thetas)
    ref = (A_INV @ (A_INV @ thetas.T + C[:, None])).T
    assert rel_err(grads, ref) <= 1e-9

    th = theta.clone().requires_grad_(True)
    g, = torch.autograd.grad(outer_loss(linear_root(th)), th, create_graph=True)
    hvp, = torch.autograd.grad(g @ tangent, th)
    # d²L/dθ² = A⁻ᵀ A⁻¹ = A⁻².
    assert rel_err(hvp, A_INV @ A_INV @ tangent) <= 1e-8


def test_implicit_solve_on_a_convex_quadratic():
    H = spd_matrix(8, 50.0, seed=16)

    def objective(x, theta):
        return 0.5 * x @ H @ x - theta @ x + 0.5 * (theta**2).sum() * x.sum()

    def closed_form(F, x0, theta):
        return torch.linalg.solve(H, theta - 0.5 * (theta**2).sum())

    theta = rhs(8, 17).requires_grad_(True)
    x, info = ig.implicit_solve(objective, torch.zeros(8, dtype=DT), theta, solver=closed_form,
                                linear_solver=ig.MINRES(), on_failure="raise", return_info=True)
    g, = torch.autograd.grad((x**3).sum(), theta)
    theta_ref = theta.detach().clone().requires_grad_(True)
    g_ref, = torch.autograd.grad((closed_form(None, None, theta_ref) ** 3).sum(), theta_ref)
    assert rel_err(g, g_ref) <= 1e-9
    assert info.backward.solver == "MINRES" and info.backward.converged
