"""Hessian-vector products to a 1e-6 hypergradient, cold against warm-started CG.

Two outer loops, in float64, each outer step differentiating through an inner solution:

* **HPO** — the per-feature L2 penalties of ``examples/hpo_logreg_l2.py`` (logistic
  regression on the breast-cancer data, 31 unknowns), hypergradient descent with Adam (the
  example's step 0.1, and 0.01: how far the backward system moves per step decides the gain);
  without scikit-learn, the logistic problem of :mod:`bench_backward` at a smaller size.
* **Meta-training** — iMAML on a small MLP: a fixed pool of few-shot tasks that come back
  at every outer step, each task's proximal problem
  ``CE(MLP_φ(X_s), y_s) + λ/2 ‖φ − θ‖²`` solved by gradient descent, Adam on ``θ``.

At each outer step the backward system ``H u = ∇ₓL`` (``H`` the Hessian of the inner
objective at its solution) is solved by ``ig.CG(maxiter=K)`` with a tolerance below
reach, from ``0`` (cold) and from the solution the previous outer step kept (warm: the
previous step's, or the same task's at the previous step), and ``K`` is searched (doubling,
then bisection) for the smallest budget whose hypergradient ``−(∂_θ∇ₓf)ᵀu`` is within
``1e-6`` relative error of the reference (a dense solve up to :data:`DENSE_MAX` unknowns,
CG to a 1e-13 residual above). The products are counted at the matvec, so a warm start
pays for its initial residual ``b − H u₀``. The warm state kept for the next step is the
solution found at that smallest budget (what a solve stopping at the target would keep).

Where ``ig.WarmStart`` exists, the same search also runs through
``ig.implicit_solve(..., warm_start=ig.WarmStart(recycle=RECYCLE, extrapolate=True))`` (the
line through the last two solutions as the start, and the last :data:`RECYCLE` CG directions
as a preconditioner; products: the library's count plus the initial residual), on the HPO
runs with the memories of :data:`SWEEP` as well, and :class:`LibraryPath` repeats the steps
with ``ig.CG(tol=1e-8)`` as a user would run them.
"""

from __future__ import annotations

import copy
import inspect
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from _problems import make_proximal_objective, make_task, mlp_module, mlp_params, proximal_solution

import implicitgrad as ig

HERE = Path(__file__).resolve().parent
TARGET_ERROR = 1e-6
TARGET_RATIO = 2.0  # the target: warm starts need at least 2x fewer products over the HPO run
DENSE_MAX = 1000
TINY_TOL = 1e-30
KMAX = 4096
RECYCLE = 30  # CG directions an ig.WarmStart(recycle=...) keeps across solves
SWEEP = (10, 20, 50)  # other memories measured on the HPO runs
LIBRARY_TOL = 1e-8  # relative residual of the library-path CG solves


class Counter:
    """A matvec that counts its calls."""

    def __init__(self, matvec: Callable) -> None:
        self.matvec, self.calls = matvec, 0

    def __call__(self, p):
        self.calls += 1
        return self.matvec(p)


class System:
    """The backward system of one outer step on a flat vector ``x`` of unknowns.

    ``matvec(p) = H p``, ``b = ∇ₓL``, ``hypergradient(u) = −(∂_θ∇ₓf)ᵀu`` and the
    reference hypergradient, all at the given solution ``x`` and point ``θ``.
    """

    def __init__(self, objective: Callable, outer: Callable, x: torch.Tensor, theta: torch.Tensor) -> None:
        self.objective, self.outer = objective, outer
        self.x = x.detach().requires_grad_(True)
        self.theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            self.g = torch.autograd.grad(objective(self.x, self.theta), self.x, create_graph=True)[0]
            self.b = torch.autograd.grad(outer(self.x), self.x)[0]
        self.reference_u = self._reference()
        self.reference = self.hypergradient(self.reference_u)

    def matvec(self, p: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(self.g, self.x, p, retain_graph=True)[0]

    def hypergradient(self, u: torch.Tensor) -> torch.Tensor:
        return -torch.autograd.grad(self.g, self.theta, u, retain_graph=True)[0]

    def _reference(self) -> torch.Tensor:
        n = self.x.numel()
        if n <= DENSE_MAX:
            eye = torch.eye(n, dtype=self.x.dtype, device=self.x.device)
            hess = torch.stack([self.matvec(e) for e in eye])
            return torch.linalg.solve(0.5 * (hess + hess.T), self.b)
        u, info = ig.CG(maxiter=20 * n, tol=1e-13)(self.matvec, self.b)
        if not info.converged:
            raise RuntimeError(f"the reference CG solve did not converge: {info}")
        return u

    def error(self, u: torch.Tensor) -> float:
        return float((self.hypergradient(u) - self.reference).norm() / self.reference.norm())

    def attempt(self, K: int, init: Optional[torch.Tensor]) -> Tuple[float, int, torch.Tensor]:
        """``(error, products, u)`` of ``K`` CG steps from ``init`` (``None``: from 0)."""
        counter = Counter(self.matvec)
        if K == 0:
            u = torch.zeros_like(self.b) if init is None else init
            if init is not None:
                counter(init)  # the residual b − H u₀ a solver checks before stopping
            return self.error(u), counter.calls, u
        u, _ = ig.CG(maxiter=K, tol=TINY_TOL).solve(counter, self.b, init=init)
        return self.error(u), counter.calls, u

    def attempt_library(self, K: int, ws) -> Tuple[float, int, Any]:
        """``(error, products, ws)`` of ``ig.implicit_solve`` with ``ig.CG(maxiter=K)`` and a copy of
        the ``WarmStart`` ``ws`` (its solution and recycled directions); ``ws`` is left as it was."""
        ws = copy.deepcopy(ws)
        hits = ws.hits
        theta = self.theta.detach().clone().requires_grad_(True)
        x_star = self.x.detach()
        x, info = ig.implicit_solve(self.objective, x_star, theta, solver=lambda *_: x_star,
                                    linear_solver=ig.CG(maxiter=K, tol=TINY_TOL), warm_start=ws,
                                    on_failure="ignore", return_info=True)
        (grad,) = torch.autograd.grad(self.outer(x), theta)
        error = float((grad - self.reference).norm() / self.reference.norm())
        return error, info.backward.iterations + int(ws.hits > hits), ws

    def products_to(self, tol: float, init: Optional[torch.Tensor]) -> Tuple[int, torch.Tensor]:
        """The fewest products of CG from ``init`` whose hypergradient is within ``tol``, and the solution."""
        return smallest_budget(tol, lambda K: self.attempt(K, init), 0 if init is not None else 1)


def smallest_budget(tol: float, attempt: Callable[[int], Tuple[float, int, Any]], first: int) -> Tuple[int, Any]:
    """The fewest products ``attempt(K) -> (error, products, state)`` needs for ``error <= tol``.

    Doubling from ``K = first``, then bisection on the last interval; CG's error is not
    strictly monotone in ``K``, so the result is the smallest budget the search found,
    within a step or two of the true smallest one. Returns ``(products, state)`` there.
    """
    low, high = first - 1, first
    while True:
        err, products, state = attempt(high)
        if err <= tol:
            break
        if high >= KMAX:
            raise RuntimeError(f"CG did not reach a hypergradient error of {tol:g} in {KMAX} steps (error {err:.1e})")
        low, high = high, max(1, 2 * high)
    best = (products, state)
    while high - low > 1:
        mid = (low + high) // 2
        err, products, state = attempt(mid)
        if err <= tol:
            high, best = mid, (products, state)
        else:
            low = mid
    return best


def flat(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflat(vector: torch.Tensor, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, t in like.items():
        out[key] = vector[start:start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


def library_warm_start(recycle: int = RECYCLE):
    """The ``ig.WarmStart`` the library columns measure."""
    return ig.WarmStart(recycle=recycle, extrapolate=True)


def count_step(system: System, state: Dict[str, Any], tol: float, sweep=()) -> Dict[str, Any]:
    """Products cold, warm (CG from the kept solution) and, where ``ig.WarmStart`` exists,
    through the library with :func:`library_warm_start` (and the memories of ``sweep``), at
    one outer step.

    ``state`` holds what the previous step kept (``init``: a solution, ``ws``: a WarmStart)
    and is updated with what this step keeps.
    """
    cold, _ = system.products_to(tol, None)
    warm, kept = system.products_to(tol, state.get("init"))
    ref, init, previous = system.reference_u, state.get("init"), state.get("previous")
    # ig.WarmStart(extrapolate=True)'s start: the line through the last two kept solutions.
    line = init if previous is None else 2 * init - previous
    extrapolated = warm if previous is None else system.products_to(tol, line)[0]
    counts = {"cold": cold, "warm": warm, "extrapolated": extrapolated,
              "start_distance": None if init is None else float((init - ref).norm() / ref.norm()),
              "extrapolated_distance": None if previous is None else float((line - ref).norm() / ref.norm())}
    state["previous"], state["init"] = init, kept.detach()
    if warm_start_supported():
        ws = state.setdefault("ws", library_warm_start())
        counts["recycled"], state["ws"] = smallest_budget(tol, lambda K: system.attempt_library(K, ws), 1)
        counts["sweep"] = {}
        for k in sweep:
            ws = state.setdefault(f"ws{k}", library_warm_start(k))
            counts["sweep"][k], state[f"ws{k}"] = smallest_budget(
                tol, lambda K, ws=ws: system.attempt_library(K, ws), 1)
    return counts


class LibraryPath:
    """The same outer steps through ``ig.implicit_solve`` with ``ig.CG(tol=LIBRARY_TOL)``:
    cold, and with one :func:`library_warm_start` carried along (one per task). Products are the
    library's own count (``info.backward.iterations``) plus one for a warm start's initial
    residual; errors are against the same reference."""

    def __init__(self) -> None:
        self.ws = library_warm_start()
        self.products = {"cold": 0, "warm": 0}
        self.max_error = {"cold": 0.0, "warm": 0.0}

    def step(self, system: System, objective: Callable, outer: Callable) -> None:
        x_star = system.x.detach()
        for kind, ws in (("cold", None), ("warm", self.ws)):
            hits = self.ws.hits
            theta = system.theta.detach().clone().requires_grad_(True)
            x, info = ig.implicit_solve(objective, x_star, theta, solver=lambda _f, _x0, *_p: x_star,
                                        linear_solver=ig.CG(maxiter=KMAX, tol=LIBRARY_TOL), warm_start=ws,
                                        return_info=True)
            (grad,) = torch.autograd.grad(outer(x), theta)
            self.products[kind] += info.backward.iterations + int(self.ws.hits > hits)
            error = float((grad - system.reference).norm() / system.reference.norm())
            self.max_error[kind] = max(self.max_error[kind], error)

    @staticmethod
    def summary(paths: List[LibraryPath]) -> Dict[str, Any]:
        cold = sum(p.products["cold"] for p in paths)
        warm = sum(p.products["warm"] for p in paths)
        return {"tol": LIBRARY_TOL, "cold_total": cold, "warm_total": warm, "ratio": cold / warm,
                "max_error_cold": max(p.max_error["cold"] for p in paths),
                "max_error_warm": max(p.max_error["warm"] for p in paths)}


def warm_start_supported() -> bool:
    return hasattr(ig, "WarmStart") and "warm_start" in inspect.signature(ig.implicit_solve).parameters


def totals(per_step: List[Dict[str, Any]]) -> Dict[str, Any]:
    cold = sum(s["cold"] for s in per_step)
    warm = sum(s["warm"] for s in per_step)
    distances = [d for s in per_step for d in s["start_distance"] if d is not None]
    extrapolated = sum(s["extrapolated"] for s in per_step)
    lines = [d for s in per_step for d in s["extrapolated_distance"] if d is not None]
    out = {"cold_total": cold, "warm_total": warm, "ratio": cold / warm if warm else math.inf,
           "cold": [s["cold"] for s in per_step], "warm": [s["warm"] for s in per_step],
           "median_start_distance": statistics.median(distances) if distances else None, "recycle": None,
           "extrapolated_total": extrapolated, "extrapolated_ratio": cold / extrapolated if extrapolated else math.inf,
           "extrapolated": [s["extrapolated"] for s in per_step],
           "median_extrapolated_distance": statistics.median(lines) if lines else None}
    if all("recycled" in s for s in per_step):
        recycled = sum(s["recycled"] for s in per_step)
        out.update({"recycle": RECYCLE, "extrapolate": True, "recycled_total": recycled,
                    "recycled_ratio": cold / recycled, "recycled": [s["recycled"] for s in per_step]})
        sweep = {k: sum(s["sweep"][k] for s in per_step) for k in per_step[0].get("sweep", {})}
        out["sweep"] = {str(k): {"total": v, "ratio": cold / v} for k, v in {**sweep, RECYCLE: recycled}.items()}
    return out


# ---------------------------------------------------------------------------- HPO


def hpo_problem(seed: int):
    """``(objective(x, θ), outer(x), solve(θ, x0) -> x*, θ0, description)`` of hpo_logreg_l2 on a flat x."""
    examples = str(HERE.parent / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import hpo_logreg_l2 as ex

    data = ex.load_data(100, 200, seed, torch.device("cpu"))
    X, y = data["train"]
    like = ex.zero_model(X)

    def objective(x, theta):
        return ex.inner_objective(unflat(x, like), theta, X, y)

    def outer(x):
        return ex.cross_entropy(unflat(x, like), *data["val"])

    def solve(theta, x0):
        model, _ = ex.fit(theta.detach(), data, unflat(x0, like), ig.CG())
        return flat({k: v.detach() for k, v in model.items()})

    theta0 = torch.zeros(X.shape[1], dtype=ex.DTYPE)
    description = (f"examples/hpo_logreg_l2.py: breast cancer, {len(y)} training examples, {X.shape[1]} penalties, "
                   f"{X.shape[1] + 1} unknowns, L-BFGS inside")
    return objective, outer, solve, theta0, flat(like), description


def fallback_hpo_problem(seed: int):
    """The logistic problem of :mod:`bench_backward` (n = 400, d = 100) when scikit-learn is absent."""
    from _problems import make_logistic

    from implicitgrad.testing.problems import logistic_loss, logistic_objective, logistic_solution

    prob = make_logistic(400, 100, 200, seed, torch.device("cpu"))

    def solve(theta, x0):
        return logistic_solution(theta.detach(), prob.X, prob.y)

    description = "logistic regression (bench_backward's problem, n = 400, d = 100)"
    return (lambda w, t: logistic_objective(w, t, prob.X, prob.y), lambda w: logistic_loss(w, prob.X_val, prob.y_val),
            solve, prob.theta.clone(), torch.zeros(100, dtype=torch.float64), description)


def hpo_run(steps: int, lr: float = 0.1, seed: int = 0, tol: float = TARGET_ERROR,
            progress: Optional[Callable] = None, sweep=SWEEP):
    """Adam with step ``lr`` on the log-penalties; the products of every outer step, cold and warm."""
    try:
        objective, outer, solve, theta, x, description = hpo_problem(seed)
    except ImportError as exc:
        objective, outer, solve, theta, x, description = fallback_hpo_problem(seed)
        description += f" (examples/hpo_logreg_l2.py needs {exc.name})"
    theta = theta.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    per_step: List[Dict[str, Any]] = []
    state: Dict[str, Any] = {}
    library = LibraryPath() if warm_start_supported() else None
    for step in range(steps):
        x = solve(theta, x)
        system = System(objective, outer, x, theta)
        counts = count_step(system, state, tol, sweep)
        if library is not None:
            library.step(system, objective, outer)
        counts["start_distance"] = [counts["start_distance"]]
        counts["extrapolated_distance"] = [counts["extrapolated_distance"]]
        per_step.append(counts)
        optimizer.zero_grad()
        theta.grad = system.reference.detach().clone()
        optimizer.step()
        if progress and (step + 1) % max(1, steps // 5) == 0:
            progress(f"warm: HPO (lr {lr:g}) step {step + 1}/{steps}, products " + ", ".join(
                f"{k} {v}" for k, v in counts.items() if not k.endswith("distance")))
    return {"description": f"{description}, Adam (lr {lr:g}) on log λ", "steps": steps, "lr": lr,
            **totals(per_step), "library": None if library is None else LibraryPath.summary([library])}


# ---------------------------------------------------------------------------- meta-training


def meta_run(steps: int, tasks: int, sizes=(16, 32, 32, 4), shots: int = 5, lam: float = 2.0, seed: int = 0,
             tol: float = TARGET_ERROR, progress: Optional[Callable] = None):
    """iMAML on a pool of ``tasks`` tasks, all of them in every meta-batch; one warm state per task."""
    theta_dict = mlp_params(sizes, seed, torch.float64, "cpu")
    pool = [make_task(sizes[-1], shots, 3 * shots, sizes[0], seed + 1 + i, torch.float64, "cpu")
            for i in range(tasks)]
    proximal = make_proximal_objective(lam)
    theta = flat(theta_dict).requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=1e-2)
    states: List[Dict[str, Any]] = [{} for _ in range(tasks)]
    libraries = [LibraryPath() for _ in range(tasks)] if warm_start_supported() else None
    phis = [None] * tasks
    per_step = []
    for step in range(steps):
        meta_grad = torch.zeros_like(theta)
        counts: Dict[str, Any] = {"start_distance": [], "extrapolated_distance": []}
        center = unflat(theta.detach(), theta_dict)

        def centered(phi, _start, X, y, center=center):
            return proximal(phi, center, X, y)

        for i, task in enumerate(pool):
            # Gradient descent on the proximal problem around θ, from the task's previous solution.
            start = center if phis[i] is None else unflat(phis[i], theta_dict)
            phi = flat(proximal_solution(centered, start, task, lr=0.2, steps=200))
            phis[i] = phi

            def objective(x, th, task=task):
                return proximal(unflat(x, theta_dict), unflat(th, theta_dict), task.X_s, task.y_s)

            def outer(x, task=task):
                from _problems import mlp_forward

                return torch.nn.functional.cross_entropy(mlp_forward(unflat(x, theta_dict), task.X_q), task.y_q)

            system = System(objective, outer, phi, theta)
            task_counts = count_step(system, states[i], tol)
            if libraries is not None:
                libraries[i].step(system, objective, outer)
            counts["start_distance"].append(task_counts.pop("start_distance"))
            counts["extrapolated_distance"].append(task_counts.pop("extrapolated_distance"))
            task_counts.pop("sweep", None)
            for key, value in task_counts.items():
                counts[key] = counts.get(key, 0) + value
            meta_grad += system.reference.detach() / tasks
        per_step.append(counts)
        optimizer.zero_grad()
        theta.grad = meta_grad
        optimizer.step()
        if progress:
            progress(f"warm: meta step {step + 1}/{steps}, products " + ", ".join(f"{k} {v}" for k, v in counts.items()
                                                                                 if not k.endswith("distance")))
    n_params = theta.numel()
    description = (f"iMAML, MLP {'-'.join(map(str, sizes))} ({n_params} parameters), pool of {tasks} "
                   f"{sizes[-1]}-way {shots}-shot tasks (all in every meta-batch), λ = {lam}, Adam (lr 0.01)")
    return {"description": description, "steps": steps, "tasks": tasks, **totals(per_step),
            "library": None if libraries is None else LibraryPath.summary(libraries)}


def imaml_run(steps: int, tasks: int, sizes=(16, 32, 32, 4), shots: int = 5, lam: float = 2.0, seed: int = 0,
              progress: Optional[Callable] = None) -> Dict[str, Any]:
    """``ig.meta.IMAML`` itself on the MLP and task pool of :func:`meta_run` (all tasks in
    every meta-batch), with ``ig.CG(tol=LIBRARY_TOL)`` and L-BFGS inside: one learner per
    configuration of ``warm_start``, all on the same model, which Adam (step 0.01) moves
    by the cold meta-gradient. Backward products over the run as each learner counts them
    (``info.backward.iterations``), and the largest relative difference of a warm-started
    meta-gradient from the cold one at the same step."""
    from implicitgrad.meta import IMAML

    pool = [make_task(sizes[-1], shots, 3 * shots, sizes[0], seed + 1 + i, torch.float64, "cpu")
            for i in range(tasks)]
    batch = [(t.X_s, t.y_s, t.X_q, t.y_q) for t in pool]
    model = mlp_module(sizes).double()
    model.load_state_dict(mlp_params(sizes, seed, torch.float64, "cpu"))  # meta_run's MLP and start
    configs = {"False": False, "True": True, f"ig.WarmStart(recycle={RECYCLE}, extrapolate=True)": library_warm_start()}
    learners = {name: IMAML(model, torch.nn.functional.cross_entropy, lam=lam, batched=False,
                            inner_solver=ig.solvers.LBFGS(maxiter=1000, tol=1e-8),
                            linear_solver=ig.CG(maxiter=KMAX, tol=LIBRARY_TOL), warm_start=warm)
                for name, warm in configs.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    products = dict.fromkeys(configs, 0)
    worst = dict.fromkeys(configs, 0.0)
    for step in range(steps):
        grads, cold_dict = {}, {}
        for name, learner in learners.items():
            g, _ = learner.meta_gradient(batch)
            cold_dict = cold_dict or dict(g)
            grads[name] = torch.cat([v.detach().reshape(-1) for v in g.values()])
            products[name] += sum(info.backward.iterations for info in learner.last_info)
        cold = grads["False"]
        for name, g in grads.items():
            worst[name] = max(worst[name], float((g - cold).norm() / cold.norm()))
        optimizer.zero_grad()
        for key, p in model.named_parameters():
            p.grad = cold_dict[key].detach().clone()
        optimizer.step()
        if progress:
            counts = ", ".join(f"{k} {v}" for k, v in products.items())
            progress(f"warm: IMAML step {step + 1}/{steps}, products {counts}")
    return {"steps": steps, "tasks": tasks, "tol": LIBRARY_TOL, "products": products, "max_difference": worst,
            "ratio": {name: products["False"] / n for name, n in products.items()}}


def run(device, quick: bool, reps: int, warmup: int, progress: Optional[Callable] = None) -> Dict[str, Any]:
    """Both runs; products are counted, not timed, in float64 on the CPU (``device``, ``reps``, ``warmup`` unused)."""
    del device, reps, warmup
    torch.manual_seed(0)
    if quick:
        hpo = hpo_run(6, progress=progress)
        hpo_small = hpo_run(6, lr=0.01, progress=progress)
        meta = meta_run(2, 2, sizes=(8, 16, 3), progress=progress)
        imaml = imaml_run(3, 2, sizes=(8, 16, 3), progress=progress)
    else:
        hpo = hpo_run(50, progress=progress)
        hpo_small = hpo_run(50, lr=0.01, progress=progress)
        meta = meta_run(10, 4, progress=progress)
        imaml = imaml_run(10, 4, progress=progress)
    return {"target_error": TARGET_ERROR, "target_ratio": TARGET_RATIO, "hpo": hpo, "hpo_small_steps": hpo_small,
            "meta": meta, "imaml": imaml}
