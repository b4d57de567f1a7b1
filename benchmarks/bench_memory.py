"""Meta-gradient memory and time against the number of inner steps T.

One few-shot task on the MLP of :mod:`_problems` (5-way 5-shot), three meta-gradients
``∂ L_query / ∂θ``:

* ``imaml``: implicitgrad on the proximal problem ``CE_support(φ) + λ/2 ‖φ − θ‖²``,
  inner ``ig.solvers.GradientDescent(lr, maxiter=T, tol=0)``, backward by ``K`` CG steps
  (what ``ig.meta.IMAML`` computes);
* ``maml``: implicitgrad in ``mode="unrolled"`` on ``CE_support(φ)`` from ``φ₀ = θ``, the
  same gradient descent differentiated through its ``T`` steps (MAML);
* ``maml_higher``: the same MAML meta-gradient with ``higher.innerloop_ctx`` and SGD.

Peak memory: each (method, T) runs in a fresh subprocess (``python bench_memory.py
--worker '{json}'``) that builds everything, warms up on one step, then measures one
meta-gradient with :func:`_timing.measure_peak`; a full run repeats this in three fresh
processes and reports the median. Time: all methods interleaved in the
parent process for each T.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from _problems import make_proximal_objective, make_task, mlp_forward, mlp_module, mlp_params, support_loss
from _timing import Impl, agreement, interleaved, measure_peak, summarize, sync

import implicitgrad as ig

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import higher
except ImportError:
    higher = None

SIZES = (64, 256, 256, 5)
SHOTS = 5
LAM = 1.0
INNER_LR = 0.1
CG_STEPS = 10
STEPS_FULL = (5, 10, 20, 50, 100, 200)
STEPS_QUICK = (10, 20)
METHODS = ("imaml", "maml", "maml_higher")
MEMORY_REPEATS = 3  # fresh processes per configuration in a full run; the median is reported

# Targets of the issue.
TARGET_FLAT = 1.25  # iMAML peak at T = 200 within this factor of T = 10
TARGET_VS_MAML = 0.2  # iMAML peak at T = 200 at most this fraction of MAML's


class MetaGradient:
    """Builds the task once; ``method(T)`` returns a function computing the meta-gradient."""

    def __init__(self, device, dtype, seed: int = 0) -> None:
        self.device = torch.device(device)
        self.theta = mlp_params(SIZES, seed, dtype, self.device)
        self.keys = list(self.theta)
        self.task = make_task(SIZES[-1], SHOTS, 3 * SHOTS, SIZES[0], seed + 1, dtype, self.device)
        self.proximal = make_proximal_objective(LAM)
        if higher is not None:
            self.module = mlp_module(SIZES).to(dtype=dtype, device=self.device)
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    p.copy_(self.theta[name])

    def query_loss(self, phi) -> torch.Tensor:
        return F.cross_entropy(mlp_forward(phi, self.task.X_q), self.task.y_q)

    def imaml(self, T: int) -> List[torch.Tensor]:
        theta = {k: v.detach().clone().requires_grad_(True) for k, v in self.theta.items()}
        phi = ig.implicit_solve(
            self.proximal, {k: v.detach().clone() for k, v in theta.items()}, theta, self.task.X_s, self.task.y_s,
            solver=ig.solvers.GradientDescent(lr=INNER_LR, maxiter=T, tol=0),
            linear_solver=ig.CG(maxiter=CG_STEPS, tol=1e-30), on_failure="ignore",
        )
        return list(torch.autograd.grad(self.query_loss(phi), list(theta.values())))

    def maml(self, T: int) -> List[torch.Tensor]:
        theta = {k: v.detach().clone().requires_grad_(True) for k, v in self.theta.items()}
        phi = ig.implicit_solve(
            support_loss, theta, self.task.X_s, self.task.y_s,
            solver=ig.solvers.GradientDescent(lr=INNER_LR, maxiter=T, tol=0), mode="unrolled", on_failure="ignore",
        )
        return list(torch.autograd.grad(self.query_loss(phi), list(theta.values())))

    def maml_higher(self, T: int) -> List[torch.Tensor]:
        params = list(self.module.parameters())
        opt = torch.optim.SGD(params, lr=INNER_LR)
        with higher.innerloop_ctx(self.module, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(T):
                diffopt.step(F.cross_entropy(fmodel(self.task.X_s), self.task.y_s))
            loss = F.cross_entropy(fmodel(self.task.X_q), self.task.y_q)
            return list(torch.autograd.grad(loss, params))

    def available(self) -> List[str]:
        return [m for m in METHODS if m != "maml_higher" or higher is not None]

    def call(self, method: str, T: int) -> Callable[[], Any]:
        fn = getattr(self, method)
        return lambda: fn(T)


def _ignore_state(fn: Callable[[], Any]) -> Callable[[Any], Any]:
    return lambda _state: fn()


def worker(config: Dict[str, Any]) -> Dict[str, Any]:
    """Peak memory of one (method, T) — run in its own process."""
    torch.set_num_threads(config.get("threads") or torch.get_num_threads())
    device = torch.device(config["device"])
    meta = MetaGradient(device, getattr(torch, config["dtype"]))
    run = meta.call(config["method"], 1)
    run()  # warm-up: lazy initialisation of autograd, threads and kernels
    out = measure_peak(meta.call(config["method"], config["T"]), device)
    sync(device)
    out.update({"method": config["method"], "T": config["T"]})
    return out


def measure_in_subprocess(method: str, T: int, device, dtype: str, threads: Optional[int]) -> Dict[str, Any]:
    config = json.dumps({"method": method, "T": T, "device": str(device), "dtype": dtype, "threads": threads})
    # A fixed mmap threshold makes glibc hand every tensor above 64 KiB straight back to the
    # system when freed, so the resident size follows live memory instead of heap reuse.
    env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="65536")
    # The worker imports implicitgrad from this checkout, as run.py does, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", config],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {method} T={T} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(device) -> Optional[Dict[str, Any]]:
    """float64: implicitgrad's unrolled MAML against higher's, at T = 5 (None without higher)."""
    if higher is None:
        return None
    meta = MetaGradient(device, torch.float64)
    results = {m: meta.call(m, 5)() for m in meta.available() if m != "imaml"}
    return agreement(results, 1e-10)


def run(device, quick: bool, reps: int, warmup: int, threads: Optional[int] = None,
        dtype=torch.float32, progress: Optional[Callable] = None) -> Dict[str, Any]:
    if higher is None:
        print("note: higher is not installed; the higher MAML baseline is skipped (pip install higher).")
    steps = STEPS_QUICK if quick else STEPS_FULL
    repeats = 1 if quick else MEMORY_REPEATS
    dtype_name = str(dtype).replace("torch.", "")
    meta = MetaGradient(device, dtype)
    methods = meta.available()
    out: Dict[str, Any] = {
        "steps": list(steps), "methods": methods, "check": check(device),
        "setup": {"mlp": list(SIZES), "parameters": sum(t.numel() for t in meta.theta.values()),
                  "shots": SHOTS, "lambda": LAM, "inner_lr": INNER_LR, "cg_steps": CG_STEPS, "dtype": dtype_name},
        "memory_repeats": repeats,
        "peak_mib": {m: {} for m in methods}, "peak_mib_runs": {m: {} for m in methods},
        "median_s": {m: {} for m in methods}, "ratios": {},
    }
    for T in steps:
        if progress:
            progress(f"memory/time: T = {T}")
        for method in methods:
            runs = [measure_in_subprocess(method, T, device, dtype_name, threads) for _ in range(repeats)]
            out["peak_mib"][method][T] = statistics.median(r["peak_mib"] for r in runs)
            out["peak_mib_runs"][method][T] = [r["peak_mib"] for r in runs]
            out["memory_measure"] = runs[0]["how"]
        impls = [Impl(m, lambda: None, _ignore_state(meta.call(m, T))) for m in methods]
        times = interleaved(impls, reps=reps, warmup=warmup, device=device)
        summary = summarize(times, [("imaml", "maml"), ("maml", "maml_higher")])
        for m in methods:
            out["median_s"][m][T] = summary["median_s"][m]
        out["ratios"][T] = summary["ratios"]
    peaks = out["peak_mib"]
    top = max(steps)
    out["max_T"] = top
    out["imaml_flatness"] = peaks["imaml"][top] / max(peaks["imaml"][10], 1e-9)
    out["imaml_vs_maml_at_max_T"] = peaks["imaml"][top] / max(peaks["maml"][top], 1e-9)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="JSON", required=True, help="configuration of one measurement")
    args = parser.parse_args()
    print(json.dumps(worker(json.loads(args.worker))))


if __name__ == "__main__":
    main()
