"""Tests of implicitgrad.meta against closed forms on linear-regression tasks (float64).

For a linear model ``f(x) = [x, 1] w`` and the mean squared loss over ``n`` examples,
``L(w) = ‖X w − y‖² / n`` (``X`` with a column of ones) has gradient ``A w − b`` with
``A = 2XᵀX/n`` and ``b = 2Xᵀy/n``. Hence, per task with support ``(A_s, b_s)`` and query
``(A_q, b_q)``:

* K gradient steps of size α: ``φ_K = M^K θ + Σ_{j<K} M^j α b_s`` with ``M = I − α A_s``,
  so MAML's meta-gradient is ``M^K (A_q φ_K − b_q)`` and FOMAML's ``A_q φ_K − b_q``;
* Reptile: the same steps on support ∪ query give ``φ̃``, meta-gradient ``θ − φ̃``;
* iMAML with diagonal ``Λ``: ``φ* = (A_s + Λ)⁻¹(b_s + Λθ)``, meta-gradient
  ``Λ (A_s + Λ)⁻¹ (A_q φ* − b_q)``, and ``∂/∂log λ_i = λ_i (θ_i − φ*_i) [(A_s + Λ)⁻¹ g_q]_i``;
* joint training: ``A_all θ − b_all``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from registry import rel_err
from torch.nn.functional import mse_loss

import implicitgrad as ig
import implicitgrad.meta as meta
from implicitgrad.data import Sinusoid
from implicitgrad.training import run_training

DTYPE = torch.float64
D = 3
RTOL = 1e-8


def make_tasks(num=4, n_support=6, n_query=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(num):
        w = torch.randn(D, 1, generator=g, dtype=DTYPE)
        x_s = torch.randn(n_support, D, generator=g, dtype=DTYPE)
        x_q = torch.randn(n_query, D, generator=g, dtype=DTYPE)
        noise = 0.1 * torch.randn(n_support + n_query, 1, generator=g, dtype=DTYPE)
        tasks.append((x_s, x_s @ w + noise[:n_support], x_q, x_q @ w + noise[n_support:]))
    return tasks


def make_model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Linear(D, 1).to(DTYPE)


def theta_of(model):
    return torch.cat([model.weight.detach()[0], model.bias.detach()])


def grad_of(model):
    return torch.cat([model.weight.grad[0], model.bias.grad])


def normal_eq(x, y):
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], 1)
    return 2 * xa.T @ xa / len(x), 2 * xa.T @ y[:, 0] / len(x)


def descend(theta, a, b, lr, steps):
    for _ in range(steps):
        theta = theta - lr * (a @ theta - b)
    return theta


def closed_form(method, theta, tasks, lr=0.05, steps=4, lam=None):
    grads = []
    eye = torch.eye(D + 1, dtype=DTYPE)
    for x_s, y_s, x_q, y_q in tasks:
        a_s, b_s = normal_eq(x_s, y_s)
        a_q, b_q = normal_eq(x_q, y_q)
        a_all, b_all = normal_eq(torch.cat([x_s, x_q]), torch.cat([y_s, y_q]))
        if method == "maml":
            phi = descend(theta, a_s, b_s, lr, steps)
            m = torch.linalg.matrix_power(eye - lr * a_s, steps)
            grads.append(m @ (a_q @ phi - b_q))
        elif method == "fomaml":
            phi = descend(theta, a_s, b_s, lr, steps)
            grads.append(a_q @ phi - b_q)
        elif method == "reptile":
            grads.append(theta - descend(theta, a_all, b_all, lr, steps))
        elif method == "joint":
            grads.append(a_all @ theta - b_all)
        elif method == "imaml":
            lam_vec = lam * torch.ones(D + 1, dtype=DTYPE) if not torch.is_tensor(lam) else lam
            big = a_s + torch.diag(lam_vec)
            phi = torch.linalg.solve(big, b_s + lam_vec * theta)
            u = torch.linalg.solve(big, a_q @ phi - b_q)
            grads.append(torch.cat([lam_vec * u, lam_vec * (theta - phi) * u]))
    return torch.stack(grads).mean(0)


def exact_inner(objective, phi0, theta, log_lam, x, y):
    """The proximal problem's minimiser in closed form: a solver the core treats as a black box."""
    a, b = normal_eq(x, y)
    theta_vec = torch.cat([theta["weight"][0], theta["bias"]])
    lam = 2.0 if log_lam is None else torch.cat([log_lam["weight"][0], log_lam["bias"]]).exp()
    lam_vec = lam * torch.ones(D + 1, dtype=DTYPE)
    phi = torch.linalg.solve(a + torch.diag(lam_vec), b + lam_vec * theta_vec)
    return {"weight": phi[:D].reshape(1, D), "bias": phi[D:]}


LEARNERS = {
    "maml": lambda m, **kw: meta.MAML(m, mse_loss, inner_lr=0.05, inner_steps=4, **kw),
    "fomaml": lambda m, **kw: meta.FOMAML(m, mse_loss, inner_lr=0.05, inner_steps=4, **kw),
    "reptile": lambda m, **kw: meta.Reptile(m, mse_loss, inner_lr=0.05, inner_steps=4, **kw),
    "joint": lambda m, **kw: meta.JointTraining(m, mse_loss, inner_lr=0.05, inner_steps=4, **kw),
    "imaml": lambda m, **kw: meta.IMAML(
        m, mse_loss, lam=2.0, inner_solver=ig.solvers.GradientDescent(lr=0.1, maxiter=2000, tol=1e-13),
        linear_solver=ig.CG(tol=1e-12), **kw),
}


# ---------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_meta_gradient_matches_closed_form(method, batched):
    model, tasks = make_model(), make_tasks()
    learner = LEARNERS[method](model, batched=batched)
    expected = closed_form(method, theta_of(model), tasks, lam=2.0)
    loss = learner.meta_step(tasks)
    assert rel_err(grad_of(model), expected[: D + 1]) < RTOL
    assert loss.shape == () and not loss.requires_grad


def test_imaml_with_black_box_exact_solver_and_learned_lambda():
    model, tasks = make_model(), make_tasks()
    lam = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=DTYPE)
    imaml = meta.IMAML(model, mse_loss, lam=1.0, inner_solver=exact_inner, linear_solver=ig.CG(tol=1e-13),
                       learn_lam=True)
    with torch.no_grad():
        imaml.log_lam["weight"].copy_(lam[:D].log().reshape(1, D))
        imaml.log_lam["bias"].copy_(lam[D:].log())
    expected = closed_form("imaml", theta_of(model), tasks, lam=lam)
    imaml.meta_step(tasks)
    assert rel_err(grad_of(model), expected[: D + 1]) < 1e-10
    got_lam = torch.cat([imaml.log_lam["weight"].grad[0], imaml.log_lam["bias"].grad])
    assert rel_err(got_lam, expected[D + 1:]) < 1e-10
    names = [n for n, _ in imaml.named_meta_parameters()]
    assert names == ["weight", "bias", "log_lam.weight", "log_lam.bias"]


def dense_dict_solve(matvec, b):
    """A linear solver of one's own on dicts of tensors: forms the matrix, solves densely."""
    keys, shapes = list(b), [b[k].shape for k in b]
    sizes = [b[k].numel() for k in keys]

    def flat(tree):
        return torch.cat([tree[k].reshape(-1) for k in keys])

    def unflat(vector):
        return {k: c.reshape(s) for k, c, s in zip(keys, vector.split(sizes), shapes)}

    eye = torch.eye(sum(sizes), dtype=DTYPE)
    matrix = torch.stack([flat(matvec(unflat(e))) for e in eye], 1)
    return unflat(torch.linalg.solve(matrix, flat(b)))


@pytest.mark.parametrize("batched", [True, False])
def test_imaml_accepts_a_plain_callable_linear_solver(batched):
    model, tasks = make_model(), make_tasks()
    calls = []

    def linear_solver(matvec, b):
        calls.append(sorted(b))
        return dense_dict_solve(matvec, b)

    imaml = meta.IMAML(model, mse_loss, lam=2.0, inner_solver=exact_inner, linear_solver=linear_solver,
                       batched=batched)
    assert imaml.linear_solver is linear_solver
    imaml.meta_step(tasks)
    assert calls == [["bias", "weight"]] * len(tasks)
    assert rel_err(grad_of(model), closed_form("imaml", theta_of(model), tasks, lam=2.0)[: D + 1]) < 1e-10
    assert all(info.backward.converged for info in imaml.last_info)


def test_imaml_refuses_a_linear_solver_class():
    with pytest.raises(TypeError, match="IMAML: linear_solver must be an instance, got the class CG"):
        meta.IMAML(make_model(), mse_loss, 1.0, exact_inner, linear_solver=ig.CG)


def test_imaml_adapt_is_the_proximal_minimiser_and_differentiable():
    model, (task, *_) = make_model(), make_tasks()
    imaml = LEARNERS["imaml"](model)
    phi = imaml.adapt(task[0], task[1])
    a, b = normal_eq(task[0], task[1])
    theta = theta_of(model)
    expected = torch.linalg.solve(a + 2.0 * torch.eye(D + 1, dtype=DTYPE), b + 2.0 * theta)
    assert rel_err(torch.cat([phi["weight"][0], phi["bias"]]), expected) < 1e-10
    # dφ*/dθ = λ (A + λI)⁻¹ (symmetric): the gradient of Σφ* is λ (A + λI)⁻¹ 1.
    (phi["weight"].sum() + phi["bias"].sum()).backward()
    jac_sum = 2.0 * torch.linalg.solve(a + 2.0 * torch.eye(D + 1, dtype=DTYPE), torch.ones(D + 1, dtype=DTYPE))
    assert rel_err(grad_of(model), jac_sum) < 1e-8
    assert imaml.last_info and imaml.last_info[0].forward_status == "converged"


def test_maml_adapt_runs_the_inner_steps():
    model, (task, *_) = make_model(), make_tasks()
    maml = LEARNERS["maml"](model)
    with torch.no_grad():
        phi = maml.adapt(task[0], task[1])
    a, b = normal_eq(task[0], task[1])
    expected = descend(theta_of(model), a, b, 0.05, 4)
    assert rel_err(torch.cat([phi["weight"][0], phi["bias"]]), expected) < 1e-12
    assert not phi["weight"].requires_grad
    out = maml.predict(phi, task[2])
    assert torch.allclose(out, torch.func.functional_call(model, phi, (task[2],)))


# ---------------------------------------------------------------------------- interface
def test_meta_step_overwrites_grad_and_returns_mean_query_loss():
    model, tasks = make_model(), make_tasks()
    maml = LEARNERS["maml"](model)
    maml.meta_step(tasks)
    first = grad_of(model).clone()
    loss = maml.meta_step(tasks)
    assert torch.equal(grad_of(model), first)
    losses = []
    for x_s, y_s, x_q, y_q in tasks:
        with torch.no_grad():
            losses.append(mse_loss(maml.predict(maml.adapt(x_s, y_s), x_q), y_q))
    assert torch.allclose(loss, torch.stack(losses).mean(), rtol=1e-12)


def test_frozen_parameters_are_passed_through():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DTYPE)
    model[0].requires_grad_(False)
    maml = meta.MAML(model, mse_loss, inner_lr=0.1, inner_steps=2)
    grads, _ = maml.meta_gradient(make_tasks())
    assert sorted(grads) == ["2.bias", "2.weight"]
    phi = maml.adapt(*make_tasks()[0][:2])
    assert phi["0.weight"] is model[0].weight
    assert model[0].weight.grad is None


@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_batched_equals_looped_on_a_network(method):
    torch.manual_seed(0)
    tasks = [tuple(t.to(DTYPE) for t in task) for task in Sinusoid(5, seed=0).sample(3)]
    grads = {}
    for batched in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DTYPE)
        if method == "imaml":
            # A fixed budget: 5 gradient steps and 3 CG steps, every system running all of them.
            learner = meta.IMAML(model, mse_loss, lam=4.0, inner_solver=ig.solvers.GradientDescent(0.02, 5, tol=0),
                                 linear_solver=ig.CG(maxiter=3, tol=1e-30), on_failure="ignore", batched=batched)
        else:
            learner = LEARNERS[method](model, batched=batched)
        grads[batched] = learner.meta_gradient(tasks)
    for name, value in grads[True][0].items():
        torch.testing.assert_close(value, grads[False][0][name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-12, atol=0)


def test_vmap_over_adapt():
    model, tasks = make_model(), make_tasks()
    for learner in (LEARNERS["imaml"](model), LEARNERS["maml"](model)):
        x_s, y_s = torch.stack([t[0] for t in tasks]), torch.stack([t[1] for t in tasks])
        with torch.no_grad():
            batched = torch.func.vmap(learner.adapt)(x_s, y_s)
            looped = [learner.adapt(t[0], t[1]) for t in tasks]
        for name in batched:
            torch.testing.assert_close(batched[name], torch.stack([p[name] for p in looped]), rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------- buffers, batching choice
def bn_model(track):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8, track_running_stats=track), torch.nn.ReLU(),
        torch.nn.Linear(8, 1),
    ).to(DTYPE)


def test_batchnorm_with_running_stats_runs_task_by_task_and_keeps_buffers():
    model = bn_model(track=True)
    tasks = [tuple(t.to(DTYPE) for t in task) for task in Sinusoid(5, seed=0).sample(3)]
    maml = meta.MAML(model, mse_loss, inner_lr=0.05, inner_steps=2)
    assert not meta.vmappable(model)
    before = {n: b.clone() for n, b in model.named_buffers()}
    loss = maml.meta_step(tasks)
    assert torch.isfinite(loss)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name])
    with pytest.raises(ValueError, match="cannot run correctly under"):
        meta.MAML(model, mse_loss, inner_lr=0.05, inner_steps=2, batched=True).meta_step(tasks)
    model.eval()
    assert meta.vmappable(model, second_order=True)


def reference_maml_gradient(model, tasks, lr, steps):
    """Second-order MAML by plain autograd (create_graph), task by task."""
    names, theta = zip(*model.named_parameters())
    total = 0
    for x_s, y_s, x_q, y_q in tasks:
        phi = list(theta)
        for _ in range(steps):
            loss = mse_loss(torch.func.functional_call(model, dict(zip(names, phi)), (x_s,)), y_s)
            phi = [p - lr * g for p, g in zip(phi, torch.autograd.grad(loss, phi, create_graph=True))]
        total = total + mse_loss(torch.func.functional_call(model, dict(zip(names, phi)), (x_q,)), y_q)
    return dict(zip(names, torch.autograd.grad(total / len(tasks), theta)))


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_normalisation_layers_without_running_stats(norm):
    """Batch statistics / LayerNorm: vmapped where correct, task by task for second-order MAML."""
    tasks = [tuple(t.to(DTYPE) for t in task) for task in Sinusoid(5, seed=0).sample(3)]
    layer = torch.nn.BatchNorm1d(8, track_running_stats=False) if norm == "batch" else torch.nn.LayerNorm(8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), layer, torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(DTYPE)
    assert meta.vmappable(model) and not meta.vmappable(model, second_order=True)
    maml = meta.MAML(model, mse_loss, inner_lr=0.05, inner_steps=3)
    expected = reference_maml_gradient(model, tasks, 0.05, 3)
    for name, value in maml.meta_gradient(tasks)[0].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12)
    for batched in (None, False):
        imaml = meta.IMAML(model, mse_loss, lam=4.0, inner_solver=ig.solvers.GradientDescent(0.05, 10, tol=0),
                           linear_solver=ig.CG(maxiter=3, tol=1e-30), on_failure="ignore", batched=batched)
        fomaml = meta.FOMAML(model, mse_loss, inner_lr=0.05, inner_steps=3, batched=batched)
        if batched is None:
            vmapped = [imaml.meta_gradient(tasks)[0], fomaml.meta_gradient(tasks)[0]]
        else:
            looped = [imaml.meta_gradient(tasks)[0], fomaml.meta_gradient(tasks)[0]]
    for a, b in zip(vmapped, looped):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- iMAML reporting
def fixed_step_imaml(model, **kw):
    return meta.IMAML(model, mse_loss, lam=2.0, inner_solver=ig.solvers.GradientDescent(lr=0.05, maxiter=3, tol=0),
                      linear_solver=ig.CG(maxiter=2, tol=1e-12), **kw)


def test_imaml_reports_each_kind_of_shortfall_once():
    model, tasks = make_model(), make_tasks()
    imaml = fixed_step_imaml(model)
    with pytest.warns(ig.ImplicitGradWarning) as record:
        imaml.meta_step(tasks)
        imaml.meta_step(tasks)
        imaml.adapt(*tasks[0][:2])
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert any("forward_tol=" in m for m in messages)
    assert any("backward solve" in m for m in messages)
    info = imaml.last_info[0]
    assert info.forward_status == "not_converged" and info.forward_iterations == 3


def test_imaml_forward_tol_acknowledges_a_fixed_budget():
    model, tasks = make_model(), make_tasks()
    imaml = meta.IMAML(model, mse_loss, lam=2.0, inner_solver=ig.solvers.GradientDescent(lr=0.05, maxiter=3, tol=0),
                       forward_tol=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imaml.meta_step(tasks)
    assert imaml.last_info[0].forward_status == "converged"


def test_imaml_on_failure_raise_and_ignore():
    model, tasks = make_model(), make_tasks()
    with pytest.raises(ig.ConvergenceError):
        fixed_step_imaml(model, on_failure="raise").meta_step(tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed_step_imaml(model, on_failure="ignore").meta_step(tasks)


def test_imaml_state_dict_round_trip():
    model = make_model()
    imaml = meta.IMAML(model, mse_loss, lam=3.0, inner_solver=exact_inner, learn_lam=True)
    state = imaml.state_dict()
    with torch.no_grad():
        imaml.log_lam["bias"].add_(1.0)
    tensor = imaml.log_lam["bias"]
    imaml.load_state_dict(state)
    assert imaml.log_lam["bias"] is tensor
    torch.testing.assert_close(tensor, torch.full((1,), 3.0, dtype=DTYPE).log())
    with pytest.raises(ValueError, match="log_lam"):
        meta.IMAML(model, mse_loss, lam=3.0, inner_solver=exact_inner).load_state_dict(state)


# ---------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "build, error",
    [
        (lambda m: meta.MAML("model", mse_loss, 0.1, 1), TypeError),
        (lambda m: meta.MAML(m, "loss", 0.1, 1), TypeError),
        (lambda m: meta.MAML(m, mse_loss, -0.1, 1), ValueError),
        (lambda m: meta.Reptile(m, mse_loss, 0.1, 1.5), ValueError),
        (lambda m: meta.IMAML(m, mse_loss, 0.0, exact_inner), ValueError),
        (lambda m: meta.IMAML(m, mse_loss, 1.0, None), TypeError),
        (lambda m: meta.IMAML(m, mse_loss, 1.0, exact_inner, linear_solver="cg"), TypeError),
        (lambda m: meta.IMAML(m, mse_loss, 1.0, exact_inner, on_failure="loud"), ValueError),
        (lambda m: meta.FOMAML(m, mse_loss, 0.1, 1, batched="yes"), ValueError),
        (lambda m: meta.MAML(m.requires_grad_(False), mse_loss, 0.1, 1), ValueError),
    ],
)
def test_bad_arguments(build, error):
    with pytest.raises(error):
        build(make_model())


def test_bad_tasks():
    maml = LEARNERS["maml"](make_model())
    x = torch.zeros(4, D, dtype=DTYPE)
    y = torch.zeros(4, 1, dtype=DTYPE)
    with pytest.raises(TypeError, match="non-empty list"):
        maml.meta_step([])
    with pytest.raises(TypeError, match="4 Tensors"):
        maml.meta_step([(x, y, x)])
    with pytest.raises(ValueError, match="examples along dimension 0"):
        maml.meta_step([(x, y[:3], x, y)])
    with pytest.raises(ValueError, match="shapes differ"):
        LEARNERS["maml"](make_model(), batched=True).meta_step([(x, y, x, y), (x[:2], y[:2], x, y)])


# ---------------------------------------------------------------------------- resumption
class Interrupt(Exception):
    pass


def train(path, steps, resume=False, stop_at=None):
    """iMAML on sinusoids with Adam, tasks drawn from a checkpointed generator."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    imaml = meta.IMAML(model, mse_loss, lam=2.0, inner_solver=ig.solvers.GradientDescent(0.05, 5, tol=0),
                       linear_solver=ig.CG(maxiter=3), learn_lam=True, on_failure="ignore")
    optimizer = torch.optim.Adam(imaml.meta_parameters(), lr=1e-2)
    family = Sinusoid(5, seed=3)

    def step(i):
        if i == stop_at:
            raise Interrupt
        loss = imaml.meta_step(family.sample(4))
        optimizer.step()
        return {"loss": loss}

    history = run_training(step, steps, checkpoint_path=path, checkpoint_every=3, resume=resume, progress=False,
                           state_objects={"model": model, "optimizer": optimizer, "imaml": imaml},
                           generators={"tasks": family.generator})
    return model, imaml, history


def test_resume_equals_uninterrupted(tmp_path):
    model_a, imaml_a, history_a = train(tmp_path / "a.pt", 8)
    with pytest.raises(Interrupt):
        train(tmp_path / "b.pt", 8, stop_at=5)
    model_b, imaml_b, history_b = train(tmp_path / "b.pt", 8, resume=True)
    assert history_a == history_b and len(history_a["loss"]) == 8
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    for name, a in imaml_a.log_lam.items():
        assert torch.equal(a, imaml_b.log_lam[name])


# ---------------------------------------------------------------------------- iMAML defaults and diagnostics
def test_imaml_defaults_solve_the_proximal_problem_and_match_the_closed_form():
    """IMAML(model, loss) with its default λ, inner solver and CG: the closed-form meta-gradient."""
    model, tasks = make_model(), make_tasks()
    imaml = meta.IMAML(model, mse_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imaml.meta_step(tasks)
    ref = closed_form("imaml", theta_of(model), tasks, lam=meta.imaml.DEFAULT_LAM)[: D + 1]
    # The inner solve stops at half the float64 forward tolerance (1e-6): the error is of that order.
    assert rel_err(grad_of(model), ref) <= 1e-5
    assert imaml.inner_converged_fraction == 1.0


def test_imaml_check_every_records_the_cosine_with_the_unrolled_adaptation():
    model, tasks = make_model(), make_tasks()
    imaml = meta.IMAML(model, mse_loss, lam=2.0, check_every=2)
    for _ in range(3):
        imaml.meta_step(tasks)
    assert [c["step"] for c in imaml.gradient_checks] == [1, 3]
    # A solved inner problem: the implicit meta-gradient is the derivative of the adaptation.
    assert all(c["cosine"] > 1 - 1e-8 and c["relative_difference"] < 1e-4 for c in imaml.gradient_checks)


def test_imaml_check_every_sees_a_truncated_adaptation():
    """Three gradient steps are far from the minimiser: the implicit meta-gradient drifts from the truth."""
    model, tasks = make_model(), make_tasks()
    imaml = fixed_step_imaml(model, check_every=1, forward_tol=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ig.ImplicitGradWarning)
        imaml.meta_step(tasks)
    check = imaml.gradient_checks[0]
    assert check["relative_difference"] > 1e-2 and check["cosine"] < 1 - 1e-6


def test_imaml_check_every_needs_an_unrollable_inner_solver():
    with pytest.raises(ValueError, match="cannot be unrolled"):
        meta.IMAML(make_model(), mse_loss, 1.0, exact_inner, check_every=5)
    with pytest.raises(ValueError, match="check_every"):
        meta.IMAML(make_model(), mse_loss, 1.0, check_every=0)


def test_imaml_counts_tasks_whose_inner_problem_is_not_solved():
    model, tasks = make_model(), make_tasks()
    imaml = fixed_step_imaml(model, on_failure="ignore")
    imaml.meta_step(tasks)
    assert imaml.inner_tasks == len(tasks) and imaml.inner_converged_fraction == 0.0


class WorseThanZero(ig.LinearSolver):
    """Claims convergence but returns a solution far worse than u = 0."""

    def solve(self, matvec, b, *, x0=None, batch_ndim=0, spec=None):
        u = [10 * t for t in b]
        r = [bi - ai for bi, ai in zip(b, matvec(u))]
        res = float(torch.sqrt(sum((t ** 2).sum() for t in r)) / torch.sqrt(sum((t ** 2).sum() for t in b)))
        return u, ig.LinearSolveInfo(iterations=1, residual=res, converged=True, status="converged", solver="bad")


def test_imaml_reports_a_backward_solution_worse_than_zero_whatever_its_status():
    model, tasks = make_model(), make_tasks()
    imaml = meta.IMAML(model, mse_loss, lam=2.0, linear_solver=WorseThanZero(), batched=False)
    with pytest.warns(ig.ImplicitGradWarning, match="worse than u = 0"):
        imaml.meta_step(tasks)


# ------------------------------------------------------ iMAML: negative curvature sends it back
# A one-weight model w on inputs 1 and the loss (w² − y)²: with support target 1 the proximal
# problem G(w) = (w² − 1)² + λ/2 (w − θ)² has G'' + … = 12w² − 4 + λ, negative for |w| < 0.5
# at λ = 1, and its minimiser near w = 1. From θ = 0.05 the gradient is ≈ −0.2: a forward
# tolerance of 0.5 accepts θ itself (L-BFGS stops at 0.25 before its first step), where the
# backward system H + λI = −3 is negative; 10× tighter sends L-BFGS to the minimiser.
def double_well_loss(output, target):
    return ((output ** 2 - target) ** 2).mean()


def double_well_problem():
    model = torch.nn.Linear(1, 1, bias=False).to(DTYPE)
    with torch.no_grad():
        model.weight.fill_(0.05)
    ones = torch.ones(4, 1, dtype=DTYPE)
    task = (ones, ones, ones, 2 * ones)  # query target 2: L_q'(w) = 4w(w² − 2)
    return model, [task]


def double_well_meta_gradient(theta=0.05, lam=1.0):
    """λ (G''(w*))⁻¹ L_q'(w*) at the minimiser w* near 1 of G, by Newton's method in float64."""
    w = torch.tensor(1.0, dtype=DTYPE)
    for _ in range(50):
        w = w - (4 * w * (w ** 2 - 1) + lam * (w - theta)) / (12 * w ** 2 - 4 + lam)
    return lam / (12 * w ** 2 - 4 + lam) * 4 * w * (w ** 2 - 2)


@pytest.mark.parametrize("on_failure", ["warn", "raise"])
def test_imaml_resolves_a_meta_batch_whose_backward_meets_negative_curvature(on_failure):
    model, tasks = double_well_problem()
    imaml = meta.IMAML(model, double_well_loss, lam=1.0, forward_tol=0.5, on_failure=on_failure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imaml.meta_step(tasks)
    assert imaml.inner_resolves == 1
    assert imaml.last_info[0].backward.converged
    # The re-solve met 10× the tolerance (0.025 absolute on |G'|): the meta-gradient is that of
    # the minimiser up to the first-order effect of that residual.
    assert rel_err(model.weight.grad.reshape(()), double_well_meta_gradient()) < 0.05
    assert imaml.state_dict()["counters"]["inner_resolves"] == 1


def test_imaml_does_not_rerun_a_users_inner_solver_and_says_so():
    model, tasks = double_well_problem()
    solver = ig.solvers.LBFGS(maxiter=100, tol=0.25)
    imaml = meta.IMAML(model, double_well_loss, lam=1.0, inner_solver=solver, forward_tol=0.5)
    with pytest.warns(ig.ImplicitGradWarning, match="not positive definite: solve the inner problem further"):
        imaml.meta_step(tasks)
    assert imaml.inner_resolves == 0 and imaml.last_info[0].backward.status == "negative_curvature"
    with pytest.raises(ig.ConvergenceError):
        meta.IMAML(model, double_well_loss, lam=1.0, inner_solver=solver, forward_tol=0.5,
                   on_failure="raise").meta_step(tasks)


def test_imaml_reports_negative_curvature_left_after_every_resolve():
    model, tasks = double_well_problem()
    imaml = meta.IMAML(model, double_well_loss, lam=1.0, forward_tol=0.5)
    imaml.RESOLVE_TIGHTENING = (1.0,)  # a re-solve that changes nothing
    with pytest.warns(ig.ImplicitGradWarning, match=r"even after re-solving the inner problems with tolerances 1× "):
        imaml.meta_step(tasks)
    assert imaml.inner_resolves == 1 and imaml.last_info[0].backward.status == "negative_curvature"
    with pytest.raises(ig.ConvergenceError):
        broken = meta.IMAML(model, double_well_loss, lam=1.0, forward_tol=0.5, on_failure="raise")
        broken.RESOLVE_TIGHTENING = (1.0,)
        broken.meta_step(tasks)
