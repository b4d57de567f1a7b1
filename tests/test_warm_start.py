"""Warm-started linear solves: the same gradients as cold ones, in fewer products when the
problem repeats with small changes; opt-in for ImplicitLayer and IMAML."""

import pytest
import torch
from torch.nn.functional import mse_loss

import implicitgrad as ig
import implicitgrad.meta as meta

DT = torch.float64


def _data(n=200, d=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)


def _ridge(X, y):
    def objective(w, log_lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (log_lam.exp() * w**2).sum()

    def solver(f, w0, log_lam):
        return torch.linalg.solve(X.T @ X + torch.diag(log_lam.exp()), X.T @ y)

    return objective, solver


def _exact_hypergradient(X, y, log_lam):
    a = X.T @ X + torch.diag(log_lam.exp())
    w = torch.linalg.solve(a, X.T @ y)
    v = X.T @ (X @ w - y) / X.shape[0] * 2  # d/dw of mean squared error
    u = torch.linalg.solve(a, v)
    return -(u * log_lam.exp() * w)


def _run(ws, steps=8, lr=1e-3):
    X, y = _data()
    objective, solver = _ridge(X, y)
    log_lam = torch.zeros(30, dtype=DT, requires_grad=True)
    iterations, errors = [], []
    for _ in range(steps):
        w, info = ig.implicit_solve(objective, torch.zeros(30, dtype=DT), log_lam, solver=solver, warm_start=ws,
                                    linear_solver=ig.CG(tol=1e-10, maxiter=300), return_info=True)
        (g,) = torch.autograd.grad(((X @ w - y) ** 2).mean(), log_lam)
        exact = _exact_hypergradient(X, y, log_lam.detach())
        errors.append(float((g - exact).norm() / exact.norm()))
        iterations.append(info.backward.iterations)
        with torch.no_grad():
            log_lam -= lr * g / g.abs().max()
    return iterations, errors


def test_warm_start_needs_fewer_products_for_the_same_gradient():
    cold, cold_err = _run(None)
    ws = ig.WarmStart()
    warm, warm_err = _run(ws)
    assert ws.hits == len(warm) - 1 and ws.misses == 1
    assert warm[0] == cold[0]
    assert sum(warm[1:]) < 0.8 * sum(cold[1:])
    assert max(cold_err + warm_err) < 1e-8


def test_a_start_of_another_shape_is_not_used():
    X, y = _data()
    objective, solver = _ridge(X, y)
    ws = ig.WarmStart()
    for d in (30, 20):
        Xd = X[:, :d]
        obj, sol = _ridge(Xd, y)
        log_lam = torch.zeros(d, dtype=DT, requires_grad=True)
        w = ig.implicit_solve(obj, torch.zeros(d, dtype=DT), log_lam, solver=sol, warm_start=ws)
        (g,) = torch.autograd.grad(((Xd @ w - y) ** 2).mean(), log_lam)
        torch.testing.assert_close(g, _exact_hypergradient(Xd, y, log_lam.detach()), rtol=1e-7, atol=1e-12)
    assert ws.misses == 2 and ws.hits == 0


def test_non_finite_solutions_are_not_stored():
    ws = ig.WarmStart()
    ws.store("backward", [torch.tensor([1.0, float("nan")], dtype=DT)])
    assert ws.initial_guess("backward", [torch.zeros(2, dtype=DT)]) is None
    ws.store("backward", [torch.tensor([1.0, 2.0], dtype=DT)])
    torch.testing.assert_close(ws.initial_guess("backward", [torch.zeros(2, dtype=DT)])[0],
                               torch.tensor([1.0, 2.0], dtype=DT))


def test_warm_start_under_vmap_matches_the_loop():
    X, y = _data(n=50, d=6)
    objective, solver = _ridge(X, y)
    ws = ig.WarmStart()

    def hyper(log_lam):
        w = ig.implicit_solve(objective, torch.zeros(6, dtype=DT), log_lam, solver=solver, warm_start=ws,
                              linear_solver=ig.CG(tol=1e-12))
        return ((X @ w - y) ** 2).mean()

    lams = torch.stack([torch.zeros(6, dtype=DT), 0.3 * torch.ones(6, dtype=DT)])
    for _ in range(2):
        grads = torch.func.vmap(torch.func.grad(hyper))(lams)
    for i in range(2):
        torch.testing.assert_close(grads[i], _exact_hypergradient(X, y, lams[i]), rtol=1e-8, atol=1e-12)


def test_wrong_warm_start_is_refused():
    X, y = _data()
    objective, solver = _ridge(X, y)
    with pytest.raises(TypeError, match="WarmStart"):
        ig.implicit_solve(objective, torch.zeros(30, dtype=DT), torch.zeros(30, dtype=DT), solver=solver,
                          warm_start=True)


class _Ridge(ig.nn.ImplicitLayer):
    """x* = argmin ½‖A x − u‖² + ½ exp(a)‖x‖², solved by L-BFGS from x0."""

    def __init__(self, A, warm_start):
        super().__init__(solver=ig.solvers.LBFGS(maxiter=1000, tol=1e-11),
                         linear_solver=ig.CG(tol=1e-10), warm_start=warm_start)
        self.A = A
        self.a = torch.nn.Parameter(torch.tensor(0.0, dtype=DT))

    def init(self, inputs):
        return torch.zeros(self.A.shape[1], dtype=DT)

    def objective(self, x, inputs, params):
        return 0.5 * ((self.A @ x - inputs[0]) ** 2).sum() + 0.5 * params["a"].exp() * (x**2).sum()


def test_layer_warm_start_reuses_its_solutions_with_the_same_gradients():
    A, u = _data(n=100, d=60)
    results = {}
    for warm in (False, True):
        layer = _Ridge(A, warm)
        iterations, grads = [], []
        for _ in range(4):
            layer.zero_grad()
            layer(u).square().sum().backward()
            iterations.append((layer.last_info.forward_iterations, layer.last_info.backward.iterations))
            grads.append(layer.a.grad.clone())
            with torch.no_grad():
                layer.a -= 1e-3
        results[warm] = (iterations, grads)
    (cold_it, cold_g), (warm_it, warm_g) = results[False], results[True]
    for a, b in zip(cold_g, warm_g):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert sum(i[0] for i in warm_it[1:]) < sum(i[0] for i in cold_it[1:])  # forward from the last x*
    assert sum(i[1] for i in warm_it[1:]) < sum(i[1] for i in cold_it[1:])  # backward from the last u
    layer = _Ridge(A, True)
    layer(u)
    layer.reset_warm_start()
    assert layer._last_x is None


def _imaml_tasks():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(3):
        w = torch.randn(3, 1, generator=g, dtype=DT)
        x_s, x_q = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)
        tasks.append((x_s, x_s @ w, x_q, x_q @ w))
    return tasks


def _imaml_run(tasks, warm, batched, steps):
    """Meta-gradients and backward products of ``steps`` SGD meta-steps of a fresh IMAML."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(DT)
    learner = meta.IMAML(model, mse_loss, lam=1.0, linear_solver=ig.CG(maxiter=200, tol=1e-10),
                         batched=batched, warm_start=warm)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    grads, products = [], []
    for _ in range(steps):
        g_, _ = learner.meta_gradient(tasks)
        grads.append(torch.cat([v.reshape(-1) for v in g_.values()]))
        products.append(sum(info.backward.iterations for info in learner.last_info))
        opt.zero_grad()
        learner.meta_step(tasks)
        opt.step()
    return grads, products, learner


@pytest.mark.parametrize("batched", [False, True])
def test_imaml_warm_start_per_task_gives_the_same_meta_gradient(batched):
    tasks = _imaml_tasks()
    runs = {warm: _imaml_run(tasks, warm, batched, 3)[:2] for warm in (False, True)}
    (cold_g, cold_p), (warm_g, warm_p) = runs[False], runs[True]
    for a, b in zip(cold_g, warm_g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    assert sum(warm_p[1:]) < sum(cold_p[1:])


# ------------------------------------------------------------------ recycled CG directions
def _spd(n, seed, cond=1e3):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)) @ q.T


def test_limited_memory_preconditioner_is_spd_and_inverts_a_on_its_span():
    from implicitgrad.linalg._recycle import Recycler

    a = _spd(20, 0)
    s = torch.randn(6, 1, 20, dtype=DT, generator=torch.Generator().manual_seed(1))
    rec = Recycler(memory=10)
    for sj in s:
        rec.pairs.append((sj, sj @ a))
    h = rec.preconditioner(torch.zeros(1, 20, dtype=DT))
    hm = torch.stack([h(e.unsqueeze(0))[0] for e in torch.eye(20, dtype=DT)])
    torch.testing.assert_close(hm, hm.T, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(hm).min() > 0
    for sj in s:  # H A s = s on the span of the pairs
        torch.testing.assert_close(h(sj @ a), sj, rtol=1e-8, atol=1e-10)


def test_recycled_directions_solve_a_repeated_system_at_once():
    a = _spd(60, 2, cond=1e4)
    b = torch.randn(60, dtype=DT, generator=torch.Generator().manual_seed(3))
    ws = ig.WarmStart(recycle=60)
    its = []
    for k in range(3):
        lam = torch.tensor(1.0 + 1e-3 * k, dtype=DT, requires_grad=True)

        def quadratic(x, lam):
            return 0.5 * x @ (a @ x) + 0.5 * lam * (x**2).sum() - b @ x

        x, info = ig.implicit_solve(quadratic, torch.zeros(60, dtype=DT), lam, return_info=True, warm_start=ws,
                                    solver=lambda f, x0, lam: torch.linalg.solve(a + lam * torch.eye(60, dtype=DT), b),
                                    linear_solver=ig.CG(maxiter=300, tol=1e-10))
        (g,) = torch.autograd.grad(x.sum(), lam)
        m = a + lam.detach() * torch.eye(60, dtype=DT)
        torch.testing.assert_close(g, -(torch.linalg.solve(m, torch.ones(60, dtype=DT)) @ x.detach()),
                                   rtol=1e-8, atol=1e-12)
        its.append(info.backward.iterations)
    assert its[1] < its[0] / 2 and its[2] < its[0] / 2


def test_recycling_gives_the_same_hypergradients():
    # The product counts depend on the spectrum (benchmarks/bench_warm.py measures them);
    # the gradients do not.
    _, err_plain = _run(ig.WarmStart())
    recycled, err_recycled = _run(ig.WarmStart(recycle=60))
    assert max(err_plain + err_recycled) < 1e-8
    assert sum(recycled[-3:]) < sum(recycled[:3])  # the directions of earlier solves accumulate


def test_a_solve_of_its_own_inside_the_objective_does_not_touch_the_recycled_directions():
    X, y = _data(n=40, d=5)
    inner_a = _spd(5, 4)

    def objective(w, log_lam):
        # The objective itself calls CG on an unrelated system (e.g. a preconditioned model).
        shift, _ = ig.CG(tol=1e-12)(lambda v: inner_a @ v, torch.ones(5, dtype=DT))
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (log_lam.exp() * w**2).sum() + 0.0 * (shift.detach() @ w)

    ws = ig.WarmStart(recycle=10)
    for _ in range(2):
        log_lam = torch.zeros(5, dtype=DT, requires_grad=True)
        w = ig.implicit_solve(objective, torch.zeros(5, dtype=DT), log_lam, warm_start=ws,
                              solver=lambda f, w0, ll: torch.linalg.solve(X.T @ X + torch.diag(ll.exp()), X.T @ y))
        (g,) = torch.autograd.grad(((X @ w - y) ** 2).mean(), log_lam)
        torch.testing.assert_close(g, _exact_hypergradient(X, y, log_lam.detach()), rtol=1e-7, atol=1e-12)
    assert all(s.shape == (1, 5) for s, _ in ws.recycler("backward").pairs)


def test_bad_recycle_is_refused():
    with pytest.raises(ValueError, match="recycle"):
        ig.WarmStart(recycle=-1)


def test_extrapolation_starts_from_the_line_through_the_last_two_solutions():
    ws = ig.WarmStart(extrapolate=True)
    b = [torch.zeros(3, dtype=DT)]
    u1, u2 = torch.tensor([1.0, 2.0, 3.0], dtype=DT), torch.tensor([1.5, 2.0, 2.0], dtype=DT)
    assert ws.initial_guess("backward", b) is None
    ws.store("backward", [u1])
    torch.testing.assert_close(ws.initial_guess("backward", b)[0], u1)  # one solution: itself
    ws.store("backward", [u2])
    torch.testing.assert_close(ws.initial_guess("backward", b)[0], 2 * u2 - u1, rtol=0, atol=0)
    ws.store("backward", [torch.full((3,), float("nan"), dtype=DT)])  # not kept, and the line is lost
    assert ws.initial_guess("backward", b) is None
    assert (ws.hits, ws.misses) == (2, 2)
    with pytest.raises(ValueError, match="extrapolate"):
        ig.WarmStart(extrapolate=1)


def test_extrapolated_starts_give_the_same_gradients_in_fewer_products_on_a_smooth_path():
    # Small steps of a normalised gradient: a smooth path, where the line through the last
    # two solutions predicts the next one better than the last one alone.
    plain, err_plain = _run(ig.WarmStart(), steps=10, lr=1e-3)
    extrapolated, err_extrapolated = _run(ig.WarmStart(extrapolate=True), steps=10, lr=1e-3)
    assert max(err_plain + err_extrapolated) < 1e-8
    assert extrapolated[:2] == plain[:2]  # no line yet at the first two steps
    assert sum(extrapolated[2:]) < sum(plain[2:])


# ------------------------------------------------------------------ the chain of solves
def _cg_pairs(a, b, steps):
    """The directions and products of ``steps`` plain CG steps on ``a x = b`` (one system)."""
    x, r = torch.zeros_like(b), b.clone()
    p, pairs = r.clone(), []
    for _ in range(steps):
        ap = a @ p
        pairs.append((p.unsqueeze(0).clone(), ap.unsqueeze(0).clone()))
        alpha = (r @ r) / (p @ ap)
        x, r_new = x + alpha * p, r - alpha * ap
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    return pairs


def _recycler_of(*solves, memory=100):
    from implicitgrad.linalg._recycle import Recycler

    rec = Recycler(memory=memory)
    for pairs in solves:
        for s, y in pairs:
            rec.record(s, y, (s * y).sum(-1))
        rec.finish()
    return rec


def _dense(h, n):
    return torch.stack([h(e.unsqueeze(0))[0] for e in torch.eye(n, dtype=DT)])


def test_chained_preconditioner_is_spd_and_inverts_the_newest_matrix_on_its_directions():
    # Two solves of two different matrices: the newest solve's pairs are inverted exactly,
    # whatever the older solve said about the same directions; H stays SPD.
    a_old, a_new = _spd(20, 5), _spd(20, 6)
    b = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(7))
    old, new = _cg_pairs(a_old, b, 8), _cg_pairs(a_new, b, 5)
    rec = _recycler_of(old, new)
    assert rec.sizes == [8, 5] and len(rec.pairs) == 13
    h = rec.preconditioner(torch.zeros(1, 20, dtype=DT))
    hm = _dense(h, 20)
    torch.testing.assert_close(hm, hm.T, rtol=1e-9, atol=1e-11)
    assert torch.linalg.eigvalsh(0.5 * (hm + hm.T)).min() > 0
    for s, y in new:
        torch.testing.assert_close(h(y), s, rtol=1e-8, atol=1e-10)
    # The chain, written out: γ I (γ = sᵀy / yᵀy of the newest pair), updated by the old
    # solve's pairs, then by the new solve's (Gratton, Sartenaer and Tshimanga's H with M
    # the level below).
    gamma = float(new[-1][0] @ new[-1][1].T / (new[-1][1] @ new[-1][1].T))
    expected = gamma * torch.eye(20, dtype=DT)
    for pairs in (old, new):
        s = torch.cat([p[0] for p in pairs]).T  # (20, k)
        y = torch.cat([p[1] for p in pairs]).T
        d_inv = torch.linalg.inv(0.5 * (s.T @ y + y.T @ s))
        left = torch.eye(20, dtype=DT) - s @ d_inv @ y.T
        expected = left @ expected @ left.T + s @ d_inv @ s.T
    torch.testing.assert_close(hm, expected, rtol=1e-8, atol=1e-10)


def test_memory_cuts_the_oldest_solves_first():
    a = _spd(12, 8)
    b = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(9))
    solves = [_cg_pairs(a, b, 4), _cg_pairs(a, b + 1, 3), _cg_pairs(a, b - 1, 5)]
    rec = _recycler_of(*solves, memory=6)
    assert rec.sizes == [1, 5] and len(rec.pairs) == 6
    assert rec.pairs[0][0] is solves[1][-1][0] and rec.pairs[-1][0] is solves[2][-1][0]
    assert [len(g) for g in rec.solves()] == [1, 5]


def test_recycling_builds_on_the_users_preconditioner():
    # The user's preconditioner is the first level of the recycled one (it used to switch
    # recycling off): a repeated system is solved in fewer products, to the same gradient.
    a = _spd(60, 10, cond=1e4)
    b = torch.randn(60, dtype=DT, generator=torch.Generator().manual_seed(11))
    jacobi = 1 / torch.diagonal(a)
    runs = {}
    for recycle in (0, 60):
        ws, its = ig.WarmStart(recycle=recycle), []
        for k in range(3):
            lam = torch.tensor(1.0 + 1e-3 * k, dtype=DT, requires_grad=True)

            def quadratic(x, lam):
                return 0.5 * x @ (a @ x) + 0.5 * lam * (x**2).sum() - b @ x

            m = a + lam.detach() * torch.eye(60, dtype=DT)
            cg = ig.CG(maxiter=300, tol=1e-10, preconditioner=lambda v: jacobi * v)
            x, info = ig.implicit_solve(quadratic, torch.zeros(60, dtype=DT), lam, return_info=True, warm_start=ws,
                                        solver=lambda f, x0, lam, m=m: torch.linalg.solve(m, b), linear_solver=cg)
            (g,) = torch.autograd.grad(x.sum(), lam)
            torch.testing.assert_close(g, -(torch.linalg.solve(m, torch.ones(60, dtype=DT)) @ x.detach()),
                                       rtol=1e-8, atol=1e-12)
            its.append(info.backward.iterations)
        runs[recycle] = its
    assert runs[60][1] < runs[0][1] / 2 and runs[60][2] < runs[0][2] / 2


# ------------------------------------------------------------------ settings for layers and learners
@pytest.mark.parametrize("batched", [False, True])
def test_imaml_takes_the_settings_of_a_warm_start_for_every_task(batched):
    tasks = _imaml_tasks()
    template = ig.WarmStart(recycle=20, extrapolate=True)
    cold_g, cold_p, _ = _imaml_run(tasks, False, batched, 4)
    warm_g, warm_p, learner = _imaml_run(tasks, template, batched, 4)
    for a, b in zip(cold_g, warm_g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    assert sum(warm_p[1:]) < sum(cold_p[1:])
    # One WarmStart per task (per meta-batch, vmapped) with the template's settings; the
    # template itself stays empty.
    keys = [[x_s for x_s, *_ in tasks]] if batched else [[x_s] for x_s, *_ in tasks]
    per_task = [learner._warm.get(key) for key in keys]
    assert all(ws is not template and ws.recycle == 20 and ws.extrapolate for ws in per_task)
    assert all(ws.recycler("backward").pairs for ws in per_task)
    assert template.hits == template.misses == 0 and template.recycler("backward").pairs == []


def test_layer_uses_the_warm_start_it_is_given():
    A, u = _data(n=100, d=60)
    ws = ig.WarmStart(recycle=10)
    layer, cold = _Ridge(A, ws), _Ridge(A, False)
    assert layer.warm is ws
    for _ in range(3):
        for lay in (layer, cold):
            lay.zero_grad()
            lay(u).square().sum().backward()
        torch.testing.assert_close(layer.a.grad, cold.a.grad, rtol=1e-7, atol=1e-12)
        with torch.no_grad():
            layer.a -= 1e-3
            cold.a -= 1e-3
    assert ws.hits == 2 and ws.recycler("backward").pairs
    assert layer.last_info.backward.iterations < cold.last_info.backward.iterations


@pytest.mark.parametrize("bad", ["yes", 1, ig.WarmStart])
def test_layers_and_learners_refuse_other_warm_starts(bad):
    with pytest.raises(TypeError, match="warm_start must be True, False or an ig.WarmStart"):
        _Ridge(torch.eye(2, dtype=DT), bad)
    with pytest.raises(TypeError, match="warm_start must be True, False or an ig.WarmStart"):
        meta.IMAML(torch.nn.Linear(2, 1).to(DT), mse_loss, lam=1.0, warm_start=bad)
