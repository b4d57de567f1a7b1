"""ig.solvers.Broyden against dense solutions in float64: linear fixed points (finite
termination in 2n steps), nonlinear fixed points and roots against dense Newton, per-problem
stopping in a batch, hypergradients through fixed_point_solve and root_solve, the DEQ layer,
failures and settings."""

import pytest
import torch
from registry import rel_err

import implicitgrad as ig

DT = torch.float64
Broyden = ig.solvers.Broyden


def gen(seed):
    return torch.Generator().manual_seed(seed)


def contractions(batch, n, rho=0.9, seed=0):
    M = torch.randn(batch, n, n, generator=gen(seed), dtype=DT)
    M = rho * M / torch.linalg.matrix_norm(M, ord=2).reshape(batch, 1, 1)
    c = torch.randn(batch, n, generator=gen(seed + 1), dtype=DT)
    return M, c


def affine(x, M, c):
    return (M @ x.unsqueeze(-1)).squeeze(-1) + c


def newton(residual, x, steps=50):
    """Dense Newton on one system, the reference for nonlinear problems."""
    for _ in range(steps):
        J = torch.autograd.functional.jacobian(residual, x)
        x = x - torch.linalg.solve(J, residual(x))
    return x


def test_linear_fixed_point_terminates_within_2n_steps():
    """Good Broyden with full memory solves a linear system in at most 2n steps (Gay, 1979)."""
    n = 10
    M, c = contractions(1, n)
    M, c = M[0], c[0]
    x, stats = Broyden(memory=2 * n, tol=1e-12).run(lambda x, c: M @ x + c, torch.zeros(n, dtype=DT), c)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - M, c)
    assert stats.converged and rel_err(x, exact) < 1e-11
    assert stats.iterations <= 2 * n + 1  # evaluations: the start plus at most 2n steps


def test_fewer_evaluations_than_plain_iteration():
    n = 30
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(2), dtype=DT))
    M = Q @ torch.diag(torch.linspace(-0.5, 0.98, n, dtype=DT)) @ Q.T  # spectral radius 0.98
    c = torch.randn(n, generator=gen(3), dtype=DT)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - M, c)
    x_b, stats_b = Broyden(tol=1e-10).run(lambda x: M @ x + c, torch.zeros(n, dtype=DT))
    x_f, stats_f = ig.solvers.FixedPointIteration(maxiter=5000, tol=1e-10).run(lambda x: M @ x + c,
                                                                             torch.zeros(n, dtype=DT))
    assert stats_b.converged and stats_f.converged
    assert rel_err(x_b, exact) < 1e-8 and rel_err(x_f, exact) < 1e-8
    assert stats_b.iterations * 3 < stats_f.iterations


def test_batch_stops_per_problem_and_each_meets_its_tolerance():
    """Problem 0 is easy (ρ = 0.1), problem 1 hard (ρ = 0.99): each matches its dense solution."""
    n = 12
    M0, c0 = contractions(1, n, rho=0.1, seed=3)
    M1, c1 = contractions(1, n, rho=0.99, seed=4)
    M, c = torch.cat([M0, M1]), torch.cat([c0, c1])
    tol = 1e-11
    x, stats = Broyden(memory=8, tol=tol).run(affine, torch.zeros(2, n, dtype=DT), M, c, batch_ndim=1)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - M, c)
    assert stats.converged
    residual = (affine(x, M, c) - x).norm(dim=-1)
    initial = c.norm(dim=-1).clamp_min(1.0)
    assert bool((residual <= tol * initial).all())
    for i in range(2):
        assert rel_err(x[i], exact[i]) < 1e-9
    # The easy problem alone needs far fewer steps than the batch ran.
    _, alone = Broyden(memory=8, tol=tol).run(affine, torch.zeros(1, n, dtype=DT), M0, c0, batch_ndim=1)
    assert alone.iterations < stats.iterations


def test_nonlinear_fixed_point_matches_dense_newton():
    n, batch = 16, 4
    M, c = contractions(batch, n, rho=0.8, seed=5)

    def mapping(z, M, c):
        return torch.tanh(affine(z, M, c))

    z, stats = Broyden(tol=1e-12).run(mapping, torch.zeros(batch, n, dtype=DT), M, c, batch_ndim=1)
    assert stats.converged
    for i in range(batch):
        ref = newton(lambda v, i=i: torch.tanh(M[i] @ v + c[i]) - v, torch.zeros(n, dtype=DT))
        assert rel_err(z[i], ref) < 1e-10


def test_root_form_matches_dense_newton_and_its_hypergradient():
    n = 8
    g = gen(6)
    A = torch.eye(n, dtype=DT) + 0.3 * torch.randn(n, n, generator=g, dtype=DT) / n**0.5
    b = torch.randn(n, generator=g, dtype=DT, requires_grad=True)

    def residual(x, b):
        return A @ x + 0.1 * x**3 - b

    x = ig.root_solve(residual, torch.zeros(n, dtype=DT), b, solver=Broyden(form="root", tol=1e-12),
                      linear_solver=ig.Exact())
    ref = newton(lambda v: residual(v, b.detach()), torch.zeros(n, dtype=DT))
    assert rel_err(x.detach(), ref) < 1e-10
    w = torch.randn(n, generator=g, dtype=DT)
    (grad,) = torch.autograd.grad((x * w).sum(), b)
    J = A + torch.diag(0.3 * ref**2)  # dF/dx at the root; dx/db = J⁻¹
    assert rel_err(grad, torch.linalg.solve(J.T, w)) < 1e-9


def test_fixed_point_solve_hypergradient_and_vmap():
    n = 10
    M, c = contractions(3, n, rho=0.9, seed=7)
    c = c.clone().requires_grad_(True)

    def one(M, c):
        return ig.fixed_point_solve(lambda x, M, c: M @ x + c, torch.zeros(n, dtype=DT), M, c,
                                    solver=Broyden(tol=1e-12), linear_solver=ig.Exact())

    x = torch.func.vmap(one)(M, c)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - M, c.detach())
    assert rel_err(x.detach(), exact) < 1e-10
    w = torch.randn(3, n, generator=gen(8), dtype=DT)
    (grad,) = torch.autograd.grad((x * w).sum(), c)
    expected = torch.linalg.solve((torch.eye(n, dtype=DT) - M).transpose(-1, -2), w)
    assert rel_err(grad, expected) < 1e-9


def test_deq_with_broyden_matches_anderson_fixed_point_and_gradient():
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            W = torch.randn(6, 6, generator=gen(9), dtype=DT)
            self.W = torch.nn.Parameter(0.8 * W / torch.linalg.matrix_norm(W, ord=2))

        def forward(self, z, x):
            return torch.tanh(z @ self.W.T + x)

    cell = Cell()
    x = torch.randn(5, 6, generator=gen(10), dtype=DT)
    broyden = ig.nn.DEQ(cell, solver=Broyden(tol=1e-12), linear_solver=ig.GMRES(tol=1e-12))
    anderson = ig.nn.DEQ(cell, solver=ig.solvers.AndersonAcceleration(tol=1e-12, maxiter=500),
                         linear_solver=ig.GMRES(tol=1e-12))
    z_b, info = broyden(x, return_info=True)
    z_a = anderson(x)
    assert info.solve.forward_status == "converged" and bool((info.relative_residuals < 1e-10).all())
    assert rel_err(z_b.detach(), z_a.detach()) < 1e-10
    (g_b,) = torch.autograd.grad(z_b.sum(), cell.W)
    (g_a,) = torch.autograd.grad(z_a.sum(), cell.W)
    assert rel_err(g_b, g_a) < 1e-9


def test_unconverged_run_is_reported_and_the_best_iterate_returned():
    n = 20
    M, c = contractions(2, n, rho=0.999, seed=11)
    x, stats = Broyden(memory=2, maxiter=5, tol=1e-12).run(affine, torch.zeros(2, n, dtype=DT), M, c, batch_ndim=1)
    assert stats.converged is False
    assert "above tol" in stats.message and "of 2 problems" in stats.message
    assert stats.iterations == 5 and bool(torch.isfinite(x).all())
    with pytest.warns(ig.ImplicitGradWarning):
        ig.fixed_point_solve(lambda x, M, c: M @ x + c, torch.zeros(n, dtype=DT), M[0], c[0],
                             solver=Broyden(memory=2, maxiter=5, tol=1e-12))


def test_non_finite_step_clears_the_memory_and_recovers():
    """A mapping that returns NaN far from the fixed point: the step is refused, the memory
    cleared, and the iteration continues from the last finite point."""
    calls = {"n": 0}

    def mapping(x):
        calls["n"] += 1
        out = 0.5 * x + 1.0
        return out if calls["n"] != 2 else torch.full_like(out, float("nan"))

    x, stats = Broyden(tol=1e-12).run(mapping, torch.zeros(3, dtype=DT))
    assert stats.converged and torch.allclose(x, torch.full((3,), 2.0, dtype=DT), atol=1e-10)


@pytest.mark.parametrize("kwargs,error", [
    (dict(memory=0), ValueError), (dict(maxiter=0), ValueError), (dict(tol=-1.0), ValueError),
    (dict(form="newton"), ValueError), (dict(memory=2.5), TypeError),
])
def test_bad_settings_are_refused(kwargs, error):
    with pytest.raises(error):
        Broyden(**kwargs)


def test_mapping_with_another_structure_is_refused():
    with pytest.raises(ValueError, match="structure"):
        Broyden().run(lambda x: x[:2], torch.zeros(3, dtype=DT))
