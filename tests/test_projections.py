"""ig.projections: each projection against the KKT conditions of its set, the variational
inequality ⟨x − z, y − z⟩ ≤ 0 on points y of the set drawn independently, derivatives
against their closed forms, axes, pytrees and vmap."""

import pytest
import torch

import implicitgrad as ig

P = ig.projections
DT = torch.float64
ATOL = 1e-12
SEEDS = range(4)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def points(seed, shape=(30,), spread=2.0):
    return spread * torch.randn(shape, generator=gen(seed), dtype=DT)


def assert_variational_inequality(x, z, ys):
    """z = P_C(x) iff ⟨x − z, y − z⟩ ≤ 0 for all y in C; ``ys`` are points of C (rows)."""
    assert float(((ys - z) @ (x - z)).max()) <= 1e-10


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_simplex_kkt(seed, scale):
    x = points(seed)
    z = P.simplex(x, scale)
    assert bool((z >= 0).all()) and float(z.sum()) == pytest.approx(scale, abs=ATOL)
    # x − z = τ·1 on the support; x_i ≤ τ off it (multipliers of z ≥ 0 are τ − x_i ≥ 0).
    on = z > 0
    tau = (x - z)[on]
    assert torch.allclose(tau, tau[0].expand_as(tau), atol=ATOL)
    assert bool((x[~on] <= tau[0] + ATOL).all())
    ys = scale * torch.distributions.Dirichlet(torch.ones(30, dtype=DT)).sample((200,))
    assert_variational_inequality(x, z, ys)


@pytest.mark.parametrize("seed", SEEDS)
def test_l1_ball_kkt(seed):
    x, r = points(seed), 3.0
    z = P.l1_ball(x, r)
    assert float(z.abs().sum()) == pytest.approx(r, abs=1e-10)
    on = z != 0
    assert bool((torch.sign(z[on]) == torch.sign(x[on])).all())
    # x − z = τ·sign(z) on the support, |x_i| ≤ τ off it, τ ≥ 0.
    tau = ((x - z)[on] * torch.sign(z[on]))
    assert float(tau.min()) >= 0 and torch.allclose(tau, tau[0].expand_as(tau), atol=ATOL)
    assert bool((x[~on].abs() <= tau[0] + ATOL).all())
    inside = x * 0.5 * r / x.abs().sum()
    assert torch.equal(P.l1_ball(inside, r), inside)
    signs = torch.sign(torch.randn(200, 30, generator=gen(seed + 50), dtype=DT))
    ys = r * signs * torch.distributions.Dirichlet(torch.ones(30, dtype=DT)).sample((200,))
    assert_variational_inequality(x, z, ys)


@pytest.mark.parametrize("seed", SEEDS)
def test_l2_ball_secular_equation(seed):
    x, r = points(seed), 2.0
    z = P.l2_ball(x, r)
    # z = x / (1 + μ) with μ ≥ 0 the root of the secular equation ‖x‖ / (1 + μ) = r
    # (found by bisection, independent of the implementation) and μ (‖z‖ − r) = 0.
    lo, hi = 0.0, float(x.norm()) / r
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(x.norm()) / (1 + mid) > r else (lo, mid)
    mu = 0.5 * (lo + hi)
    assert torch.allclose(z, x / (1 + mu), atol=1e-12)
    inside = x * 0.5 * r / x.norm()
    assert torch.equal(P.l2_ball(inside, r), inside)
    directions = torch.randn(200, 30, generator=gen(seed + 60), dtype=DT)
    ys = r * torch.rand(200, 1, generator=gen(seed + 61), dtype=DT) * directions / directions.norm(dim=1, keepdim=True)
    assert_variational_inequality(x, z, ys)


@pytest.mark.parametrize("seed", SEEDS)
def test_box_nonnegative_linf_kkt(seed):
    x = points(seed)
    lower = -torch.rand(30, generator=gen(seed + 1), dtype=DT)
    upper = torch.rand(30, generator=gen(seed + 2), dtype=DT)
    for z, lo, hi in ((P.box(x, lower, upper), lower, upper),
                      (P.nonnegative(x), torch.zeros(30, dtype=DT), torch.full((30,), torch.inf, dtype=DT)),
                      (P.linf_ball(x, 0.7), torch.full((30,), -0.7, dtype=DT), torch.full((30,), 0.7, dtype=DT))):
        assert bool(((z >= lo) & (z <= hi)).all())
        # The multiplier x − z is ≤ 0 at the lower bound, ≥ 0 at the upper, 0 strictly inside.
        mult = x - z
        strictly_inside = (z > lo) & (z < hi)
        assert bool((mult[strictly_inside] == 0).all())
        assert bool((mult[z == lo] <= 0).all()) and bool((mult[z == hi] >= 0).all())
        finite_hi = torch.where(torch.isinf(hi), lo + 5.0, hi)
        ys = lo + (finite_hi - lo) * torch.rand(200, 30, generator=gen(seed + 3), dtype=DT)
        assert_variational_inequality(x, z, ys)


@pytest.mark.parametrize("seed", SEEDS)
def test_hyperplane_and_halfspace_kkt(seed):
    x, a, b = points(seed), points(seed + 10), 0.7
    z = P.hyperplane(x, a, b)
    assert float(a @ z) == pytest.approx(b, abs=1e-10)
    mu = (x - z) @ a / (a @ a)
    assert torch.allclose(x - z, mu * a, atol=ATOL)  # x − z ∥ a
    for bias in (float(a @ x) - 1.0, float(a @ x) + 1.0):  # x inside, then outside
        z = P.halfspace(x, a, bias)
        assert float(a @ z) <= bias + 1e-10
        mu = float((x - z) @ a / (a @ a))
        assert mu >= 0 and torch.allclose(x - z, mu * a, atol=ATOL)
        assert abs(mu * (float(a @ z) - bias)) <= 1e-10  # complementary slackness
        ys = torch.randn(200, 30, generator=gen(seed + 4), dtype=DT)
        ys = ys - torch.relu(ys @ a - bias).unsqueeze(1) * a / (a @ a) - 0.1 * a  # points with ⟨a, y⟩ < b
        assert_variational_inequality(x, z, ys)


def test_simplex_derivatives_closed_form():
    x = points(1, (8,))
    scale = torch.tensor(1.5, dtype=DT)
    z = P.simplex(x, scale)
    on = (z > 0).to(DT)
    jac_x, jac_s = torch.autograd.functional.jacobian(P.simplex, (x, scale))
    # On the support S: I − 11ᵀ/|S| in x, 1/|S| in the scale; zero rows and columns off it.
    expected = torch.diag(on) - torch.outer(on, on) / on.sum()
    assert torch.allclose(jac_x, expected, atol=1e-12)
    assert torch.allclose(jac_s, on / on.sum(), atol=1e-12)


def test_l2_ball_and_l1_ball_radius_derivatives():
    x = points(2, (5,))
    r = torch.tensor(1.2, dtype=DT)
    assert torch.allclose(torch.autograd.functional.jacobian(lambda t: P.l2_ball(x, t), r), x / x.norm(), atol=1e-14)
    h = 1e-6
    fd = (P.l1_ball(x, r + h) - P.l1_ball(x, r - h)) / (2 * h)
    assert torch.allclose(torch.autograd.functional.jacobian(lambda t: P.l1_ball(x, t), r), fd, atol=1e-8)


@pytest.mark.parametrize("projection", [P.simplex, P.l1_ball, P.l2_ball])
def test_axes_rows_and_whole_leaf(projection):
    x = points(3, (4, 6))
    rows = projection(x)
    for i in range(4):
        assert torch.allclose(rows[i], projection(x[i]), atol=1e-15)
    columns = projection(x, axis=0)
    for j in range(6):
        assert torch.allclose(columns[:, j], projection(x[:, j]), atol=1e-15)
    assert torch.allclose(projection(x, axis=None), projection(x.reshape(-1)).reshape(4, 6), atol=1e-15)


def test_pytree_and_vmap():
    x = {"u": points(4, (5,)), "v": (points(5, (3,)), 7)}
    z = P.l2_ball(x, {"u": 1.0, "v": (2.0, None)})
    assert z["v"][1] == 7
    assert torch.equal(z["u"], P.l2_ball(x["u"], 1.0)) and torch.equal(z["v"][0], P.l2_ball(x["v"][0], 2.0))
    xs = points(6, (7, 5))
    assert torch.allclose(torch.func.vmap(P.simplex)(xs), P.simplex(xs), atol=1e-15)
    a = points(7, (5,))
    assert torch.allclose(torch.func.vmap(lambda t: P.halfspace(t, a, 0.0))(xs), P.halfspace(xs, a, 0.0), atol=1e-15)
