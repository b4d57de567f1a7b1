"""AndersonAcceleration against plain iteration and dense solves, in float64: same fixed
points, fewer evaluations, per-problem behaviour under vmap, implicit and unrolled
gradients, settings and messages."""

import pytest
import torch
from test_proximal_solvers import rel_err, svm_problem

import implicitgrad as ig

DT = torch.float64
AA = ig.solvers.AndersonAcceleration
FPI = ig.solvers.FixedPointIteration


def linear_contraction(n=40, rho=0.98, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    M = Q @ torch.diag(torch.linspace(-0.5, rho, n, dtype=DT)) @ Q.T
    M = M + 0.05 * torch.triu(torch.randn(n, n, generator=g, dtype=DT), 1) / n  # not symmetric
    c = torch.randn(n, generator=g, dtype=DT)
    return M, c


def test_linear_fixed_point_matches_the_dense_solve_in_fewer_steps():
    M, c = linear_contraction()
    exact = torch.linalg.solve(torch.eye(40, dtype=DT) - M, c)
    x_aa, stats_aa = AA(tol=1e-12).run(lambda x, c: M @ x + c, torch.zeros(40, dtype=DT), c)
    x_fpi, stats_fpi = FPI(maxiter=5000, tol=1e-12).run(lambda x, c: M @ x + c, torch.zeros(40, dtype=DT), c)
    assert stats_aa.converged and stats_fpi.converged
    assert rel_err(x_aa, exact) < 1e-9 and rel_err(x_fpi, exact) < 1e-9
    assert stats_aa.iterations * 3 < stats_fpi.iterations


def test_nonlinear_fixed_point_and_its_hypergradient():
    g = torch.Generator().manual_seed(1)
    W = 0.9 * torch.randn(30, 30, generator=g, dtype=DT) / 30**0.5
    c = torch.randn(30, generator=g, dtype=DT, requires_grad=True)

    def mapping(x, c):
        return torch.tanh(W @ x + c)

    x, info = ig.fixed_point_solve(mapping, torch.zeros(30, dtype=DT), c, solver=AA(tol=1e-12), return_info=True)
    ref = FPI(maxiter=20000, tol=1e-14)(mapping, torch.zeros(30, dtype=DT), c.detach())
    assert rel_err(x, ref) < 1e-10
    grad, = torch.autograd.grad(x.sum(), c)
    # Dense IFT reference: dx/dc = (I − D W)⁻¹ D with D = diag(1 − tanh²) at the fixed point.
    D = torch.diag(1 - ref**2)
    expected = torch.linalg.solve(torch.eye(30, dtype=DT) - D @ W, D).T @ torch.ones(30, dtype=DT)
    assert rel_err(grad, expected) < 1e-9
    assert info.forward_iterations < FPI(maxiter=20000, tol=1e-12).run(mapping, torch.zeros(30, dtype=DT),
                                                                        c.detach())[1].iterations


def test_memory_one_is_damped_iteration():
    M, c = linear_contraction(seed=2)
    for beta in (1.0, 0.6):
        a = AA(memory=1, maxiter=37, tol=0, damping=beta)(lambda x: M @ x + c, torch.zeros(40, dtype=DT))
        b = FPI(maxiter=37, tol=0, damping=beta)(lambda x: M @ x + c, torch.zeros(40, dtype=DT))
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_svm_dual_as_a_projected_fixed_point():
    dual, X, Y, mu = svm_problem()
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    step = 1.0 / float(torch.linalg.eigvalsh(X @ X.T).max() / 0.7 + mu)

    def mapping(beta, lam, X, Y):
        grad = X @ (X.T @ (beta - Y)) / lam - (1 - Y) + mu * beta  # ∇f of the dual, by hand
        return ig.projections.simplex(beta - step * grad)

    beta0 = torch.full_like(Y, 1.0 / 3)
    b_aa, info_aa = ig.fixed_point_solve(mapping, beta0, lam, X, Y, solver=AA(tol=1e-12, maxiter=5000),
                                         return_info=True)
    b_fpi, info_fpi = ig.fixed_point_solve(mapping, beta0, lam, X, Y, solver=FPI(tol=1e-12, maxiter=50000),
                                           return_info=True)
    b_pg = ig.implicit_solve(dual, beta0, lam, X, Y, solver=ig.solvers.ProjectedGradient(ig.projections.simplex,
                                                                                         tol=1e-13))
    assert rel_err(b_aa, b_pg) < 1e-8 and rel_err(b_fpi, b_pg) < 1e-8
    assert info_aa.forward_iterations < info_fpi.forward_iterations
    grads = [torch.autograd.grad(b.sum(), lam)[0] for b in (b_aa, b_fpi, b_pg)]
    assert float(grads[0]) == pytest.approx(float(grads[2]), rel=1e-8)
    assert float(grads[1]) == pytest.approx(float(grads[2]), rel=1e-8)


def test_vmap_each_problem_meets_its_own_tolerance():
    M, _ = linear_contraction(seed=3)
    cs = torch.randn(4, 40, generator=torch.Generator().manual_seed(4), dtype=DT)
    cs[2] *= 1e4  # one problem far larger than the rest
    cs.requires_grad_(True)

    def fit(c):
        return ig.fixed_point_solve(lambda x, c: M @ x + c, torch.zeros(40, dtype=DT), c, solver=AA(tol=1e-12))

    xs = torch.func.vmap(fit)(cs)
    exact = torch.linalg.solve(torch.eye(40, dtype=DT) - M, cs.detach().T).T
    for i in range(4):
        assert rel_err(xs[i], exact[i]) < 1e-9
    g, = torch.autograd.grad(xs.sum(), cs)
    expected = torch.linalg.solve((torch.eye(40, dtype=DT) - M).T, torch.ones(40, dtype=DT))
    assert rel_err(g, expected.expand(4, 40)) < 1e-9


def test_unrolled_gradient_matches_the_implicit_one():
    M, c = linear_contraction(seed=5)
    c = c.clone().requires_grad_(True)
    for mode in ("implicit", "unrolled"):
        x = ig.fixed_point_solve(lambda x, c: M @ x + c, torch.zeros(40, dtype=DT), c, solver=AA(tol=1e-13),
                                 mode=mode)
        g, = torch.autograd.grad(x.sum(), c)
        expected = torch.linalg.solve((torch.eye(40, dtype=DT) - M).T, torch.ones(40, dtype=DT))
        assert rel_err(g, expected) < 1e-8, mode


def test_pytree_variable():
    M, c = linear_contraction(n=10, seed=6)

    def mapping(x):
        flat = torch.cat([x["a"], x["b"].reshape(-1)])
        out = M @ flat + c
        return {"a": out[:4], "b": out[4:].reshape(2, 3)}

    x = AA(tol=1e-12)(mapping, {"a": torch.zeros(4, dtype=DT), "b": torch.zeros(2, 3, dtype=DT)})
    exact = torch.linalg.solve(torch.eye(10, dtype=DT) - M, c)
    assert rel_err(torch.cat([x["a"], x["b"].reshape(-1)]), exact) < 1e-9
    scalar = AA(tol=1e-12)(lambda x: 0.5 * x + 1.0, torch.tensor(0.0, dtype=DT))  # a 0-d variable
    assert scalar.shape == () and float(scalar) == pytest.approx(2.0, abs=1e-10)


def test_settings_and_messages():
    for kwargs, name in (({"memory": 0}, "memory"), ({"damping": 1.5}, "damping"), ({"ridge": -1.0}, "ridge"),
                         ({"maxiter": 2.5}, "maxiter"), ({"tol": 2.0}, "tol")):
        with pytest.raises(ValueError, match=name):
            AA(**kwargs)
    M, c = linear_contraction(seed=7)
    _, stats = AA(maxiter=3).run(lambda x: M @ x + c, torch.zeros(40, dtype=DT))
    assert stats.converged is False and "after 3 steps" in stats.message
    with pytest.raises(ValueError, match="structure and shapes"):
        AA().run(lambda x: x[:3], torch.zeros(5, dtype=DT))
