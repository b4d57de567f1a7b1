r"""Per-feature L2 penalties of a logistic regression, with the training data split over processes.

The inner problem of ``hpo_logreg_l2.py``,

.. math::

    (w^\star, b^\star)(\theta) = \arg\min_{w, b} \; \frac1N \sum_{i=1}^N \ell(y_i, x_i^\top w + b)
    + \tfrac12 \textstyle\sum_j e^{\theta_j} w_j^2 ,

written as a sum over processes: process :math:`r` holds rows :math:`S_r` of the training and the
validation data and computes :math:`\frac1N \sum_{i \in S_r} \ell_i` (:math:`N` the *global*
count); the penalty is computed on every process and counted once
(:func:`implicitgrad.distributed.all_reduce_objective`). The inner L-BFGS iterates, the CG
iterates of the backward pass and the hypergradient are then identical on every process, and
equal to one process with all the data up to rounding. The script checks both, measures the time
per outer step and counts the all-reduces and bytes per step
(:func:`implicitgrad.distributed.count_all_reduces` wraps ``torch.distributed.all_reduce``).

Run from the repository root::

    python examples/hpo_distributed.py --quick                      # one process
    torchrun --nproc_per_node=2 examples/hpo_distributed.py --quick
    torchrun --nproc_per_node=4 examples/hpo_distributed.py --quick  # 4 processes: oversubscribes 2 cores

``--data synthetic --n-train 200000`` replaces the 569 tumours of scikit-learn's breast-cancer
data by a larger synthetic problem, where the computation, not the communication, dominates.
Only process 0 prints, writes the JSON and saves the figure.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import example_parser, parse_args, print_summary, progress, pyplot, save_figure, write_json
from hpo_logreg_l2 import cross_entropy, inner_objective, load_data, logits, zero_model
from imaml_sinusoid import distributed_processes

import implicitgrad as ig

DTYPE = torch.float64
# Tight tolerances: the comparison with one process measures rounding, not the solvers' stopping.
SOLVER = ig.solvers.TorchOptimizer(torch.optim.LBFGS, tol=1e-12, history_size=100, max_iter=200)
LINEAR = ig.CG(maxiter=1000, tol=1e-12)


def synthetic_data(n_train: int, dim: int, seed: int, device: torch.device) -> Dict[str, Any]:
    """A logistic model with a few informative features among ``dim``; 20% validation, 20% test."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(dim, dtype=DTYPE)
    w[: max(1, dim // 5)] = torch.randn(max(1, dim // 5), generator=g, dtype=DTYPE)
    n = n_train + 2 * max(1, n_train // 5)
    X = torch.randn(n, dim, generator=g, dtype=DTYPE)
    y = (torch.rand(n, generator=g, dtype=DTYPE) < torch.sigmoid(X @ w)).to(DTYPE)
    X, y = X.to(device), y.to(device)
    m = (n - n_train) // 2
    return {"train": (X[:n_train], y[:n_train]), "val": (X[n_train:n_train + m], y[n_train:n_train + m]),
            "test": (X[n_train + m:], y[n_train + m:]), "features": [f"x{j}" for j in range(dim)]}


def sharded_problem(data: Dict[str, Any]):
    """The all-reduced inner objective and validation loss, and this process's shards."""
    (X, y), (Xv, yv) = data["train"], data["val"]
    n_train, n_val = len(y), len(yv)

    def shard_loss(model, theta, Xr, yr):
        return F.binary_cross_entropy_with_logits(logits(model, Xr), yr, reduction="sum") / n_train

    def penalty(model, theta, Xr, yr):
        return 0.5 * (theta.exp() * model["w"] ** 2).sum()

    def shard_val(model, Xr, yr):
        return F.binary_cross_entropy_with_logits(logits(model, Xr), yr, reduction="sum") / n_val

    objective = ig.distributed.all_reduce_objective(shard_loss, penalty, sharded=(1, 2))
    validation = ig.distributed.all_reduce_objective(shard_val, sharded=(0, 1))
    shards = {"train": tuple(ig.distributed.shard(t) for t in (X, y)),
              "val": tuple(ig.distributed.shard(t) for t in (Xv, yv))}
    return objective, validation, shards


def whole_data_hypergradient(data: Dict[str, Any], theta: torch.Tensor, x0: Dict[str, torch.Tensor]) -> torch.Tensor:
    """One process, all the data, the plain functions of ``hpo_logreg_l2.py``: the reference."""
    t = theta.detach().clone().requires_grad_(True)
    model = ig.implicit_solve(inner_objective, x0, t, *data["train"], solver=SOLVER, linear_solver=LINEAR,
                              on_failure="raise")
    (grad,) = torch.autograd.grad(cross_entropy(model, *data["val"]), t)
    return grad


def spread_across_ranks(t: torch.Tensor) -> float:
    """Largest absolute difference between this tensor on any process and on process 0."""
    if not ig.meta.is_distributed():
        return 0.0
    first = t.detach().clone()
    dist.broadcast(first, 0)
    gap = (t.detach() - first).abs().max().reshape(1)
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return float(gap)


def run(data: Dict[str, Any], theta0: torch.Tensor, steps: int, lr: float, check: Sequence[int], rank: int):
    """Hypergradient descent on θ; times, all-reduce sizes and agreement checks per step."""
    objective, validation, shards = sharded_problem(data)
    theta = theta0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    model = zero_model(data["train"][0])
    history: Dict[str, List[Any]] = {"val": [], "forward_s": [], "backward_s": [], "forward_bytes": [],
                                     "backward_bytes": [], "cg_iterations": [], "lbfgs_iterations": [],
                                     "checks": []}
    bar = progress(range(steps), desc="outer steps", disable=rank != 0)
    for step in bar:
        x0 = model
        optimizer.zero_grad()
        start = time.perf_counter()
        with ig.distributed.count_all_reduces() as forward_log:
            solution, info = ig.implicit_solve(objective, x0, theta, *shards["train"], solver=SOLVER,
                                               linear_solver=LINEAR, return_info=True, on_failure="raise")
        middle = time.perf_counter()
        with ig.distributed.count_all_reduces() as backward_log:
            loss = validation(solution, *shards["val"])
            loss.backward()
        end = time.perf_counter()
        if step in check:
            check_row = {"step": step, "spread_across_ranks": spread_across_ranks(theta.grad)}
            if rank == 0:
                reference = whole_data_hypergradient(data, theta, x0)
                check_row["relative_error"] = float((theta.grad - reference).abs().max() / reference.abs().max())
            history["checks"].append(check_row)
        optimizer.step()
        model = {k: v.detach() for k, v in solution.items()}
        history["val"].append(loss.item())
        history["forward_s"].append(middle - start)
        history["backward_s"].append(end - middle)
        history["forward_bytes"].append([b for _, b in forward_log])
        history["backward_bytes"].append([b for _, b in backward_log])
        history["cg_iterations"].append(info.backward.iterations)
        history["lbfgs_iterations"].append(info.forward_iterations)
        bar.set_postfix(val_loss=f"{loss.item():.4f}", refresh=False)
    return theta.detach(), history


def plot(history: Dict[str, List[Any]], world_size: int, out):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(history["val"])
    axes[0].set(xlabel="outer step", ylabel="validation cross-entropy",
                title=f"hypergradient descent, {world_size} process(es)")
    steps = np.arange(len(history["val"]))
    axes[1].bar(steps, 1e3 * np.array(history["forward_s"]), label="inner solve (L-BFGS)")
    axes[1].bar(steps, 1e3 * np.array(history["backward_s"]), bottom=1e3 * np.array(history["forward_s"]),
                label="hypergradient (CG)")
    axes[1].set(xlabel="outer step", ylabel="ms", title="time per outer step")
    axes[1].legend()
    fig.tight_layout()
    return save_figure(fig, out, f"hpo_distributed_{world_size}proc.png")


def _per_step(logs: List[List[int]]) -> Tuple[float, float]:
    """Median number of all-reduces and median bytes per step, without the first step's checks."""
    later = logs[1:] or logs
    return float(np.median([len(log) for log in later])), float(np.median([sum(log) for log in later]))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = example_parser(__file__, "Hyperparameter optimisation with the training data split over "
                            "torch.distributed processes (launch with torchrun).",
                            quick_time="about 10 s per process on one CPU core")
    parser.add_argument("--steps", type=int, default=None, help="outer steps (default 10 quick, 30 full)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam step size on log λ")
    parser.add_argument("--data", choices=("breast_cancer", "synthetic"), default="breast_cancer",
                        help="scikit-learn's breast-cancer data or a synthetic logistic model")
    parser.add_argument("--n-train", type=int, default=300, help="training examples")
    parser.add_argument("--dim", type=int, default=50, help="features of the synthetic data")
    parser.set_defaults(threads=1)
    args = parse_args(parser, argv)
    steps = args.steps or (10 if args.quick else 30)
    if steps < 1 or args.n_train < 1 or args.dim < 1:
        parser.error("--steps, --n-train and --dim must be positive.")
    with distributed_processes(args.device) as (rank, world_size):
        return solve(args, steps, rank, world_size)


def solve(args, steps: int, rank: int, world_size: int) -> dict:
    """The outer loop on this process's shard; rank 0 plots and reports."""
    if args.data == "breast_cancer":
        data = load_data(args.n_train, 150, args.seed, args.device)
    else:
        data = synthetic_data(args.n_train, args.dim, args.seed, args.device)
    d = data["train"][0].shape[1]
    theta0 = torch.zeros(d, dtype=DTYPE, device=args.device)
    checks = sorted({0, steps // 2, steps - 1})
    theta, history = run(data, theta0, steps, args.lr, checks, rank)

    forward_count, forward_bytes = _per_step(history["forward_bytes"])
    backward_count, backward_bytes = _per_step(history["backward_bytes"])
    step_s = [f + b for f, b in zip(history["forward_s"], history["backward_s"])]
    later = slice(1, None) if steps > 1 else slice(None)  # the first step pays one-off costs
    errors = [c["relative_error"] for c in history["checks"] if "relative_error" in c]
    metrics = {
        "world_size": world_size,
        "threads_per_process": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "data": args.data,
        "n_train": len(data["train"][1]),
        "features": d,
        "outer_steps": steps,
        "step_seconds_median": float(np.median(step_s[later])),
        "forward_seconds_median": float(np.median(history["forward_s"][later])),
        "backward_seconds_median": float(np.median(history["backward_s"][later])),
        "all_reduces_forward_per_step": forward_count,
        "all_reduce_bytes_forward_per_step": forward_bytes,
        "all_reduces_backward_per_step": backward_count,
        "all_reduce_bytes_backward_per_step": backward_bytes,
        "cg_iterations_median": float(np.median(history["cg_iterations"])),
        "lbfgs_iterations_median": float(np.median(history["lbfgs_iterations"])),
        "hypergradient_relative_error_max": max(errors) if errors else None,
        "hypergradient_spread_across_ranks_max": max(c["spread_across_ranks"] for c in history["checks"]),
        "checks": history["checks"],
        "val_loss_before": history["val"][0],
        "val_loss_after": history["val"][-1],
    }
    if rank == 0:
        figure = plot(history, world_size, args.out)
        write_json(args.json, metrics)
        print_summary(
            f"Per-feature L2 penalties, {args.data} data ({metrics['n_train']} train rows, {d} features) split "
            f"over {world_size} process(es), {steps} outer steps",
            [
                ("validation cross-entropy, first / last step",
                 f"{metrics['val_loss_before']:.4f} / {metrics['val_loss_after']:.4f}"),
                ("time per outer step, median (inner solve + hypergradient)",
                 f"{1e3 * metrics['step_seconds_median']:.1f} ms ({1e3 * metrics['forward_seconds_median']:.1f} + "
                 f"{1e3 * metrics['backward_seconds_median']:.1f})"),
                ("L-BFGS / CG iterations per step (median)",
                 f"{metrics['lbfgs_iterations_median']:.0f} / {metrics['cg_iterations_median']:.0f}"),
                ("all-reduces per step: inner solve / hypergradient",
                 f"{forward_count:.0f} ({forward_bytes:.0f} B) / {backward_count:.0f} ({backward_bytes:.0f} B)"),
                ("hypergradient vs one process on all the data (max relative error)",
                 "n/a" if not errors else f"{max(errors):.1e}"),
                ("hypergradient difference across processes (max)",
                 f"{metrics['hypergradient_spread_across_ranks_max']:.1e}"),
            ],
            notes=[
                "Each process holds 1/N of the training and validation rows. The inner solve costs one all-reduce",
                "of one number per objective value and one of the model's size per gradient; the hypergradient one",
                "of the model's size per CG iteration plus a few (see docs/howto/distributed.rst).",
                f"Figure: {figure}",
            ],
        )
    return metrics


if __name__ == "__main__":
    main()
