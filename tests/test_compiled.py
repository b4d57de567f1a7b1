"""CG(compile=...): the fixed-iteration backward handed to torch.compile.

The tests trace with the ``aot_eager`` backend (the same graph capture, no C++ code
generation, seconds instead of a minute); the benchmarks time the default backend.
"""

import pytest
import torch

import implicitgrad as ig
from implicitgrad import _compiled

DT = torch.float64
TRACE = {"backend": "aot_eager"}


def _logistic(n=80, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) > 0.5).to(DT)

    def objective(w, log_lam, X, y):
        return torch.nn.functional.softplus(-(2 * y - 1) * (X @ w)).mean() + 0.5 * (log_lam.exp() * w**2).sum()

    return objective, X, y


SOLVER = ig.solvers.LBFGS(maxiter=500, tol=1e-12)


def _hypergradient(linear_solver, log_lam, objective, X, y, **kw):
    log_lam = log_lam.detach().clone().requires_grad_(True)
    w, info = ig.implicit_solve(objective, torch.zeros(X.shape[1], dtype=DT), log_lam, X, y, solver=SOLVER,
                                linear_solver=linear_solver, return_info=True, **kw)
    (g,) = torch.autograd.grad((w**2).sum() + w.sum(), log_lam)
    return g, info


def test_compiled_backward_equals_the_eager_one_and_reports_its_solve():
    objective, X, y = _logistic()
    log_lam = torch.linspace(-2, 0, 12, dtype=DT)
    eager, _ = _hypergradient(ig.CG(maxiter=60, tol=1e-12), log_lam, objective, X, y)
    compiled, info = _hypergradient(ig.CG(maxiter=30, tol=1e-10, compile=TRACE), log_lam, objective, X, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-14)
    assert info.backward.solver == "CG(compile)" and info.backward.iterations == 30
    assert info.backward.converged and info.backward.residual < 1e-10


def test_too_few_iterations_are_reported_not_hidden():
    objective, X, y = _logistic()
    with pytest.warns(ig.ImplicitGradWarning, match="did not converge"):
        _, info = _hypergradient(ig.CG(maxiter=2, tol=1e-10, compile=TRACE), torch.full((12,), -3.0, dtype=DT),
                                 objective, X, y)
    assert info.backward.status == "max_iterations" and info.backward.residual > 1e-10


def test_negative_curvature_is_reported():
    # f(x) = ½ xᵀ diag(1, −1) x − θᵀx: a saddle; the solver returns the stationary point.
    def saddle(x, theta):
        return 0.5 * (x[0] ** 2 - x[1] ** 2) - (theta * x).sum()

    theta = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    x = ig.implicit_solve(saddle, torch.zeros(2, dtype=DT), theta, solver=lambda f, x0, t: t * torch.tensor(
        [1.0, -1.0], dtype=DT), linear_solver=ig.CG(maxiter=4, compile=TRACE), on_failure="ignore",
        return_info=True)
    x, info = x
    torch.autograd.grad(x.sum() + x[1], theta)
    assert info.backward.status == "negative_curvature"


def test_vmapped_problems_compile_with_one_system_each():
    objective, X, y = _logistic(n=60, d=6)
    lams = torch.stack([torch.zeros(6, dtype=DT), torch.full((6,), -1.0, dtype=DT)]).requires_grad_(True)

    def solve(lin):
        def one(log_lam):
            return ig.implicit_solve(objective, torch.zeros(6, dtype=DT), log_lam, X, y, solver=SOLVER,
                                     linear_solver=lin)
        w = torch.func.vmap(one)(lams)
        return torch.autograd.grad((w**2).sum(), lams)[0]

    torch.testing.assert_close(solve(ig.CG(maxiter=20, tol=1e-12, compile=TRACE)),
                               solve(ig.CG(maxiter=40, tol=1e-12)), rtol=1e-9, atol=1e-14)


def test_one_compiled_function_per_layout_and_fresh_python_values_are_used():
    X = torch.randn(40, 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    y = torch.randn(40, dtype=DT, generator=torch.Generator().manual_seed(4))

    def ridge(w, lam, scale):  # scale: a Python float, part of the layout
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * scale * lam * (w**2).sum()

    def closed(f, w0, lam, scale):
        return torch.linalg.solve(X.T @ X + scale * lam * torch.eye(5, dtype=DT), X.T @ y)

    lin = ig.CG(maxiter=12, tol=1e-12, compile=TRACE)
    for scale in (1.0, 1.0, 3.0):
        lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
        w = ig.implicit_solve(ridge, torch.zeros(5, dtype=DT), lam, scale, solver=closed, linear_solver=lin)
        (g,) = torch.autograd.grad(0.5 * (w**2).sum(), lam)
        a = X.T @ X + scale * lam.detach() * torch.eye(5, dtype=DT)
        torch.testing.assert_close(g, -scale * (w.detach() @ torch.linalg.solve(a, w.detach())))
    assert len(_compiled._CACHE[ridge]) == 2  # scale 1.0 once, scale 3.0 once


def test_higher_order_falls_back_to_the_differentiable_path():
    objective, X, y = _logistic(n=40, d=4)
    log_lam = torch.zeros(4, dtype=DT, requires_grad=True)
    w = ig.implicit_solve(objective, torch.zeros(4, dtype=DT), log_lam, X, y, solver=SOLVER,
                          linear_solver=ig.CG(maxiter=20, tol=1e-12, compile=TRACE))
    (g,) = torch.autograd.grad((w**2).sum(), log_lam, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), log_lam)
    w2 = ig.implicit_solve(objective, torch.zeros(4, dtype=DT), log_lam, X, y, solver=SOLVER,
                           linear_solver=ig.CG(maxiter=20, tol=1e-12))
    (g2,) = torch.autograd.grad((w2**2).sum(), log_lam, create_graph=True)
    (h2,) = torch.autograd.grad(g2.sum(), log_lam)
    torch.testing.assert_close(h, h2, rtol=1e-8, atol=1e-14)


def test_bad_compile_arguments_are_refused():
    with pytest.raises(TypeError, match="compile"):
        ig.CG(compile="yes")
    with pytest.raises(ValueError, match="preconditioner"):
        ig.CG(compile=True, preconditioner=lambda r: r)


def test_more_layouts_than_the_recompile_limit_each_compile():
    """Every layout is a closure over one code object; torch.compile's per-code-object limit
    (8 variants) must not make the ninth layout of a process fail."""
    objective, X, y = _logistic(n=20, d=3)
    log_lam = torch.zeros(3, dtype=DT)
    limit = torch._dynamo.config.recompile_limit
    reference, _ = _hypergradient(ig.CG(maxiter=40, tol=1e-12), log_lam, objective, X, y)
    for k in range(limit + 2):  # a new maxiter is a new layout
        g, info = _hypergradient(ig.CG(maxiter=20 + k, tol=1e-10, compile={"backend": "eager"}), log_lam,
                                 objective, X, y)
        assert info.backward.solver == "CG(compile)" and info.backward.iterations == 20 + k
        torch.testing.assert_close(g, reference, rtol=1e-8, atol=1e-12)
