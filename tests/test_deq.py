"""ig.nn.DEQ: implicit gradients against dense per-sample solves and unrolled iteration, the
phantom and Jacobian-free approximations against their own definitions, per-sample stopping,
the Hutchinson regulariser against the exact Frobenius norm, failures and bad arguments."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import implicitgrad as ig
from implicitgrad.nn import DEQ

DT = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x + c), W scaled to spectral norm ``contraction``."""

    def __init__(self, width=5, contraction=0.7, seed=0, dtype=DT):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(width, width, generator=g, dtype=dtype)
        self.W = nn.Parameter(contraction * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(torch.randn(width, width, generator=g, dtype=dtype) / width**0.5)
        self.c = nn.Parameter(0.1 * torch.randn(width, generator=g, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.c)


def tight():
    return dict(solver=ig.solvers.AndersonAcceleration(maxiter=500, tol=1e-13),
                linear_solver=ig.GMRES(tol=1e-13, maxiter=200))


def data(batch=4, width=5, seed=1):
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(seed), dtype=DT)


def rel(a, b):
    return float(((a - b).norm() / b.norm()).detach())


def sample_jacobian(cell, z, x, i):
    """∂f/∂z of sample ``i`` at ``z[i]``, a dense matrix."""
    xi = x[i : i + 1].detach()
    return torch.autograd.functional.jacobian(lambda zi: cell(zi.unsqueeze(0), xi).squeeze(0), z[i].detach())


def dense_reference(cell, z, x, v):
    """Per sample: u = (I − ∂f/∂z)⁻ᵀ v by a dense solve, then (∂f/∂(θ, x))ᵀ u by autograd."""
    z = z.detach()
    us = []
    for i in range(z.shape[0]):
        J = sample_jacobian(cell, z, x, i)
        us.append(torch.linalg.solve((torch.eye(z.shape[1], dtype=DT) - J).T, v[i]))
    u = torch.stack(us)
    xr = x.detach().requires_grad_(True)
    out = cell(z, xr)
    return torch.autograd.grad(out, [*cell.parameters(), xr], u)


def test_implicit_gradient_matches_dense_per_sample_solves():
    cell, x = Cell(), data().requires_grad_(True)
    deq = DEQ(cell, **tight())
    z, info = deq(x, return_info=True)
    with torch.no_grad():
        assert rel(cell(z, x), z) < 1e-12
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    ours = torch.autograd.grad((z * v).sum(), [*cell.parameters(), x])
    expected = dense_reference(cell, z, x, v)
    for a, e in zip(ours, expected):
        assert rel(a, e) < 1e-8
    assert info.solve.backward is not None and info.solve.backward.converged


def test_implicit_gradient_matches_unrolled_iteration():
    cell, x = Cell(contraction=0.5), data()
    z = DEQ(cell, **tight())(x)
    (g_implicit,) = torch.autograd.grad(z.square().sum(), cell.W)
    zu = torch.zeros_like(x)
    for _ in range(120):  # 0.5^120: the unrolled map has converged to machine precision
        zu = cell(zu, x)
    (g_unrolled,) = torch.autograd.grad(zu.square().sum(), cell.W)
    assert rel(g_implicit, g_unrolled) < 1e-10


def test_phantom_gradient_is_its_damped_unrolling_and_converges_to_implicit():
    cell, x = Cell(contraction=0.5), data()
    z_star = DEQ(cell, **tight())(x)
    (implicit,) = torch.autograd.grad(z_star.square().sum(), cell.W)
    errors = []
    for steps in (1, 5, 20, 200):
        deq = DEQ(cell, backward="phantom", phantom_steps=steps, phantom_damping=0.8, **tight())
        z = deq(x)
        (phantom,) = torch.autograd.grad(z.square().sum(), cell.W)
        zp = z_star.detach()
        for _ in range(steps):
            zp = 0.2 * zp + 0.8 * cell(zp, x)
        (manual,) = torch.autograd.grad(zp.square().sum(), cell.W)
        assert rel(phantom, manual) < 1e-12
        errors.append(rel(phantom, implicit))
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2
    assert errors[-1] < 1e-8


def test_jacobian_free_gradient_is_one_step_from_the_detached_fixed_point():
    cell, x = Cell(), data()
    z_star = DEQ(cell, **tight())(x)
    z = DEQ(cell, backward="jacobian_free", **tight())(x)
    (jfb,) = torch.autograd.grad(z.square().sum(), cell.W)
    (manual,) = torch.autograd.grad(cell(z_star.detach(), x).square().sum(), cell.W)
    (implicit,) = torch.autograd.grad(z_star.square().sum(), cell.W)
    assert rel(jfb, manual) < 1e-12
    assert rel(jfb, implicit) > 1e-2  # an approximation, not the gradient of the layer


def test_each_sample_meets_its_own_tolerance():
    """Sample 0 is slow (rate 0.95), the others fast (0.1); a batch norm would hide it."""

    class Scaled(nn.Module):  # f(z, x) = ρ W z + c with W orthogonal: the iteration contracts by exactly ρ
        def __init__(self):
            super().__init__()
            W = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=DT))[0]
            self.W = nn.Parameter(W)

        def forward(self, z, x):
            return x[:, :1] * (z @ self.W.T) + x[:, 1:]

    x = torch.cat([torch.tensor([[0.95], [0.1], [0.1], [0.1]], dtype=DT), data(4, 6)], 1)
    z0 = torch.zeros(4, 6, dtype=DT)
    fpi = ig.solvers.FixedPointIteration(maxiter=1000, tol=1e-10)
    z, info = DEQ(Scaled(), solver=fpi)(x, z0, return_info=True)
    assert info.solve.forward_status == "converged"
    residuals = torch.tensor(info.solve.forward_residuals)
    initial = torch.tensor(info.solve.initial_residuals)
    assert bool((residuals <= 1e-10 * initial.clamp_min(1.0)).all())
    assert 400 < info.forward_iterations < 1000  # log(1e-10) / log(0.95) ≈ 449 steps for the slow sample
    assert float(info.relative_residuals.max()) < 1e-9
    with pytest.warns(ig.ImplicitGradWarning, match="1 of 4 problems"):
        DEQ(Scaled(), solver=ig.solvers.FixedPointIteration(maxiter=60, tol=1e-10))(x, z0)


def test_non_contractive_f_is_reported_per_on_failure():
    class Drift(nn.Module):  # f(z) = z + 1 + softplus(a x): no fixed point
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones((), dtype=DT))

        def forward(self, z, x):
            return z + 1 + nn.functional.softplus(self.a * x)

    x = data(3, 2)
    solver = ig.solvers.AndersonAcceleration(maxiter=30)
    with pytest.warns(ig.ImplicitGradWarning, match="not a contraction"):
        DEQ(Drift(), solver=solver)(x)
    with pytest.raises(ig.ConvergenceError, match="not a contraction"):
        DEQ(Drift(), solver=solver, on_failure="raise")(x)
    with pytest.raises(ig.ConvergenceError):
        DEQ(Drift(), solver=solver, backward="phantom", on_failure="raise")(x)


def test_hutchinson_estimate_is_unbiased_for_the_frobenius_norm():
    torch.manual_seed(0)
    cell, x = Cell(), data()
    deq = DEQ(cell, jacobian_samples=4000, **tight())
    z, info = deq(x, return_info=True)
    exact = []
    for i in range(x.shape[0]):
        J = sample_jacobian(cell, z, x, i)
        exact.append((J.square().sum(), (J @ J.T).square().sum()))
    mean = sum(e[0] for e in exact) / len(exact)
    # Var ‖εᵀJ‖² = 2‖J Jᵀ‖_F² for Gaussian ε; the estimate averages 4000 × batch draws.
    std = (sum(2 * e[1] for e in exact) / (4000 * len(exact) ** 2)) ** 0.5
    assert abs(float(info.jacobian_loss.detach()) - float(mean)) < 5 * float(std)
    (g,) = torch.autograd.grad(info.jacobian_loss, cell.W)
    assert float(g.norm()) > 0
    assert deq.last_info is info


def test_float32_and_no_grad_run_quietly():
    cell, x = Cell(dtype=torch.float32), data().float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, info = DEQ(cell)(x, return_info=True)
        z.sum().backward()
        with torch.no_grad():
            z2 = DEQ(cell, jacobian_samples=1)(x)
    assert info.solve.forward_status == "converged" and info.jacobian_loss is None
    assert not z2.requires_grad and torch.allclose(z.detach(), z2, atol=1e-4)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        DEQ(lambda z, x: z)
    with pytest.raises(ValueError, match="backward must be one of"):
        DEQ(Cell(), backward="unrolled")
    with pytest.raises(ValueError, match="phantom_damping"):
        DEQ(Cell(), phantom_damping=1.5)
    with pytest.raises(ValueError, match="batch size"):
        DEQ(Cell())(data(4), torch.zeros(3, 5, dtype=DT))
    with pytest.raises(TypeError, match="linear_solver"):
        DEQ(Cell(), linear_solver="gmres")


def test_agrees_with_torchdeq():
    torchdeq = pytest.importorskip("torchdeq", reason="torchdeq is an optional peer (pip install implicitgrad[peers])")
    cell, x = Cell(contraction=0.8), data()
    z = DEQ(cell, **tight())(x)
    (ours,) = torch.autograd.grad(z.square().sum(), cell.W)
    deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=200, f_tol=1e-12, f_stop_mode="abs", ift=True,
                           b_solver="anderson", b_max_iter=200, b_tol=1e-12, b_stop_mode="abs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zs, _ = deq(lambda z: cell(z, x), torch.zeros_like(x))
    (theirs,) = torch.autograd.grad(zs[-1].square().sum(), cell.W)
    assert rel(z.detach(), zs[-1].detach()) < 1e-8
    assert rel(ours, theirs) < 1e-6


# ------------------------------------------------------------------------- forward mode
def dense_tangent(cell, z, x, b):
    """Per sample, ż = (I − ∂f/∂z)⁻¹ b by a dense solve."""
    out = []
    for i in range(x.shape[0]):
        J = sample_jacobian(cell, z, x, i)
        out.append(torch.linalg.solve(torch.eye(J.shape[0], dtype=DT) - J, b[i]))
    return torch.stack(out)


def unrolled(cell, x, params=None, steps=400):
    """The plain iteration z ← f(z, x) from zero, differentiable by any transform."""
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = cell(z, x) if params is None else torch.func.functional_call(cell, params, (z, x))
    return z


@pytest.mark.parametrize("grad_mode", [True, False])
def test_jvp_in_the_input_matches_dense_solve_and_unrolled_iteration(grad_mode):
    cell, x, xdot = Cell(), data(), data(seed=5)
    deq = DEQ(cell, **tight())
    with torch.set_grad_enabled(grad_mode):
        z, zdot = torch.func.jvp(deq, (x,), (xdot,))
    zs = z.detach()
    (b,) = torch.func.jvp(lambda xx: cell(zs, xx), (x,), (xdot,))[1:]
    assert rel(zdot, dense_tangent(cell, zs, x, b.detach())) < 1e-10
    with torch.no_grad():
        _, zdot_unrolled = torch.func.jvp(lambda xx: unrolled(cell, xx), (x,), (xdot,))
    assert rel(zdot, zdot_unrolled) < 1e-10


def test_jvp_in_the_parameters_matches_dense_solve_and_unrolled_iteration():
    cell, x = Cell(), data()
    deq = DEQ(cell, **tight())
    params = {k: v.detach() for k, v in cell.named_parameters()}
    g = torch.Generator().manual_seed(6)
    tangents = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in params.items()}
    z, zdot = torch.func.jvp(lambda p: torch.func.functional_call(deq, {f"f.{k}": v for k, v in p.items()}, (x,)),
                             (params,), (tangents,))
    zs = z.detach()
    _, b = torch.func.jvp(lambda p: torch.func.functional_call(cell, p, (zs, x)), (params,), (tangents,))
    assert rel(zdot, dense_tangent(cell, zs, x, b)) < 1e-10
    with torch.no_grad():
        _, zdot_unrolled = torch.func.jvp(lambda p: unrolled(cell, x, p), (params,), (tangents,))
    assert rel(zdot, zdot_unrolled) < 1e-10


@pytest.mark.parametrize("mode", ["phantom", "jacobian_free"])
def test_jvp_of_the_approximate_modes_is_the_transpose_of_their_backward(mode):
    """Forward mode through phantom / Jacobian-free gives the same approximation as their
    backward: ⟨u, J̃ ẋ⟩ = ⟨J̃ᵀ u, ẋ⟩; for Jacobian-free, J̃ ẋ = ∂f/∂x ẋ at z*."""
    cell, x, xdot, u = Cell(), data(), data(seed=5), data(seed=7)
    deq = DEQ(cell, backward=mode, **tight())
    z, zdot = torch.func.jvp(deq, (x,), (xdot,))
    leaf = x.clone().requires_grad_(True)
    (xbar,) = torch.autograd.grad(deq(leaf), leaf, u)
    gap = ((u * zdot).sum() - (xbar * xdot).sum()).detach()
    assert abs(float(gap)) < 1e-12 * float((zdot.norm() * u.norm()).detach())
    if mode == "jacobian_free":
        z_star = DEQ(cell, **tight())(x).detach()
        _, expected = torch.func.jvp(lambda xx: cell(z_star, xx), (x,), (xdot,))
        assert rel(zdot, expected) < 1e-12


def test_a_plain_callable_linear_solver_is_accepted():
    """A user's linear solver ``(matvec, b) -> x`` (here a dense solve built from products)."""

    def dense(matvec, b):
        n = b.numel()
        cols = [matvec(e.reshape(b.shape)).reshape(-1) for e in torch.eye(n, dtype=b.dtype)]
        return torch.linalg.solve(torch.stack(cols, 1), b.reshape(-1)).reshape(b.shape)

    cell, x = Cell(), data().requires_grad_(True)
    z = DEQ(cell, solver=ig.solvers.AndersonAcceleration(maxiter=500, tol=1e-13), linear_solver=dense)(x)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    ours = torch.autograd.grad((z * v).sum(), [*cell.parameters(), x])
    for a, e in zip(ours, dense_reference(cell, z, x, v)):
        assert rel(a, e) < 1e-8
