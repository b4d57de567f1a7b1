"""Backward (hypergradient) time against TorchOpt and against a hand-written floor.

Both problems of :mod:`_problems` are differentiated three ways at the same given
solution ``x*`` with exactly ``K`` conjugate-gradient iterations each:

* ``implicitgrad``: ``ig.implicit_solve(..., linear_solver=ig.CG(maxiter=K, tol=1e-30))``
  (the tolerance is below what any residual reaches, so CG runs all ``K`` steps);
* ``torchopt``: ``torchopt.diff.implicit.custom_root(optimality, argnums=1,
  solve=torchopt.linear_solve.solve_cg(maxiter=K, rtol=0, atol=0))`` — TorchOpt's CG loops
  ``while ‖r‖² > max(rtol²‖b‖², atol²) and k < maxiter``, so with zero tolerances it runs
  exactly ``K`` steps;
* ``floor``: :func:`_problems.floor_hypergradient` (plain autograd, plain CG).

Only the backward pass is timed: each round builds the forward (which returns the given
``x*``) and the outer loss untimed, then times ``torch.autograd.grad(loss, θ)``; the floor
times the same work (``∂L/∂x*``, the graph of ``∇ₓf``, ``K`` products, one VJP). Before
timing, the three gradients are computed in float64 and compared.
"""

from __future__ import annotations

import copy
import cProfile
import functools
import io
import pstats
import re
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from _problems import (
    floor_hypergradient,
    lean_implicit_call,
    logistic_objective,
    logistic_outer,
    make_logistic,
    make_proximal_objective,
    make_task,
    mlp_forward,
    mlp_params,
    proximal_solution,
)
from _timing import Impl, agreement, interleaved, summarize

import implicitgrad as ig

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchopt
except ImportError:
    torchopt = None

TINY_TOL = 1e-30
AGREEMENT_TOL = 1e-8  # float64, same K steps from the same start: only rounding differs

# Targets of the issue: backward time relative to TorchOpt's and to the floor.
TARGET_VS_TORCHOPT = 0.6
TARGET_VS_FLOOR = 1.10


def _given(solution: Any) -> Callable:
    """An inner "solver" returning a solution computed beforehand (warm forward)."""

    def solver(_fn, _x0, *_params):
        return solution

    return solver


class Case:
    """One problem with its three backward implementations.

    Subclasses define ``objective(x, θ, *data)``, ``outer(x)``, the solution ``x_star`` and
    ``theta`` (flat lists), ``to_x`` / ``to_theta`` (flat list → what ``objective`` takes)
    and ``data``.
    """

    name = ""
    description = ""
    K = 0

    def __init__(self) -> None:
        self.ig_linear = ig.CG(maxiter=self.K, tol=TINY_TOL)
        self.torchopt_solver = self._torchopt_solver() if torchopt is not None else None

    # -- implicitgrad
    def setup_ig(self):
        theta = [t.detach().clone().requires_grad_(True) for t in self.theta]
        x = ig.implicit_solve(
            self.objective, self.to_x(self.x0()), self.to_theta(theta), *self.data,
            solver=_given(self.to_x(self.x_star)), linear_solver=self.ig_linear, on_failure="ignore",
        )
        return self.outer(x), theta

    # -- TorchOpt
    def _torchopt_solver(self):
        objective, to_x, to_theta = self.objective, self.to_x, self.to_theta
        x_star = tuple(self.x_star)

        def optimality(x, theta, *data):
            grads = torch.func.grad(lambda xx: objective(to_x(list(xx)), to_theta(list(theta)), *data))(x)
            return tuple(grads)

        def solve(x0, theta, *data):
            return x_star

        solve_cg = torchopt.linear_solve.solve_cg(maxiter=self.K, rtol=0.0, atol=0.0)
        return torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve_cg)(solve)

    def setup_torchopt(self):
        theta = [t.detach().clone().requires_grad_(True) for t in self.theta]
        x = self.torchopt_solver(tuple(self.x0()), tuple(theta), *self.data)
        return self.outer(self.to_x(list(x))), theta

    # -- hand-written
    def setup_floor(self):
        x = [t.detach().clone().requires_grad_(True) for t in self.x_star]
        return self.outer(self.to_x(x)), x

    def run_floor(self, state):
        loss, x = state
        v = torch.autograd.grad(loss, x)
        return floor_hypergradient(self.objective, x, self.theta, v, self.K, self.to_x, self.to_theta, self.data)

    @staticmethod
    def run_grad(state):
        loss, theta = state
        return torch.autograd.grad(loss, theta)

    # -- whole call: forward (returning the given x*), outer loss, hypergradient
    def setup_params(self):
        return [t.detach().clone().requires_grad_(True) for t in self.theta]

    def run_ig_call(self, theta, **options):
        """``options`` go to ``ig.implicit_solve`` (``warm_start=...``, for instance)."""
        x = ig.implicit_solve(
            self.objective, self.to_x(self.x0()), self.to_theta(theta), *self.data,
            solver=_given(self.to_x(self.x_star)), linear_solver=self.ig_linear, on_failure="ignore", **options,
        )
        return torch.autograd.grad(self.outer(x), theta)

    def run_torchopt_call(self, theta):
        x = self.torchopt_solver(tuple(self.x0()), tuple(theta), *self.data)
        return torch.autograd.grad(self.outer(self.to_x(list(x))), theta)

    def run_floor_call(self, theta):
        x = [t.detach().clone().requires_grad_(True) for t in self.x_star]
        v = torch.autograd.grad(self.outer(self.to_x(x)), x)
        return floor_hypergradient(self.objective, x, theta, v, self.K, self.to_x, self.to_theta, self.data)

    def run_lean_call(self, theta):
        x = lean_implicit_call(self.objective, self.x_star, theta, self.K, self.to_x, self.to_theta, self.data)
        return torch.autograd.grad(self.outer(self.to_x(x)), theta)

    def call_impls(self) -> List[Impl]:
        """Whole calls (forward + outer loss + backward) of implicitgrad and of the floor."""
        return [Impl("implicitgrad", self.setup_params, self.run_ig_call),
                Impl("floor", self.setup_params, self.run_floor_call)]

    def impls(self) -> List[Impl]:
        out = [Impl("implicitgrad", self.setup_ig, self.run_grad)]
        if self.torchopt_solver is not None:
            out.append(Impl("torchopt", self.setup_torchopt, self.run_grad))
        out.append(Impl("floor", self.setup_floor, self.run_floor))
        return out

    def x0(self) -> List[torch.Tensor]:
        return [torch.zeros_like(t) for t in self.x_star]

    def variant(self, K: Optional[int] = None, theta=None, x_star=None, linear=None) -> Case:
        """A copy of this case with another ``K``, point ``θ`` or solution ``x*`` (solvers rebuilt).

        ``linear`` replaces implicitgrad's linear solver (``ig.CG(maxiter=K, tol=1e-30)`` otherwise).
        """
        other = copy.copy(self)
        if K is not None:
            other.K = K
            other.description = re.sub(r"CG K = \d+", f"CG K = {K}", self.description)
        if theta is not None:
            other.theta = list(theta)
        if x_star is not None:
            other.x_star = list(x_star)
        Case.__init__(other)
        if linear is not None:
            other.ig_linear = linear
        return other

    def backward_iterations(self) -> int:
        """CG iterations implicitgrad's backward actually ran (checks the forcing works)."""
        theta = [t.detach().clone().requires_grad_(True) for t in self.theta]
        x, info = ig.implicit_solve(
            self.objective, self.to_x(self.x0()), self.to_theta(theta), *self.data,
            solver=_given(self.to_x(self.x_star)), linear_solver=self.ig_linear, on_failure="ignore",
            return_info=True,
        )
        torch.autograd.grad(self.outer(x), theta)
        return info.backward.iterations


@functools.cache
def _logistic64(n: int, d: int, seed: int, device: str):
    """The float64 problem and its solution, shared by the check and the timed cases."""
    return make_logistic(n, d, n // 2, seed, torch.device(device))


@functools.cache
def _proximal64(sizes, shots: int, lam: float, seed: int, device: str):
    """Meta-parameters θ and the proximal solution φ* in float64 (shared like ``_logistic64``)."""
    theta = mlp_params(sizes, seed, torch.float64, torch.device(device))
    task = make_task(sizes[-1], shots, 3 * shots, sizes[0], seed + 1, torch.float64, torch.device(device))
    phi = proximal_solution(make_proximal_objective(lam), theta, task, lr=0.2, steps=100)
    return theta, phi


class LogisticCase(Case):
    name = "logistic"

    def __init__(self, n: int, d: int, K: int, device, dtype, seed: int = 0) -> None:
        self.K = K
        self.description = f"logistic regression, {d} per-feature L2 hyperparameters, n = {n}, CG K = {K}"
        prob = _logistic64(n, d, seed, str(device))
        self.X, self.y, self.X_val, self.y_val = (t.to(dtype) for t in (prob.X, prob.y, prob.X_val, prob.y_val))
        self.theta = [prob.theta.to(dtype)]
        self.x_star = [prob.w_star.to(dtype)]
        self.data = (self.X, self.y)
        self.sizes = {"n": n, "d": d, "hyperparameters": d, "inner_variables": d}
        super().__init__()

    @staticmethod
    def objective(w, theta, X, y):
        return logistic_objective(w, theta, X, y)

    def outer(self, w):
        return logistic_outer(w, self.X_val, self.y_val)

    @staticmethod
    def to_x(leaves):
        return leaves[0]

    to_theta = to_x


class ProximalMLPCase(Case):
    name = "imaml_mlp"

    def __init__(self, sizes, shots: int, K: int, lam: float, device, dtype, seed: int = 0) -> None:
        self.K = K
        self.keys = list(mlp_params(sizes, seed, torch.float64, "cpu"))
        theta, phi = _proximal64(tuple(sizes), shots, lam, seed, str(device))
        task = make_task(sizes[-1], shots, 3 * shots, sizes[0], seed + 1, dtype, device)
        self._objective = make_proximal_objective(lam)
        self.theta = [theta[k].to(dtype) for k in self.keys]
        self.x_star = [phi[k].to(dtype) for k in self.keys]
        self.data = (task.X_s, task.y_s)
        self.X_q, self.y_q = task.X_q, task.y_q
        n_params = sum(t.numel() for t in self.theta)
        self.description = (
            f"iMAML proximal task, MLP {'-'.join(map(str, sizes))} ({n_params} parameters in "
            f"{len(self.keys)} tensors), {sizes[-1]}-way {shots}-shot, λ = {lam}, CG K = {K}"
        )
        self.sizes = {"mlp": list(sizes), "parameters": n_params, "shots": shots, "lambda": lam}
        super().__init__()

    def objective(self, phi, theta, X, y):
        return self._objective(phi, theta, X, y)

    def outer(self, phi):
        return torch.nn.functional.cross_entropy(mlp_forward(phi, self.X_q), self.y_q)

    def to_x(self, leaves):
        return dict(zip(self.keys, leaves))

    to_theta = to_x


def build_cases(device, dtype) -> List[Case]:
    return [
        LogisticCase(n=2000, d=500, K=20, device=device, dtype=dtype),
        ProximalMLPCase(sizes=(64, 256, 256, 5), shots=5, K=10, lam=1.0, device=device, dtype=dtype),
    ]


def check(device) -> Dict[str, Any]:
    """float64 gradients of every implementation, compared pairwise."""
    out = {}
    for case in build_cases(device, torch.float64):
        results = {impl.name: [g.detach() for g in impl.run(impl.setup())] for impl in case.impls()}
        report = agreement(results, AGREEMENT_TOL)
        iterations = case.backward_iterations()
        report["implicitgrad_backward_iterations"] = iterations
        report["K"] = case.K
        report["ok"] = report["ok"] and iterations == case.K
        out[case.name] = report
    return out


def profile(case: Case, top: int = 15, runs: int = 5) -> Dict[str, str]:
    """Where the time of implicitgrad's backward and of the floor goes, over ``runs`` calls.

    Operator level (``torch.profiler``, self CPU time) for both, and Python level
    (``cProfile``, internal time) for implicitgrad. The forward states are built before
    profiling so that only the backward passes are recorded.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    texts = {}
    impls = {impl.name: impl for impl in case.impls()}
    for name in ("implicitgrad", "floor"):
        impl = impls[name]
        for _ in range(3):
            impl.run(impl.setup())
        states = [impl.setup() for _ in range(runs)]
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for state in states:
                impl.run(state)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
        texts[f"{name} operators ({runs} calls)"] = table
    impl = impls["implicitgrad"]
    states = [impl.setup() for _ in range(runs)]
    profiler = cProfile.Profile()
    profiler.enable()
    for state in states:
        impl.run(state)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    texts[f"implicitgrad python ({runs} calls)"] = stream.getvalue()
    return texts


def run(device, quick: bool, reps: int, warmup: int, dtype=torch.float32, progress: Optional[Callable] = None):
    """Agreement check, then interleaved timing of every case; profiles a missed floor target (full runs)."""
    if torchopt is None:
        print("note: torchopt is not installed; the TorchOpt comparison is skipped (pip install torchopt).")
    checks = check(device)
    results: Dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "cases": {}}
    for case in build_cases(device, dtype):
        if progress:
            progress(f"backward: {case.name}")
        times = interleaved(case.impls(), reps=reps, warmup=warmup, device=device)
        summary = summarize(times, [("implicitgrad", "torchopt"), ("implicitgrad", "floor"), ("torchopt", "floor")])
        entry = {
            "description": case.description,
            "sizes": case.sizes,
            "K": case.K,
            "check": checks[case.name],
            "times_s": times,
            **summary,
        }
        vs_floor = summary["ratios"].get("implicitgrad/floor")
        if not quick and vs_floor is not None and vs_floor > TARGET_VS_FLOOR:
            entry["profile"] = profile(case)
        results["cases"][case.name] = entry
    return results


# ---------------------------------------------------------------------------- whole call

CALL_KS = (5, 20)
# Target of the issue: forward + outer loss + backward within 5 % of the floor's whole call.
TARGET_CALL_VS_FLOOR = 1.05


def call_cases(device, dtype, Ks=CALL_KS) -> List[Case]:
    """Both problems at every ``K`` of ``Ks`` (logistic first)."""
    return [case.variant(K=K) for K in Ks for case in build_cases(device, dtype)]


def run_call(device, quick: bool, reps: int, warmup: int, dtype=torch.float32,
             progress: Optional[Callable] = None) -> Dict[str, Any]:
    """Whole-call rows: implicitgrad against the floor, both doing forward, outer loss and hypergradient,
    and the lean call (:func:`_problems.lean_implicit_call`: the floor plus the checks of an
    implicit solve, written as leanly as Python allows) against the floor.

    The forward "solver" of implicitgrad returns the solution computed beforehand (so the
    forward cost is implicitgrad's own: the check of the condition at ``x*``, the graph it
    keeps for the backward, the diagnostics); the floor starts from the same solution. Each
    pair is first compared in float64, then timed interleaved in ``dtype``.
    """
    del quick  # the rows are the four configurations in every run
    results: Dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "target": TARGET_CALL_VS_FLOOR,
                               "cases": {}}
    for case64, case in zip(call_cases(device, torch.float64), call_cases(device, dtype)):
        if progress:
            progress(f"call: {case.name}, K = {case.K}")
        impls64 = case64.call_impls() + [Impl("lean", case64.setup_params, case64.run_lean_call)]
        grads = {impl.name: [g.detach() for g in impl.run(impl.setup())] for impl in impls64}
        impls = case.call_impls() + [Impl("lean", case.setup_params, case.run_lean_call)]
        times = interleaved(impls, reps=reps, warmup=warmup, device=device)
        lean = summarize(times, [("lean", "floor")])
        del times["lean"]  # a reference, reported apart from the two rows the target compares
        results["cases"][f"{case.name}_K{case.K}"] = {
            "description": case.description, "problem": case.name, "K": case.K,
            "check": agreement(grads, AGREEMENT_TOL), "times_s": times,
            **summarize(times, [("implicitgrad", "floor")]),
            "lean": {"median_s": lean["median_s"]["lean"], "ratio_to_floor": lean["ratios"]["lean/floor"],
                     "best_ratio_to_floor": lean["best_ratios"]["lean/floor"]},
        }
    return results
