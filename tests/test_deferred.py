"""on_failure="defer": a call that reads no value back to the host, checked later by
SolveInfo.verify() with the reports an eager call makes.

The host-read counter (``implicitgrad.testing.syncs.host_reads``) sees every read written
in Python; on CUDA each would be a synchronisation, and one is enough to make a CUDA-graph
capture fail. The references are the same calls with ``on_failure="warn"``.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import implicitgrad as ig
from implicitgrad._validation import SettingError
from implicitgrad.linalg._base import deferred_checks
from implicitgrad.testing.syncs import count_syncs, host_reads

DT = torch.float64
TRACE = {"backend": "aot_eager"}


def _data(n=50, d=10, seed=6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.sign(torch.randn(n, generator=g, dtype=DT))
    return X, y


def _logistic(w, log_lam, X, y):
    return F.softplus(-y * (X @ w)).mean() + 0.5 * (log_lam.exp() * w * w).sum()


def _step(on_failure, log_lam, *, inner=20, cg=10, tol=1e-30, compile=False, outer=None, data=None):
    """A fixed amount of work: ``inner`` gradient steps, ``cg`` CG iterations."""
    X, y = _data() if data is None else data
    log_lam = log_lam.detach().clone().requires_grad_(True)
    w, info = ig.implicit_solve(
        _logistic, torch.zeros(X.shape[1], dtype=DT), log_lam, X, y,
        solver=ig.solvers.GradientDescent(lr=0.5, maxiter=inner, tol=0),
        linear_solver=ig.CG(maxiter=cg, tol=tol, check_every=cg, compile=compile),
        on_failure=on_failure, return_info=True)
    loss = F.softplus(-y * (X @ w)).mean() if outer is None else outer(w)
    (g,) = torch.autograd.grad(loss, log_lam)
    return g, info


def _messages(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run()
    return out, [str(w.message) for w in caught if issubclass(w.category, ig.ImplicitGradWarning)]


def _same_info(deferred, eager):
    assert deferred.forward_status == eager.forward_status
    assert deferred.forward_residual == pytest.approx(eager.forward_residual, rel=1e-12, nan_ok=True)
    assert deferred.initial_residual == pytest.approx(eager.initial_residual, rel=1e-12, nan_ok=True)
    assert len(deferred.history) == len(eager.history)
    for d, e in zip(deferred.history, eager.history):
        assert (d.status, d.iterations, d.converged) == (e.status, e.iterations, e.converged)
        assert d.residual == pytest.approx(e.residual, rel=1e-9, abs=1e-300, nan_ok=True)
        assert d.message == e.message


@pytest.mark.parametrize("compile", [False, TRACE], ids=["eager", "compiled"])
def test_a_deferred_call_reads_nothing_and_gives_the_eager_gradient(compile):
    log_lam = torch.full((10,), -1.0, dtype=DT)
    _step("defer", log_lam, compile=compile)  # warm-up (a compiled layout compiles here)
    with count_syncs(host_reads) as syncs:
        deferred, info = _step("defer", log_lam, compile=compile)
    assert syncs.count == 0, syncs.summary()
    assert info.forward_status == "deferred" and info.backward.status == "deferred"
    eager, _ = _step("ignore", log_lam, compile=compile)
    torch.testing.assert_close(deferred, eager, rtol=0, atol=0)


def test_verify_reports_what_the_eager_call_reports_in_one_read():
    # 20 gradient steps leave the forward unconverged; tol=1e-30 is out of CG's reach.
    log_lam = torch.full((10,), -1.0, dtype=DT)
    (_, eager), said = _messages(lambda: _step("warn", log_lam))
    (_, info) = _step("defer", log_lam)
    assert len(said) == 2 and "not stationary" in said[0] and "did not converge" in said[1]
    def verify():
        with count_syncs(host_reads) as syncs:
            info.verify()
        return syncs

    syncs, told = _messages(verify)
    # One read for every check; one more for the residual at x0, evaluated (as in the eager
    # call) only because the residual at x exceeds forward_tol.
    assert syncs.count == 2, syncs.summary()
    assert told == said
    _same_info(info, eager)
    # Nothing changed on the device: a second verify reads the same numbers again.
    assert _messages(info.verify)[1] == said


def test_a_converged_call_verifies_silently():
    log_lam = torch.zeros(10, dtype=DT)
    _, info = _step("defer", log_lam, inner=400, cg=40, tol=1e-10)
    (_, eager), said = _messages(lambda: _step("warn", log_lam, inner=400, cg=40, tol=1e-10))
    assert said == []
    assert _messages(info.verify)[1] == []
    _same_info(info, eager)
    assert info.forward_status == "converged" and info.backward.converged


def test_verify_raises_or_stays_silent_as_asked():
    log_lam = torch.full((10,), -1.0, dtype=DT)
    _, info = _step("defer", log_lam)
    with pytest.raises(ig.ConvergenceError, match="not stationary"):
        info.verify(on_failure="raise")
    _, info = _step("defer", log_lam)
    assert _messages(lambda: info.verify(on_failure="ignore"))[1] == []
    assert info.forward_status == "not_converged" and info.backward.status == "max_iterations"
    with pytest.raises(ValueError, match="on_failure"):
        info.verify(on_failure="defer")


def test_a_nonfinite_parameter_raises_at_verify_as_it_does_eagerly():
    X, y = _data()
    log_lam = torch.full((10,), -1.0, dtype=DT)
    log_lam[3] = float("nan")
    with pytest.raises(ValueError, match="contains NaN/Inf") as eager:
        _step("warn", log_lam, data=(X, y))
    g, info = _step("defer", log_lam, data=(X, y))  # the call itself reads nothing, so cannot raise
    assert not torch.isfinite(g).all()
    with pytest.raises(ValueError, match="contains NaN/Inf") as deferred:
        info.verify()
    assert str(deferred.value) == str(eager.value)


def test_a_nonfinite_incoming_gradient_is_reported_at_verify():
    log_lam = torch.zeros(10, dtype=DT)

    def outer(w):
        return (w * torch.tensor(float("nan"), dtype=DT)).sum()

    kw = {"inner": 400, "cg": 40, "tol": 1e-10, "outer": outer}
    (g_eager, eager), said = _messages(lambda: _step("warn", log_lam, **kw))
    g, info = _step("defer", log_lam, **kw)
    told = _messages(info.verify)[1]
    assert any("incoming gradient" in m for m in said) and told == said
    assert torch.isnan(g).all() and torch.isnan(g_eager).all()
    _same_info(info, eager)


def test_a_nonfinite_inner_solution_poisons_the_gradient_and_is_reported():
    # λ = e⁵ makes the step 0.5 far beyond 2/L: each step multiplies w by about −73, and
    # 400 of them overflow to Inf, then NaN.
    log_lam = torch.full((10,), 5.0, dtype=DT)
    (g_eager, eager), said = _messages(lambda: _step("warn", log_lam, inner=400))
    g, info = _step("defer", log_lam, inner=400)
    assert torch.isnan(g).all() and torch.isnan(g_eager).all()
    told = _messages(info.verify)[1]
    assert told[0] == said[0] and "NaN/Inf" in told[0]
    assert info.forward_status == eager.forward_status == "nonfinite"


# ------------------------------------------------------------------ CG's deferred bookkeeping
def _spd(n=30, seed=0, shift=1e-2):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return (Q * torch.logspace(-2, 1, n, dtype=DT)) @ Q.T + shift * torch.eye(n, dtype=DT), g


def _matrices():
    A, g = _spd()
    n = A.shape[0]
    b = torch.randn(n, generator=g, dtype=DT)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    indefinite = (Q * torch.linspace(-1, 2, n, dtype=DT)) @ Q.T
    # Positive semidefinite with a 3-dimensional null space that b is not orthogonal to.
    singular = (Q * torch.cat([torch.zeros(3, dtype=DT), torch.logspace(-1, 0, n - 3, dtype=DT)])) @ Q.T
    nan = A.clone()
    nan[4, 5] = float("nan")
    return {"spd": (A, b), "spd_unconverged": (_spd(shift=1e-6)[0], b), "indefinite": (indefinite, b),
            "singular": (singular, b), "nonfinite": (nan, b), "zero_rhs": (A, torch.zeros(n, dtype=DT))}


@pytest.mark.parametrize("name", list(_matrices()))
def test_deferred_cg_ends_as_the_checking_cg(name):
    A, b = _matrices()[name]
    maxiter = 12 if name == "spd_unconverged" else 200

    def matvec(v):
        return [A @ v[0]]

    eager_x, eager = ig.CG(maxiter=maxiter, check_every=10).solve_leaves(matvec, [b])
    with deferred_checks(True), count_syncs(host_reads) as syncs:
        x, info = ig.CG(maxiter=maxiter).solve_leaves(matvec, [b])
    assert syncs.count == 0, syncs.summary()
    assert info.status == "deferred" and info.iterations >= eager.iterations
    info.settle(info.deferred_values().tolist())
    assert info.status == eager.status, (info, eager)
    assert info.converged == eager.converged
    if eager.status == "nonfinite":
        assert torch.isnan(x[0]).all()
        return
    assert info.residual == pytest.approx(eager.residual, rel=1e-6, abs=1e-12)
    if eager.converged:
        # Converged: the same solution to the tolerance, whether CG stopped or kept still.
        exact = torch.linalg.solve(A, b)
        assert (x[0] - exact).norm() <= 1e-8 * max(exact.norm(), 1)
    else:
        torch.testing.assert_close(x[0], eager_x[0], rtol=1e-10, atol=1e-12)


def test_deferred_cg_keeps_per_system_convergence_in_a_batch(monkeypatch):
    # One easy system and one that needs all the iterations: the easy one stops moving at
    # its tolerance, as it stops in the checking CG with per-system masks (the device
    # bookkeeping, checked every iteration), so both end on the same iterates.
    A, g = _spd()
    b = torch.randn(2, A.shape[0], generator=g, dtype=DT)
    hard = A + torch.diag(torch.logspace(-5, 2, A.shape[0], dtype=DT))  # a far wider spectrum

    def matvec(v):
        return [torch.stack([A @ v[0][0], hard @ v[0][1]])]

    with deferred_checks(True):
        x, info = ig.CG(maxiter=200, tol=1e-8).solve_leaves(matvec, [b], batch_ndim=1)
    info.settle(info.deferred_values().tolist())
    monkeypatch.setattr(ig.CG, "HOST_SYSTEMS", 0)
    checked, checked_info = ig.CG(maxiter=200, tol=1e-8, check_every=1).solve_leaves(matvec, [b], batch_ndim=1)
    assert info.status == checked_info.status and info.residual == checked_info.residual
    torch.testing.assert_close(x[0], checked[0], rtol=0, atol=0)
    # The easy system met its tolerance long before the budget ran out.
    alone = ig.CG(maxiter=200, tol=1e-8, check_every=1).solve_leaves(lambda v: [A @ v[0]], [b[0]])[1]
    assert alone.converged and alone.iterations < 200


# ------------------------------------------------------------------ what defer refuses
def _defer(**kw):
    X, y = _data()
    args = {"solver": ig.solvers.GradientDescent(lr=0.5, maxiter=5, tol=0), "linear_solver": ig.CG(maxiter=5),
            "on_failure": "defer", "return_info": True}
    args.update(kw)
    return ig.implicit_solve(_logistic, torch.zeros(10, dtype=DT), torch.zeros(10, dtype=DT), X, y, **args)


@pytest.mark.parametrize("kw,match", [
    ({"return_info": False}, "return_info=True"),
    ({"linear_solver": ig.GMRES()}, "GMRES reads its residual"),
    ({"linear_solver": ig.MINRES()}, "MINRES reads its residual"),
    ({"warm_start": ig.WarmStart()}, "warm_start"),
    ({"mode": "unrolled"}, "mode='implicit'"),
])
def test_defer_refuses_what_would_read_or_lose_its_checks(kw, match):
    with pytest.raises(SettingError, match=match):
        _defer(**kw)


def test_defer_is_refused_inside_a_torch_func_transform():
    X, y = _data()

    def one(log_lam):
        return ig.implicit_solve(
            _logistic, torch.zeros(10, dtype=DT), log_lam, X, y,
            solver=ig.solvers.GradientDescent(lr=0.5, maxiter=5, tol=0), linear_solver=ig.CG(maxiter=5),
            on_failure="defer", return_info=True)[0].sum()

    with pytest.raises(SettingError, match="torch.func"):
        torch.func.vmap(one)(torch.zeros(3, 10, dtype=DT))


def test_the_layers_do_not_take_defer():
    # A layer returns no SolveInfo to verify: deferred checks would be lost.
    class Shrink(ig.nn.ImplicitLayer):
        def objective(self, x, inputs, params):
            return 0.5 * ((x - inputs[0]) ** 2).sum()

    with pytest.raises(SettingError, match="on_failure"):
        Shrink(solver=ig.solvers.GradientDescent(lr=0.5, maxiter=5), on_failure="defer")


def _nonsymmetric_root(on_failure):
    """A root condition with a non-symmetric Jacobian, differentiated with CG: the
    symmetry probe's report, then CG's (its residual may not meet the tolerance)."""
    a = torch.eye(6, dtype=DT) + 0.05 * torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=DT)
    theta = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=DT).requires_grad_(True)
    x, info = ig.root_solve(lambda x, th: a @ x - th, torch.zeros(6, dtype=DT), theta,
                            solver=lambda fn, x0, th: torch.linalg.solve(a, th.detach()),
                            linear_solver=ig.CG(maxiter=50), on_failure=on_failure, return_info=True)
    torch.autograd.grad(x.sum(), theta)
    return info


def _outcome(run):
    """The ConvergenceError ``run`` raises (its message, or None) and the warnings it gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run()
            error = None
        except ig.ConvergenceError as exc:
            error = str(exc)
    return error, [str(w.message) for w in caught if issubclass(w.category, ig.ImplicitGradWarning)]


@pytest.mark.parametrize("on_failure", ["raise", "warn", "ignore"])
def test_the_symmetry_probe_reports_at_verify_as_it_does_eagerly(on_failure):
    """The eager call only warns that CG's matrix is not symmetric, even with
    on_failure="raise" (what fails after it raises); verify(on_failure) does the same."""
    eager = _outcome(lambda: _nonsymmetric_root(on_failure))
    info = _nonsymmetric_root("defer")
    deferred = _outcome(lambda: info.verify(on_failure=on_failure))
    assert deferred == eager
    error, said = eager
    symmetric = [m for m in said if "assumes a symmetric matrix" in m]
    expected = {"raise": (1, True), "warn": (1, False), "ignore": (0, False)}[on_failure]
    assert (len(symmetric), error is not None) == expected
