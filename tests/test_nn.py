"""Implicit layers: RidgeHead against autograd through its closed form, LogisticHead and
generic layers against central finite differences, training inside nn.Sequential,
diagnostics and argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from registry import rel_err
from torch import nn

import implicitgrad as ig
from implicitgrad.nn import EncodeEpisode, ImplicitLayer, LogisticHead, RidgeHead
from implicitgrad.solvers import FixedPointIteration, TorchOptimizer

DT = torch.float64



@pytest.fixture(autouse=True)
def one_thread():
    """Run on one intra-op thread: the tensors here are tiny, and on a shared, loaded CPU
    torch's parallel reductions (mean, cross_entropy) then cost milliseconds instead of
    microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def randn(*shape, seed=0, dtype=DT):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- RidgeHead
def ridge_closed_form(z, y, z_query, log_lam, scale):
    """Autograd reference: α Z_q (ZᵀZ + λI)⁻¹ Zᵀ Y written directly."""
    d = z.shape[1]
    gram = z.T @ z + log_lam.exp() * torch.eye(d, dtype=z.dtype)
    return scale * (z_query @ torch.linalg.solve(gram, z.T @ y))


TARGETS = {
    "labels": lambda n: torch.arange(n) % 4,
    "float-1d": lambda n: randn(n, seed=5),
    "float-2d": lambda n: randn(n, 3, seed=6),
}


@pytest.mark.parametrize("form,n,d", [("dual", 8, 20), ("primal", 8, 20), ("auto", 30, 6), ("auto", 8, 20)])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_ridge_head_gradient_equals_autograd_through_closed_form(form, n, d, target):
    head = RidgeHead(lam=0.7, learn_scale=True, scale=1.3, form=form, linear_solver=ig.Exact()).double()
    z, z_query = randn(n, d, seed=1).requires_grad_(True), randn(5, d, seed=2).requires_grad_(True)
    y = TARGETS[target](n)
    y = y.requires_grad_(True) if y.is_floating_point() else y
    out = head(z, y, z_query)
    cotangent = randn(*out.shape, seed=3)
    (out * cotangent).sum().backward()

    log_lam = head.log_lam.detach().clone().requires_grad_(True)
    scale = head.scale.detach().clone().requires_grad_(True)
    z_ref, zq_ref = z.detach().clone().requires_grad_(True), z_query.detach().clone().requires_grad_(True)
    if y.is_floating_point():
        y_ref = y.detach().clone().requires_grad_(True)
        y_mat = y_ref.unsqueeze(1) if y_ref.dim() == 1 else y_ref
    else:
        y_ref, y_mat = None, F.one_hot(y, 4).to(DT)
    ref = ridge_closed_form(z_ref, y_mat, zq_ref, log_lam, scale)
    ref = ref.squeeze(1) if target == "float-1d" else ref
    assert rel_err(out, ref) < 1e-12
    (ref * cotangent).sum().backward()
    for got, want in [(head.log_lam.grad, log_lam.grad), (head.scale.grad, scale.grad), (z.grad, z_ref.grad),
                      (z_query.grad, zq_ref.grad)] + ([(y.grad, y_ref.grad)] if y_ref is not None else []):
        assert rel_err(got, want) < 1e-10


def test_ridge_head_default_cg_backward_is_accurate():
    head = RidgeHead(lam=0.5).double()
    z, z_query = randn(10, 40, seed=1).requires_grad_(True), randn(6, 40, seed=2)
    labels = torch.arange(10) % 5
    F.cross_entropy(head(z, labels, z_query), torch.arange(6) % 5).backward()
    log_lam = head.log_lam.detach().clone().requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    ref = ridge_closed_form(z_ref, F.one_hot(labels, 5).to(DT), z_query, log_lam, torch.tensor(1.0, dtype=DT))
    F.cross_entropy(ref, torch.arange(6) % 5).backward()
    assert rel_err(head.log_lam.grad, log_lam.grad) < 1e-8
    assert rel_err(z.grad, z_ref.grad) < 1e-8
    info = head.last_info
    assert info.forward_status == "converged" and info.backward.converged and info.backward.solver == "CG"
    assert info.backward.iterations <= 11  # at most n + 1 distinct eigenvalues


def test_ridge_head_forms_agree_and_auto_picks_the_smaller_system():
    z, z_query, labels = randn(7, 15, seed=1), randn(4, 15, seed=2), torch.arange(7) % 3
    primal = RidgeHead(lam=0.3, form="primal").double()
    dual = RidgeHead(lam=0.3, form="dual").double()
    assert rel_err(primal(z, labels, z_query), dual(z, labels, z_query)) < 1e-12
    auto = RidgeHead(lam=0.3).double()
    assert auto.init(auto.prepare(z, labels, z_query)).shape == (7, 3)  # dual: n < d
    tall = randn(15, 5, seed=4)
    assert auto.init(auto.prepare(tall, torch.arange(15) % 3, randn(2, 5, seed=5))).shape == (5, 3)  # primal


def test_ridge_head_fixed_hyperparameters_are_buffers():
    head = RidgeHead(lam=2.0, learn_lam=False).double()
    assert dict(head.named_parameters()) == {}
    assert {name for name, _ in head.named_buffers()} == {"log_lam", "scale"}
    z = randn(6, 4, seed=1).requires_grad_(True)
    head(z, torch.arange(6) % 2, randn(3, 4, seed=2)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_ridge_head_with_an_iterative_solver_matches_closed_form():
    z, z_query, labels = randn(8, 12, seed=1), randn(4, 12, seed=2), torch.arange(8) % 4
    exact = RidgeHead(lam=0.4).double()
    iterative = RidgeHead(lam=0.4, solver=TorchOptimizer(torch.optim.LBFGS)).double()
    out_exact, out_iter = exact(z, labels, z_query), iterative(z, labels, z_query)
    assert rel_err(out_iter, out_exact) < 1e-7
    out_exact.sum().backward()
    out_iter.sum().backward()
    assert rel_err(iterative.log_lam.grad, exact.log_lam.grad) < 1e-6


# --------------------------------------------------------------------------- training in nn.Sequential
def episodes(count, seed, ways=4, shots=5, queries=6, dim=10, dtype=torch.float32):
    """Clusters around random class centres, seen through a fixed random nonlinear map."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g)
    out = []
    for _ in range(count):
        centres = 1.5 * torch.randn(ways, dim, generator=g)

        def sample(per_class, centres=centres):
            labels = torch.arange(ways).repeat_interleave(per_class)
            x = centres[labels] + torch.randn(len(labels), dim, generator=g)
            return torch.tanh(x @ mix / dim**0.5).to(dtype), labels

        (x_s, y_s), (x_q, y_q) = sample(shots), sample(queries)
        out.append(((x_s, y_s, x_q), y_q))
    return out


def mean_loss(model, data):
    with torch.no_grad():
        return float(sum(F.cross_entropy(model(ep), y_q) for ep, y_q in data) / len(data))


@pytest.mark.parametrize(
    "make_head",
    [
        pytest.param(lambda: RidgeHead(lam=1.0, learn_scale=True), id="RidgeHead"),
        pytest.param(lambda: LogisticHead(num_classes=4, lam=0.1, learn_scale=True), id="LogisticHead"),
    ],
)
def test_head_trains_inside_sequential_with_feature_extractor(make_head):
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16))
    model = nn.Sequential(EncodeEpisode(extractor), make_head())
    train, held_out = episodes(12, seed=1), episodes(8, seed=2)
    before = mean_loss(model, held_out)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for step in range(30):
        episode, y_q = train[step % len(train)]
        optimizer.zero_grad()
        F.cross_entropy(model(episode), y_q).backward()
        optimizer.step()
    after = mean_loss(model, held_out)
    assert after < 0.75 * before, (before, after)
    head = model[1]
    assert head.last_info.forward_status == "converged"
    assert all(p.grad is not None for p in extractor.parameters())


# --------------------------------------------------------------------------- LogisticHead
def test_logistic_head_gradient_matches_central_differences():
    head = LogisticHead(num_classes=3, lam=0.3, learn_scale=True, scale=1.5,
                        solver=TorchOptimizer(torch.optim.LBFGS, tol=1e-12)).double()
    z, z_query, labels = randn(12, 5, seed=1), randn(7, 5, seed=2), torch.arange(12) % 3
    y_query = torch.arange(7) % 3
    names = ["log_lam", "scale", "z", "z_query"]
    point = {"log_lam": head.log_lam.detach(), "scale": head.scale.detach(), "z": z, "z_query": z_query}
    direction = {k: randn(*v.shape, seed=10 + i) for i, (k, v) in enumerate(point.items())}

    def loss(values):
        params = {"log_lam": values["log_lam"], "scale": values["scale"]}
        logits = torch.func.functional_call(head, params, (values["z"], labels, values["z_query"]))
        return F.cross_entropy(logits, y_query)

    leaves = {k: v.clone().requires_grad_(True) for k, v in point.items()}
    loss(leaves).backward()
    analytic = sum(float((leaves[k].grad * direction[k]).sum()) for k in names)
    assert head.last_info.backward.converged

    h = 1e-4
    with torch.no_grad():
        plus = loss({k: point[k] + h * direction[k] for k in names})
        minus = loss({k: point[k] - h * direction[k] for k in names})
    assert float(plus - minus) / (2 * h) == pytest.approx(analytic, rel=1e-6)


def test_logistic_head_infers_classes_and_reports_info():
    head = LogisticHead().double()
    logits = head(randn(9, 4, seed=1), torch.arange(9) % 3, randn(2, 4, seed=2))
    assert logits.shape == (2, 3)
    assert head.last_info.forward_iterations > 0 and head.last_info.forward_residual < 1e-6


# --------------------------------------------------------------------------- generic ImplicitLayer
class SoftplusDenoiser(ImplicitLayer):
    """x* = argmin ½‖x − u‖² + Σ softplus(L x): a strongly convex problem using a sub-module."""

    def __init__(self, dim, linear_solver=None):
        super().__init__(solver=TorchOptimizer(torch.optim.LBFGS, tol=1e-12), linear_solver=linear_solver)
        self.proj = nn.Linear(dim, 3)

    def init(self, inputs):
        return torch.zeros_like(inputs[0])

    def objective(self, x, inputs, params):
        return 0.5 * ((x - inputs[0]) ** 2).sum() + F.softplus(self.call_submodule("proj", params, x)).sum()


class TanhEquilibrium(ImplicitLayer):
    """x* = tanh(W x* + u), through its residual x − tanh(W x + u) (W small: a contraction)."""

    def __init__(self, dim, linear_solver=None):
        super().__init__(solver=self.fixed_point_of_residual, linear_solver=linear_solver or ig.GMRES())
        self.weight = nn.Parameter(0.3 * randn(dim, dim, seed=7) / dim**0.5)

    @staticmethod
    def fixed_point_of_residual(residual, x0, *args):
        return FixedPointIteration(tol=1e-13).run(lambda x, *a: x - residual(x, *a), x0, *args)[0]

    def init(self, inputs):
        return torch.zeros_like(inputs[0])

    def residual(self, x, inputs, params):
        return x - torch.tanh(x @ params["weight"].T + inputs[0])


@pytest.mark.parametrize("make_layer", [SoftplusDenoiser, TanhEquilibrium], ids=["objective", "residual"])
def test_generic_layer_in_sequential_matches_central_differences(make_layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), make_layer(4)).double()
    u = randn(5, 3, seed=1)
    target = randn(5, 4, seed=2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    direction = {k: randn(*v.shape, seed=20 + i) for i, (k, v) in enumerate(params.items())}

    def loss(values):
        return ((torch.func.functional_call(model, values, (u,)) - target) ** 2).sum()

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss(leaves).backward()
    info = model[1].last_info
    assert isinstance(info, ig.SolveInfo) and info.forward_status == "converged" and info.backward.converged
    assert all(leaves[k].grad is not None for k in leaves)
    analytic = sum(float((leaves[k].grad * direction[k]).sum()) for k in leaves)
    h = 1e-5
    with torch.no_grad():
        plus = loss({k: params[k] + h * direction[k] for k in params})
        minus = loss({k: params[k] - h * direction[k] for k in params})
    assert float(plus - minus) / (2 * h) == pytest.approx(analytic, rel=1e-6)


def dense_solve(matvec, b):
    """A linear solver of one's own: forms the matrix column by column, solves densely."""
    columns = [matvec(e.reshape(b.shape)).reshape(-1) for e in torch.eye(b.numel(), dtype=b.dtype)]
    return torch.linalg.solve(torch.stack(columns, 1), b.reshape(-1)).reshape(b.shape)


@pytest.mark.parametrize("returns_info", [False, True], ids=["x", "x-info"])
@pytest.mark.parametrize("make_layer", [SoftplusDenoiser, TanhEquilibrium], ids=["objective", "residual"])
def test_layer_accepts_a_plain_callable_linear_solver(make_layer, returns_info):
    calls = []

    def solve(matvec, b):
        calls.append(b.shape)
        x = dense_solve(matvec, b)
        if not returns_info:
            return x
        residual = float((matvec(x) - b).norm() / b.norm())
        return x, ig.LinearSolveInfo.from_residual(residual, 1e-10, iterations=b.numel(), solver="dense")

    u = randn(5, 3, seed=1)
    grads, infos = {}, {}
    for name, linear_solver in [("callable", solve), ("exact", ig.Exact())]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), make_layer(4, linear_solver=linear_solver)).double()
        (model(u) ** 3).sum().backward()
        grads[name] = [p.grad for p in model.parameters()]
        infos[name] = model[1].last_info
    assert calls == [torch.Size([5, 4])]
    assert infos["callable"].backward.converged and infos["callable"].backward.residual < 1e-10
    for got, want in zip(grads["callable"], grads["exact"]):
        assert rel_err(got, want) < 1e-10


def test_layer_constructor_accepts_a_callable_and_refuses_a_class():
    layer = NoSolver(solver=FixedPointIteration(), linear_solver=dense_solve)
    assert layer.linear_solver is dense_solve and "dense_solve" in repr(layer)
    with pytest.raises(TypeError, match="linear_solver must be an instance, got the class CG"):
        NoSolver(solver=FixedPointIteration(), linear_solver=ig.CG)


def test_objective_reading_self_instead_of_params_is_flagged():
    class Leaky(SoftplusDenoiser):
        def objective(self, x, inputs, params):
            return 0.5 * ((x - inputs[0]) ** 2).sum() + F.softplus(self.proj(x)).sum()

    layer = Leaky(3).double()
    with pytest.warns(ig.ImplicitGradWarning, match="not among params"):
        layer(randn(2, 3, seed=1))


# --------------------------------------------------------------------------- arguments
class Neither(ImplicitLayer):
    def init(self, inputs):
        return inputs[0]


class Both(Neither):
    def objective(self, x, inputs, params):
        return x.sum()

    def residual(self, x, inputs, params):
        return x


class NoSolver(ImplicitLayer):
    def objective(self, x, inputs, params):
        return x.sum()


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: Neither(solver=FixedPointIteration()), TypeError, "neither"),
        (lambda: Both(solver=FixedPointIteration()), TypeError, "both"),
        (lambda: NoSolver(), TypeError, "closed_form"),
        (lambda: NoSolver(solver="lbfgs"), TypeError, "callable"),
        (lambda: NoSolver(solver=FixedPointIteration(), linear_solver="cg"), TypeError, "linear_solver"),
        (lambda: NoSolver(solver=FixedPointIteration(), on_failure="loud"), ValueError, "on_failure"),
        (lambda: NoSolver(solver=FixedPointIteration(), forward_tol=0), ValueError, "forward_tol"),
        (lambda: RidgeHead(lam=0.0), ValueError, "lam"),
        (lambda: RidgeHead(lam=float("inf")), ValueError, "lam"),
        (lambda: RidgeHead(form="woodbury"), ValueError, "form"),
        (lambda: RidgeHead(num_classes=0), ValueError, "num_classes"),
        (lambda: RidgeHead(scale=float("nan")), ValueError, "scale"),
        (lambda: LogisticHead(num_classes=1), ValueError, "num_classes"),
        (lambda: LogisticHead(lam=-1.0), ValueError, "lam"),
        (lambda: EncodeEpisode(lambda x: x), TypeError, "nn.Module"),
    ],
)
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "head,args,match",
    [
        (RidgeHead, (randn(5, 3), torch.arange(5), randn(2, 4)), "differ in dimension"),
        (RidgeHead, (randn(5), torch.arange(5), randn(2, 5)), "feature matrix"),
        (RidgeHead, (randn(5, 3), torch.arange(4), randn(2, 3)), "5 integer class labels"),
        (RidgeHead, (randn(5, 3), randn(4, 2), randn(2, 3)), "float targets"),
        (lambda: RidgeHead(num_classes=2), (randn(5, 3), torch.arange(5), randn(2, 3)), "out of range"),
        (LogisticHead, (randn(5, 3), randn(5), randn(2, 3)), "integer class labels"),
        (LogisticHead, (randn(5, 3), -torch.arange(5), randn(2, 3)), "non-negative"),
    ],
)
def test_bad_inputs(head, args, match):
    with pytest.raises(ValueError, match=match):
        head().double()(*args)


def test_encode_episode_needs_three_elements():
    with pytest.raises(TypeError, match="three|3|episode"):
        EncodeEpisode(nn.Identity())((randn(2, 2), torch.arange(2)))


def test_exports_are_sorted():
    import implicitgrad.nn as ignn

    assert ignn.__all__ == sorted(ignn.__all__)
    assert {"EncodeEpisode", "ImplicitLayer", "LogisticHead", "RidgeHead"} <= set(ignn.__all__)
