r"""A deep equilibrium classifier on the 8×8 digits, trained with three gradients.

The model injects an image :math:`x` into a state :math:`z \in \mathbb R^{64}`, finds the
equilibrium :math:`z^\star = \tanh(W z^\star + U x + c)` with ``ig.nn.DEQ`` (Anderson
acceleration, every sample to its own tolerance) and classifies :math:`z^\star` linearly. The
same model and data are trained three ways:

* ``implicit`` — the exact gradient of the equilibrium (one linear system per sample);
* ``phantom`` — 5 damped steps from :math:`z^\star` differentiated by autograd (an
  approximation);
* ``unrolled`` — 30 plain iterations from zero, differentiated through every step (the
  memory grows with the steps, and the state is only approximately an equilibrium).

:math:`W` is rescaled to Frobenius norm at most 0.9 (so the cell is a contraction), and a
Jacobian regulariser (Hutchinson estimate of :math:`\|\partial f/\partial z\|_F^2`) keeps
its equilibria fast to find. The script reports test accuracy, forward iterations and
train time of each, and the error of the phantom and Jacobian-free gradients against the
implicit one on the trained model.

Run from the repository root: ``python examples/deq_digits.py --quick``.
"""

from __future__ import annotations

import time
from typing import Dict, Tuple

import torch
from _common import example_parser, parse_args, print_summary, progress, pyplot, save_figure, split_indices, write_json
from torch import nn

import implicitgrad as ig

WIDTH = 64
UNROLLED_STEPS = 30
JACOBIAN_WEIGHT = 0.01  # the estimate sums over the 64 × 64 entries of ∂f/∂z


class Cell(nn.Module):
    """f(z, u) = tanh(W z + u): the input enters through the injection u = U x + c.

    W is rescaled to Frobenius norm at most 0.9, so f is a contraction in z with constant 0.9
    at most (‖W‖₂ ≤ ‖W‖_F and tanh is 1-Lipschitz) and every forward solve converges.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.W = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.W.weight, std=0.8 / width**0.5)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        W = self.W.weight
        W = W * (0.9 / torch.linalg.matrix_norm(W)).clamp_max(1.0)
        return torch.tanh(z @ W.T + u)


class Classifier(nn.Module):
    def __init__(self, mode: str, width: int = WIDTH) -> None:
        super().__init__()
        self.mode = mode
        self.inject = nn.Linear(64, width)
        self.cell = Cell(width)
        backward = "implicit" if mode == "unrolled" else mode
        solver = ig.solvers.AndersonAcceleration(memory=5, maxiter=100, tol=1e-4)
        self.deq = ig.nn.DEQ(self.cell, solver=solver, backward=backward, jacobian_samples=1)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        u = self.inject(x)
        if self.mode == "unrolled":
            z = torch.zeros_like(u)
            for _ in range(UNROLLED_STEPS):
                z = self.cell(z, u)
            jac = self.deq._jacobian_loss(z.detach(), u)
            return self.head(z), jac, UNROLLED_STEPS
        z, info = self.deq(u, return_info=True)
        return self.head(z), info.jacobian_loss, int(info.forward_iterations or 0)


def load(seed: int, device: torch.device) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    parts = split_indices(len(bunch.target), [1297, -1], seed)
    out = {}
    for name, idx in zip(("train", "test"), parts):
        out[name] = (torch.as_tensor(bunch.data[idx] / 16.0, dtype=torch.float32, device=device),
                     torch.as_tensor(bunch.target[idx], device=device))
    return out


def train(mode: str, data, epochs: int, seed: int, batch: int = 64) -> Dict[str, object]:
    torch.manual_seed(seed)
    model = Classifier(mode).to(data["train"][0].device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, y = data["train"]
    losses, iterations = [], []
    start = time.perf_counter()
    for _ in progress(range(epochs), desc=f"{mode} epochs"):
        order = torch.randperm(len(y), device=X.device)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            logits, jac, its = model(X[idx])
            loss = nn.functional.cross_entropy(logits, y[idx]) + JACOBIAN_WEIGHT * jac
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            iterations.append(its)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        logits, _, its = model(data["test"][0])
    accuracy = float((logits.argmax(1) == data["test"][1]).float().mean())
    return {"model": model, "losses": losses, "test_accuracy": accuracy, "train_time_s": elapsed,
            "mean_forward_iterations": sum(iterations) / len(iterations), "test_forward_iterations": its}


def gradient_errors(state: Dict[str, torch.Tensor], data) -> Dict[str, Dict[str, float]]:
    """Relative error and cosine of the approximate gradients against the implicit one, on one batch
    (float64 copies, solved to 1e-12, so that the differences are the approximations')."""
    model = Classifier("implicit").double().to(data["train"][0].device).requires_grad_(True)
    model.load_state_dict({k: v.double() for k, v in state.items()})
    X, y = data["train"][0][:256].double(), data["train"][1][:256]
    grads = {}
    for mode in ("implicit", "phantom", "jacobian_free"):
        model.deq.backward_mode = mode
        model.deq.solver = ig.solvers.AndersonAcceleration(maxiter=500, tol=1e-12)
        model.deq.linear_solver = ig.GMRES(tol=1e-12, maxiter=500)
        model.deq.jacobian_samples = 0
        logits, _, _ = model(X)
        loss = nn.functional.cross_entropy(logits, y)
        grads[mode] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    ref = grads["implicit"]
    return {mode: {"rel_error": float((g - ref).norm() / ref.norm()),
                   "cosine": float(torch.nn.functional.cosine_similarity(g, ref, dim=0))}
            for mode, g in grads.items() if mode != "implicit"}


def main(argv=None):
    parser = example_parser(__file__, "A DEQ classifier on the digits: implicit, phantom and unrolled gradients.",
                            quick_time="about 20 s on one CPU core")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: 12 quick, 30 full)")
    parser.set_defaults(threads=1)
    args = parse_args(parser, argv)
    epochs = args.epochs or (12 if args.quick else 30)
    data = load(args.seed, args.device)
    if args.quick:
        data["train"] = (data["train"][0][:640], data["train"][1][:640])
    runs = {mode: train(mode, data, epochs, args.seed) for mode in ("implicit", "phantom", "unrolled")}
    errors = gradient_errors(runs["implicit"]["model"].state_dict(), data)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, run in runs.items():
        axes[0].plot(run["losses"], label=f"{mode} ({run['test_accuracy']:.1%} test)")
    axes[0].set(xlabel="step", ylabel="training loss", title="DEQ on digits", yscale="log")
    axes[0].legend()
    axes[1].bar(list(runs), [run["train_time_s"] for run in runs.values()])
    axes[1].set(ylabel="train time (s)", title="time to train")
    save_figure(fig, args.out, "deq_digits.png")

    metrics: Dict[str, object] = {"epochs": epochs}
    for mode, run in runs.items():
        for key in ("test_accuracy", "train_time_s", "mean_forward_iterations"):
            metrics[f"{mode}_{key}"] = run[key]
    for mode, err in errors.items():
        metrics[f"{mode}_gradient_rel_error"] = err["rel_error"]
        metrics[f"{mode}_gradient_cosine"] = err["cosine"]
    print_summary("DEQ classifier on digits", [(k, v) for k, v in metrics.items()])
    write_json(args.json, metrics)
    return metrics


if __name__ == "__main__":
    main()
