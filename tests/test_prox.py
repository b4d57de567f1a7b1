"""ig.prox: each operator against its optimality condition, its derivatives against central
finite differences, pytrees, vmap and bad arguments."""

import pytest
import torch

import implicitgrad as ig

DT = torch.float64
ATOL = 1e-12


def points(seed, shape=(40,)):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(shape, generator=g, dtype=DT)


def central_difference(fn, t, h=1e-6):
    """d fn / d t for a scalar tensor ``t`` (fn returns a tensor)."""
    return (fn(t + h) - fn(t - h)) / (2 * h)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scaling", [1.0, 0.3])
def test_lasso_subgradient_condition(seed, scaling):
    x, lam = points(seed), 0.8
    z = ig.prox.lasso(x, lam, scaling)
    # x − z ∈ sλ ∂‖z‖₁: equal to sλ·sign(z) on the support, at most sλ in size off it.
    on = z != 0
    assert torch.allclose((x - z)[on], scaling * lam * torch.sign(z[on]), atol=ATOL)
    assert bool(((x - z)[~on].abs() <= scaling * lam + ATOL).all())
    assert bool(on.any()) and bool((~on).any())


@pytest.mark.parametrize("seed", range(3))
def test_elastic_net_subgradient_condition(seed):
    x, (l1, l2), s = points(seed), (0.7, 0.4), 0.5
    z = ig.prox.elastic_net(x, (l1, l2), s)
    residual = x - z - s * l2 * z  # ∈ s·l1·∂‖z‖₁
    on = z != 0
    assert torch.allclose(residual[on], s * l1 * torch.sign(z[on]), atol=ATOL)
    assert bool((residual[~on].abs() <= s * l1 + ATOL).all())


@pytest.mark.parametrize("axis", [None, -1, 0])
def test_group_lasso_condition(axis):
    x = points(3, (6, 5))
    x[1] *= 0.05  # a row that the threshold zeroes
    lam, s = 1.5, 0.8
    z = ig.prox.group_lasso(x, lam, s, axis=axis)
    # A group runs along ``axis``: the rows for axis=-1, the columns for axis=0.
    other = {None: None, -1: 0, 0: 1}[axis]
    groups = [(x, z)] if axis is None else list(zip(x.unbind(other), z.unbind(other)))
    for xg, zg in groups:
        if zg.norm() > 0:  # x − z = sλ z/‖z‖
            assert torch.allclose(xg - zg, s * lam * zg / zg.norm(), atol=ATOL)
        else:
            assert float(xg.norm()) <= s * lam + ATOL
    if axis == -1:
        assert float(z[1].norm()) == 0.0


def test_ridge_nonnegative_box_conditions():
    x = points(4)
    z = ig.prox.ridge(x, 0.6, 0.5)
    assert torch.allclose(x - z, 0.5 * 0.6 * z, atol=ATOL)
    assert torch.equal(ig.prox.nonnegative(x), torch.where(x > 0, x, torch.zeros_like(x)))
    lower, upper = -0.5 * torch.ones_like(x), torch.linspace(0.1, 2.0, x.numel(), dtype=DT)
    z = ig.prox.box(x, (lower, upper), 3.0)
    inside = (x >= lower) & (x <= upper)
    assert torch.equal(z[inside], x[inside])
    assert torch.equal(z[x < lower], lower[x < lower]) and torch.equal(z[x > upper], upper[x > upper])


@pytest.mark.parametrize(
    "prox, strength",
    [
        (lambda x, t: ig.prox.lasso(x, t, 0.7), 0.9),
        (lambda x, t: ig.prox.elastic_net(x, (t, 2 * t), 0.7), 0.9),
        (lambda x, t: ig.prox.group_lasso(x, t, 0.7, axis=-1), 0.9),
        (lambda x, t: ig.prox.ridge(x, t, 0.7), 0.9),
        (lambda x, t: ig.prox.box(x, (-t, t)), 0.9),
    ],
    ids=["lasso", "elastic_net", "group_lasso", "ridge", "box"],
)
def test_derivatives_match_central_differences(prox, strength):
    x = points(5, (4, 5)).requires_grad_(True)
    t = torch.tensor(strength, dtype=DT, requires_grad=True)
    w = points(6, (4, 5))  # a fixed cotangent
    gx, gt = torch.autograd.grad((prox(x, t) * w).sum(), (x, t))
    fd_t = central_difference(lambda s: (prox(x.detach(), s) * w).sum(), t.detach())
    assert float(gt) == pytest.approx(float(fd_t), rel=1e-8, abs=1e-10)
    e = torch.zeros_like(x)
    e[1, 2] = 1.0
    fd_x = central_difference(lambda s: (prox(x.detach() + s * e, t.detach()) * w).sum(), torch.tensor(0.0, dtype=DT))
    assert float(gx[1, 2]) == pytest.approx(float(fd_x), rel=1e-8, abs=1e-10)


def test_pytrees_and_per_leaf_strengths():
    x = {"a": points(7, (3,)), "b": [points(8, (2, 2)), "tag"]}
    z = ig.prox.lasso(x, {"a": 0.1, "b": [1.0, None]})
    assert z["b"][1] == "tag"
    assert torch.equal(z["a"], ig.prox.lasso(x["a"], 0.1))
    assert torch.equal(z["b"][0], ig.prox.lasso(x["b"][0], 1.0))
    shared = ig.prox.elastic_net(x, (0.3, 0.2))
    assert torch.equal(shared["a"], ig.prox.elastic_net(x["a"], (0.3, 0.2)))


def test_group_lasso_at_zero_has_a_finite_derivative():
    x = torch.zeros(3, dtype=DT, requires_grad=True)
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    gx, gl = torch.autograd.grad(ig.prox.group_lasso(x, lam).sum(), (x, lam))
    assert torch.isfinite(gx).all() and torch.isfinite(gl)


def test_vmap_over_strengths():
    x = points(9)
    lams = torch.tensor([0.1, 0.5, 2.0], dtype=DT)
    batched = torch.func.vmap(lambda lam: ig.prox.lasso(x, lam))(lams)
    for row, lam in zip(batched, lams):
        assert torch.equal(row, ig.prox.lasso(x, lam))


@pytest.mark.parametrize("prox", [ig.prox.elastic_net, ig.prox.box])
def test_pair_strength_is_required(prox):
    with pytest.raises(TypeError, match="pair"):
        prox(points(0), 0.5)
