"""Krylov solvers for non-symmetric systems (GMRES, BiCGStab, CGNR): accuracy against dense
solves, product budgets, per-system convergence in batches, breakdowns and NaN, and the
three inside implicit solves under backward, double backward, jvp and vmap (float64)."""

from __future__ import annotations

import pytest
import torch
from registry import linear_solvers, rel_err

import implicitgrad as ig

DT = torch.float64
NONSYMMETRIC = [(name, solver) for name, solver in linear_solvers(symmetric=False) if name != "Exact"]
#: With CG on the normal equations, whose rate is set by κ(A)² (a larger budget).
WITH_CGNR = NONSYMMETRIC + [("CGNR", ig.CGNR(maxiter=4000))]


def nonsymmetric_matrix(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """``U diag(σ) Vᵀ`` with singular values log-spaced in ``[1, cond]`` and a positive
    definite symmetric part (``U``, ``V`` close: a rotation of a few degrees apart), so
    both solvers converge; non-symmetric by construction."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    skew = torch.randn(n, n, generator=g, dtype=DT)
    rotation = torch.linalg.matrix_exp(0.05 * (skew - skew.T))
    sigma = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    return u @ torch.diag(sigma) @ (rotation @ u).T


def batched(mats: torch.Tensor):
    return lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1)


def measured(A, x, b) -> torch.Tensor:
    """Relative residual per system, ‖b − A x‖ / ‖b‖."""
    return (b - batched(A)(x)).norm(dim=-1) / b.norm(dim=-1)


class Counted:
    """A matvec that counts its calls."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A, self.calls = A, 0

    def __call__(self, v):
        self.calls += 1
        return batched(self.A)(v)


# --------------------------------------------------------------------------- alone


@pytest.mark.parametrize("name,solver", WITH_CGNR)
@pytest.mark.parametrize("seed", [0, 1])
def test_against_dense_solve(name, solver, seed):
    A = nonsymmetric_matrix(40, 50.0, seed)
    assert rel_err(A, A.T) > 0.05
    b = torch.randn(40, dtype=DT, generator=torch.Generator().manual_seed(seed + 10))
    x, info = solver(lambda v: A @ v, b)
    assert info.status == "converged", info
    assert info.residual <= 1e-10
    assert info.residual == pytest.approx(float(measured(A, x, b)), rel=1e-6)
    # κ = 50 bounds the relative error by 50 × the relative residual.
    assert rel_err(x, torch.linalg.solve(A, b)) <= 50 * 1e-10


@pytest.mark.parametrize("name,solver", NONSYMMETRIC)
def test_products_are_counted_and_bounded_by_maxiter(name, solver):
    """Every product counts, the restart residuals of GMRES and the final measurement included."""
    A = nonsymmetric_matrix(60, 1e3, seed=2)
    b = torch.ones(60, dtype=DT)
    for maxiter in (1, 2, 7, 23):
        small = type(solver)(maxiter=maxiter, **({"restart": 5} if name == "GMRES" else {}))
        op = Counted(A)
        x, info = small(op, b)
        assert info.iterations == op.calls <= maxiter
        assert info.status == "max_iterations"
        # The residual reported is that of the returned x.
        assert info.residual == pytest.approx(float(measured(A, x, b)), rel=1e-8)
    op = Counted(A)
    _, info = type(solver)(maxiter=5000, **({"restart": 5} if name == "GMRES" else {}))(op, b)
    assert info.converged and info.iterations == op.calls


def test_gmres_budget_and_cycles():
    """GMRES(5), maxiter 23: cycles of 5 + 1, 5 + 1, 5 + 1 products, then 4 + 1."""
    A = nonsymmetric_matrix(60, 1e3, seed=2)
    op = Counted(A)
    seen = []

    def logged(v):
        seen.append(v.clone())
        return op(v)

    _, info = ig.GMRES(maxiter=23, restart=5)(logged, torch.ones(60, dtype=DT))
    assert op.calls == info.iterations == 23
    # The product after each cycle is A x (its input is the iterate, not a unit basis vector).
    norms = [float(v.norm()) for v in seen]
    units = [i for i, n in enumerate(norms) if n == pytest.approx(1.0, rel=1e-12)]
    assert [i for i in range(23) if i not in units] == [5, 11, 17, 22]
    # With an initial guess, its residual is one more product.
    op.calls = 0
    _, info = ig.GMRES(maxiter=23, restart=5)(op, torch.ones(60, dtype=DT), init=torch.ones(60, dtype=DT))
    assert op.calls == info.iterations == 23


def test_gmres_matches_the_minimal_residual_of_the_krylov_space():
    """One cycle of k steps returns argmin ‖b − A x‖ over span(b, Ab, ..., A^{k−1} b)."""
    A = nonsymmetric_matrix(30, 1e2, seed=3)
    b = torch.randn(30, dtype=DT, generator=torch.Generator().manual_seed(4))
    for k in (1, 2, 5):
        x, info = ig.GMRES(maxiter=k + 1, restart=k, tol=1e-300)(lambda v: A @ v, b)
        powers = torch.stack([torch.linalg.matrix_power(A, i) @ b for i in range(k)], dim=1)
        krylov = torch.linalg.qr(powers).Q
        coef = torch.linalg.lstsq(A @ krylov, b.unsqueeze(1)).solution.squeeze(1)
        best = float((b - A @ krylov @ coef).norm() / b.norm())
        assert info.iterations == k + 1
        assert info.residual == pytest.approx(best, rel=1e-8)
        assert rel_err(x, krylov @ coef) <= 1e-8


@pytest.mark.parametrize("check_every", [1, 4])
def test_gmres_check_interval_keeps_the_solution(check_every):
    A = nonsymmetric_matrix(50, 1e2, seed=5)
    b = torch.randn(50, dtype=DT, generator=torch.Generator().manual_seed(5))
    x, info = ig.GMRES(maxiter=200, restart=30, check_every=check_every)(lambda v: A @ v, b)
    assert info.converged and rel_err(x, torch.linalg.solve(A, b)) <= 1e-8


@pytest.mark.parametrize("name,solver", WITH_CGNR)
def test_pytree_leaves_and_two_batch_dimensions(name, solver):
    """b = {"a": (2, 3, 4), "b": (2, 3, 2, 3)} with batch_ndim = 2: six coupled 10×10 systems."""
    mats = torch.stack([nonsymmetric_matrix(10, 20.0, seed=s) for s in range(6)]).reshape(2, 3, 10, 10)

    def matvec(v):
        flat = torch.cat([v["a"], v["b"].reshape(2, 3, 6)], dim=-1)
        out = (mats @ flat.unsqueeze(-1)).squeeze(-1)
        return {"a": out[..., :4], "b": out[..., 4:].reshape(2, 3, 2, 3)}

    g = torch.Generator().manual_seed(6)
    b = {"a": torch.randn(2, 3, 4, generator=g, dtype=DT), "b": torch.randn(2, 3, 2, 3, generator=g, dtype=DT)}
    x, info = solver(matvec, b, batch_ndim=2)
    assert info.converged, info
    flat_b = torch.cat([b["a"], b["b"].reshape(2, 3, 6)], dim=-1)
    flat_x = torch.cat([x["a"], x["b"].reshape(2, 3, 6)], dim=-1)
    assert rel_err(flat_x, torch.linalg.solve(mats, flat_b)) <= 1e-9


@pytest.mark.parametrize("name,solver", NONSYMMETRIC)
def test_batch_with_a_much_harder_system(name, solver):
    """Each system meets its own tolerance ‖r_i‖ ≤ tol ‖b_i‖, whatever the others do: the
    hard system (condition number 100× larger) has a right-hand side 1e10 times smaller
    than the easy ones, so a tolerance on the batch norm would accept it unsolved."""
    easy = [nonsymmetric_matrix(30, 10.0, seed=s) for s in range(3)]
    hard = nonsymmetric_matrix(30, 1e3, seed=9)
    mats = torch.stack(easy + [hard])
    b = torch.randn(4, 30, dtype=DT, generator=torch.Generator().manual_seed(7))
    b[3] *= 1e-10
    tol = 1e-9
    # x = 0 would meet a tolerance on the batch norm for the hard system.
    assert float(b[3].norm()) <= tol * float(b.norm())
    big = type(solver)(maxiter=2000, tol=tol, **({"restart": 40} if name == "GMRES" else {}))
    x, info = big(batched(mats), b, batch_ndim=1)
    assert info.converged, info
    per_system = measured(mats, x, b)
    assert bool((per_system <= tol).all()), per_system
    assert info.residual == pytest.approx(float(per_system.max()), rel=1e-6)
    # Each system's solution is its one-by-one solution (it stops at its own step).
    for i in range(4):
        xi, ii = big(lambda v, i=i: mats[i] @ v, b[i])
        assert ii.converged and rel_err(x[i], xi) <= 1e-6
    # The hard system cannot be hidden: too small a budget fails the batch.
    _, short = type(solver)(maxiter=60, tol=tol)(batched(mats), b, batch_ndim=1)
    assert short.status == "max_iterations" and short.residual > tol


def test_gmres_frozen_systems_keep_their_solution():
    """A system solved in an early cycle is not restarted: later cycles leave it unchanged."""
    mats = torch.stack([torch.eye(20, dtype=DT) * 2, nonsymmetric_matrix(20, 1e2, seed=11)])
    b = torch.randn(2, 20, dtype=DT, generator=torch.Generator().manual_seed(8))
    first, _ = ig.GMRES(maxiter=6, restart=5)(batched(mats), b, batch_ndim=1)
    assert rel_err(first[0], b[0] / 2) <= 1e-15
    x, info = ig.GMRES(maxiter=400, restart=5)(batched(mats), b, batch_ndim=1)
    assert info.converged and info.iterations > 12
    assert torch.equal(x[0], first[0])


# --------------------------------------------------------------------------- statuses


def test_lucky_breakdown_is_convergence():
    """A matrix with two eigenvalues: the Krylov space is invariant after two steps."""
    A = torch.diag(torch.tensor([2.0] * 5 + [-3.0] * 5, dtype=DT))
    b = torch.arange(1.0, 11.0, dtype=DT)
    x, info = ig.GMRES()(lambda v: A @ v, b)
    assert info.status == "converged" and info.iterations == 3  # two steps and the measurement
    assert rel_err(x, b / A.diagonal()) <= 1e-14
    x, info = ig.GMRES()(lambda v: 4.0 * v, b)
    assert info.status == "converged" and info.iterations == 2
    assert rel_err(x, b / 4) <= 1e-15


def test_gmres_breakdown_on_a_singular_matrix():
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    b = torch.ones(3, dtype=DT)
    x, info = ig.GMRES()(lambda v: A @ v, b)
    assert info.status == "breakdown" and not info.converged
    assert "singular" in info.message and "Exact" in info.message
    assert bool(torch.isfinite(x).all())
    # The least-squares residual is the best any x can do: 1/√3.
    assert info.residual == pytest.approx(3**-0.5, rel=1e-10)
    assert info.iterations < 100


def test_bicgstab_breakdown_names_gmres():
    """A rotation by 90°: ⟨r̂₀, A r₀⟩ = 0 at once; GMRES solves it."""
    A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=DT)
    b = torch.tensor([1.0, 0.0], dtype=DT)
    x, info = ig.BiCGStab()(lambda v: A @ v, b)
    assert info.status == "breakdown" and not info.converged
    assert "GMRES" in info.message and "ρ" in info.message and "ω" in info.message
    assert bool(torch.isfinite(x).all())
    x, info = ig.GMRES()(lambda v: A @ v, b)
    assert info.converged and rel_err(x, torch.linalg.solve(A, b)) <= 1e-14
    # In a batch only that system stops.
    mats = torch.stack([A, torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=DT)])
    bs = torch.stack([b, torch.ones(2, dtype=DT)])
    x, info = ig.BiCGStab()(batched(mats), bs, batch_ndim=1)
    assert info.status == "breakdown"
    assert rel_err(x[1], torch.linalg.solve(mats[1], bs[1])) <= 1e-12


@pytest.mark.parametrize("name,solver", WITH_CGNR)
def test_nonfinite_data_gives_nan_not_a_finite_number(name, solver):
    A = nonsymmetric_matrix(8, 5.0, seed=12)
    b = torch.ones(8, dtype=DT)
    b_nan = b.clone()
    b_nan[3] = float("nan")
    for matvec, rhs in ((lambda v: A @ v, b_nan), (lambda v: A @ v * float("inf"), b)):
        x, info = solver(matvec, rhs)
        assert info.status == "nonfinite" and not info.converged
        assert bool(torch.isnan(x).all())
    # In a batch, the system whose products are NaN gets NaN; the other is solved.
    mats = torch.stack([A, A.clone()])
    mats[1, 2, 5] = float("nan")
    x, info = solver(batched(mats), torch.ones(2, 8, dtype=DT), batch_ndim=1)
    assert info.status == "nonfinite"
    assert bool(torch.isnan(x[1]).all())
    assert rel_err(x[0], torch.linalg.solve(A, b)) <= 1e-9


def test_bicgstab_preconditioner_receives_pytrees_and_cuts_products():
    scaling = torch.logspace(0, 3, 30, dtype=DT)
    A = nonsymmetric_matrix(30, 5.0, seed=13) * scaling[None, :]
    b = torch.randn(30, dtype=DT, generator=torch.Generator().manual_seed(13))
    seen = []

    def jacobi(r):
        seen.append(sorted(r))
        return {"v": r["v"] / A.diagonal()}

    x, info = ig.BiCGStab(maxiter=400, preconditioner=jacobi)(lambda v: {"v": A @ v["v"]}, {"v": b})
    assert info.converged and seen and all(keys == ["v"] for keys in seen)
    assert rel_err(x["v"], torch.linalg.solve(A, b)) <= 1e-8
    _, plain = ig.BiCGStab(maxiter=400)(lambda v: A @ v, b)
    assert info.iterations < plain.iterations


def test_bicgstab_rejects_a_preconditioner_that_is_not_callable():
    with pytest.raises(TypeError, match="preconditioner"):
        ig.BiCGStab(preconditioner="jacobi")


# --------------------------------------------------------------------------- CG on the normal equations


def near_orthogonal(n: int, seed: int) -> torch.Tensor:
    """``Q diag(σ)`` with ``Q`` a random orthogonal matrix and σ in [1, 1.5]: eigenvalues
    spread around the origin, singular values clustered (κ(A)² = 2.25)."""
    q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT)).Q
    return q * torch.linspace(1.0, 1.5, n, dtype=DT)[None, :]


class CountedTranspose(Counted):
    def __call__(self, u):
        self.calls += 1
        return batched(self.A.mT)(u)


def test_cgnr_converges_where_gmres_and_bicgstab_do_not():
    """CG on AᵀA depends on the singular values only: clustered here, so a few dozen
    products suffice, where the eigenvalues around the origin stall GMRES(20) and BiCGStab."""
    A = near_orthogonal(80, seed=40)
    b = torch.randn(80, dtype=DT, generator=torch.Generator().manual_seed(41))
    x, info = ig.CGNR(maxiter=200)(lambda v: A @ v, b, rmatvec=lambda u: A.T @ u)
    assert info.status == "converged" and info.iterations <= 80, info
    assert info.residual == pytest.approx(float(measured(A, x, b)), rel=1e-6)
    assert rel_err(x, torch.linalg.solve(A, b)) <= 1.5 * 1e-10
    for other in (ig.GMRES(maxiter=info.iterations * 5), ig.BiCGStab(maxiter=info.iterations * 5)):
        assert not other(lambda v: A @ v, b)[1].converged


def test_cgnr_transpose_from_rmatvec_or_from_autograd():
    A = nonsymmetric_matrix(20, 10.0, seed=42)
    b = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(42))
    op, op_t = Counted(A), CountedTranspose(A)
    x, info = ig.CGNR(maxiter=500).solve(op, b, rmatvec=op_t)
    assert info.converged and op_t.calls > 0
    # One product with Aᵀ first, then one with A and one with Aᵀ per iteration, and the
    # final measured residual: all counted, all within maxiter.
    assert info.iterations == op.calls + op_t.calls and op.calls == op_t.calls
    # Without rmatvec, Aᵀ u is the vector-Jacobian product of the (linear) matvec.
    y, auto = ig.CGNR(maxiter=500)(lambda v: A @ v, b)
    assert auto.converged and rel_err(y, x) <= 1e-10
    assert rel_err(x, torch.linalg.solve(A, b)) <= 1e-9
    # A matvec autograd cannot see through needs rmatvec, and the error says so.
    with pytest.raises(TypeError, match="rmatvec"):
        ig.CGNR()(lambda v: torch.from_numpy(A.numpy() @ v.detach().numpy()), b)
    with pytest.raises(TypeError, match="rmatvec"):
        ig.CGNR()(lambda v: A @ v, b, rmatvec="A.T")


def test_cgnr_inside_a_product_does_not_take_the_outer_transpose():
    """A CGNR solve run by a product of another CGNR solve derives its own Aᵀ."""
    A = nonsymmetric_matrix(12, 5.0, seed=43)
    B = nonsymmetric_matrix(7, 5.0, seed=44)
    inner = []

    def matvec(v):
        y, _ = ig.CGNR(maxiter=200)(lambda u: B @ u, torch.ones(7, dtype=DT))
        inner.append(rel_err(y, torch.linalg.solve(B, torch.ones(7, dtype=DT))))
        return A @ v

    b = torch.ones(12, dtype=DT)
    x, info = ig.CGNR(maxiter=200)(matvec, b, rmatvec=lambda u: A.T @ u)
    assert info.converged and rel_err(x, torch.linalg.solve(A, b)) <= 1e-9
    assert inner and max(inner) <= 1e-9


def test_cgnr_budget_counts_both_products():
    A = nonsymmetric_matrix(60, 1e3, seed=2)
    b = torch.ones(60, dtype=DT)
    for maxiter in (1, 2, 3, 4, 9, 24):
        op, op_t = Counted(A), CountedTranspose(A)
        x, info = ig.CGNR(maxiter=maxiter)(op, b, rmatvec=op_t)
        assert info.iterations == op.calls + op_t.calls <= maxiter
        assert info.status == "max_iterations"
        assert info.residual == pytest.approx(float(measured(A, x, b)), rel=1e-8)


def test_cgnr_batch_with_a_much_harder_system():
    """Each system stops on its own ‖r_i‖ ≤ tol ‖b_i‖: the hard one (κ 10× larger, data
    1e10 times smaller) is solved, and the easy ones end as they do alone."""
    mats = torch.stack([nonsymmetric_matrix(100, 2.0, seed=s) for s in range(3)]
                       + [nonsymmetric_matrix(100, 30.0, seed=9)])
    b = torch.randn(4, 100, dtype=DT, generator=torch.Generator().manual_seed(7))
    b[3] *= 1e-10
    tol = 1e-9
    solver = ig.CGNR(maxiter=3000, tol=tol)
    x, info = solver(batched(mats), b, batch_ndim=1, rmatvec=batched(mats.mT))
    assert info.converged, info
    per_system = measured(mats, x, b)
    assert bool((per_system <= tol).all()), per_system
    for i in range(4):
        xi, ii = solver(lambda v, i=i: mats[i] @ v, b[i], rmatvec=lambda u, i=i: mats[i].T @ u)
        assert ii.converged and rel_err(x[i], xi) <= 1e-6
    alone = [solver(lambda v, i=i: mats[i] @ v, b[i])[1].iterations for i in range(4)]
    assert alone[3] > 2 * max(alone[:3])


def test_cgnr_breakdown_gives_the_least_squares_solution():
    """A singular, b outside its range: Aᵀ r vanishes with r ≠ 0."""
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    x, info = ig.CGNR()(lambda v: A @ v, torch.ones(3, dtype=DT))
    assert info.status == "breakdown" and not info.converged
    assert rel_err(x, torch.tensor([1.0, 0.5, 0.0], dtype=DT)) <= 1e-12
    assert info.residual == pytest.approx(3**-0.5, rel=1e-10)


def test_cgnr_in_root_solve_uses_the_conditions_other_product():
    """Inside root_solve the solver receives (∂ₓF) as the transpose of the backward's
    (∂ₓF)ᵀ: no autograd graph of the matvec is needed, and the gradient is exact."""
    theta = torch.tensor([0.3, -0.5, 0.8], dtype=DT, requires_grad=True)
    x, info = ig.root_solve(root_residual, torch.zeros(6, dtype=DT), theta, solver=newton,
                            linear_solver=ig.CGNR(maxiter=400), return_info=True)
    (g,) = torch.autograd.grad(outer(x), theta)
    assert info.backward.solver == "CGNR" and info.backward.converged
    assert rel_err(g, torch.func.grad(unrolled_loss)(theta.detach())) <= 1e-8


# --------------------------------------------------------------------------- inside implicit solves

G = torch.Generator().manual_seed(20)
A_ROOT = nonsymmetric_matrix(6, 8.0, seed=21)
C_ROOT = torch.randn(6, 3, generator=G, dtype=DT)
WEIGHTS = torch.arange(1.0, 7.0, dtype=DT)


def root_residual(x, theta):
    return A_ROOT @ x + 0.3 * torch.tanh(x) - C_ROOT @ theta


def newton(F, x0, theta):
    x = x0
    for _ in range(30):
        J = torch.func.jacfwd(F)(x, theta)
        x = x - torch.linalg.solve(J, F(x, theta))
    return x


def outer(x):
    return (WEIGHTS * x**3).sum()


def implicit_loss(theta, linear_solver):
    x = ig.root_solve(root_residual, torch.zeros(6, dtype=DT), theta, solver=newton, linear_solver=linear_solver)
    return outer(x)


def unrolled_loss(theta):
    """The reference: differentiate through Newton's iterations themselves."""
    return outer(newton(root_residual, torch.zeros(6, dtype=DT), theta))


@pytest.mark.parametrize("name,solver", WITH_CGNR)
def test_root_solve_gradient_hessian_and_jvp(name, solver):
    theta = torch.tensor([0.3, -0.5, 0.8], dtype=DT)
    g = torch.func.grad(implicit_loss)(theta, solver)
    assert rel_err(g, torch.func.grad(unrolled_loss)(theta)) <= 1e-8
    # Double backward (create_graph) and torch.func.hessian.
    t = theta.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(implicit_loss(t, solver), t, create_graph=True)
    rows = torch.stack([torch.autograd.grad(g1[i], t, retain_graph=True)[0] for i in range(3)])
    H_ref = torch.autograd.functional.hessian(unrolled_loss, theta)
    assert rel_err(rows, H_ref) <= 1e-7
    assert rel_err(torch.func.hessian(implicit_loss)(theta, solver), H_ref) <= 1e-7
    # Forward mode.
    direction = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    _, dot = torch.func.jvp(lambda th: implicit_loss(th, solver), (theta,), (direction,))
    _, dot_ref = torch.func.jvp(unrolled_loss, (theta,), (direction,))
    assert float(dot) == pytest.approx(float(dot_ref), rel=1e-8)


@pytest.mark.parametrize("name,solver", WITH_CGNR)
def test_vmap_over_parameters_equals_the_loop(name, solver):
    thetas = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(22))
    grads = torch.func.vmap(torch.func.grad(implicit_loss), in_dims=(0, None))(thetas, solver)
    for i in range(5):
        assert rel_err(grads[i], torch.func.grad(unrolled_loss)(thetas[i])) <= 1e-8
    hessians = torch.func.vmap(torch.func.hessian(implicit_loss), in_dims=(0, None))(thetas[:2], solver)
    for i in range(2):
        assert rel_err(hessians[i], torch.autograd.functional.hessian(unrolled_loss, thetas[i])) <= 1e-7


def tanh_layer(seed: int = 23, width: int = 8):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(width, width, generator=g, dtype=DT)
    return 0.8 * W / torch.linalg.matrix_norm(W, ord=2), torch.randn(width, 3, generator=g, dtype=DT)


def test_fixed_point_solve_under_vmap_with_each_solver():
    """A small deep-equilibrium layer vmapped over samples: the gradient of every sample
    against the dense implicit-function-theorem formula."""
    W, U = tanh_layer()
    inputs = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(24))

    def mapping(z, u):
        return torch.tanh(W @ z + U @ u)

    forward = ig.solvers.FixedPointIteration(tol=1e-14, maxiter=5000)
    for _, solver in WITH_CGNR:
        def loss(u, solver=solver):
            z = ig.fixed_point_solve(mapping, torch.zeros(8, dtype=DT), u, solver=forward, linear_solver=solver)
            return (z**2).sum()

        grads = torch.func.vmap(torch.func.grad(loss))(inputs)
        for i in range(4):
            z = forward(mapping, torch.zeros(8, dtype=DT), inputs[i])
            Jz = torch.func.jacrev(mapping, argnums=0)(z, inputs[i])
            Ju = torch.func.jacrev(mapping, argnums=1)(z, inputs[i])
            ref = (torch.linalg.solve(torch.eye(8, dtype=DT) - Jz, Ju)).T @ (2 * z)
            assert rel_err(grads[i], ref) <= 1e-8


# --------------------------------------------------------------------------- batched fixed points


def contractions(rates, width: int = 6, seed: int = 30):
    """One linear contraction per problem, ``T_i(x) = ρ_i Q_i x + c_i``, ``Q_i`` orthogonal:
    the error shrinks by exactly ρ_i per step (1 − ρ_i: the conditioning of I − T')."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.stack([torch.linalg.qr(torch.randn(width, width, generator=g, dtype=DT))[0] for _ in rates])
    return torch.tensor(rates, dtype=DT)[:, None, None] * Q


def test_fixed_point_iteration_stops_each_problem_on_its_own_tolerance():
    """Under vmap: easy problems (ρ = 0.5) with large data, one 100× worse conditioned
    (ρ = 0.995) with data 1e3 times smaller. Each meets tol relative to its own initial
    residual; a rule on the batch norm would stop while the hard one is far from it."""
    M = contractions([0.5, 0.5, 0.5, 0.995])
    c = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(31))
    c[:3] *= 1e3
    tol = 1e-8
    solver = ig.solvers.FixedPointIteration(maxiter=20000, tol=tol)

    def mapping(x, Mi, ci):
        return Mi @ x + ci

    x, stats = solver.run(lambda x, Mb, cb: torch.func.vmap(mapping)(x, Mb, cb), torch.zeros(4, 6, dtype=DT), M, c,
                          batch_ndim=1)
    assert stats.converged
    residual = (x - torch.func.vmap(mapping)(x, M, c)).norm(dim=1)
    initial = c.norm(dim=1)  # x0 = 0
    assert bool((residual <= tol * initial.clamp_min(1.0)).all()), residual / initial
    # Easy problems stop early, each at its own iterate: the same as alone.
    for i in range(4):
        xi = solver(mapping, torch.zeros(6, dtype=DT), M[i], c[i])
        assert rel_err(x[i], xi) <= 1e-12
    # The hard problem alone takes far more steps than the easy ones.
    assert solver.run(mapping, torch.zeros(6, dtype=DT), M[3], c[3])[1].iterations > 20 * (
        solver.run(mapping, torch.zeros(6, dtype=DT), M[0], c[0])[1].iterations
    )


def test_fixed_point_solve_reports_a_diverging_problem_of_the_batch():
    M = contractions([0.5, 0.5, 1.02])
    c = torch.ones(3, 6, dtype=DT)

    def mapping(x, Mi, ci):
        return Mi @ x + ci

    solver = ig.solvers.FixedPointIteration(maxiter=300)
    _, stats = solver.run(lambda x, Mb, cb: torch.func.vmap(mapping)(x, Mb, cb), torch.zeros(3, 6, dtype=DT), M, c,
                          batch_ndim=1)
    assert stats.converged is False and "1 of 3 problems" in stats.message
    with pytest.warns(ig.ImplicitGradWarning, match="not stationary.*1 of 3 problems"):
        x = torch.func.vmap(
            lambda Mi, ci: ig.fixed_point_solve(mapping, torch.zeros(6, dtype=DT), Mi, ci, solver=solver)
        )(M, c)
    for i in range(2):
        assert rel_err(x[i], torch.linalg.solve(torch.eye(6, dtype=DT) - M[i], c[i])) <= 1e-7
