"""ProximalGradient / ProjectedGradient through ig.implicit_solve, in float64, against
independent references: the lasso's closed form on its support, scikit-learn's Lasso and
ElasticNet, SciPy's nnls, the secular equation of a ball-constrained least squares, the
active-set KKT system of a multiclass SVM dual; hypergradients against those references
differentiated or central finite differences of them. Also: GMRES is picked, symmetric
linear solvers on a non-symmetric condition are flagged, settings are checked."""

import re
import warnings

import pytest
import torch
from registry import rel_err

import implicitgrad as ig

DT = torch.float64
REL = 1e-8
PG = ig.solvers.ProximalGradient
PJ = ig.solvers.ProjectedGradient


def regression(n=60, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.zeros(d, dtype=DT)
    w_true[: d // 3] = torch.randn(d // 3, generator=g, dtype=DT) * 2
    y = X @ w_true + 0.3 * torch.randn(n, generator=g, dtype=DT)
    return X, y


def least_squares(w, *params):
    X, y = params[-2:]
    return 0.5 * ((X @ w - y) ** 2).mean()


def solve(objective, x0, *params, solver, **kw):
    return ig.implicit_solve(objective, x0, *params, solver=solver, return_info=True, **kw)


# ------------------------------------------------------------------------- lasso
@pytest.mark.parametrize("lam_value", [0.05, 0.3])
def test_lasso_matches_closed_form_on_the_support(lam_value):
    X, y = regression()
    n, d = X.shape
    lam = torch.tensor(lam_value, dtype=DT, requires_grad=True)
    yg = y.clone().requires_grad_(True)
    w, info = solve(least_squares, torch.zeros(d, dtype=DT), lam, X, yg, solver=PG(ig.prox.lasso, tol=1e-12))
    assert info.forward_status == "converged"
    S = w.detach() != 0
    assert 0 < int(S.sum()) < d
    # On the support S with signs s: w_S = (X_SᵀX_S/n)⁻¹(X_Sᵀy/n − λ s), zero elsewhere.
    s = torch.sign(w.detach()[S])
    H = X[:, S].T @ X[:, S] / n
    lam_ref = lam.detach().clone().requires_grad_(True)
    y_ref = y.clone().requires_grad_(True)
    w_ref = torch.zeros(d, dtype=DT).index_put((S.nonzero()[:, 0],),
                                               torch.linalg.solve(H, X[:, S].T @ y_ref / n - lam_ref * s))
    assert rel_err(w.detach(), w_ref.detach()) < REL
    weights = torch.linspace(-1, 2, d, dtype=DT)
    g = torch.autograd.grad((weights * w).sum(), (lam, yg))
    g_ref = torch.autograd.grad((weights * w_ref).sum(), (lam_ref, y_ref))
    assert info.backward.solver == "GMRES"
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < REL


def test_lasso_matches_scikit_learn_and_every_variant_agrees():
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, y = regression(seed=1)
    lam = torch.tensor(0.1, dtype=DT)
    ref = linear_model.Lasso(alpha=0.1, fit_intercept=False, tol=1e-14, max_iter=200000).fit(X.numpy(), y.numpy())
    H_max = float(torch.linalg.eigvalsh(X.T @ X / X.shape[0]).max())
    for solver in (PG(ig.prox.lasso, tol=1e-12), PG(ig.prox.lasso, acceleration=False, maxiter=20000, tol=1e-12),
                   PG(ig.prox.lasso, stepsize=1.0 / H_max, tol=1e-12)):
        w, info = solve(least_squares, torch.zeros(12, dtype=DT), lam, X, y, solver=solver)
        assert info.forward_status == "converged", solver
        assert rel_err(w, torch.as_tensor(ref.coef_)) < REL, solver


# ------------------------------------------------------------------------- elastic net
def test_elastic_net_matches_scikit_learn_and_finite_differences():
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, y = regression(seed=2)
    Xn, yn = X.numpy(), y.numpy()

    def sklearn_solution(l1, l2):
        alpha = l1 + l2  # sklearn: α·r‖w‖₁ + α(1 − r)/2‖w‖², so l1 = α r, l2 = α(1 − r)
        model = linear_model.ElasticNet(alpha=alpha, l1_ratio=l1 / alpha, fit_intercept=False, tol=1e-15,
                                        max_iter=500000)
        return torch.as_tensor(model.fit(Xn, yn).coef_)

    l1 = torch.tensor(0.08, dtype=DT, requires_grad=True)
    l2 = torch.tensor(0.3, dtype=DT, requires_grad=True)
    solver = PG(ig.prox.elastic_net, reg=(0, 1), tol=1e-12)
    w, info = solve(least_squares, torch.zeros(12, dtype=DT), l1, l2, X, y, solver=solver)
    assert info.forward_status == "converged"
    assert rel_err(w, sklearn_solution(0.08, 0.3)) < REL
    weights = torch.linspace(-1, 2, 12, dtype=DT)
    g1, g2 = torch.autograd.grad((weights * w).sum(), (l1, l2))
    h = 1e-4  # on a fixed support w is smooth in (l1, l2); h trades truncation against the solver's noise
    fd1 = (weights @ (sklearn_solution(0.08 + h, 0.3) - sklearn_solution(0.08 - h, 0.3))) / (2 * h)
    fd2 = (weights @ (sklearn_solution(0.08, 0.3 + h) - sklearn_solution(0.08, 0.3 - h))) / (2 * h)
    assert float(g1) == pytest.approx(float(fd1), rel=1e-7)
    assert float(g2) == pytest.approx(float(fd2), rel=1e-7)


# ------------------------------------------------------------------------- NNLS
def test_nonnegative_least_squares_matches_scipy_nnls():
    optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(3)
    A = torch.randn(40, 15, generator=g, dtype=DT)
    b = torch.randn(40, generator=g, dtype=DT, requires_grad=True)
    x, info = solve(lambda x, b: 0.5 * ((A @ x - b) ** 2).sum(), torch.zeros(15, dtype=DT), b,
                    solver=PJ(ig.projections.nonnegative, tol=1e-12))
    ref = torch.as_tensor(optimize.nnls(A.numpy(), b.detach().numpy())[0])
    assert info.forward_status == "converged"
    assert 0 < int((ref > 0).sum()) < 15
    assert rel_err(x, ref) < REL
    weights = torch.linspace(-1, 2, 15, dtype=DT)
    grad, = torch.autograd.grad((weights * x).sum(), b)
    h = 1e-6
    for i in (0, 7, 31):
        e = torch.zeros(40, dtype=DT)
        e[i] = h
        up = optimize.nnls(A.numpy(), (b.detach() + e).numpy())[0]
        down = optimize.nnls(A.numpy(), (b.detach() - e).numpy())[0]
        fd = float(weights @ torch.as_tensor(up - down)) / (2 * h)
        assert float(grad[i]) == pytest.approx(fd, rel=1e-7, abs=1e-9)


# ------------------------------------------------------------------------- L2 ball
def test_ball_constrained_least_squares_matches_the_secular_equation():
    optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(4)
    A = torch.randn(30, 8, generator=g, dtype=DT)
    b = torch.randn(30, generator=g, dtype=DT)
    AtA, Atb = A.T @ A, A.T @ b

    def secular_solution(r):
        # x(μ) = (AᵀA + μI)⁻¹Aᵀb with μ > 0 the root of ‖x(μ)‖ = r.
        def x_of(mu):
            return torch.linalg.solve(AtA + mu * torch.eye(8, dtype=DT), Atb)

        mu = optimize.brentq(lambda m: float(x_of(m).norm()) - r, 0.0, 1e6, xtol=1e-15, rtol=1e-15)
        return x_of(mu)

    r = torch.tensor(0.5, dtype=DT, requires_grad=True)
    assert float(torch.linalg.solve(AtA, Atb).norm()) > 0.5  # the constraint is active
    x, info = solve(lambda x, r: 0.5 * ((A @ x - b) ** 2).sum(), torch.zeros(8, dtype=DT), r,
                    solver=PJ(ig.projections.l2_ball, args=0, tol=1e-13))
    assert info.forward_status == "converged"
    assert rel_err(x, secular_solution(0.5)) < REL
    weights = torch.linspace(-1, 2, 8, dtype=DT)
    grad, = torch.autograd.grad((weights * x).sum(), r)
    h = 1e-5
    fd = float(weights @ (secular_solution(0.5 + h) - secular_solution(0.5 - h))) / (2 * h)
    assert float(grad) == pytest.approx(fd, rel=1e-8)


# ------------------------------------------------------------------------- SVM dual
def svm_problem(n=20, k=3, d=5, mu=0.1, seed=5):
    """A smoothed multiclass (Crammer-Singer) SVM dual: one simplex per sample (n·k unknowns).

    f(β) = ‖Xᵀ(Y − β)‖²/(2λ) − ⟨β, 1 − Y⟩ + μ‖β‖²/2 over rows β_i in the simplex; the primal
    weights are W = Xᵀ(Y − β)/λ.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    scores = X @ torch.randn(d, k, generator=g, dtype=DT) + 0.5 * torch.randn(n, k, generator=g, dtype=DT)
    labels = torch.argmax(scores, 1)
    Y = torch.nn.functional.one_hot(labels, k).to(DT)

    def dual(beta, lam, X, Y):
        W = X.T @ (Y - beta) / lam
        return 0.5 * lam * (W**2).sum() - (beta * (1 - Y)).sum() + 0.5 * mu * (beta**2).sum()

    return dual, X, Y, mu


def svm_active_set_solution(beta, lam, X, Y, mu):
    """The dual solution from the KKT system on the support of ``beta``, differentiable in λ.

    Stationarity on the support S: (H β)_S − c_S + E τ = 0 with H = (XXᵀ ⊗ I)/λ + μI,
    c = vec(XXᵀY)/λ + vec(1 − Y), and one equality Σ_j β_ij = 1 per row (multiplier τ_i).
    """
    n, k = Y.shape
    S = (beta.reshape(-1) > 0).nonzero()[:, 0]
    H = torch.kron(X @ X.T, torch.eye(k, dtype=DT)) / lam + mu * torch.eye(n * k, dtype=DT)
    c = (X @ X.T @ Y).reshape(-1) / lam + (1 - Y).reshape(-1)
    E = torch.zeros(n * k, n, dtype=DT)
    E[torch.arange(n * k), torch.arange(n * k) // k] = 1.0
    m = len(S)
    M = torch.cat([torch.cat([H[S][:, S], E[S]], 1), torch.cat([E[S].T, torch.zeros(n, n, dtype=DT)], 1)], 0)
    solution = torch.linalg.solve(M, torch.cat([c[S], torch.ones(n, dtype=DT)]))
    return torch.zeros(n * k, dtype=DT).index_put((S,), solution[:m]).reshape(n, k)


def test_svm_dual_matches_its_active_set_kkt_system():
    dual, X, Y, mu = svm_problem()
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    beta0 = torch.full_like(Y, 1.0 / Y.shape[1])
    beta, info = solve(dual, beta0, lam, X, Y, solver=PJ(ig.projections.simplex, tol=1e-13))
    assert info.forward_status == "converged"
    b = beta.detach()
    assert torch.allclose(b.sum(1), torch.ones(20, dtype=DT), atol=1e-12) and bool((b >= 0).all())
    # KKT: on each row, the gradient is the same (−τ_i) on the support and not below it off the support.
    grad = torch.func.grad(dual)(b, lam.detach(), X, Y)
    for gi, bi in zip(grad, b):
        on = bi > 0
        assert float(gi[on].max() - gi[on].min()) < 1e-9
        assert bool((gi[~on] >= gi[on].max() - 1e-9).all())
    assert int((b > 0).sum()) < b.numel()  # the constraints bind somewhere
    lam_ref = lam.detach().clone().requires_grad_(True)
    ref = svm_active_set_solution(b, lam_ref, X, Y, mu)
    assert rel_err(b, ref.detach()) < REL
    weights = torch.randn(Y.shape, generator=torch.Generator().manual_seed(9), dtype=DT)
    g, = torch.autograd.grad((weights * beta).sum(), lam)
    g_ref, = torch.autograd.grad((weights * ref).sum(), lam_ref)
    assert float(g) == pytest.approx(float(g_ref), rel=REL)
    h = 1e-6
    fd = (weights * (svm_active_set_solution(b, lam_ref.detach() + h, X, Y, mu)
                     - svm_active_set_solution(b, lam_ref.detach() - h, X, Y, mu))).sum() / (2 * h)
    assert float(g) == pytest.approx(float(fd), rel=1e-7)


# ------------------------------------------------------------------------- structure
def test_l1_ball_radius_and_group_lasso_on_a_pytree():
    X, y = regression(seed=6)
    r = torch.tensor(1.5, dtype=DT, requires_grad=True)
    w, info = solve(least_squares, torch.zeros(12, dtype=DT), r, X, y, solver=PJ(ig.projections.l1_ball, args=0,
                                                                                  tol=1e-12))
    assert info.forward_status == "converged"
    assert float(w.detach().abs().sum()) == pytest.approx(1.5, rel=1e-10)
    g, = torch.autograd.grad(least_squares(w, X, y), r)
    h = 1e-5

    def loss_at(radius):
        ws = ig.implicit_solve(least_squares, torch.zeros(12, dtype=DT), torch.tensor(radius, dtype=DT), X, y,
                               solver=PJ(ig.projections.l1_ball, args=0, tol=1e-14))
        return float(least_squares(ws, X, y))

    assert float(g) == pytest.approx((loss_at(1.5 + h) - loss_at(1.5 - h)) / (2 * h), rel=1e-6)

    def split_objective(w, lam, X, y):
        return least_squares(torch.cat([w["a"], w["b"]]), X, y)

    lam = torch.tensor(0.2, dtype=DT, requires_grad=True)
    w0 = {"a": torch.zeros(4, dtype=DT), "b": torch.zeros(8, dtype=DT)}
    w, info = solve(split_objective, w0, lam, X, y, solver=PG(ig.prox.group_lasso, tol=1e-12))
    assert info.forward_status == "converged" and set(w) == {"a", "b"}
    assert float(w["b"].detach().norm()) == 0.0 < float(w["a"].detach().norm())
    gl, = torch.autograd.grad(w["a"].sum(), lam)
    assert torch.isfinite(gl)


def test_vmap_over_penalties_matches_separate_solves():
    X, y = regression(seed=7)
    lams = torch.tensor([0.02, 0.1, 0.4], dtype=DT, requires_grad=True)

    def fit(lam):
        return ig.implicit_solve(least_squares, torch.zeros(12, dtype=DT), lam, X, y,
                                 solver=PG(ig.prox.lasso, tol=1e-12))

    batched = torch.func.vmap(fit)(lams)
    g, = torch.autograd.grad(batched.sum(), lams)
    for i in range(3):
        lam = lams.detach()[i].clone().requires_grad_(True)
        w = fit(lam)
        assert rel_err(batched[i].detach(), w.detach()) < 1e-10
        assert float(g[i]) == pytest.approx(float(torch.autograd.grad(w.sum(), lam)[0]), rel=1e-9)


def test_unrolled_mode_approaches_the_implicit_gradient():
    X, y = regression(seed=8)
    lam = torch.tensor(0.1, dtype=DT, requires_grad=True)
    w = ig.implicit_solve(least_squares, torch.zeros(12, dtype=DT), lam, X, y, solver=PG(ig.prox.lasso, tol=1e-12))
    g_implicit, = torch.autograd.grad(w.sum(), lam)
    w_unrolled = ig.implicit_solve(least_squares, torch.zeros(12, dtype=DT), lam, X, y,
                                   solver=PG(ig.prox.lasso, tol=1e-12), mode="unrolled")
    g_unrolled, = torch.autograd.grad(w_unrolled.sum(), lam)
    assert float(g_unrolled) == pytest.approx(float(g_implicit), rel=1e-6)


def test_solver_used_alone_reports_its_stats():
    X, y = regression(seed=9)
    w = PG(ig.prox.lasso, maxiter=3)(least_squares, torch.zeros(12, dtype=DT), torch.tensor(0.1, dtype=DT), X, y)
    assert w.shape == (12,)
    _, stats = PG(ig.prox.lasso, maxiter=3).run(least_squares, torch.zeros(12, dtype=DT),
                                                torch.tensor(0.1, dtype=DT), X, y)
    assert stats.converged is False and "after 3 iterations" in stats.message
    _, stats = PG(ig.prox.lasso).run(least_squares, torch.zeros(12, dtype=DT), torch.tensor(0.1, dtype=DT), X, y)
    assert stats.converged is True and stats.residual <= 1e-8 * 10


# ------------------------------------------------------------------------- checks
@pytest.mark.parametrize("linear_solver", [ig.CG(), ig.MINRES()], ids=["CG", "MINRES"])
def test_symmetric_linear_solvers_on_non_symmetric_conditions_are_flagged(linear_solver):
    """The symmetry of A is measured in the backward pass: flagged where it fails, silent where it holds."""
    X, y = regression(seed=10)
    shift = torch.diag(torch.ones(2, dtype=DT), 1)  # x ↦ (x₂, x₃, 0): not symmetric
    lam = torch.tensor(0.1, dtype=DT, requires_grad=True)
    theta = torch.ones(3, dtype=DT, requires_grad=True)
    cases = [
        ("mapping", lambda: ig.implicit_solve(least_squares, torch.zeros(12, dtype=DT), lam, X, y,
                                              solver=PG(ig.prox.lasso), linear_solver=linear_solver)),
        ("mapping", lambda: ig.fixed_point_solve(lambda x, t: 0.5 * shift @ x + t, torch.zeros(3, dtype=DT),
                                                 theta, linear_solver=linear_solver)),
        ("residual", lambda: ig.root_solve(
            lambda x, t: x + shift @ x - t, torch.zeros(3, dtype=DT), theta,
            solver=lambda f, x, t: torch.linalg.solve(torch.eye(3, dtype=DT) + shift, t),
            linear_solver=linear_solver)),
    ]
    for kind, solve in cases:
        # The truncated symmetric solve may report its own failure too; the symmetry report must be there.
        with pytest.warns(ig.ImplicitGradWarning) as record:
            solve().sum().backward()
        assert any(re.search(rf"{kind} condition.*not symmetric: measured.*GMRES", str(w.message))
                   for w in record), [str(w.message) for w in record]
    # Symmetric matrices of the same kinds: nothing to report.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ig.fixed_point_solve(lambda x, t: 0.5 * x.flip(0) + t, torch.zeros(3, dtype=DT), theta,
                             linear_solver=linear_solver).sum().backward()
        ig.root_solve(lambda x, t: x**3 - t, torch.ones(3, dtype=DT), theta, solver=lambda f, x, t: t ** (1 / 3),
                      linear_solver=linear_solver).sum().backward()
        ig.implicit_solve(least_squares, torch.zeros(12, dtype=DT), lam, X, y,
                          solver=ig.solvers.LBFGS(maxiter=500), linear_solver=linear_solver).sum().backward()


def test_an_unconverged_backward_solve_names_the_solvers_that_fit_the_condition():
    A = torch.diag(torch.logspace(0, 6, 20, dtype=DT))
    theta = torch.ones(20, dtype=DT, requires_grad=True)

    def closed_form(fn, x, t):
        return torch.linalg.solve(A, t)

    with pytest.warns(ig.ImplicitGradWarning, match=r"did not converge.*symmetric \(a Hessian\).*ig\.MINRES"):
        ig.implicit_solve(lambda x, t: 0.5 * x @ A @ x - t @ x, torch.zeros(20, dtype=DT), theta,
                          solver=closed_form, linear_solver=ig.CG(maxiter=2)).sum().backward()
    with pytest.warns(ig.ImplicitGradWarning, match=r"did not converge.*not symmetric in general.*ig\.GMRES"):
        ig.root_solve(lambda x, t: A @ x - t, torch.zeros(20, dtype=DT), theta, solver=closed_form,
                      linear_solver=ig.GMRES(maxiter=2)).sum().backward()


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"reg=lambda \*params: 0.1"):
        PG(ig.prox.lasso, reg=0.1)
    with pytest.raises(TypeError, match="args"):
        PJ(ig.projections.l2_ball, args="radius")
    with pytest.raises(TypeError, match="prox must be callable"):
        PG("lasso")
    with pytest.raises(ValueError, match="stepsize"):
        PG(ig.prox.lasso, stepsize=-1.0)
    X, y = regression(seed=11)
    with pytest.raises(ValueError, match=r"reg=5 points at params\[5\]"):
        ig.implicit_solve(least_squares, torch.zeros(12, dtype=DT), X, y, solver=PG(ig.prox.lasso, reg=5))
    with pytest.raises(ValueError, match="same structure"):
        PJ(lambda y: y[:3]).run(lambda x: (x**2).sum(), torch.ones(5, dtype=DT))
