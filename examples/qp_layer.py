r"""A QP layer learns the constraints of a projection from examples (OptNet-style).

Data: points :math:`x \in \mathbb R^2` and their Euclidean projections :math:`y = \Pi_P(x)` onto an
unknown polygon :math:`P = \{z : G^\star z \le h^\star\}` (a hexagon). The layer

.. math::

    z^\star(x) = \arg\min_z \tfrac12\|z - x\|^2 \quad\text{s.t.}\quad G z \le h

(``ig.nn.QP`` with ``Q = I``, ``p = -x`` given and ``G``, ``h`` learned) is trained on the
squared error to :math:`y`: every step solves a batch of 128 QPs with the interior-point
method and differentiates them through their KKT conditions. The script reports the test
error of the learned projection, the learned polygon against the true one, the iterations
of the solver, and (when qpth is installed) the agreement of the layer's gradient with
qpth's on a batch.

Run from the repository root: ``python examples/qp_layer.py --quick``.
"""

from __future__ import annotations

import math
import time
from typing import Dict

import torch
from _common import example_parser, parse_args, print_summary, progress, pyplot, save_figure, write_json

import implicitgrad as ig

DTYPE = torch.float64
SIDES = 6


def true_polygon(device: torch.device):
    """A hexagon: outward normals at angles 2πk/6 + 0.3, offsets between 0.6 and 1.2."""
    angles = torch.arange(SIDES, dtype=DTYPE, device=device) * 2 * math.pi / SIDES + 0.3
    G = torch.stack([angles.cos(), angles.sin()], 1)
    h = torch.tensor([0.6, 1.0, 0.8, 1.2, 0.7, 0.9], dtype=DTYPE, device=device)
    return G, h


def sample(n: int, G: torch.Tensor, h: torch.Tensor, generator: torch.Generator):
    x = 2.0 * torch.randn(n, 2, generator=generator, dtype=DTYPE).to(G.device)
    y = ig.qp_solve(torch.eye(2, dtype=DTYPE, device=G.device), -x, G, h)
    return x, y


def qpth_agreement(layer: ig.nn.QP, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Relative difference of the solutions and of the gradients in (G, h) between the layer and qpth.

    qpth is given G and h expanded over the batch: for a parameter shared by the batch it
    returns the mean of the per-problem gradients instead of the gradient of the sum.
    """
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return {}
    import warnings

    G, h = layer.G.detach().clone().requires_grad_(True), layer.h.detach().clone().requires_grad_(True)
    eye = torch.eye(2, dtype=DTYPE, device=x.device)
    ours = ig.qp_solve(eye, -x, G, h, tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = torch.empty(0, dtype=DTYPE, device=x.device)
        B = x.shape[0]
        theirs = QPFunction(verbose=-1, eps=1e-10, maxIter=100)(eye, -x, G.expand(B, -1, -1), h.expand(B, -1), e, e)
    g_ours = torch.autograd.grad((ours - y).square().sum(), [G, h])
    g_theirs = torch.autograd.grad((theirs - y).square().sum(), [G, h])
    return {"qpth_solution_max_diff": float((ours - theirs).detach().abs().max()),
            "qpth_gradient_rel_diff": max(float((a - b).norm() / b.norm()) for a, b in zip(g_ours, g_theirs))}


def main(argv=None):
    parser = example_parser(__file__, "A QP layer learns the polygon a projection maps onto.",
                            quick_time="about 15 s on one CPU core")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 150 quick, 600 full)")
    parser.set_defaults(threads=1)
    args = parse_args(parser, argv)
    steps = args.steps or (150 if args.quick else 600)
    generator = torch.Generator().manual_seed(args.seed)
    G_true, h_true = true_polygon(args.device)
    x_test, y_test = sample(1000, G_true, h_true, generator)

    layer = ig.nn.QP(2, n_ineq=SIDES, learn=("G", "h"), dtype=DTYPE).to(args.device)
    with torch.no_grad():  # start from a regular hexagon of radius 0.5, rotated away from the truth
        angles = torch.arange(SIDES, dtype=DTYPE) * 2 * math.pi / SIDES
        layer.G.copy_(torch.stack([angles.cos(), angles.sin()], 1))
        layer.h.fill_(0.5)
    eye = torch.eye(2, dtype=DTYPE, device=args.device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.02)
    losses, iterations = [], []
    with torch.no_grad():
        initial_error = float((layer(p=-x_test, Q=eye) - y_test).square().sum(1).mean())
    start = time.perf_counter()
    bar = progress(range(steps), desc="training steps")
    for _ in bar:
        x, y = sample(128, G_true, h_true, generator)
        loss = (layer(p=-x, Q=eye) - y).square().sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        iterations.append(int(layer.last_info.iterations.max()))
        bar.set_postfix(loss=f"{losses[-1]:.2e}", refresh=False)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        test_error = float((layer(p=-x_test, Q=eye) - y_test).square().sum(1).mean())
    metrics: Dict[str, float] = {
        "steps": steps, "initial_test_mse": initial_error, "test_mse": test_error, "train_time_s": elapsed,
        "mean_qp_iterations": sum(iterations) / len(iterations), "max_qp_iterations": max(iterations),
        **qpth_agreement(layer, x_test[:64], y_test[:64]),
    }

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    grid = torch.linspace(-2.5, 2.5, 300, dtype=DTYPE)
    X1, X2 = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([X1.reshape(-1), X2.reshape(-1)], 1).to(args.device)
    for G, h, style, label in ((G_true, h_true, "k", "true polygon"),
                               (layer.G.detach(), layer.h.detach(), "tab:red", "learned polygon")):
        inside = ((points @ G.T) <= h).all(1).reshape(X1.shape).to(DTYPE).cpu()
        axes[0].contour(X1, X2, inside, levels=[0.5], colors=style)
        axes[0].plot([], [], color=style, label=label)
    axes[0].scatter(*x_test[:150].T.cpu(), s=4, color="tab:gray", label="inputs x")
    axes[0].scatter(*y_test[:150].T.cpu(), s=4, color="tab:blue", label="targets Π(x)")
    axes[0].set(aspect="equal", xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), title="learned constraints")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[1].semilogy(losses)
    axes[1].set(xlabel="step", ylabel="training MSE", title="training a QP layer")
    save_figure(fig, args.out, "qp_layer.png")
    print_summary("QP layer learning a projection", list(metrics.items()))
    write_json(args.json, metrics)
    return metrics


if __name__ == "__main__":
    main()
