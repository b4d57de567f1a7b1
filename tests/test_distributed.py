"""Data-parallel inner problems and implicit layers under DDP, on 2 and 4 gloo processes.

Each spawned process holds a shard of the data (uneven shards for 4 processes). The
references are computed in the parent process on the whole data with plain functions that
never touch ``ig.distributed``. Everything is float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_meta_distributed import free_port, gloo_group
from torch import nn

import implicitgrad as ig

DTYPE = torch.float64
N_TRAIN, N_VAL, DIM = 50, 30, 5  # 50 rows on 4 ranks: shards of 13, 13, 12, 12
EPISODES, BATCH = 4, 8

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


# ---------------------------------------------------------------------- the inner problem
def make_data():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(DIM, generator=g, dtype=DTYPE)
    X = torch.randn(N_TRAIN + N_VAL, DIM, generator=g, dtype=DTYPE)
    y = (X @ w_true + 0.5 * torch.randn(N_TRAIN + N_VAL, generator=g, dtype=DTYPE) > 0).to(DTYPE)
    theta = 0.3 * torch.randn(DIM, generator=g, dtype=DTYPE) - 1.0  # log-penalties, one per feature
    weights = 0.5 + torch.rand(N_TRAIN, generator=g, dtype=DTYPE)  # per-example weights (sharded)
    scale = torch.tensor(0.8, dtype=DTYPE)  # logit scale: a hyperparameter of the sharded term
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:], theta, weights, scale


def zero_model():
    return {"w": torch.zeros(DIM, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}


def weighted_losses(model, scale, X, y, weights):
    return weights * F.binary_cross_entropy_with_logits(scale * (X @ model["w"] + model["b"]), y, reduction="none")


def penalty(model, theta):
    return 0.5 * (theta.exp() * model["w"] ** 2).sum()


# (inner solver, linear solver, on_failure): solved to convergence, or stopped after a fixed
# budget, where the residuals are figures of the problem and not of rounding.
SETTINGS = {
    "converged": (ig.solvers.LBFGS(maxiter=200, tol=1e-12), ig.CG(maxiter=100, tol=1e-12), "raise"),
    "budget": (ig.solvers.LBFGS(maxiter=3, tol=1e-30), ig.CG(maxiter=3, tol=1e-30), "ignore"),
}


def reference_hypergradient(setting):
    """One process, the whole data, plain functions."""
    solver, linear, on_failure = SETTINGS[setting]
    X, y, Xv, yv, theta, weights, scale = make_data()
    for t in (theta, weights, scale):
        t.requires_grad_(True)

    def objective(model, theta, scale, weights):
        return weighted_losses(model, scale, X, y, weights).sum() / N_TRAIN + penalty(model, theta)

    model, info = ig.implicit_solve(objective, zero_model(), theta, scale, weights, solver=solver,
                                    linear_solver=linear, return_info=True, on_failure=on_failure)
    val = F.binary_cross_entropy_with_logits(Xv @ model["w"] + model["b"], yv, reduction="sum") / N_VAL
    val.backward()
    return {"val": val.detach(), "theta": theta.grad, "scale": scale.grad, "weights": weights.grad,
            "w": model["w"].detach(), "info": _figures(info)}


def _figures(info):
    b = info.backward
    return {"forward_residual": info.forward_residual, "initial_residual": info.initial_residual,
            "forward_iterations": info.forward_iterations, "forward_status": info.forward_status,
            "backward_iterations": b.iterations, "backward_residual": b.residual, "backward_status": b.status}


def sharded_hypergradient(group, setting):
    """This rank's shard of the data; the objective and the validation loss all-reduced."""
    solver, linear, on_failure = SETTINGS[setting]
    X, y, Xv, yv, theta, weights, scale = make_data()
    Xr, yr, wr = (ig.distributed.shard(t, group) for t in (X, y, weights))
    Xvr, yvr = ig.distributed.shard(Xv, group), ig.distributed.shard(yv, group)
    theta.requires_grad_(True)
    scale.requires_grad_(True)
    wr = wr.detach().clone().requires_grad_(True)
    objective = ig.distributed.all_reduce_objective(
        lambda model, theta, scale, wr, Xr, yr: weighted_losses(model, scale, Xr, yr, wr).sum() / N_TRAIN,
        lambda model, theta, scale, wr, Xr, yr: penalty(model, theta),
        sharded=(2, 3, 4), group=group,
    )
    validation = ig.distributed.all_reduce_objective(
        lambda model, Xvr, yvr: F.binary_cross_entropy_with_logits(
            Xvr @ model["w"] + model["b"], yvr, reduction="sum") / N_VAL,
        sharded=(0, 1), group=group,
    )
    with ig.distributed.count_all_reduces() as forward_log:
        model, info = ig.implicit_solve(objective, zero_model(), theta, scale, wr, Xr, yr, solver=solver,
                                        linear_solver=linear, return_info=True, on_failure=on_failure)
    with ig.distributed.count_all_reduces() as backward_log:
        val = validation(model, Xvr, yvr)
        val.backward()
    return {"val": val.detach(), "theta": theta.grad, "scale": scale.grad, "weights": wr.grad,
            "w": model["w"].detach(),
            "info": _figures(info), "forward_log": forward_log, "backward_log": backward_log}


# ---------------------------------------------------------------------- second order, vmap
def _ridge_data():
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(N_TRAIN, 4, generator=g, dtype=DTYPE), torch.randn(N_TRAIN, generator=g, dtype=DTYPE)
    lams = 0.2 + torch.rand(3, 4, generator=g, dtype=DTYPE)  # three per-feature penalty vectors
    return X, y, lams


def _ridge_solve(objective, lam, X, y):
    return ig.implicit_solve(objective, torch.zeros(4, dtype=DTYPE), lam, X, y, on_failure="raise",
                             solver=ig.solvers.LBFGS(tol=1e-13), linear_solver=ig.CG(tol=1e-13))


def higher_order(objective, X, y):
    """Hypergradient, the gradient of its squared norm (create_graph) and a vmapped Jacobian."""
    _, _, lams = _ridge_data()
    lam = lams[0].clone().requires_grad_(True)
    w = _ridge_solve(objective, lam, X, y)
    (first,) = torch.autograd.grad((w**3).sum(), lam, create_graph=True)
    (second,) = torch.autograd.grad((first**2).sum(), lam)

    def batch_total(ls):
        return torch.func.vmap(_ridge_solve, in_dims=(None, 0, None, None))(objective, ls, X, y).sum()

    return {"first": first.detach(), "second": second, "vmap_jacobian": torch.func.jacrev(batch_total)(lams)}


def plain_ridge(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum() / N_TRAIN + 0.5 * (lam * w**2).sum()


def sharded_higher_order(group):
    X, y, _ = _ridge_data()
    objective = ig.distributed.all_reduce_objective(
        lambda w, lam, Xr, yr: 0.5 * ((Xr @ w - yr) ** 2).sum() / N_TRAIN,
        lambda w, lam, Xr, yr: 0.5 * (lam * w**2).sum(), sharded=(1, 2), group=group)
    return higher_order(objective, ig.distributed.shard(X, group), ig.distributed.shard(y, group))


def mismatch_error(group):
    """A replicated argument that differs between ranks must raise on every rank."""
    objective = ig.distributed.all_reduce_objective(lambda x, t: ((x - t) ** 2).sum(), group=group)
    t = torch.full((3,), float(dist.get_rank(group)), dtype=DTYPE)
    try:
        objective(torch.zeros(3, dtype=DTYPE), t)
    except ValueError as e:
        return str(e)
    return ""


# ---------------------------------------------------------------------- layers under DDP
class Shrink(ig.nn.ImplicitLayer):
    """Per sample: x* = argmin ½‖x − u‖² + Σ_j exp(a_j) cosh(x_j); output x*."""

    def __init__(self):
        super().__init__(solver=ig.solvers.LBFGS(maxiter=100, tol=1e-13), linear_solver=ig.CG(tol=1e-13))
        self.a = nn.Parameter(torch.linspace(-1.5, -0.5, 4, dtype=DTYPE))

    def init(self, inputs):
        return torch.zeros_like(inputs[0])

    def objective(self, x, inputs, params):
        return 0.5 * ((x - inputs[0]) ** 2).sum() + (params["a"].exp() * torch.cosh(x)).sum()


def make_net(kind):
    torch.manual_seed(0)
    if kind == "implicit_layer":
        return nn.Sequential(nn.Linear(6, 4), Shrink(), nn.Linear(4, 3)).to(DTYPE)
    head = (ig.nn.RidgeHead(lam=0.5, learn_scale=True) if kind == "ridge"
            else ig.nn.LogisticHead(num_classes=3, learn_scale=True))
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    return nn.Sequential(ig.nn.EncodeEpisode(encoder), head).to(DTYPE)


class MeanLoss(nn.Module):
    """Mean cross-entropy over a list of items: episodes ``(x_s, y_s, x_q, y_q)`` or batches ``(x, y)``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, items):
        losses = [F.cross_entropy(self.net(item[:-1] if len(item) > 2 else item[0]), item[-1]) for item in items]
        return torch.stack(losses).mean()


def make_items(kind):
    """``EPISODES`` items, each an episode (few-shot heads) or a batch of ``BATCH`` samples."""
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(EPISODES):
        if kind == "implicit_layer":
            items.append((torch.randn(BATCH, 6, generator=g, dtype=DTYPE), torch.arange(BATCH) % 3))
        else:
            items.append((torch.randn(9, 6, generator=g, dtype=DTYPE), torch.arange(9) % 3,
                          torch.randn(6, 6, generator=g, dtype=DTYPE), torch.arange(6) % 3))
    return items


LAYERS = ("ridge", "logistic", "implicit_layer")


def layer_gradients(kind, group=None, wrap="ddp"):
    """Gradients of the mean loss; wrapped, each rank takes ``items[rank::world]`` (equal counts).

    ``wrap``: ``None`` (one process, every item), ``"ddp"`` or ``"fsdp"`` (``fully_shard`` on
    every sub-module with parameters, the implicit layers included, then on the whole model).
    fully_shard refuses 0-d parameters (the heads' log λ and scale): they are left to the
    caller, here an explicit all-reduce of their gradients.
    """
    net = make_net(kind)
    items = make_items(kind)
    model = MeanLoss(net)
    if wrap is not None:
        items = items[dist.get_rank(group)::dist.get_world_size(group)]
    scalars = [p for p in net.parameters() if p.dim() == 0]
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model, process_group=group)
    elif wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in net.modules():
            if isinstance(module, (nn.Linear, ig.nn.ImplicitLayer)) and any(p.dim() for p in module.parameters()):
                fully_shard(module, ignored_params=set(scalars))
        fully_shard(model, ignored_params=set(scalars))
    model(items).backward()
    if wrap == "fsdp":
        for p in scalars:
            dist.all_reduce(p.grad, group=group)
            p.grad /= dist.get_world_size(group)
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for name, p in net.named_parameters()}


# ---------------------------------------------------------------------- processes
def run_checks(group):
    result = {"hyper": {setting: sharded_hypergradient(group, setting) for setting in SETTINGS},
              "mismatch": mismatch_error(group), "higher_order": sharded_higher_order(group),
              "layers": {kind: layer_gradients(kind, group) for kind in LAYERS}}
    if group is None:  # fully_shard on the default mesh: every process
        result["fsdp"] = {kind: layer_gradients(kind, group, wrap="fsdp") for kind in LAYERS}
    return result


def worker(rank, world_size, init_method, out):
    """Every check on all the processes, then on a group of the first two (the others wait)."""
    torch.set_num_threads(1)
    with gloo_group(rank, world_size, init_method):
        pair = dist.new_group([0, 1])  # collective: every process creates it
        result = {world_size: run_checks(None)}
        if rank < 2:
            result[2] = run_checks(pair)
        torch.save(result, f"{out}.{rank}")


WORLD = 4  # one launch serves both sizes: the 2-rank checks run on a subgroup


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist") / "result")
    mp.spawn(worker, args=(WORLD, f"tcp://127.0.0.1:{free_port()}", out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(params=[2, 4], ids=lambda w: f"{w}ranks")
def ranks(request, launched):
    """The results of the ranks of a group of ``request.param`` processes."""
    return [launched[rank][request.param] for rank in range(request.param)]


@pytest.fixture(scope="module")
def reference():
    return {setting: reference_hypergradient(setting) for setting in SETTINGS}


@pytest.mark.parametrize("setting", SETTINGS)
def test_hypergradient_equals_whole_data(ranks, reference, setting):
    ref = reference[setting]
    weights = []
    for got in (r["hyper"][setting] for r in ranks):
        torch.testing.assert_close(got["val"], ref["val"], rtol=1e-12, atol=0)
        for key in ("w", "theta", "scale"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-13)
        weights.append(got["weights"])
    # The gradient in a sharded argument is the rank's block of the whole gradient.
    torch.testing.assert_close(torch.cat(weights), ref["weights"], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("setting", SETTINGS)
def test_iterates_and_figures_identical_across_ranks(ranks, setting):
    first = ranks[0]["hyper"][setting]
    for got in (r["hyper"][setting] for r in ranks[1:]):
        assert got["info"] == first["info"]  # exact: every quantity the solvers read is global
        for key in ("val", "w", "theta", "scale"):
            assert torch.equal(got[key], first[key]), key


def test_figures_equal_whole_data(ranks, reference):
    # Stopped after a fixed budget, the residuals are properties of the iterates: equal to 1e-10.
    got, ref = ranks[0]["hyper"]["budget"]["info"], reference["budget"]["info"]
    assert got["forward_status"] == ref["forward_status"] == "not_converged"
    assert got["backward_status"] == ref["backward_status"] == "max_iterations"
    assert (got["forward_iterations"], got["backward_iterations"]) == (ref["forward_iterations"], 3)
    for key in ("forward_residual", "initial_residual", "backward_residual"):
        assert math.isclose(got[key], ref[key], rel_tol=1e-10), key
    # Solved to convergence, they are rounding-level numbers: below the tolerance on both sides;
    # the iteration counts, decided by global residuals, are equal.
    got, ref = ranks[0]["hyper"]["converged"]["info"], reference["converged"]["info"]
    assert got["forward_status"] == ref["forward_status"] == "converged"
    assert got["backward_status"] == ref["backward_status"] == "converged"
    assert (got["forward_iterations"], got["backward_iterations"]) == (ref["forward_iterations"],
                                                                       ref["backward_iterations"])
    assert math.isclose(got["initial_residual"], ref["initial_residual"], rel_tol=1e-12)
    tol = 1e-12 * max(1.0, ref["initial_residual"])
    assert max(got["forward_residual"], ref["forward_residual"]) < tol
    assert max(got["backward_residual"], ref["backward_residual"]) < 1e-12


def test_communication_per_hypergradient(ranks):
    """One all-reduce of x's size per inner gradient and per CG iteration, one number per value."""
    hyper = ranks[0]["hyper"]["converged"]
    n_x = DIM + 1
    backward = [n for n, _ in hyper["backward_log"]]
    # The validation wrapper's first-call check of x* (3 numbers per leaf, twice), the validation
    # value, ∂val/∂x*, one product per CG iteration and the VJP in the replicated hyperparameters
    # that need a gradient, θ and the scale together (θ's part is zero: it only enters the
    # regulariser, computed on every rank). The linearisation's value and ∇ₓf are not evaluated
    # again: the backward pass reuses the graph of the forward check (its last [1, n_x] below).
    iterations = hyper["info"]["backward_iterations"]
    assert backward == [6 * 2, 1, n_x] + [n_x] * iterations + [DIM + 1]
    assert all(b == 8 * n for n, b in hyper["backward_log"])
    # Forward: the one-off check (x's 2 leaves, θ and the scale), then a value and a gradient
    # per L-BFGS evaluation and for the forward check at x* (whose graph the backward reuses).
    forward = [n for n, _ in hyper["forward_log"]]
    assert forward[0] == 6 * 4
    assert forward[1:] == [1, n_x] * (len(forward[1:]) // 2)


def test_replicated_mismatch_raises_on_every_rank(ranks):
    for r in ranks:
        assert "differ between ranks" in r["mismatch"] and "params[0]" in r["mismatch"]


def test_second_order_and_vmap_equal_whole_data(ranks):
    X, y, _ = _ridge_data()
    reference = higher_order(plain_ridge, X, y)
    for r in ranks:
        for key, value in reference.items():
            torch.testing.assert_close(r["higher_order"][key], value, rtol=1e-10, atol=1e-13)


@pytest.fixture(scope="module")
def layer_reference():
    """One process, every item: the gradients each wrapped run must reproduce."""
    return {kind: layer_gradients(kind, wrap=None) for kind in LAYERS}


@pytest.mark.parametrize("kind", LAYERS)
def test_layers_under_ddp_equal_concatenated_batch(ranks, layer_reference, kind):
    reference = layer_reference[kind]
    for r in ranks:
        got = r["layers"][kind]
        assert sorted(got) == sorted(reference)
        for name, value in reference.items():
            torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------- one process
def test_without_process_group_is_the_plain_objective():
    assert not dist.is_initialized()
    X, y, _, _, theta, weights, scale = make_data()
    objective = ig.distributed.all_reduce_objective(
        lambda m, t, Xr, yr: weighted_losses(m, scale, Xr, yr, weights).sum(), lambda m, t, Xr, yr: penalty(m, t),
        sharded=(1, 2))
    model = {"w": torch.randn(DIM, dtype=DTYPE), "b": torch.tensor(0.3, dtype=DTYPE)}
    expected = weighted_losses(model, scale, X, y, weights).sum() + penalty(model, theta)
    assert torch.equal(objective(model, theta, X, y), expected)
    t = torch.arange(3.0)
    assert ig.distributed.sum_over_ranks(t) is t and ig.distributed.replicate(t) is t


def test_shard_covers_the_data_in_order():
    data = torch.arange(10)
    blocks = [ig.distributed.shard(data, rank=r, world_size=4) for r in range(4)]
    assert [len(b) for b in blocks] == [3, 3, 2, 2]
    assert torch.equal(torch.cat(blocks), data)
    assert torch.equal(ig.distributed.shard(data), data)
    with pytest.raises(ValueError, match="rank"):
        ig.distributed.shard(data, rank=4, world_size=4)
    with pytest.raises(ValueError, match="dimension"):
        ig.distributed.shard(torch.tensor(1.0))


def test_bad_arguments():
    with pytest.raises(TypeError, match="shard_objective"):
        ig.distributed.all_reduce_objective(None)
    with pytest.raises(TypeError, match="regularizer"):
        ig.distributed.all_reduce_objective(lambda x: x.sum(), 3)
    with pytest.raises(TypeError, match="sharded"):
        ig.distributed.all_reduce_objective(lambda x: x.sum(), sharded=1)
    objective = ig.distributed.all_reduce_objective(lambda x, a: x.sum(), sharded=(1,))
    with pytest.raises(ValueError, match="beyond"):
        objective(torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("kind", LAYERS)
def test_layers_under_fsdp_equal_concatenated_batch(launched, layer_reference, kind):
    reference = layer_reference[kind]
    for r in launched:
        got = r[WORLD]["fsdp"][kind]
        assert sorted(got) == sorted(reference)
        for name, value in reference.items():
            torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-13)


def test_example_on_one_process(monkeypatch, tmp_path):
    """The torchrun example, started without torchrun: no all-reduce, the reference agreement holds."""
    import importlib
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    threads = torch.get_num_threads()
    try:
        metrics = importlib.import_module("hpo_distributed").main(
            ["--quick", "--steps", "3", "--json", str(tmp_path / "m.json"), "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "m.json").read_text())["world_size"] == metrics["world_size"] == 1
    assert metrics["all_reduces_forward_per_step"] == metrics["all_reduces_backward_per_step"] == 0
    assert metrics["hypergradient_relative_error_max"] < 1e-10
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert list(tmp_path.glob("hpo_distributed_1proc.png"))
