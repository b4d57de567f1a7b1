"""Inner-solver adapters: hypergradients against a hand-written dense IFT and finite
differences, reported statistics, pytrees, batches under vmap, dtypes, failures, arguments.

The problem throughout is an L2-regularised logistic regression whose per-feature
penalties ``exp(θ_j)`` are the hyperparameters, in float64 unless stated otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from registry import rel_err

import implicitgrad as ig
from implicitgrad.solvers import FixedPointIteration, GradientDescent, SciPy, TorchOpt, TorchOptimizer

DT = torch.float64
try:
    import torchopt  # noqa: F401

    HAS_TORCHOPT = True
except ImportError:
    HAS_TORCHOPT = False
needs_torchopt = pytest.mark.skipif(not HAS_TORCHOPT, reason="torchopt is not installed (pip install torchopt)")
#: Relative error of a hypergradient from a solve at the default tolerance, per dtype.
RTOL = {torch.float64: 1e-6, torch.float32: 2e-3}
B_PENALTY = 1e-2



@pytest.fixture(autouse=True)
def one_thread():
    """Run on one intra-op thread: the tensors here are tiny, and on a shared, loaded CPU
    torch's parallel reductions (mean, cross_entropy) then cost milliseconds instead of
    microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# --------------------------------------------------------------------------- problem
def make_data(seed: int, n: int = 60, d: int = 5, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = (torch.sigmoid(X @ w + 0.3) > torch.rand(n, generator=g, dtype=DT)).to(DT)
    return X.to(dtype), y.to(dtype)


X_TRAIN, Y_TRAIN = make_data(0)
X_VAL, Y_VAL = make_data(1, n=40)
THETA = torch.linspace(-1.0, 1.0, 5, dtype=DT)


def objective(x, theta, X, y):
    """mean[softplus(z) − y z] + ½ Σ exp(θ) w² + ½ c b², z = X w + b."""
    z = X @ x["w"] + x["b"]
    return (F.softplus(z) - y * z).mean() + 0.5 * (theta.exp() * x["w"] ** 2).sum() + 0.5 * B_PENALTY * x["b"] ** 2


def outer(x):
    z = X_VAL @ x["w"] + x["b"]
    return (F.softplus(z) - Y_VAL * z).mean()


def x_zero(dtype=DT):
    return {"w": torch.zeros(5, dtype=dtype), "b": torch.zeros((), dtype=dtype)}


def gradient_and_hessian(v, theta, X, y):
    """Explicit ∇f and ∇²f in the stacked variable v = (w, b)."""
    Xt = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    p = torch.sigmoid(Xt @ v)
    penalty = torch.cat([theta.exp(), torch.tensor([B_PENALTY], dtype=X.dtype)])
    grad = Xt.T @ (p - y) / X.shape[0] + penalty * v
    hess = Xt.T @ (Xt * (p * (1 - p))[:, None]) / X.shape[0] + torch.diag(penalty)
    return grad, hess


def reference(theta):
    """Newton to machine precision, then the IFT with a dense solve: (v*, dL/dθ)."""
    v = torch.zeros(6, dtype=DT)
    for _ in range(30):
        grad, hess = gradient_and_hessian(v, theta, X_TRAIN, Y_TRAIN)
        v = v - torch.linalg.solve(hess, grad)
    grad, hess = gradient_and_hessian(v, theta, X_TRAIN, Y_TRAIN)
    assert float(grad.norm()) < 1e-14
    Xt = torch.cat([X_VAL, torch.ones(X_VAL.shape[0], 1, dtype=DT)], 1)
    dL_dv = Xt.T @ (torch.sigmoid(Xt @ v) - Y_VAL) / X_VAL.shape[0]
    u = torch.linalg.solve(hess, dL_dv)
    # ∂_θ ∇_w f = diag(exp(θ) ⊙ w); ∇_b f does not depend on θ.
    return v, -(theta.exp() * v[:5]) * u[:5]


V_REF, HYPERGRAD_REF = reference(THETA)


def stacked(x):
    return torch.cat([x["w"].reshape(-1), x["b"].reshape(1)])


def hypergradient(solver, theta=THETA, dtype=DT, **kwargs):
    theta = theta.to(dtype).clone().requires_grad_(True)
    X, y = X_TRAIN.to(dtype), Y_TRAIN.to(dtype)
    x = ig.implicit_solve(objective, x_zero(dtype), theta, X, y, solver=solver, **kwargs)
    z = X_VAL.to(dtype) @ x["w"] + x["b"]
    (F.softplus(z) - Y_VAL.to(dtype) * z).mean().backward()
    return x, theta.grad


# --------------------------------------------------------------------------- registry
def _torchopt(name, *args, **kwargs):
    import torchopt

    return getattr(torchopt, name)(*args, **kwargs)


#: (id, factory, converges to the default tol); factories so that a missing torchopt only skips.
SOLVERS = [
    ("TorchOptimizer-SGD", lambda: TorchOptimizer(torch.optim.SGD, lr=0.5, momentum=0.9), True),
    ("TorchOptimizer-Adam", lambda: TorchOptimizer(torch.optim.Adam, lr=0.05), True),
    ("TorchOptimizer-LBFGS", lambda: TorchOptimizer(torch.optim.LBFGS), True),
    ("TorchOpt-adam", lambda: TorchOpt(_torchopt("adam", 0.05)), True),
    ("TorchOpt-sgd", lambda: TorchOpt(_torchopt("sgd", 0.5, momentum=0.9)), True),
    ("SciPy-L-BFGS-B", lambda: SciPy(), True),
    ("SciPy-BFGS", lambda: SciPy("BFGS"), True),
    ("SciPy-trust-ncg", lambda: SciPy("trust-ncg"), True),
    # SciPy's Newton-CG ends once gᵀHg <= 3 eps (absolute), here just above 1e-8.
    ("SciPy-Newton-CG", lambda: SciPy("Newton-CG"), False),
]


def _params(entries):
    return [
        pytest.param(factory, converges, id=name, marks=[needs_torchopt] if name.startswith("TorchOpt-") else [])
        for name, factory, converges in entries
    ]


# --------------------------------------------------------------------------- hypergradients
@pytest.mark.parametrize("factory,converges", _params(SOLVERS))
def test_hypergradient_matches_dense_ift(factory, converges):
    x, grad = hypergradient(factory())
    assert rel_err(stacked(x), V_REF) < 1e-6
    assert rel_err(grad, HYPERGRAD_REF) < RTOL[DT]


@pytest.mark.parametrize("factory,converges", _params(SOLVERS))
def test_stats_report_gradient_norm_at_returned_point(factory, converges):
    x0 = x_zero()
    x, stats = factory().run(objective, x0, THETA, X_TRAIN, Y_TRAIN)
    assert isinstance(stats, ig.solvers.SolverStats)
    assert isinstance(stats.iterations, int) and stats.iterations > 0
    grad, _ = gradient_and_hessian(stacked(x), THETA, X_TRAIN, Y_TRAIN)
    assert stats.residual == pytest.approx(float(grad.norm()), rel=1e-6, abs=1e-14)
    g0 = float(gradient_and_hessian(torch.zeros(6, dtype=DT), THETA, X_TRAIN, Y_TRAIN)[0].norm())
    assert stats.converged is converges
    if converges:
        assert stats.residual <= 1e-8 * max(1.0, g0)
    assert all(float(t.abs().max()) == 0 for t in x0.values()), "x0 must not be modified"


@pytest.mark.parametrize(
    "factory,rtol",
    [
        pytest.param(lambda: TorchOptimizer(torch.optim.LBFGS, tol=1e-12), 1e-6, id="TorchOptimizer-LBFGS"),
        # SciPy stops near 1e-10 (rounding of f); that error is smooth in θ and shifts the
        # difference quotient by about 3e-6.
        pytest.param(lambda: SciPy(), 2e-5, id="SciPy-L-BFGS-B"),
    ],
)
def test_hypergradient_matches_central_differences_through_resolving(factory, rtol):
    solver = factory()
    direction = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=DT)
    _, grad = hypergradient(solver)
    h = 1e-3

    def loss(theta):
        x, stats = solver.run(objective, x_zero(), theta, X_TRAIN, Y_TRAIN)
        assert stats.converged
        return float(outer(x))

    fd = (loss(THETA + h * direction) - loss(THETA - h * direction)) / (2 * h)
    assert fd == pytest.approx(float(grad @ direction), rel=rtol)


# --------------------------------------------------------------------------- pytrees, dtypes, batches
PYTREE_SOLVERS = [entry for entry in SOLVERS if entry[0] in ("TorchOptimizer-LBFGS", "TorchOpt-adam", "SciPy-L-BFGS-B")]


@pytest.mark.parametrize("factory,converges", _params(PYTREE_SOLVERS))
def test_nested_pytree_variable_with_non_tensor_leaf(factory, converges):
    def nested_objective(x, theta, X, y):
        w, b = x["coef"]
        return objective({"w": w, "b": b}, theta, X, y)

    x0 = {"coef": (torch.zeros(5, dtype=DT), torch.zeros((), dtype=DT)), "name": "logreg"}
    theta = THETA.clone().requires_grad_(True)
    x = ig.implicit_solve(nested_objective, x0, theta, X_TRAIN, Y_TRAIN, solver=factory())
    assert x["name"] == "logreg" and isinstance(x["coef"], tuple)
    outer({"w": x["coef"][0], "b": x["coef"][1]}).backward()
    assert rel_err(theta.grad, HYPERGRAD_REF) < RTOL[DT]


@pytest.mark.parametrize("factory,converges", _params(PYTREE_SOLVERS))
def test_float32_keeps_dtype_and_meets_float32_accuracy(factory, converges):
    x, grad = hypergradient(factory(), dtype=torch.float32)
    assert x["w"].dtype == torch.float32 and x["b"].dtype == torch.float32
    assert rel_err(grad, HYPERGRAD_REF) < RTOL[torch.float32]


@pytest.mark.parametrize("factory,converges", _params(PYTREE_SOLVERS))
def test_vmap_solves_a_batch_jointly(factory, converges):
    solver = factory()
    assert solver.batchable
    thetas = torch.stack([THETA, THETA.flip(0), THETA - 0.5]).requires_grad_(True)

    def solve(theta):
        return ig.implicit_solve(objective, x_zero(), theta, X_TRAIN, Y_TRAIN, solver=solver)

    xs = torch.func.vmap(solve)(thetas)
    torch.func.vmap(outer)(xs).sum().backward()
    for i in range(3):
        v_ref, grad_ref = reference(thetas[i].detach())
        assert rel_err(torch.cat([xs["w"][i], xs["b"][i].reshape(1)]).detach(), v_ref) < 1e-6
        assert rel_err(thetas.grad[i], grad_ref) < RTOL[DT]


@pytest.mark.cuda
@pytest.mark.parametrize("factory,converges", _params(PYTREE_SOLVERS))
def test_cuda_solution_stays_on_device(factory, converges):
    X, y = X_TRAIN.cuda(), Y_TRAIN.cuda()
    x0 = {k: v.cuda() for k, v in x_zero().items()}
    x, stats = factory().run(objective, x0, THETA.cuda(), X, y)
    assert x["w"].is_cuda and stats.converged
    assert rel_err(stacked(x).cpu(), V_REF) < 1e-6


# --------------------------------------------------------------------------- L-BFGS specifics
def test_lbfgs_default_converges_an_ill_conditioned_quadratic():
    # Condition number 1e4: torch's strong-Wolfe line search alone stalls near 1e-6 here.
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DT))
    A = q @ torch.diag(torch.logspace(0, 4, 30, dtype=DT)) @ q.T
    b = torch.randn(30, generator=g, dtype=DT)
    x, stats = TorchOptimizer(torch.optim.LBFGS).run(lambda x, A, b: 0.5 * x @ A @ x - b @ x,
                                                      torch.zeros(30, dtype=DT), A, b)
    assert stats.converged
    assert float((A @ x - b).norm()) <= 1e-8 * max(1.0, float(b.norm()))
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-6


def test_lbfgs_maxiter_counts_step_calls():
    solver = TorchOptimizer(torch.optim.LBFGS, maxiter=2, max_iter=3, history_size=5)
    x, stats = solver.run(objective, x_zero(), THETA, X_TRAIN, Y_TRAIN)
    assert 2 < stats.iterations <= 6  # two step() calls of at most three iterations each
    assert stats.converged is False


# --------------------------------------------------------------------------- failures
UNCONVERGED = [
    ("TorchOptimizer-SGD", lambda: TorchOptimizer(torch.optim.SGD, lr=0.01, maxiter=5), 5),
    ("TorchOpt-sgd", lambda: TorchOpt(_torchopt("sgd", 0.01), maxiter=5), 5),
    ("SciPy-L-BFGS-B", lambda: SciPy(maxiter=2), 2),
]


@pytest.mark.parametrize("factory,maxiter", _params(UNCONVERGED))
def test_maxiter_is_reported_and_the_core_warns(factory, maxiter):
    solver = factory()
    x, stats = solver.run(objective, x_zero(), THETA, X_TRAIN, Y_TRAIN)
    assert stats.iterations == maxiter and stats.converged is False
    grad, _ = gradient_and_hessian(stacked(x), THETA, X_TRAIN, Y_TRAIN)
    assert stats.residual == pytest.approx(float(grad.norm()), rel=1e-6)
    with pytest.warns(ig.ImplicitGradWarning, match="not stationary"):
        _, info = ig.implicit_solve(objective, x_zero(), THETA, X_TRAIN, Y_TRAIN, solver=solver, return_info=True)
    assert info.forward_status == "not_converged" and info.forward_iterations == maxiter


def test_scipy_failure_message_is_kept():
    _, stats = SciPy(maxiter=2).run(objective, x_zero(), THETA, X_TRAIN, Y_TRAIN)
    assert "ITERATIONS REACHED LIMIT" in stats.message.upper() or "MAXIMUM" in stats.message.upper()


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(lambda: TorchOptimizer(torch.optim.SGD, lr=0.1, tol=0, maxiter=7), id="TorchOptimizer"),
        pytest.param(lambda: TorchOpt(_torchopt("sgd", 0.1), tol=0, maxiter=7), id="TorchOpt", marks=needs_torchopt),
    ],
)
def test_tol_zero_runs_exactly_maxiter_steps(factory):
    x, stats = factory().run(objective, x_zero(), THETA, X_TRAIN, Y_TRAIN)
    assert stats.iterations == 7 and stats.converged is None
    assert math.isfinite(stats.residual)


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(lambda: TorchOptimizer(torch.optim.SGD, lr=1.0), id="TorchOptimizer"),
        pytest.param(lambda: TorchOpt(_torchopt("sgd", 1.0)), id="TorchOpt", marks=needs_torchopt),
    ],
)
def test_divergence_stops_early_and_is_reported(factory):
    # x ← x − 10 x: |x| grows ninefold per step and overflows after about 330 steps.
    x, stats = factory().run(lambda x: 5.0 * (x**2).sum(), torch.ones(3, dtype=DT))
    assert stats.iterations < 1000 and stats.converged is False
    assert stats.message.startswith("diverged")


def test_adapters_cannot_be_unrolled():
    for solver in (TorchOptimizer(torch.optim.Adam), SciPy()):
        assert not solver.unrollable
        with pytest.raises(ValueError, match="cannot be unrolled"):
            ig.implicit_solve(objective, x_zero(), THETA.clone().requires_grad_(True), X_TRAIN, Y_TRAIN,
                              solver=solver, mode="unrolled")


def test_gradient_descent_records_iterations_only_when_something_requires_grad():
    f = lambda x, c: ((x - c) ** 2).sum()  # noqa: E731
    gd = GradientDescent(lr=0.5, maxiter=10)
    assert gd(f, torch.zeros(2), torch.ones(2)).grad_fn is None
    assert gd(f, torch.zeros(2), torch.ones(2, requires_grad=True)).grad_fn is not None


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: TorchOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)])), TypeError, "not an instance"),
        (lambda: TorchOptimizer(torch.nn.Linear), TypeError, "Optimizer subclass"),
        (lambda: TorchOptimizer("Adam"), TypeError, "Optimizer subclass"),
        (lambda: TorchOptimizer(torch.optim.SGD, lr=-1.0), ValueError, "Invalid learning rate"),
        (lambda: TorchOptimizer(torch.optim.Adam, momentum=0.9), TypeError, "momentum"),
        (lambda: TorchOptimizer(torch.optim.Adam, params=[]), TypeError, "do not pass params"),
        (lambda: TorchOptimizer(torch.optim.Adam, maxiter=0), ValueError, "maxiter"),
        (lambda: TorchOptimizer(torch.optim.Adam, tol=-1.0), ValueError, "tol"),
        (lambda: TorchOptimizer(torch.optim.Adam, check_every=0), ValueError, "check_every"),
        (lambda: SciPy("Nelder-Mead"), ValueError, "Gradient-free"),
        (lambda: SciPy("trust-exact"), ValueError, "method must be one of"),
        (lambda: SciPy(method=3), ValueError, "method must be one of"),
        (lambda: SciPy(tol=0), ValueError, "positive"),
        (lambda: SciPy(maxiter=1.5), ValueError, "maxiter"),
        (lambda: SciPy(bounds=[(0, 1)]), ValueError, "bounds"),
        (lambda: GradientDescent(tol=-1), ValueError, "tol"),
        (lambda: FixedPointIteration(tol="x"), ValueError, "tol"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@needs_torchopt
@pytest.mark.parametrize("transform", ["adam", torch.optim.Adam, None])
def test_torchopt_rejects_non_transformations(transform):
    with pytest.raises(TypeError, match="gradient transformation"):
        TorchOpt(transform)


@needs_torchopt
def test_torchopt_bad_numbers():
    with pytest.raises(ValueError, match="maxiter"):
        TorchOpt(_torchopt("adam", 0.1), maxiter=0)
    with pytest.raises(ValueError, match="tol"):
        TorchOpt(_torchopt("adam", 0.1), tol=-1.0)


@pytest.mark.parametrize(
    "solver",
    [TorchOptimizer(torch.optim.Adam), SciPy()],
    ids=["TorchOptimizer", "SciPy"],
)
def test_integer_variable_is_rejected_at_run_time(solver):
    with pytest.raises(TypeError, match="floating point"):
        solver.run(lambda x: x.sum(), torch.zeros(3, dtype=torch.int64))


def test_scipy_rejects_complex_variable():
    with pytest.raises(TypeError, match="real floating point"):
        SciPy().run(lambda x: x.abs().sum(), torch.zeros(3, dtype=torch.complex128))


def test_non_scalar_objective_is_a_value_error():
    with pytest.raises(ValueError, match="scalar"):
        TorchOptimizer(torch.optim.Adam).run(lambda x: x * 2, torch.zeros(3, dtype=DT))


def test_missing_torchopt_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torchopt", None)
    with pytest.raises(ImportError, match=r"pip install implicitgrad\[torchopt\]"):
        TorchOpt(object())


def test_missing_scipy_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r"pip install implicitgrad\[scipy\]"):
        SciPy()


def test_exports_are_sorted_and_complete():
    names = ig.solvers.__all__
    assert names == sorted(names)
    for name in ("FixedPointIteration", "GradientDescent", "InnerSolver", "SciPy", "SolverStats", "TorchOpt",
                 "TorchOptimizer"):
        assert issubclass(getattr(ig.solvers, name), object) and name in names
    for cls in (TorchOptimizer, TorchOpt, SciPy):
        assert issubclass(cls, ig.solvers.InnerSolver)
