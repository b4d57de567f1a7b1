"""Two gloo processes, each with its shard of the meta-batch, equal one process with all tasks."""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.functional import mse_loss

import implicitgrad as ig
import implicitgrad.meta as meta

DTYPE = torch.float64
NUM_TASKS = 5  # shards of 3 and 2 tasks: the all-reduce must weight by task counts
STEPS = 2

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def make_tasks():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(NUM_TASKS):
        w = torch.randn(3, 1, generator=g, dtype=DTYPE)
        x_s, x_q = torch.randn(6, 3, generator=g, dtype=DTYPE), torch.randn(6, 3, generator=g, dtype=DTYPE)
        tasks.append((x_s, torch.tanh(x_s @ w), x_q, torch.tanh(x_q @ w)))
    return tasks


def make_learner(method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DTYPE)
    if method == "imaml":
        # Fixed budgets: a tolerance test on the joint residual of a shard would stop after a
        # number of iterations that depends on the shard.
        learner = meta.IMAML(model, mse_loss, lam=2.0, inner_solver=ig.solvers.GradientDescent(0.1, 20, tol=0),
                             linear_solver=ig.CG(maxiter=6, tol=1e-30), learn_lam=True, on_failure="ignore")
    else:
        learner = meta.MAML(model, mse_loss, inner_lr=0.1, inner_steps=3)
    return model, learner


def train(method, tasks):
    """``STEPS`` meta-steps with Adam; returns per-step losses, last gradients and final parameters."""
    model, learner = make_learner(method)
    optimizer = torch.optim.Adam(learner.meta_parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        losses.append(learner.meta_step(tasks))
        optimizer.step()
    names = [n for n, _ in learner.named_meta_parameters()]
    return {
        "losses": torch.stack(losses),
        "grads": {n: p.grad.clone() for n, p in learner.named_meta_parameters()},
        "params": {n: p.detach().clone() for n, p in zip(names, learner.meta_parameters())},
    }


METHODS = ("imaml", "maml")


@contextlib.contextmanager
def gloo_group(rank, world_size, init_method):
    """A gloo process group for the ``with`` body, destroyed once every process is done with it.

    The barrier matters: a process that destroys its group and exits while a peer's transport
    threads still serve the last collective can make that peer abort at exit ("terminate called
    without an active exception", SIGABRT) after it has finished and saved its work. A body that
    raises skips the barrier: the other processes may never reach it.
    """
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def worker(rank, world_size, init_method, out):
    torch.set_num_threads(1)
    with gloo_group(rank, world_size, init_method):
        results = {method: train(method, meta.shard_tasks(make_tasks())) for method in METHODS}
        torch.save(results, f"{out}.{rank}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(worker, args=(2, f"tcp://127.0.0.1:{free_port()}", out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for method in METHODS:
        reference = train(method, make_tasks())
        for got in (r[method] for r in results):
            torch.testing.assert_close(got["losses"], reference["losses"], rtol=1e-12, atol=0)
            for key in ("grads", "params"):
                assert sorted(got[key]) == sorted(reference[key])
                for name, value in reference[key].items():
                    torch.testing.assert_close(got[key][name], value, rtol=1e-10, atol=1e-13)


def test_shard_tasks_without_process_group():
    assert not meta.is_distributed()
    assert meta.shard_tasks([1, 2, 3]) == [1, 2, 3]
    assert meta.shard_tasks(list(range(7)), rank=2, world_size=3) == [2, 5]
    with pytest.raises(ValueError, match="rank"):
        meta.shard_tasks([1, 2], rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least as many tasks"):
        meta.shard_tasks([1], rank=0, world_size=2)
    grads, loss = meta.all_reduce_mean([torch.ones(2)], torch.tensor(3.0), 4)
    assert torch.equal(grads[0], torch.ones(2)) and loss.item() == 3.0
