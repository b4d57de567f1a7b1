"""ig.qp_solve and ig.nn.QP: solutions against closed forms and the KKT conditions, gradients
against autograd through the equality-constrained KKT system of the known active set and
against central finite differences, agreement with qpth and cvxpylayers, and every failure
reported per problem."""

from __future__ import annotations

import warnings

import pytest
import torch

import implicitgrad as ig

DT = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def strict_problem(B, n, m, k, seed=0, margin=0.5):
    """Problems with a known solution and active set, strictly complementary by ``margin``.

    z*, the active set, λ* (≥ margin on active rows) and slacks (≥ margin on inactive rows)
    are drawn first; p and h are then chosen so that the KKT conditions hold.
    """
    g = gen(seed)
    L = torch.randn(B, n, n, generator=g, dtype=DT)
    Q = L @ L.transpose(-1, -2) / n + 0.5 * torch.eye(n, dtype=DT)
    G = torch.randn(B, m, n, generator=g, dtype=DT)
    A = torch.randn(B, k, n, generator=g, dtype=DT)
    z = torch.randn(B, n, generator=g, dtype=DT)
    # At most (n - k) // 2 + 1 active rows: with the equalities, fewer than n independent rows (LICQ).
    ranks = torch.rand(B, m, generator=g).argsort(-1).argsort(-1)
    active = ranks < min(m, (n - k) // 2 + 1)
    lam = torch.where(active, margin + torch.rand(B, m, generator=g, dtype=DT), torch.zeros(B, m, dtype=DT))
    s = torch.where(active, torch.zeros(B, m, dtype=DT), margin + torch.rand(B, m, generator=g, dtype=DT))
    nu = torch.randn(B, k, generator=g, dtype=DT)
    p = -(Q @ z.unsqueeze(-1)).squeeze(-1) - (G.transpose(-1, -2) @ lam.unsqueeze(-1)).squeeze(-1) \
        - (A.transpose(-1, -2) @ nu.unsqueeze(-1)).squeeze(-1)
    h = (G @ z.unsqueeze(-1)).squeeze(-1) + s
    b = (A @ z.unsqueeze(-1)).squeeze(-1)
    return (Q, p, G, h, A, b), z, active


def active_set_reference(Q, p, G, h, A, b, active):
    """z* from the KKT system of the equality-constrained QP on the active rows, by autograd-able solves."""
    out = []
    for i in range(Q.shape[0]):
        a = active[i]
        Ga, ha = G[i][a], h[i][a]
        n, na, k = Q.shape[-1], int(a.sum()), A.shape[1]
        Qs = 0.5 * (Q[i] + Q[i].T)
        K = torch.cat([
            torch.cat([Qs, Ga.T, A[i].T], 1),
            torch.cat([Ga, torch.zeros(na, na + k, dtype=DT)], 1),
            torch.cat([A[i], torch.zeros(k, na + k, dtype=DT)], 1),
        ], 0)
        out.append(torch.linalg.solve(K, torch.cat([-p[i], ha, b[i]]))[:n])
    return torch.stack(out)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("n,m,k", [(4, 6, 0), (5, 8, 2), (3, 0, 1), (3, 0, 0), (6, 10, 3)])
def test_solution_and_gradients_match_active_set_kkt_reference(n, m, k):
    (args, z_true, active) = strict_problem(6, n, m, k, seed=n + m + k)
    args = [t.clone().requires_grad_(True) for t in args]
    z, info = ig.qp_solve(*args, return_info=True)
    assert info.converged, info
    assert rel(z.detach(), z_true) < 1e-9
    ref = active_set_reference(*args, active)
    v = torch.randn(z.shape, generator=gen(1), dtype=DT)
    ours = torch.autograd.grad((z * v).sum(), args, allow_unused=True)
    expected = torch.autograd.grad((ref * v).sum(), args, allow_unused=True, materialize_grads=True)
    for name, a, e in zip("QpGhAb", ours, expected):
        if e.numel() == 0:
            continue
        e = 0.5 * (e + e.transpose(-1, -2)) if name == "Q" else e  # only sym(Q) enters the problem
        assert rel(a, e) < 1e-8, (name, rel(a, e))


def test_gradients_match_central_finite_differences():
    (args, _, _) = strict_problem(1, 4, 6, 1, seed=3)
    args = [t[0].clone() for t in args]
    v = torch.randn(4, generator=gen(2), dtype=DT)

    def loss(*a):
        return (ig.qp_solve(*a, tol=1e-13) * v).sum()

    leaves = [t.clone().requires_grad_(True) for t in args]
    grads = torch.autograd.grad(loss(*leaves), leaves)
    step = 1e-6
    for j, (t, g) in enumerate(zip(args, grads)):
        fd = torch.zeros_like(t).reshape(-1)
        for i in range(t.numel()):
            e = torch.zeros(t.numel(), dtype=DT)
            e[i] = step
            plus = [a if jj != j else a + e.reshape(a.shape) for jj, a in enumerate(args)]
            minus = [a if jj != j else a - e.reshape(a.shape) for jj, a in enumerate(args)]
            fd[i] = (loss(*plus) - loss(*minus)) / (2 * step)
        fd = fd.reshape(t.shape)
        if j == 0:
            g = 0.5 * (g + g.T)
            fd = 0.5 * (fd + fd.T)
        assert rel(g, fd) < 1e-6, ("QpGhAb"[j], rel(g, fd))


def test_unconstrained_and_equality_constrained_closed_forms():
    (args, _, _) = strict_problem(3, 5, 0, 2, seed=4)
    Q, p, _, _, A, b = args
    z = ig.qp_solve(Q, p)
    assert rel(z, torch.linalg.solve(Q, -p)) < 1e-12
    z = ig.qp_solve(Q, p, A=A, b=b)
    K = torch.cat([torch.cat([Q, A.transpose(-1, -2)], -1), torch.cat([A, torch.zeros(3, 2, 2, dtype=DT)], -1)], -2)
    assert rel(z, torch.linalg.solve(K, torch.cat([-p, b], -1))[:, :5]) < 1e-10


def test_kkt_conditions_hold_on_random_problems():
    g = gen(5)
    B, n, m = 16, 20, 30
    L = torch.randn(B, n, n, generator=g, dtype=DT)
    Q = L @ L.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=DT)
    p, G = torch.randn(B, n, generator=g, dtype=DT), torch.randn(B, m, n, generator=g, dtype=DT)
    h = torch.rand(B, m, generator=g, dtype=DT)
    z, info = ig.qp_solve(Q, p, G, h, return_info=True)
    lam, _ = info.multipliers
    assert info.converged
    assert float((G @ z.unsqueeze(-1)).squeeze(-1).sub(h).max()) < 1e-9
    assert float(lam.min()) >= 0
    stationarity = (Q @ z.unsqueeze(-1) + G.transpose(-1, -2) @ lam.unsqueeze(-1)).squeeze(-1) + p
    assert float(stationarity.abs().max()) < 1e-8
    assert float((lam * (h - (G @ z.unsqueeze(-1)).squeeze(-1))).abs().max()) < 1e-9
    assert info.iterations.shape == (B,) and int(info.iterations.min()) >= 1


def test_shared_arguments_broadcast_and_receive_summed_gradients():
    (args, _, _) = strict_problem(4, 3, 4, 0, seed=6)
    Q, p, G, h, _, _ = args
    G0 = G[0].clone().requires_grad_(True)
    h0 = h[0].clone()
    z = ig.qp_solve(Q, p, G0, h0)
    zs = torch.stack([ig.qp_solve(Q[i], p[i], G0, h0) for i in range(4)])
    assert torch.allclose(z, zs, atol=1e-10)
    (g_batch,) = torch.autograd.grad(z.sum(), G0)
    (g_loop,) = torch.autograd.grad(zs.sum(), G0)
    assert rel(g_batch, g_loop) < 1e-8


def test_float32_solves_to_its_tolerance():
    (args, z_true, _) = strict_problem(4, 5, 6, 1, seed=7)
    z, info = ig.qp_solve(*[t.float() for t in args], return_info=True)
    assert z.dtype == torch.float32 and info.converged
    assert rel(z.double(), z_true) < 1e-4


# ------------------------------------------------------------------------- peers
def random_batch(B=8, n=10, m=15, seed=8):
    g = gen(seed)
    L = torch.randn(B, n, n, generator=g, dtype=DT)
    Q = L @ L.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=DT)
    p, G = torch.randn(B, n, generator=g, dtype=DT), torch.randn(B, m, n, generator=g, dtype=DT)
    z0 = torch.randn(B, n, generator=g, dtype=DT)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, generator=g, dtype=DT)
    return [t.requires_grad_(True) for t in (Q, p, G, h)]


def test_agrees_with_qpth():
    qpth = pytest.importorskip("qpth.qp", reason="qpth is an optional peer (pip install implicitgrad[peers])")
    Q, p, G, h = random_batch()
    v = torch.randn(Q.shape[0], Q.shape[1], generator=gen(9), dtype=DT)
    z = ig.qp_solve(Q, p, G, h, tol=1e-10)
    e = torch.empty(0, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zq = qpth.QPFunction(verbose=-1, eps=1e-10, maxIter=100)(Q, p, G, h, e, e)
    assert float((z - zq).detach().abs().max()) < 1e-6
    ours = torch.autograd.grad((z * v).sum(), [Q, p, G, h])
    theirs = torch.autograd.grad((zq * v).sum(), [Q, p, G, h])
    for a, b in zip(ours, theirs):
        assert rel(a, b) < 1e-6


def test_agrees_with_cvxpylayers():
    pytest.importorskip("cvxpylayers", reason="cvxpylayers is an optional peer (pip install implicitgrad[peers])")
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    Q, p, G, h = random_batch(B=4, n=6, m=8, seed=10)
    n, m = 6, 8
    L, pp, GG, hh, x = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ x) + pp @ x), [GG @ x <= hh])
    layer = CvxpyLayer(problem, parameters=[L, pp, GG, hh], variables=[x])
    factor = torch.linalg.cholesky(Q).transpose(-1, -2)  # Q = Lᵀ L with L = factorᵀ... (upper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (zc,) = layer(factor, p, G, h, solver_args={"eps": 1e-10, "max_iters": 100000})
    z = ig.qp_solve(Q, p, G, h, tol=1e-10)
    assert float((z - zc).detach().abs().max()) < 1e-6
    v = torch.randn(4, n, generator=gen(11), dtype=DT)
    ours = torch.autograd.grad((z * v).sum(), [p, G, h])
    theirs = torch.autograd.grad((zc * v).sum(), [p, G, h])
    for a, b in zip(ours, theirs):
        assert rel(a, b) < 1e-6


# ------------------------------------------------------------------------- failures
I2 = torch.eye(2, dtype=DT)
ZERO2 = torch.zeros(2, dtype=DT)


def mixed_batch():
    """Problem 0 solvable, 1 infeasible, 2 unbounded, 3 non-convex."""
    Q = torch.stack([I2, I2, torch.zeros(2, 2, dtype=DT), torch.diag(torch.tensor([1.0, -1.0], dtype=DT))])
    p = torch.tensor([[1.0, -2.0], [0.0, 0.0], [-1.0, -1.0], [1.0, 1.0]], dtype=DT)
    G = torch.stack([I2, torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT), -I2, I2])
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]], dtype=DT)
    return Q, p, G, h


def test_failures_are_detected_per_problem_and_warned():
    Q, p, G, h = mixed_batch()
    p = p.clone().requires_grad_(True)
    expected = "infeasible.*problem 1.*unbounded.*problem 2.*nonconvex.*problem 3"
    with pytest.warns(ig.ImplicitGradWarning, match=expected):
        z, info = ig.qp_solve(Q, p, G, h, return_info=True)
    assert info.status == ["solved", "infeasible", "unbounded", "nonconvex"]
    assert not info.converged
    assert torch.allclose(z[0], torch.tensor([-1.0, 1.0], dtype=DT), atol=1e-9)
    assert bool(torch.isnan(z[1:]).all())
    (g,) = torch.autograd.grad(z[0].sum(), p)
    # z = (−p₁, 1): the bound z₂ ≤ 1 is active, z₁ = −p₁ is free.
    assert torch.allclose(g[0], torch.tensor([-1.0, 0.0], dtype=DT), atol=1e-8)


def test_failures_raise_or_stay_silent_per_on_failure():
    Q, p, G, h = mixed_batch()
    with pytest.raises(ig.ConvergenceError, match="infeasible"):
        ig.qp_solve(Q, p, G, h, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, info = ig.qp_solve(Q, p, G, h, on_failure="ignore", return_info=True)
    assert info.status[1] == "infeasible" and bool(torch.isnan(z[1]).all())


def test_infeasible_equalities_and_singular_kkt():
    z, info = ig.qp_solve(I2, ZERO2, I2, torch.ones(2, dtype=DT), torch.ones(1, 2, dtype=DT),
                          torch.tensor([3.0], dtype=DT), on_failure="ignore", return_info=True)
    assert info.status == ["infeasible"]
    z, info = ig.qp_solve(torch.zeros(2, 2, dtype=DT), torch.ones(2, dtype=DT), on_failure="ignore",
                          return_info=True)
    assert info.status == ["singular"] and bool(torch.isnan(z).all())


def test_maxiter_returns_the_last_iterate_with_a_warning():
    Q, p, G, h = [t.detach() for t in random_batch(B=2)]
    with pytest.warns(ig.ImplicitGradWarning, match="max_iterations"):
        z, info = ig.qp_solve(Q, p, G, h, maxiter=2, return_info=True)
    assert info.status == ["max_iterations"] * 2 and bool(torch.isfinite(z).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(Q=torch.eye(3, dtype=DT).expand(4, 3, 3), p=torch.zeros(5, 3, dtype=DT)), "batch sizes differ"),
    (dict(Q=torch.eye(3, dtype=DT), p=torch.zeros(4, dtype=DT)), "Q must be"),
    (dict(Q=torch.eye(3, dtype=DT), p=torch.zeros(3, dtype=DT), G=torch.zeros(2, 3, dtype=DT)), "h is missing"),
    (dict(Q=torch.eye(3, dtype=DT), p=torch.zeros(3, dtype=DT), G=torch.zeros(2, 4, dtype=DT),
          h=torch.zeros(2, dtype=DT)), "G must be"),
    (dict(Q=torch.eye(3, dtype=DT), p=torch.zeros(3)), "mix dtypes"),
    (dict(Q=torch.eye(3, dtype=DT), p=torch.full((3,), float("nan"), dtype=DT)), "NaN"),
    (dict(Q=torch.eye(3, dtype=DT), p=torch.zeros(2, 2, 3, dtype=DT)), "dimensions"),
])
def test_bad_shapes_and_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ig.qp_solve(**kwargs)


def test_bad_dtypes_are_refused():
    with pytest.raises(TypeError, match="dtype"):
        ig.qp_solve(torch.eye(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="Tensor"):
        ig.qp_solve([[1.0]], torch.zeros(1))


@pytest.mark.cuda
def test_runs_on_cuda():
    (args, z_true, _) = strict_problem(4, 5, 6, 1, seed=12)
    z = ig.qp_solve(*[t.cuda() for t in args])
    assert rel(z.cpu(), z_true) < 1e-9


# ------------------------------------------------------------------------- the layer
def test_layer_learns_a_box_from_projections():
    """Data are projections onto the box [-0.5, 0.5]²; a layer with learned h (G = [I; -I]
    fixed) recovers the bounds."""
    g = gen(13)
    G = torch.cat([I2, -I2])
    x = 2 * torch.randn(64, 2, generator=g, dtype=DT)
    target = x.clamp(-0.5, 0.5)
    layer = ig.nn.QP(2, n_ineq=4, learn=("h",), dtype=DT)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(150):
        loss = (layer(p=-x, G=G) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 1e-5
    assert torch.allclose(layer.h.detach(), torch.full((4,), 0.5, dtype=DT), atol=1e-2)
    assert layer.last_info.converged


def test_layer_learned_q_is_positive_definite_and_missing_terms_are_named():
    layer = ig.nn.QP(3, n_ineq=2, learn=("Q", "G"), dtype=DT)
    with pytest.raises(ValueError, match=r"\['h'\]"):
        layer(p=torch.zeros(3, dtype=DT))
    with torch.no_grad():
        layer.L.mul_(0)
    assert float(torch.linalg.eigvalsh(layer.terms(h=torch.ones(2, dtype=DT))["Q"]).min().detach()) > 0
    with pytest.raises(ValueError, match="unknown terms"):
        ig.nn.QP(3, learn=("R",))


# ------------------------------------------------------------------------- accuracy and second order
def test_weakly_active_constraint_gradient_is_exact():
    """A constraint whose multiplier is 1e-4 (strict complementarity nearly failing): the
    interior point alone blurs its derivative by μ/margin²; the active-set refinement
    gives the derivative of the active-set KKT system to 1e-10."""
    (args, z_true, active) = strict_problem(4, 6, 9, 1, seed=21)
    Q, _, G, h, A, b = args
    # One active multiplier per problem set to 1e-4, p rebuilt so that the KKT conditions hold.
    first = active.to(torch.int64).argmax(-1)
    rows = torch.arange(4)
    lam_true = torch.zeros(4, 9, dtype=DT)
    g = gen(22)
    lam_true[active] = 0.5 + torch.rand(int(active.sum()), generator=g, dtype=DT)
    lam_true[rows, first] = 1e-4
    nu = torch.randn(4, 1, generator=g, dtype=DT)
    p = -(Q @ z_true.unsqueeze(-1)).squeeze(-1) - (G.transpose(-1, -2) @ lam_true.unsqueeze(-1)).squeeze(-1) \
        - (A.transpose(-1, -2) @ nu.unsqueeze(-1)).squeeze(-1)
    args = [t.clone().requires_grad_(True) for t in (Q, p, G, h, A, b)]
    z, info = ig.qp_solve(*args, return_info=True)
    assert info.converged and bool(info.polished.all())
    assert rel(z.detach(), z_true) < 1e-12
    v = torch.randn(z.shape, generator=gen(23), dtype=DT)
    ours = torch.autograd.grad((z * v).sum(), args)
    ref = active_set_reference(*args, active)
    expected = torch.autograd.grad((ref * v).sum(), args, materialize_grads=True)
    for name, a, e in zip("QpGhAb", ours, expected):
        e = 0.5 * (e + e.transpose(-1, -2)) if name == "Q" else e
        assert rel(a, e) < 1e-10, (name, rel(a, e))


def test_degenerate_constraint_keeps_the_interior_point():
    """A constraint active with a zero multiplier (no strict complementarity): no refinement,
    and the solution is still right."""
    Q, p = torch.eye(2, dtype=DT), torch.tensor([-1.0, 0.0], dtype=DT)
    G, h = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT), torch.tensor([1.0, 0.0], dtype=DT)
    z, info = ig.qp_solve(Q, p, G, h, return_info=True)  # z = (1, 0): both rows active, both multipliers 0
    assert info.converged and not bool(info.polished.any())
    # On a degenerate constraint an interior point is accurate to about √tol (tol = 1e-10).
    assert torch.allclose(z, torch.tensor([1.0, 0.0], dtype=DT), atol=1e-4)


def second_order_problem():
    (args, _, active) = strict_problem(1, 6, 4, 1, seed=31)  # 3 active rows + 1 equality: 2 free directions
    return [t[0].clone() for t in args], active


@pytest.mark.parametrize("wrt", range(6))
def test_double_backward_matches_active_set_reference_and_finite_differences(wrt):
    """d/dθ ⟨u, ∇_θ ⟨v, z*(θ)⟩⟩: through qp_solve with create_graph=True, against autograd
    through the dense active-set KKT solve and against central differences of the first
    gradient (the active set stays fixed under the perturbation)."""
    args, active = second_order_problem()
    v = torch.randn(6, generator=gen(32), dtype=DT)

    def first_gradient(solve, a, create_graph):
        leaves = [t.clone().requires_grad_(True) for t in a]
        z = solve(leaves)
        (g,) = torch.autograd.grad((z * v).sum(), leaves[wrt], create_graph=create_graph)
        return g, leaves

    def ours(leaves):
        return ig.qp_solve(*leaves, tol=1e-13)

    def reference(leaves):
        return active_set_reference(*[t.unsqueeze(0) for t in leaves], active)[0]

    u = torch.randn(args[wrt].shape, generator=gen(33), dtype=DT)
    g, leaves = first_gradient(ours, args, True)
    second = torch.autograd.grad((g * u).sum(), leaves, allow_unused=True, materialize_grads=True)
    g_ref, leaves_ref = first_gradient(reference, args, True)
    if wrt == 0:
        g_ref = 0.5 * (g_ref + g_ref.T)
    assert rel(g.detach(), g_ref.detach()) < 1e-9
    expected = torch.autograd.grad((g_ref * u).sum(), leaves_ref, materialize_grads=True)
    step = 1e-5
    direction = [torch.randn(t.shape, generator=gen(34 + j), dtype=DT) for j, t in enumerate(args)]
    # One relative error over all six blocks: some blocks are exactly zero (z* is linear in p, h, b).
    sym = [0.5 * (t + t.T) if j == 0 else t for j, t in enumerate(second)]
    sym_expected = [0.5 * (t + t.T) if j == 0 else t for j, t in enumerate(expected)]
    flat, flat_expected = torch.cat([t.reshape(-1) for t in sym]), torch.cat([t.reshape(-1) for t in sym_expected])
    assert float(flat_expected.norm()) > 1e-3
    assert rel(flat, flat_expected) < 1e-8, ("QpGhAb"[wrt], rel(flat, flat_expected))
    plus = [t + step * d for t, d in zip(args, direction)]
    minus = [t - step * d for t, d in zip(args, direction)]
    fd = float(((first_gradient(ours, plus, False)[0] - first_gradient(ours, minus, False)[0]) * u).sum()) / (2 * step)
    exact = float(sum((s * d).sum() for s, d in zip(second, direction)))
    assert abs(exact - fd) <= 1e-6 * max(abs(fd), 1.0), ("QpGhAb"[wrt], exact, fd)
