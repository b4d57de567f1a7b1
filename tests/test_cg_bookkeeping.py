"""CG keeps its per-system scalars on the host (few systems, a check every iteration) or
on the device (masks read every ``check_every`` iterations): both take the same decisions.

Each case runs CG twice on the same float64 system, once per bookkeeping (the host one
switched off through ``CG.HOST_SYSTEMS = 0``), and compares solution, status, residual and
products; the cases cover every way CG ends. One system on the CPU has a third
bookkeeping, with Python step sizes (``CG.SCALAR_BOOKKEEPING``), compared the same way with
the one-read host bookkeeping it replaces there.
"""

import math

import pytest
import torch

import implicitgrad as ig

DT = torch.float64


def _spd(n, seed, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ q.T


def _rhs(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _indefinite(n):
    a = _spd(n, 1)
    return a - 2.0 * torch.eye(n, dtype=DT) * a.diagonal().mean()


def _nearly_singular(n):
    # The smallest eigenvalue is rounding-level: CG takes giant steps along its vector.
    a = _spd(n, 2)
    v = torch.linalg.eigh(a).eigenvectors[:, 0]
    return a - torch.linalg.eigvalsh(a)[0] * torch.outer(v, v)


def _singular(n):
    # b = e_last lies in the null space of diag(1, ..., 1, 0): the first direction has A p = 0.
    return torch.diag(torch.cat([torch.ones(n - 1, dtype=DT), torch.zeros(1, dtype=DT)]))


CASES = {
    "converges": (lambda: _spd(30, 0), 100, 1e-10),
    "max_iterations": (lambda: _spd(30, 0, cond=1e4), 5, 1e-10),
    "negative_curvature": (lambda: _indefinite(30), 100, 1e-10),
    "diverging": (lambda: _nearly_singular(30), 100, 1e-12),
    "singular": (lambda: _singular(30), 100, 1e-12),
}


def _rhs_for(case, n, seed):
    return torch.eye(n, dtype=DT)[-1] if case == "singular" else _rhs(n, seed)


def _both(monkeypatch, solve):
    host = solve()
    monkeypatch.setattr(ig.CG, "HOST_SYSTEMS", 0)
    device = solve()
    return host, device


def _agree(host, device):
    (xh, ih), (xd, idv) = host, device
    assert ih.status == idv.status
    assert ih.iterations == idv.iterations
    assert math.isclose(ih.residual, idv.residual, rel_tol=1e-8, abs_tol=1e-14)
    torch.testing.assert_close(xh, xd, rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_host_and_device_bookkeeping_agree_on_one_system(monkeypatch, case):
    make, maxiter, tol = CASES[case]
    a, b = make(), _rhs_for(case, 30, 3)
    host, device = _both(monkeypatch, lambda: ig.CG(maxiter=maxiter, tol=tol, check_every=1)(lambda v: a @ v, b))
    _agree(host, device)
    assert host[1].status == {"converges": "converged"}.get(case, case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_scalar_and_one_read_bookkeeping_agree_on_one_system(monkeypatch, case):
    make, maxiter, tol = CASES[case]
    a, b = make(), _rhs_for(case, 30, 3)

    def solve():
        return ig.CG(maxiter=maxiter, tol=tol, check_every=1)(lambda v: a @ v, b)

    scalar = solve()
    monkeypatch.setattr(ig.CG, "SCALAR_BOOKKEEPING", False)
    _agree(scalar, solve())


def test_host_and_device_bookkeeping_agree_on_a_mixed_batch(monkeypatch):
    # One easy, one ill-conditioned, one indefinite and one nearly singular system in one batch:
    # each leaves the batch on its own.
    mats = torch.stack([_spd(30, 0), _spd(30, 4, cond=1e5), _indefinite(30), _nearly_singular(30)])
    b = torch.stack([_rhs(30, s) for s in range(4)])

    def solve():
        return ig.CG(maxiter=60, tol=1e-10, check_every=1)(lambda v: torch.einsum("sij,sj->si", mats, v), b,
                                                          batch_ndim=1)

    host, device = _both(monkeypatch, solve)
    _agree(host, device)
    exact = torch.linalg.solve(mats[0], b[0])
    torch.testing.assert_close(host[0][0], exact, rtol=1e-8, atol=1e-10)


def test_nan_in_one_system_stays_in_that_system(monkeypatch):
    a = _spd(10, 0)
    b = torch.stack([_rhs(10, 0), torch.full((10,), float("nan"), dtype=DT)])
    host, device = _both(monkeypatch, lambda: ig.CG(maxiter=50, tol=1e-12, check_every=1)(
        lambda v: v @ a.T, b, batch_ndim=1))
    for x, info in (host, device):
        assert info.status == "nonfinite"
        assert torch.isnan(x[1]).all()
    # The host bookkeeping lets the finite system finish its solve.
    torch.testing.assert_close(host[0][0], torch.linalg.solve(a, b[0]), rtol=1e-8, atol=1e-10)


def test_preconditioned_and_warm_started_solves_agree(monkeypatch):
    a, b = _spd(30, 5, cond=1e3), _rhs(30, 6)
    diag = a.diagonal()
    init = torch.linalg.solve(a, b) + 1e-3 * _rhs(30, 7)

    def solve():
        return ig.CG(maxiter=200, tol=1e-11, preconditioner=lambda r: r / diag, check_every=1)(
            lambda v: a @ v, b, init=init)

    host, device = _both(monkeypatch, solve)
    _agree(host, device)
    assert host[1].converged


def test_rounding_noise_below_an_unreachable_tol_is_not_divergence(monkeypatch):
    # tol = 1e-30 cannot be met in float64: CG reaches rounding level, where the residual
    # fluctuates by orders of magnitude; that is not divergence, and all products are spent.
    # (This system stopped as "diverging" after 102 products before rounding noise was told apart.)
    a, b = _spd(30, 0, cond=1e3), _rhs(30, 3)
    host, device = _both(monkeypatch, lambda: ig.CG(maxiter=200, tol=1e-30, check_every=1)(lambda v: a @ v, b))
    for x, info in (host, device):
        assert info.status == "max_iterations" and info.iterations == 200
        torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-11, atol=1e-13)


def test_the_three_bookkeepings_agree_on_a_long_system(monkeypatch):
    # From 2,048 unknowns on, one system's inner products are matrix products: the same in
    # every bookkeeping, which therefore still agree.
    d = torch.logspace(0, 3, 2500, dtype=DT)
    b = _rhs(2500, 8)

    def solve():
        return ig.CG(maxiter=1000, tol=1e-10, check_every=1)(lambda v: d * v, b)

    scalar = solve()
    monkeypatch.setattr(ig.CG, "SCALAR_BOOKKEEPING", False)
    one_read = solve()
    monkeypatch.setattr(ig.CG, "HOST_SYSTEMS", 0)
    device = solve()
    _agree(scalar, one_read)
    _agree(scalar, device)
    assert scalar[1].converged
    torch.testing.assert_close(scalar[0], b / d, rtol=1e-8, atol=1e-12)
