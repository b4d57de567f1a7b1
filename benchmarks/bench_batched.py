"""Many small problems at once: ``torch.func.vmap`` over ``ig.implicit_solve`` against a loop.

32 independent ridge-regularised logistic regressions (``d`` features, one log-L2
hyperparameter each), each solved by ``ig.solvers.GradientDescent`` (batchable: under
``vmap`` the sum of the objectives is minimised jointly, and the backward CG treats the
batch as independent block-diagonal systems) and differentiated for the validation loss.
Timed: forward and backward, ``vmap`` (one call) against a Python loop of 32 calls.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from _timing import Impl, agreement, interleaved, summarize

import implicitgrad as ig

BATCH = 32
TARGET_SPEEDUP = 5.0


def objective(w, log_lam, X, y):
    return F.softplus(-y * (X @ w)).mean() + 0.5 * log_lam.exp() * (w * w).sum()


def make_batch(batch: int, n: int, d: int, device, dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kw = {"dtype": torch.float64, "generator": gen}
    w_true = torch.randn(batch, d, **kw)
    X = torch.randn(batch, n, d, **kw)
    X_val = torch.randn(batch, n, d, **kw)
    y = torch.sign(torch.einsum("bnd,bd->bn", X, w_true) + torch.randn(batch, n, **kw))
    y_val = torch.sign(torch.einsum("bnd,bd->bn", X_val, w_true) + torch.randn(batch, n, **kw))
    log_lam = torch.log(torch.rand(batch, **kw) + 0.5)
    data = {"X": X, "y": y, "X_val": X_val, "y_val": y_val, "log_lam": log_lam}
    return {k: v.to(dtype=dtype, device=device) for k, v in data.items()}


class Batched:
    def __init__(self, data: Dict[str, torch.Tensor], steps: int, lr: float) -> None:
        self.data = data
        self.solver = ig.solvers.GradientDescent(lr=lr, maxiter=steps, tol=0)
        self.linear_solver = ig.CG(maxiter=50)

    def validation_loss(self, log_lam, X, y, X_val, y_val):
        w = ig.implicit_solve(objective, torch.zeros(X.shape[-1], dtype=X.dtype, device=X.device),
                              log_lam, X, y, solver=self.solver, linear_solver=self.linear_solver)
        return F.softplus(-y_val * (X_val @ w)).mean()

    def _inputs(self):
        d = self.data
        return d["log_lam"].detach().clone().requires_grad_(True), d["X"], d["y"], d["X_val"], d["y_val"]

    def vmapped(self) -> torch.Tensor:
        log_lam, *rest = self._inputs()
        losses = torch.func.vmap(self.validation_loss)(log_lam, *rest)
        return torch.autograd.grad(losses.sum(), log_lam)[0]

    def loop(self) -> torch.Tensor:
        log_lam, X, y, X_val, y_val = self._inputs()
        grads = []
        for i in range(len(log_lam)):
            loss = self.validation_loss(log_lam[i], X[i], y[i], X_val[i], y_val[i])
            grads.append(torch.autograd.grad(loss, log_lam)[0][i])
        return torch.stack(grads)


def run(device, quick: bool, reps: int, warmup: int, dtype=torch.float32,
        progress: Optional[Callable] = None) -> Dict[str, Any]:
    n, d, steps, lr = 40, 10, 60, 0.5
    if progress:
        progress("batched: vmap vs loop")
    check64 = Batched(make_batch(BATCH, n, d, device, torch.float64), steps, lr)
    check = agreement({"vmap": [check64.vmapped()], "loop": [check64.loop()]}, 1e-8)
    bench = Batched(make_batch(BATCH, n, d, device, dtype), steps, lr)
    impls = [Impl("loop", lambda: None, lambda _s: bench.loop()),
             Impl("vmap", lambda: None, lambda _s: bench.vmapped())]
    times = interleaved(impls, reps=reps, warmup=warmup, device=device)
    summary = summarize(times, [("loop", "vmap")])
    return {
        "description": f"{BATCH} logistic regressions (n = {n}, d = {d}), GradientDescent {steps} steps, "
                       "forward + backward",
        "batch": BATCH, "n": n, "d": d, "inner_steps": steps, "check": check, "times_s": times,
        **summary, "speedup": summary["ratios"]["loop/vmap"],
    }
