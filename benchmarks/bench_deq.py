"""A deep equilibrium layer: ``ig.nn.DEQ`` against torchdeq on the same fixed-point layer.

The cell is ``f(z, x) = tanh(W z + U x + c)`` (width 64, batch 32, ``‖W‖₂ = 0.9``), float64.
Both libraries solve it with Anderson acceleration until every sample's relative residual
``‖f(z) − z‖ / ‖f(z)‖`` is below 1e-6 (torchdeq: ``f_stop_mode="rel"``; implicitgrad: its
per-sample rule ``‖f(z) − z‖ ≤ tol · max(1, ‖f(z₀) − z₀‖)`` with ``tol = 1e-6``; the achieved
relative residuals are measured afterwards, alike for both, and the check requires both
below 1e-6). The implicit backward solves ``(I − ∂f/∂z)ᵀu = v``
per sample to a relative residual of 1e-8 (implicitgrad: GMRES; torchdeq: Anderson on
``u = (∂f/∂z)ᵀu + v``). Timed, interleaved: the forward pass (with autograd on, as in training)
and the backward pass alone. Gradients of ``W`` are compared with each other and with a
dense reference (per-sample Jacobians, ``torch.linalg.solve``); the phantom and
Jacobian-free gradients' errors against that reference are reported too. The row
``implicitgrad-Broyden`` is the same layer with ``ig.solvers.Broyden`` (memory 20) as the
forward solver instead of Anderson, same tolerance and backward.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from _timing import Impl, agreement, interleaved, summarize
from torch import nn

import implicitgrad as ig

DT = torch.float64
TOL = 1e-6


class Cell(nn.Module):
    def __init__(self, width: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(width, width, generator=g, dtype=DT)
        self.W = nn.Parameter(0.9 * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(torch.randn(width, width, generator=g, dtype=DT) / width**0.5)
        self.c = nn.Parameter(torch.randn(width, generator=g, dtype=DT))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.c)


def relative_residuals(cell: Cell, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        fz = cell(z, x)
        return (fz - z).norm(dim=1) / fz.norm(dim=1)


def dense_gradient(cell: Cell, z: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    z = z.detach()
    us = []
    for i in range(z.shape[0]):
        xi = x[i : i + 1]
        J = torch.autograd.functional.jacobian(lambda zi, xi=xi: cell(zi.unsqueeze(0), xi).squeeze(0), z[i])
        us.append(torch.linalg.solve((torch.eye(z.shape[1], dtype=DT, device=z.device) - J).T, v[i]))
    (g,) = torch.autograd.grad(cell(z, x), cell.W, torch.stack(us))
    return g


def run(device, quick: bool, reps: int, warmup: int, progress: Optional[Callable] = None) -> Dict[str, Any]:
    say = progress or (lambda message: None)
    width, batch = 64, (16 if quick else 32)
    cell = Cell(width).to(device)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1), dtype=DT).to(device)
    v = torch.randn(batch, width, generator=torch.Generator().manual_seed(2), dtype=DT).to(device)
    ours = ig.nn.DEQ(cell, solver=ig.solvers.AndersonAcceleration(memory=5, maxiter=200, tol=TOL),
                     linear_solver=ig.GMRES(tol=1e-8, maxiter=200))
    broyden = ig.nn.DEQ(cell, solver=ig.solvers.Broyden(memory=20, maxiter=200, tol=TOL),
                        linear_solver=ig.GMRES(tol=1e-8, maxiter=200))
    impls: Dict[str, Callable[[], torch.Tensor]] = {"implicitgrad": lambda: ours(x),
                                                    "implicitgrad-Broyden": lambda: broyden(x)}
    layers = {"implicitgrad": ours, "implicitgrad-Broyden": broyden}
    peer: Dict[str, Any] = {"installed": False}
    try:
        import torchdeq

        peer = {"installed": True, "version": getattr(torchdeq, "__version__", "installed")}
        theirs = torchdeq.get_deq(f_solver="anderson", f_max_iter=200, f_tol=TOL, f_stop_mode="rel", ift=True,
                                  b_solver="anderson", b_max_iter=200, b_tol=1e-8, b_stop_mode="rel")

        def torchdeq_forward() -> torch.Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zs, info = theirs(lambda z: cell(z, x), torch.zeros_like(x))
            peer["last_iterations"] = int(info["nstep"].max())
            return zs[-1]

        impls["torchdeq"] = torchdeq_forward
    except ImportError:
        say("torchdeq not installed: the DEQ comparison runs implicitgrad alone (pip install implicitgrad[peers])")

    say(f"deq: checking gradients (width {width}, batch {batch})")
    z_ref = ours(x)
    reference = dense_gradient(cell, z_ref, x, v)
    grads, residuals, iterations = {}, {}, {}
    for name, forward in impls.items():
        z = forward()
        residuals[name] = float(relative_residuals(cell, z, x).max())
        (grads[name],) = torch.autograd.grad((z * v).sum(), cell.W)
        iterations[name] = layers[name].last_info.forward_iterations if name in layers else peer["last_iterations"]
    errors = {name: float((g - reference).norm() / reference.norm()) for name, g in grads.items()}
    for mode in ("phantom", "jacobian_free"):
        approx = ig.nn.DEQ(cell, solver=ours.solver, backward=mode)
        (g,) = torch.autograd.grad((approx(x) * v).sum(), cell.W)
        errors[f"implicitgrad {mode}"] = float((g - reference).norm() / reference.norm())
    check = agreement({name: [g] for name, g in grads.items()} | {"dense": [reference]}, 1e-6)
    check["ok"] = check["ok"] and all(r <= TOL for r in residuals.values())
    check["relative_residuals"] = residuals

    say("deq: timing forward and backward")
    timed: List[Impl] = []
    for name, forward in impls.items():
        timed.append(Impl(f"{name} forward", lambda: None, lambda _s, f=forward: f()))
        timed.append(Impl(f"{name} backward", lambda f=forward: (f() * v).sum(),
                          lambda loss: torch.autograd.grad(loss, cell.W)))
    times = interleaved(timed, reps=reps, warmup=warmup, device=device)
    summary = summarize(times, [("implicitgrad forward", "torchdeq forward"),
                                ("implicitgrad backward", "torchdeq backward"),
                                ("implicitgrad-Broyden forward", "implicitgrad forward")])
    return {"description": f"tanh(W z + U x + c), width {width}, batch {batch}, float64", "width": width,
            "batch": batch, "tol": TOL, "iterations": iterations, "relative_residuals": residuals,
            "gradient_errors": errors, "peer": peer, "check": check, "times_s": times, **summary}
