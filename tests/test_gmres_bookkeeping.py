"""GMRES keeps the scalars of one system on the host (a check every step) or on the device
(batched tensors read every ``check_every`` steps): both take the same decisions.

Each case runs GMRES twice on the same float64 system, once per bookkeeping (the host one
switched off through ``GMRES.HOST_BOOKKEEPING = False``), and compares solution, status,
residual and products with each other and with a dense solve; the cases cover every way
GMRES ends.
"""

import math

import pytest
import torch

import implicitgrad as ig
from implicitgrad.linalg import gmres as gmres_module

DT = torch.float64


def _nonsymmetric(n, seed, spread=1.0, shift=1.0):
    """``shift · I + spread · R`` with a random ``R`` of spectral radius about 1: its Krylov
    vectors keep a fraction of about ``spread / √(shift² + spread²)`` after one Gram-Schmidt
    pass, so a small spread needs the second pass at every step and a large one seldom."""
    g = torch.Generator().manual_seed(seed)
    return shift * torch.eye(n, dtype=DT) + spread * torch.randn(n, n, generator=g, dtype=DT) / math.sqrt(n)


def _rhs(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _with_nan(n):
    a = _nonsymmetric(n, 4)
    a[2, 5] = math.nan
    return a


CASES = {
    # name: (matrix, GMRES arguments, status)
    "converges_two_passes": (lambda: _nonsymmetric(40, 0, 0.3), {"maxiter": 200}, "converged"),
    # κ ≈ 57, unrestarted: 40 steps at most.
    "converges_one_pass": (lambda: _nonsymmetric(40, 1, 1.5), {"maxiter": 200, "restart": 45}, "converged"),
    "restarts": (lambda: _nonsymmetric(40, 2, 1.0, 2.0), {"maxiter": 400, "restart": 5}, "converged"),
    "max_iterations": (lambda: _nonsymmetric(40, 3, 1.5), {"maxiter": 23, "restart": 5}, "max_iterations"),
    "breakdown": (lambda: torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT)), {}, "breakdown"),
    "lucky_breakdown": (lambda: torch.diag(torch.tensor([2.0] * 5 + [-3.0] * 5, dtype=DT)), {}, "converged"),
    "nonfinite": (lambda: _with_nan(12), {}, "nonfinite"),
}


def _both(monkeypatch, solve):
    host = solve()
    monkeypatch.setattr(ig.GMRES, "HOST_BOOKKEEPING", False)
    device = solve()
    return host, device


def _agree(host, device, same_products=True):
    (xh, ih), (xd, idv) = host, device
    assert ih.status == idv.status
    if same_products:
        assert ih.iterations == idv.iterations
    else:
        assert ih.iterations <= idv.iterations
    assert math.isclose(ih.residual, idv.residual, rel_tol=1e-6, abs_tol=1e-14) or (
        math.isnan(ih.residual) and math.isnan(idv.residual))
    torch.testing.assert_close(xh, xd, rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("start", ["zero", "init"])
def test_host_and_device_bookkeeping_agree_on_one_system(monkeypatch, case, start):
    make, kwargs, status = CASES[case]
    a = make()
    n = a.shape[0]
    b = torch.ones(n, dtype=DT) if case in ("breakdown", "nonfinite") else _rhs(n, 7)
    init = None if start == "zero" else 0.1 * _rhs(n, 8)
    host, device = _both(monkeypatch, lambda: ig.GMRES(**kwargs)(lambda v: a @ v, b, init=init))
    x, info = host
    if status == "breakdown":
        # x is determined up to a component in the null space of A: compare A x. The host
        # path ends a cycle at the invariant subspace; the device path spends the rest of
        # the cycle's products on rounding.
        _agree((a @ x, info), (a @ device[0], device[1]), same_products=False)
        assert info.iterations <= 8
    else:
        _agree(host, device)
    assert info.status == status
    if status == "converged":
        assert info.residual <= 1e-10
        # The relative error is at most κ(A) times the relative residual.
        bound = float(torch.linalg.cond(a)) * 1e-10
        assert float((x - torch.linalg.solve(a, b)).norm() / x.norm()) <= bound
    elif status == "nonfinite":
        assert bool(torch.isnan(x).all())
    else:
        assert math.isfinite(info.residual) and info.residual > 1e-10
        assert info.residual == pytest.approx(float((b - a @ x).norm() / b.norm()), rel=1e-8)


def test_breakdown_keeps_the_least_squares_residual(monkeypatch):
    """``diag(1, 2, 0)``, ``b = 1``: the best residual is the null component, 1/√3."""
    a = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    x, info = ig.GMRES()(lambda v: a @ v, torch.ones(3, dtype=DT))
    assert info.status == "breakdown"
    assert info.residual == pytest.approx(3**-0.5, rel=1e-10)
    assert rel_close(x[:2], torch.tensor([1.0, 0.5], dtype=DT), 1e-12)


def rel_close(a, b, tol):
    return float((a - b).norm() / b.norm()) <= tol


def test_the_host_path_runs_for_one_system_checked_every_step(monkeypatch):
    calls = {"host": 0, "device": 0}
    host_cycle, device_cycle = gmres_module._HostArnoldi.cycle, gmres_module._cycle

    def count(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(gmres_module._HostArnoldi, "cycle", count("host", host_cycle))
    monkeypatch.setattr(gmres_module, "_cycle", count("device", device_cycle))
    a = _nonsymmetric(20, 5)
    b = _rhs(20, 5)
    ig.GMRES()(lambda v: a @ v, b)
    assert calls == {"host": 1, "device": 0}
    ig.GMRES(check_every=4)(lambda v: a @ v, b)
    assert calls == {"host": 1, "device": 1}
    mats = torch.stack([a, a.T])
    ig.GMRES()(lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1), torch.stack([b, b]), batch_ndim=1)
    assert calls == {"host": 1, "device": 2}


def test_a_solve_inside_the_product_gets_a_basis_of_its_own():
    """A solve of the same shape inside a product (the shape of the basis kept for the next
    solve) does not write into the basis of the solve around it."""
    a = _nonsymmetric(30, 6)
    inner = _nonsymmetric(30, 7, 2.0, 3.0)
    b = _rhs(30, 6)

    def nested(v):
        # a v = inner (inner⁻¹ a v), with the inner solve made by GMRES.
        y, inner_info = ig.GMRES(tol=1e-14)(lambda u: inner @ u, inner @ (a @ v))
        assert inner_info.converged
        return y

    x, info = ig.GMRES()(nested, b)
    assert info.converged and rel_close(x, torch.linalg.solve(a, b), 1e-9)


def test_float32_host_path_against_a_dense_solve():
    a = _nonsymmetric(40, 9, 0.5)
    b = _rhs(40, 9)
    x, info = ig.GMRES()(lambda v: a.float() @ v, b.float())
    assert info.converged and x.dtype == torch.float32
    assert rel_close(x.double(), torch.linalg.solve(a, b), 1e-4)


def _spread_spectrum(n, decades, normal):
    """``Q (diag(λ) + N) Qᵀ`` with ``λ`` log-spaced over ``decades`` and ``N`` zero or
    strictly upper triangular: Krylov vectors that grow nearly dependent, where one
    classical Gram-Schmidt pass loses orthogonality."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    upper = 0 if normal else torch.triu(torch.randn(n, n, generator=g, dtype=DT), 1)
    return q @ (torch.diag(torch.logspace(0, decades, n, dtype=DT)) + upper) @ q.T


BASES = {
    "near_identity": lambda n: _nonsymmetric(n, 10, 0.3),
    "random": lambda n: _nonsymmetric(n, 10, 1.5),
    "shifted": lambda n: _nonsymmetric(n, 10, 1.0, 3.0),
    "spectrum_1e8": lambda n: _spread_spectrum(n, 8, True),
    "nonnormal_1e8": lambda n: _spread_spectrum(n, 8, False),
}


@pytest.mark.parametrize("case", sorted(BASES))
def test_the_host_basis_stays_orthonormal(case):
    """One Gram-Schmidt pass where it suffices, two where it does not, the products shifted
    by v₀ᵀ A v₀: the basis stays orthonormal to rounding (one pass alone loses about
    1e-13 on the spread spectra) and A V_k = V_{k+1} H̄_k holds."""
    n, k = 300, 40
    a = BASES[case](n)
    b = _rhs(n, 10).unsqueeze(0)
    arnoldi = gmres_module._HostArnoldi(lambda v: v @ a.T, b, k)
    try:
        _, taken, invariant = arnoldi.cycle(b, float(b.norm()), 1e-300, torch.zeros_like(b), k)
        basis = arnoldi.rows.basis[: taken + 1].clone()
    finally:
        arnoldi.rows.give_back()
    assert taken == k and not invariant
    gram = basis @ basis.T
    assert float((gram - torch.eye(k + 1, dtype=DT)).abs().max()) <= 1e-14
    # The Krylov space of b: each A v_j lies in the span of v_0 … v_{j+1}.
    products = basis[:k] @ a.T
    remainder = products - (products @ basis.T) @ basis
    assert float(remainder.norm() / products.norm()) <= 1e-13


@pytest.mark.parametrize("check_every", [1, 3])
def test_a_product_that_builds_a_graph_is_refused_with_the_ways_out(check_every):
    """GMRES writes its basis in place: autograd cannot follow it. A product, right-hand side
    or start that requires grad gets an error naming the alternatives, not an error from
    deep inside an in-place operation; under ``torch.no_grad()`` the same solve runs."""
    a = _nonsymmetric(6, 11).requires_grad_(True)
    b = _rhs(6, 11)
    solver = ig.GMRES(check_every=check_every)
    with pytest.raises(RuntimeError, match="matvec's output requires grad.*implicit_solve.*no_grad.*BiCGStab"):
        solver(lambda v: a @ v, b)
    with pytest.raises(RuntimeError, match="b requires grad"):
        solver(lambda v: a.detach() @ v, b.clone().requires_grad_(True))
    with pytest.raises(RuntimeError, match="init requires grad"):
        solver(lambda v: a.detach() @ v, b, init=b.clone().requires_grad_(True))
    with torch.no_grad():
        x, info = solver(lambda v: a @ v, b)
    assert info.converged and rel_close(x, torch.linalg.solve(a.detach(), b), 1e-9)


@pytest.mark.parametrize("check_every", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_a_dense_solve(dtype, check_every):
    """Half precision takes the device path (its small triangular solve in float32, where
    half precision has none) for one system too, and reaches the default tolerance."""
    a = _nonsymmetric(8, 12, 0.5)
    b = _rhs(8, 12)
    x, info = ig.GMRES(check_every=check_every)(lambda v: a.to(dtype) @ v, b.to(dtype))
    assert x.dtype == dtype and info.converged, info
    assert rel_close(x.double(), torch.linalg.solve(a, b), 5e-2)
