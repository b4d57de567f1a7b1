"""The inner problems the benchmarks differentiate, and a hand-written reference backward.

* Logistic regression with one L2 hyperparameter per feature:
  ``f(w, θ) = mean_i softplus(−y_i x_iᵀw) + ½ Σ_j exp(θ_j) w_j²``; outer loss the mean
  logistic loss on a validation set.
* An iMAML-style proximal task on an MLP (a dict of weight tensors):
  ``f(φ, θ) = CE(MLP_φ(X_s), y_s) + λ/2 ‖φ − θ‖²``; outer loss the cross-entropy on
  the query set.

``floor_hypergradient`` is the same implicit-differentiation math hand-written with
``torch.autograd``: ``∇ₓf`` built once with a graph, ``K`` Hessian-vector products on it
inside a plain conjugate gradient, and one vector-Jacobian product for ``θ``.
``lean_implicit_call`` adds to it, as leanly as Python allows, the checks an implicit solve
makes (the residual, finiteness, the captured-tensor walk) inside one autograd Function.

The logistic objective, its validation loss and its Newton solution are those of
``ig.testing.problems`` (re-exported here under the names the benchmarks use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from implicitgrad._problem import graph_leaves
from implicitgrad.testing.problems import logistic_loss as logistic_outer
from implicitgrad.testing.problems import logistic_objective, logistic_solution

__all__ = [
    "FewShotTask",
    "Logistic",
    "floor_hypergradient",
    "lean_implicit_call",
    "logistic_objective",
    "logistic_outer",
    "make_logistic",
    "make_proximal_objective",
    "make_task",
    "mlp_forward",
    "mlp_module",
    "mlp_params",
    "plain_cg",
    "proximal_solution",
    "support_loss",
]

# ---------------------------------------------------------------------------- logistic


@dataclass
class Logistic:
    X: torch.Tensor
    y: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    theta: torch.Tensor
    w_star: torch.Tensor


def make_logistic(n: int, d: int, n_val: int, seed: int, device, log_lam: float = -3.0) -> Logistic:
    """A logistic regression of ``n`` samples, ``d`` features, solved to float64 precision."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"dtype": torch.float64, "generator": gen}
    w_true = torch.randn(d, **kw)
    X = torch.randn(n, d, **kw)
    X_val = torch.randn(n_val, d, **kw)
    y = torch.sign(X @ w_true + 2.0 * torch.randn(n, **kw))
    y_val = torch.sign(X_val @ w_true + 2.0 * torch.randn(n_val, **kw))
    theta = log_lam + 0.5 * torch.randn(d, **kw)
    tensors = [t.to(device) for t in (X, y, X_val, y_val, theta)]
    w_star = logistic_solution(tensors[4], tensors[0], tensors[1])
    return Logistic(*tensors, w_star)


# ---------------------------------------------------------------------------- MLP


def mlp_params(sizes: Sequence[int], seed: int, dtype, device) -> Dict[str, torch.Tensor]:
    """Weights of ``Linear → tanh → ... → Linear`` named like ``nn.Sequential`` entries."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = fan_in**-0.5
        params[f"{2 * i}.weight"] = (torch.rand(fan_out, fan_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        params[f"{2 * i}.bias"] = (torch.rand(fan_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return {k: v.to(dtype=dtype, device=device) for k, v in params.items()}


def mlp_module(sizes: Sequence[int]) -> torch.nn.Sequential:
    """The ``nn.Module`` whose parameters :func:`mlp_params` names."""
    layers: List[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(torch.nn.Tanh())
        layers.append(torch.nn.Linear(fan_in, fan_out))
    return torch.nn.Sequential(*layers)


def mlp_forward(params: Dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    n_layers = len(params) // 2
    h = X
    for i in range(n_layers):
        h = F.linear(h, params[f"{2 * i}.weight"], params[f"{2 * i}.bias"])
        if i < n_layers - 1:
            h = torch.tanh(h)
    return h


def support_loss(phi: Dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(mlp_forward(phi, X), y)


def make_proximal_objective(lam: float) -> Callable:
    """``f(φ, θ, X, y) = CE(MLP_φ(X), y) + λ/2 ‖φ − θ‖²`` (the iMAML inner problem)."""

    def objective(phi, theta, X, y):
        prox = sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)
        return support_loss(phi, X, y) + 0.5 * lam * prox

    return objective


@dataclass
class FewShotTask:
    X_s: torch.Tensor
    y_s: torch.Tensor
    X_q: torch.Tensor
    y_q: torch.Tensor


def make_task(ways: int, shots: int, queries: int, dim: int, seed: int, dtype, device) -> FewShotTask:
    """A synthetic ``ways``-way classification task: Gaussian classes around random means."""
    gen = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(ways, dim, generator=gen, dtype=torch.float64)

    def draw(per_class: int):
        labels = torch.arange(ways).repeat_interleave(per_class)
        x = means[labels] + torch.randn(len(labels), dim, generator=gen, dtype=torch.float64)
        return x.to(dtype=dtype, device=device), labels.to(device)

    X_s, y_s = draw(shots)
    X_q, y_q = draw(queries)
    return FewShotTask(X_s, y_s, X_q, y_q)


def proximal_solution(objective, theta, task: FewShotTask, lr: float, steps: int) -> Dict[str, torch.Tensor]:
    """Approximate minimiser of the proximal problem by plain gradient descent from ``θ``."""
    phi = {k: v.detach().clone() for k, v in theta.items()}
    for _ in range(steps):
        with torch.enable_grad():
            leaves = {k: v.requires_grad_(True) for k, v in phi.items()}
            grads = torch.autograd.grad(objective(leaves, theta, task.X_s, task.y_s), list(leaves.values()))
        phi = {k: (v - lr * g).detach() for (k, v), g in zip(leaves.items(), grads)}
    return phi


# ---------------------------------------------------------------------------- reference backward


def plain_cg(matvec: Callable, b: List[torch.Tensor], iters: int) -> List[torch.Tensor]:
    """Exactly ``iters`` conjugate-gradient steps on lists of tensors, no checks."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in r]
    rs = sum((t * t).sum() for t in r)
    for _ in range(iters):
        ap = matvec(p)
        alpha = rs / sum((a * c).sum() for a, c in zip(p, ap))
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap)]
        rs_new = sum((t * t).sum() for t in r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


def floor_hypergradient(
    objective: Callable,
    x_star: List[torch.Tensor],
    theta: List[torch.Tensor],
    v: List[torch.Tensor],
    iters: int,
    x_tree: Callable,
    theta_tree: Callable,
    data: Sequence,
) -> List[torch.Tensor]:
    """``−(∂_θ∇ₓf)ᵀ u`` with ``∇²ₓf u = v`` solved by ``iters`` CG steps, by hand.

    ``x_tree`` / ``theta_tree`` turn the flat lists back into what ``objective`` takes.
    """
    xs = [t.detach().requires_grad_(True) for t in x_star]
    ths = [t.detach().requires_grad_(True) for t in theta]
    with torch.enable_grad():
        value = objective(x_tree(xs), theta_tree(ths), *data)
        g = torch.autograd.grad(value, xs, create_graph=True)

        def hvp(p):
            return list(torch.autograd.grad(g, xs, p, retain_graph=True))

        u = plain_cg(hvp, list(v), iters)
        grads = torch.autograd.grad(g, ths, u)
    return [-t for t in grads]


# ---------------------------------------------------------------------------- the lean call
def lean_implicit_call(objective: Callable, x_star: List[torch.Tensor], theta: List[torch.Tensor],
                       iters: int, x_tree: Callable, theta_tree: Callable, data: Sequence) -> List[torch.Tensor]:
    """``x*(θ)`` as one ``torch.autograd.Function`` with the checks of an implicit solve
    written as leanly as Python allows: the least any implementation of them costs.

    Forward: the graph of ``∇ₓf`` at ``x*`` built once (the backward reuses it), one walk
    of the objective's graph (``x`` reached, no tensor captured that requires grad), and
    ``‖∇ₓf‖`` with the finiteness of ``x*`` and ``θ`` read by the host in one read.
    Backward: the finiteness of the incoming gradient (one read), ``iters`` CG steps whose
    step sizes are Python numbers (two reads per step), one vector-Jacobian product. No
    pytrees beyond the given leaves, no batches, no options, no records: a lower bound for
    a library's call with the same checks, not a usable layer.
    """
    n = len(x_star)

    class Lean(torch.autograd.Function):
        @staticmethod
        def forward(*th: torch.Tensor):
            xs = [t.detach().requires_grad_(True) for t in x_star]
            ts = [t.detach().requires_grad_(True) for t in th]
            with torch.enable_grad():
                value = objective(x_tree(xs), theta_tree(ts), *data)
                g = torch.autograd.grad(value, xs, create_graph=True)
            x_ids, own = {id(t) for t in xs}, {id(t) for t in xs + ts}
            leaves, _ = graph_leaves([value])  # the walk implicitgrad makes
            if not any(id(t) in x_ids for t in leaves) or any(id(t) not in own for t in leaves):
                raise ValueError("the objective ignores x or captures a tensor that requires grad")
            norms = torch.stack([torch.linalg.vector_norm(t.detach()) for t in g] + [t.sum() for t in x_star + ts])
            values = norms.tolist()
            if not all(map(math.isfinite, values)):
                raise ValueError("non-finite residual, solution or parameter")
            Lean.carried = (xs, ts, g, math.sqrt(sum(v * v for v in values[:n])))
            return tuple(t.clone() for t in x_star)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.carried = Lean.carried

        @staticmethod
        def backward(ctx, *v):
            xs, ts, g, _residual = ctx.carried
            # CG on one flat vector (the leaves packed once, unpacked as views per product).
            sizes = [t.numel() for t in xs]

            def pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
                return torch.cat([t.reshape(-1) for t in parts]) if n > 1 else parts[0].reshape(-1)

            def unpack(q: torch.Tensor) -> List[torch.Tensor]:
                return [c.view_as(t) for c, t in zip(q.split(sizes), xs)] if n > 1 else [q.view_as(xs[0])]

            b = pack(v)
            if not math.isfinite(float(b.sum())):
                raise ValueError("non-finite incoming gradient")

            def hvp(q: torch.Tensor) -> torch.Tensor:
                return pack(torch.autograd.grad(g, xs, unpack(q), retain_graph=True))

            u, r, p = torch.zeros_like(b), b, b
            rr = float(torch.dot(r, r))
            for _ in range(iters):
                ap = hvp(p)
                alpha = rr / float(torch.dot(p, ap))
                u = u + alpha * p
                r = r - alpha * ap
                rr_new = float(torch.dot(r, r))
                p = r + (rr_new / rr) * p
                rr = rr_new
            return tuple(-t for t in torch.autograd.grad(g, ts, unpack(u)))

    return list(Lean.apply(*theta))
